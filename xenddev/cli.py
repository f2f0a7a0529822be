# -*- test-case-name: tests.test_cli -*-
"""
C{xenddev}: the command-line client (xl's and xm's device commands).

It talks XML-RPC to the daemon over its UNIX socket through
L{xenddev.rpcclient}, which needs only C extension modules of the standard
library: no Twisted, no C{xmlrpc.client}/C{http.client} and no attrs are
imported in this process.  Start-up matters: the client runs once per
command, and in a dom0 emulated by QEMU every module costs file look-ups
over 9p and interpreted bytecode.  So this module imports only C{os} and
C{sys} at first, and each command imports what it needs: the daemon checks
a disk spec (the same parser, before anything is written) so a plain
C{block-attach} never loads L{xenddev.diskspec}; only C{--dry-run} does.
C{tests/test_cli.py} checks which modules a command loads.

Exit codes (see C{docs/cli.md}): L{EXIT_CODES} maps each fault code of
L{xenddev.xmlrpc} to one; 2 is a usage error; 10 means the daemon could not
be reached.
"""

from __future__ import annotations

import os
import sys
import time

from xenddev import __version__

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    import xmlrpc.client
    from collections.abc import Callable, Mapping, Sequence
    from typing import Any, TextIO

    from xenddev.diskspec import DiskSpec

ROOT_SOCKET = "/var/run/xenddev/xenddev.sock"
USER_SOCKET = "./run/xenddev.sock"
DEFAULT_TIMEOUT = 300.0
#: The longest --timeout and status --wait accepted (about 11.6 days).
MAX_SECONDS = 1e6
#: The highest guest domain id, as the daemon's C{xenddev.xmlrpc.DOMID_MAX}
#: (DOMID_FIRST_RESERVED - 1; a test checks that they agree).
DOMID_MAX = 0x7FEF
#: The largest device number (libxl's INT_MAX, the daemon's limit).
DEVID_MAX = 2**31 - 1

EXIT_OK = 0
EXIT_FAILED = 1  # the operation failed (fault 2), or an unknown fault
EXIT_USAGE = 2  # bad command line (argparse)
EXIT_NO_DOMAIN = 3  # fault 3
EXIT_BAD_CONFIG = 4  # fault 10, or a bad disk spec found locally
EXIT_NO_DEVICE = 5  # fault 11
EXIT_EXISTS = 6  # fault 12
EXIT_TIMEOUT = 7  # fault 13, or the daemon did not answer in time
EXIT_PERMISSION = 8  # fault 14, or the socket refused us
EXIT_HOTPLUG = 9  # fault 15
EXIT_UNREACHABLE = 10  # no daemon on the socket; fault 16 (daemon unavailable)
EXIT_INTERNAL = 11  # fault 1 (daemon bug), or a protocol error (faults 8001, 8002)

#: Fault code → exit code.
EXIT_CODES = {
    1: EXIT_INTERNAL,
    2: EXIT_FAILED,
    3: EXIT_NO_DOMAIN,
    10: EXIT_BAD_CONFIG,
    11: EXIT_NO_DEVICE,
    12: EXIT_EXISTS,
    13: EXIT_TIMEOUT,
    14: EXIT_PERMISSION,
    15: EXIT_HOTPLUG,
    16: EXIT_UNREACHABLE,
    8001: EXIT_INTERNAL,
    8002: EXIT_INTERNAL,
}
_XM_MODES = ("r", "w", "w!")


def defaultSocket(env: Mapping[str, str] | None = None) -> str:
    """C{XENDDEV_SOCKET}, else the root or per-user default."""
    env = os.environ if env is None else env
    if env.get("XENDDEV_SOCKET"):
        return env["XENDDEV_SOCKET"]
    return ROOT_SOCKET if os.geteuid() == 0 else USER_SOCKET


def serverProxy(path: str, timeout: float | None = DEFAULT_TIMEOUT) -> xmlrpc.client.ServerProxy:
    """
    The standard library's C{ServerProxy} for the daemon on socket C{path},
    for scripts and tests (see L{xenddev.rpcclient.serverProxy}); close it
    with C{proxy("close")()}.
    """
    from xenddev import rpcclient

    return rpcclient.serverProxy(path, timeout)


class CommandError(Exception):
    """A failure to report as one line with an exit code."""

    def __init__(self, message: str, exitCode: int) -> None:
        super().__init__(message)
        self.message = message
        self.exitCode = exitCode


# Disks


def isXmForm(args: Sequence[str]) -> bool:
    """
    Whether C{block-attach} got xm's C{<uname> <dev> <mode> [backdom]}:
    three or four words, none a C{key=value}, the first a C{type:params}
    uname (or empty, a cdrom drive) and the third a mode.
    """
    if len(args) not in (3, 4) or args[2] not in _XM_MODES:
        return False
    if any("=" in a for a in args[:2]):
        return False
    uname = args[0]
    return uname == "" or (":" in uname and uname.split(":", 1)[0].isalnum())


def diskJson(spec: DiskSpec) -> dict[str, Any]:
    """The parsed disk with the keys C{--dry-run} prints (unset, default-less keys left out)."""
    out: dict[str, Any] = {
        "target": spec.target,
        "format": spec.format,
        "vdev": spec.vdev,
        "access": spec.access,
        "devtype": spec.devtype,
        "backend": spec.backendDomain,
        "backendtype": spec.backendType,
        "script": spec.script,
        # xl-disk-configuration(5): discard and trusted are on by default.
        "discard": True if spec.discard is None else spec.discard,
        "trusted": True if spec.trusted is None else spec.trusted,
        "direct-io-safe": spec.directIoSafe,
        "virtual-device": spec.devid,
    }
    return {k: v for k, v in out.items() if v is not None}


def blockConfig(args: Sequence[str]) -> dict[str, Any]:
    """
    The C{device.attach} config for C{block-attach}'s arguments, in either
    form, unparsed: the daemon parses it with L{xenddev.diskspec} and refuses
    a bad one (fault 10, xl's message) before writing anything.
    """
    if isXmForm(args):
        config: dict[str, Any] = {"uname": args[0], "dev": args[1], "mode": args[2]}
        if len(args) == 4:
            config["backend"] = args[3]
        return config
    return {"spec": ",".join(args)}


def parseBlockArgs(args: Sequence[str]) -> tuple[DiskSpec, dict[str, Any]]:
    """
    Both forms of C{block-attach} arguments → (spec, the config to send),
    parsed here as the daemon would (for C{--dry-run}).
    """
    from xenddev.diskspec import DiskError, VdevError, parseDiskSpec, parseXendDisk

    config = blockConfig(args)
    try:
        if "spec" in config:
            spec = parseDiskSpec(config["spec"])
            spec.devid  # noqa: B018 -- validates the vdev number
        else:
            spec = parseXendDisk(
                config["uname"] or None,
                config["dev"],
                config["mode"],
                backend=config.get("backend"),
            )
    except (DiskError, VdevError) as e:
        raise CommandError(str(e), EXIT_BAD_CONFIG) from None
    return spec, config


#: Longer decimal numbers are beyond every bound here (and int() refuses
#: past 4300 digits).
_MAX_DIGITS = 18


def _decimal(text: str) -> int | None:
    """
    C{text} as a number if it is all ASCII digits, else None; a number of
    more than L{_MAX_DIGITS} digits comes back as 10**L{_MAX_DIGITS}.
    """
    if not (text.isascii() and text.isdigit()):
        return None
    digits = text.lstrip("0") or "0"
    return int(digits) if len(digits) <= _MAX_DIGITS else 10**_MAX_DIGITS


def domainArgument(text: str) -> int | str:
    """
    The domain argument: a domain id (0..L{DOMID_MAX}), or a name the daemon
    resolves.

    @raise CommandError: an id beyond the range (exit 3, as the daemon's
        fault for it).
    """
    number = _decimal(text)
    if number is None:
        return text
    if number > DOMID_MAX:
        raise CommandError(f"invalid domain id {text}: must be 0..{DOMID_MAX}", EXIT_NO_DOMAIN)
    return number


def deviceArgument(text: str) -> int | str:
    """
    A device argument: a device number (0..L{DEVID_MAX}), or a name the
    daemon resolves (xvdb, /dev/xvdb, a MAC).

    @raise CommandError: a number beyond the range (exit 4, as the daemon's
        fault for it).
    """
    number = _decimal(text)
    if number is None:
        return text
    if number > DEVID_MAX:
        raise CommandError(
            f"invalid device {text}: a device number is at most {DEVID_MAX}", EXIT_BAD_CONFIG
        )
    return number


def hostArgument(text: str, what: str) -> str:
    """
    A pool host name (1-64 letters, digits, C{.}, C{_} or C{-}, starting
    with a letter or digit), checked here as the daemon checks it.

    @raise CommandError: naming C{what} (exit 4, as the daemon's fault).
    """
    ok = 0 < len(text) <= 64 and text.isascii() and text[0].isalnum()
    if not ok or not all(c.isalnum() or c in "._-" for c in text):
        raise CommandError(
            f"{what} {text!r}: a pool host name is 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit",
            EXIT_BAD_CONFIG,
        )
    return text


def _socketPath(text: str) -> str:
    """An argparse type: a socket path (not empty, no NUL)."""
    import argparse

    if not text or "\0" in text:
        raise argparse.ArgumentTypeError(f"expected the path of a UNIX socket, not {text!r}")
    return text


def _seconds(minimum: float, inclusive: bool) -> Callable[[str], float]:
    """An argparse type: a finite number of seconds from C{minimum} to L{MAX_SECONDS}."""
    import argparse

    def seconds(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        below = value < minimum if inclusive else value <= minimum
        if not value == value or below or value > MAX_SECONDS:  # NaN compares unequal
            relation = "at least" if inclusive else "more than"
            raise argparse.ArgumentTypeError(
                f"expected seconds, {relation} {minimum:g} and at most {MAX_SECONDS:g}, "
                f"not {text!r}"
            )
        return value

    return seconds


# Output


def _cell(row: Mapping[str, Any], key: str) -> Any:
    value = row.get(key)
    return -1 if value is None else value


def blockTable(rows: Sequence[Mapping[str, Any]]) -> str:
    """xl block-list's table."""
    lines = [
        f"{'Vdev':<5} {'BE':<3} {'handle':<6} {'state':<5} {'evt-ch':<6} "
        f"{'ring-ref':<8} {'BE-path':<30}".rstrip()
    ]
    for r in rows:
        lines.append(
            f"{_cell(r, 'devid')!s:<5} {_cell(r, 'backend-id')!s:<3} "
            f"{_cell(r, 'handle')!s:<6} {_cell(r, 'state')!s:<5} "
            f"{_cell(r, 'event-channel')!s:<6} {_cell(r, 'ring-ref')!s:<8} "
            f"{r.get('backend-path') or '-'}"
        )
    return "\n".join(lines) + "\n"


def networkTable(rows: Sequence[Mapping[str, Any]]) -> str:
    """xl network-list's table."""
    lines = [
        f"{'Idx':<3} {'BE':<2} {'Mac Addr.':<17} {'handle':<6} {'state':<5} "
        f"{'evt-ch':<6} {'tx-':>5}/{'rx-ring-ref':<11} {'BE-path':<30}".rstrip()
    ]
    for r in rows:
        lines.append(
            f"{_cell(r, 'devid')!s:<3} {_cell(r, 'backend-id')!s:<2} "
            f"{r.get('mac') or '-':<17} {_cell(r, 'handle')!s:<6} "
            f"{_cell(r, 'state')!s:<5} {_cell(r, 'event-channel')!s:<6} "
            f"{_cell(r, 'tx-ring-ref')!s:>5}/{_cell(r, 'rx-ring-ref')!s:<11} "
            f"{r.get('backend-path') or '-'}"
        )
    return "\n".join(lines) + "\n"


def hostsTable(hosts: Sequence[Mapping[str, Any]]) -> str:
    """
    C{pool-hosts}' table: name (this host starred), state, lease seconds
    left, pid, its devices (how many; of them holding a storage target).
    """
    lines = [f"{'Name':<24} {'State':<12} {'TTL':>4} {'PID':>7} {'Devices':>7} {'Storage':>7}"]
    for h in hosts:
        name = f"{h.get('name', '?')}{' *' if h.get('self') else ''}"
        ttl = h.get("ttl")
        devices = h.get("devices")
        count = storage = "-"
        if isinstance(devices, list):
            count = str(len(devices))
            storage = str(sum(1 for d in devices if isinstance(d, dict) and d.get("target")))
        lines.append(
            f"{name:<24} {h.get('state', '-')!s:<12} {'-' if ttl is None else ttl!s:>4} "
            f"{h.get('pid', '-')!s:>7} {count:>7} {storage:>7}"
        )
    return "\n".join(lines) + "\n"


def whereText(where: Mapping[str, Any]) -> str:
    """C{vdi-where}'s answer: the target, its writer, its readers, this host's devices."""

    def holder(h: Mapping[str, Any]) -> str:
        token = h.get("token")
        return f"{h.get('host')}" + (f" (token {token})" if token else "")

    writer = where.get("writer")
    readers = [holder(r) for r in where.get("readers") or []]
    devices = [
        f"domain {d.get('domain')} {d.get('device')} {d.get('mode')}"
        + (f" (token {d['token']})" if d.get("token") else "")
        for d in where.get("devices") or []
    ]
    return (
        f"target   {where.get('target')}\n"
        f"writer   {holder(writer) if writer else '-'}\n"
        f"readers  {', '.join(readers) or '-'}\n"
        f"devices  {'; '.join(devices) or '-'}\n"
    )


def migrationText(m: Mapping[str, Any]) -> str:
    """A migration's state (C{migrate-*}): the guest, the source, its disks, the handover."""
    lines = [f"guest {m.get('domain')} from host {m.get('from')}: {m.get('state')}"]
    moved = m.get("moved") or {}
    for d in m.get("devices") or []:
        target = d.get("target") or "-"
        token = moved.get(target) or (d.get("token") if d.get("token") not in ("0", 0) else None)
        lines.append(
            f"  {d.get('class')} {d.get('devid')}  {target}  {d.get('mode') or '-'}"
            + (f"  token {token}" if token else "")
        )
    timings = m.get("timings-ms") or {}
    if timings:
        lines.append(
            f"handover window {timings.get('window', 0):.1f} ms (release "
            f"{timings.get('release', 0):.1f}, keys {timings.get('handover', 0):.1f}, "
            f"activate {timings.get('activate', 0):.1f})"
        )
    if m.get("reinstated") is False:
        lines.append("the source could not be asked to activate its disks again")
    return "\n".join(lines) + "\n"


# Commands


class Client:
    """Runs one command against the daemon."""

    def __init__(self, opts: argparse.Namespace, out: TextIO) -> None:
        self.opts = opts
        self.out = out

    def call(self, method: str, *args: Any) -> Any:
        """One XML-RPC call; failures become L{CommandError}s."""
        from xenddev import rpcclient

        path = self.opts.socket
        try:
            return rpcclient.call(path, method, args, self.opts.timeout)
        except rpcclient.Fault as f:
            raise CommandError(
                str(f.faultString), EXIT_CODES.get(f.faultCode, EXIT_FAILED)
            ) from None
        except (FileNotFoundError, ConnectionRefusedError):
            raise CommandError(
                f"cannot reach the xenddev daemon at {path} (is it running? "
                "see --socket and XENDDEV_SOCKET)",
                EXIT_UNREACHABLE,
            ) from None
        except PermissionError:
            raise CommandError(
                f"permission denied on the daemon socket {path} (root only by default)",
                EXIT_PERMISSION,
            ) from None
        except TimeoutError:
            raise CommandError(
                f"the daemon did not answer within {self.opts.timeout:g} s", EXIT_TIMEOUT
            ) from None
        except (OSError, rpcclient.ProtocolError) as e:
            raise CommandError(
                f"talking to the daemon at {path} failed: {e}", EXIT_UNREACHABLE
            ) from None
        except (ValueError, TypeError) as e:  # checkArguments lets nothing through
            raise CommandError(f"cannot send the request: {e}", EXIT_USAGE) from None

    def emit(self, data: Any, text: str | None) -> None:
        """JSON with --json, else the text (if any)."""
        if self.opts.json:
            import json

            self.out.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
        elif text:
            self.out.write(text if text.endswith("\n") else text + "\n")

    def dom(self) -> int | str:
        """The domain argument: a number, or a name the daemon resolves."""
        return domainArgument(self.opts.dom)

    def blockAttach(self) -> None:
        """block-attach."""
        dom = self.dom()
        if self.opts.dry_run:
            import json

            disk = diskJson(parseBlockArgs(self.opts.disk)[0])
            self.emit(disk, json.dumps(disk, indent=2, sort_keys=True))
            return
        result = self.call("device.attach", dom, "vbd", blockConfig(self.opts.disk))
        self.emit(result, None)

    def blockDetach(self) -> None:
        """block-detach."""
        self.call(
            "device.detach", self.dom(), "vbd", deviceArgument(self.opts.dev), self.opts.force
        )
        self.emit({"detached": True}, None)

    def blockList(self) -> None:
        """block-list."""
        rows = self.call("device.list", self.dom(), "vbd")
        self.emit(rows, blockTable(rows))

    def cdInsert(self) -> None:
        """cd-insert: a new medium in a cdrom drive (xl's command)."""
        self._changeMedium(self.opts.target)

    def cdEject(self) -> None:
        """cd-eject: empty a cdrom drive (xl's command)."""
        self._changeMedium("")

    def _changeMedium(self, target: str) -> None:
        # The daemon parses the spec (and refuses a bad target or vdev, fault
        # 10) and resolves the drive's name, before it writes anything.
        dom = self.dom()
        vdev = self.opts.vdev.removeprefix("/dev/")
        spec = f"{target},{vdev}:cdrom,r"
        result = self.call("device.configure", dom, "vbd", deviceArgument(vdev), {"spec": spec})
        self.emit(result, None)

    def networkAttach(self) -> None:
        """network-attach."""
        config: dict[str, str] = {}
        for item in self.opts.settings:
            key, eq, value = item.partition("=")
            if not eq or not key:
                raise CommandError(f"expected key=value, not {item!r}", EXIT_USAGE)
            if key in config:
                raise CommandError(f"{key} given twice", EXIT_USAGE)
            config[key] = value
        result = self.call("device.attach", self.dom(), "vif", config)
        self.emit(result, None)

    def networkDetach(self) -> None:
        """network-detach."""
        self.call(
            "device.detach", self.dom(), "vif", deviceArgument(self.opts.dev), self.opts.force
        )
        self.emit({"detached": True}, None)

    def networkList(self) -> None:
        """network-list."""
        rows = self.call("device.list", self.dom(), "vif")
        self.emit(rows, networkTable(rows))

    def poolHosts(self) -> None:
        """pool-hosts."""
        hosts = self.call("pool.hosts")
        self.emit(hosts, hostsTable(hosts))

    def vdiWhere(self) -> None:
        """vdi-where."""
        where = self.call("pool.where", self.opts.target)
        self.emit(where, whereText(where))

    def migratePrepare(self) -> None:
        """migrate-prepare (on the destination)."""
        source = hostArgument(self.opts.source, "--from")
        dom = self.dom()
        sourceDom = domainArgument(self.opts.source_dom) if self.opts.source_dom else dom
        result = self.call("migrate.prepare", source, sourceDom, dom)
        self.emit(result, migrationText(result))

    def migrateCommit(self) -> None:
        """migrate-commit (on the destination)."""
        result = self.call("migrate.commit", self.dom())
        self.emit(result, migrationText(result))

    def migrateAbort(self) -> None:
        """migrate-abort (on the destination)."""
        result = self.call("migrate.abort", self.dom())
        self.emit(result, migrationText(result))

    def status(self) -> None:
        """status (with --wait, retry until the daemon answers or time runs out)."""
        deadline = time.monotonic() + self.opts.wait
        while True:
            try:
                info = self.call("daemon.status")
                break
            except CommandError as e:
                if e.exitCode != EXIT_UNREACHABLE or time.monotonic() >= deadline:
                    raise
                time.sleep(0.1)
        text = (
            f"xenddev {info.get('version')} running (pid {info.get('pid')}, "
            f"up {info.get('uptime', 0):.0f} s) on {self.opts.socket}\n"
            f"device classes: {' '.join(info.get('classes', []))}\n"
            f"operations in flight: {info.get('in-flight', 0)}"
        )
        self.emit({**info, "socket": self.opts.socket}, text)


def _terminalColumns() -> int:
    """The terminal's width as C{shutil.get_terminal_size} finds it (C{COLUMNS}, stdout, 80)."""
    columns = os.environ.get("COLUMNS", "")
    if columns.isascii() and columns.isdigit() and int(columns) > 0:
        return int(columns)
    stdout = sys.__stdout__
    try:
        return (stdout and os.get_terminal_size(stdout.fileno()).columns) or 80
    except (ValueError, OSError):  # closed, detached, not a terminal
        return 80


def buildParser(
    stdout: TextIO | None = None, stderr: TextIO | None = None
) -> argparse.ArgumentParser:
    """The argument parser (every command has --help); it prints to the given streams."""
    import argparse

    class Formatter(argparse.HelpFormatter):
        # argparse makes a formatter even to add an argument, and without a
        # width it imports shutil (and with it bz2, lzma, zlib) to ask the
        # terminal: ask it here, by shutil.get_terminal_size's rules.
        def __init__(
            self,
            prog: str,
            indent_increment: int = 2,
            max_help_position: int = 24,
            width: int | None = None,
        ) -> None:
            if width is None:
                width = _terminalColumns() - 2
            super().__init__(prog, indent_increment, max_help_position, width)

    class Parser(argparse.ArgumentParser):
        def _print_message(self, message: str, file: Any = None) -> None:
            if message:
                stream = (stderr or sys.stderr) if file is sys.stderr else (stdout or sys.stdout)
                stream.write(message)

    common = Parser(add_help=False, formatter_class=Formatter)
    common.add_argument(
        "--socket",
        type=_socketPath,
        default=argparse.SUPPRESS,
        help="the daemon's socket (default: $XENDDEV_SOCKET, else "
        f"{ROOT_SOCKET} as root, {USER_SOCKET} otherwise)",
    )
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output"
    )
    common.add_argument(
        "--timeout",
        type=_seconds(0, inclusive=False),
        default=argparse.SUPPRESS,
        help=f"seconds to wait for the daemon (default {DEFAULT_TIMEOUT:g})",
    )
    parser = Parser(
        prog="xenddev",
        description="Attach, detach and list Xen guest devices through the xenddev daemon.",
        epilog="Exit codes: 0 ok, 1 failed, 2 usage, 3 no such domain, 4 bad configuration, "
        "5 no such device, 6 device exists, 7 timeout, 8 permission denied, "
        "9 hotplug failed, 10 daemon unreachable, 11 internal error.",
        parents=[common],
        formatter_class=Formatter,
    )
    parser.add_argument("--version", action="version", version=f"xenddev {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help: str, description: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name, help=help, description=description, parents=[common], formatter_class=Formatter
        )

    p = command(
        "block-attach",
        "attach a disk",
        "Attach a disk: an xl disk spec (one argument, or several joined with commas as xl "
        "does: format=raw vdev=xvda access=rw target=/tmp/d.img), or xm's form "
        "<uname> <dev> <mode> [backdom].",
    )
    p.add_argument("dom", help="domain id or name")
    p.add_argument("disk", nargs="+", metavar="SPEC", help="xl disk spec, or uname dev mode")
    p.add_argument(
        "-N",
        "--dry-run",
        action="store_true",
        help="parse and validate only; print the disk as JSON (no daemon needed)",
    )
    p.set_defaults(run=Client.blockAttach)

    p = command("block-detach", "detach a disk", "Detach a disk (by name like xvdb or number).")
    p.add_argument("dom", help="domain id or name")
    p.add_argument("dev", help="the disk: xvdb, /dev/xvdb or 51728")
    p.add_argument("-f", "--force", action="store_true", help="do not wait for the guest")
    p.set_defaults(run=Client.blockDetach)

    p = command("block-list", "list disks", "List a domain's disks (xl's table).")
    p.add_argument("dom", help="domain id or name")
    p.set_defaults(run=Client.blockList)

    p = command(
        "cd-insert",
        "insert a medium in a cdrom drive",
        "Change the medium of a cdrom drive: TARGET is [FORMAT:]PATH (e.g. raw:/srv/a.iso); "
        "the drive must have been attached as a cdrom.",
    )
    p.add_argument("dom", help="domain id or name")
    p.add_argument("vdev", metavar="VDEV", help="the drive: hdc, xvdc, /dev/xvdc")
    p.add_argument("target", metavar="TARGET", help="[FORMAT:]PATH of the new medium")
    p.set_defaults(run=Client.cdInsert)

    p = command("cd-eject", "empty a cdrom drive", "Eject the medium of a cdrom drive.")
    p.add_argument("dom", help="domain id or name")
    p.add_argument("vdev", metavar="VDEV", help="the drive: hdc, xvdc, /dev/xvdc")
    p.set_defaults(run=Client.cdEject)

    p = command(
        "network-attach",
        "attach a network interface",
        "Attach a network interface; settings mac, bridge, script, ip, vifname, model, "
        "rate, backend, devid as key=value.",
    )
    p.add_argument("dom", help="domain id or name")
    p.add_argument("settings", nargs="*", metavar="KEY=VALUE", help="interface settings")
    p.set_defaults(run=Client.networkAttach)

    p = command(
        "network-detach", "detach a network interface", "Detach an interface by devid or MAC."
    )
    p.add_argument("dom", help="domain id or name")
    p.add_argument("dev", metavar="DEVID|MAC", help="the interface's devid or MAC address")
    p.add_argument("-f", "--force", action="store_true", help="do not wait for the guest")
    p.set_defaults(run=Client.networkDetach)

    p = command("network-list", "list network interfaces", "List a domain's interfaces.")
    p.add_argument("dom", help="domain id or name")
    p.set_defaults(run=Client.networkList)

    p = command(
        "pool-hosts",
        "list the hosts of the pool",
        "List the hosts of the pool (this one starred) with their state, the seconds "
        "left on their lease and their pid; without a pool, this host alone.",
    )
    p.set_defaults(run=Client.poolHosts)

    p = command(
        "vdi-where",
        "say who holds a storage target",
        "Say which host holds a storage target read-write, which hold it read-only, and "
        "which devices of this host use it. TARGET: a path, file:PATH or dev:MAJOR:MINOR.",
    )
    p.add_argument("target", metavar="TARGET", help="a path, file:PATH or dev:MAJOR:MINOR")
    p.set_defaults(run=Client.vdiWhere)

    p = command(
        "migrate-prepare",
        "prepare a guest's storage for its migration here",
        "On the destination host, while the guest still runs on the source: make the "
        "guest's disks here as the source has them, prepared and plugged but not active, "
        "and record the migration's intent in the pool.",
    )
    p.add_argument("dom", help="the guest here: domain id or name")
    p.add_argument("--from", dest="source", required=True, metavar="HOST", help="the source host")
    p.add_argument(
        "--source-dom",
        metavar="DOM",
        default=None,
        help="the guest as the source names it (default: DOM)",
    )
    p.set_defaults(run=Client.migratePrepare)

    p = command(
        "migrate-commit",
        "hand a migrating guest's storage over to this host",
        "On the destination host, the guest suspended on the source: the source "
        "deactivates its disks, their activation keys move here (new fencing tokens), the "
        "disks here are activated. Prints the handover window.",
    )
    p.add_argument("dom", help="the guest here: domain id or name")
    p.set_defaults(run=Client.migrateCommit)

    p = command(
        "migrate-abort",
        "put a migration's storage back",
        "On the destination host: the keys go back to the source (after a commit), the "
        "source's disks are active again, the disks made here are detached.",
    )
    p.add_argument("dom", help="the guest here: domain id or name")
    p.set_defaults(run=Client.migrateAbort)

    p = command("status", "show the daemon's status", "Show whether the daemon runs, and how.")
    p.add_argument(
        "--wait",
        type=_seconds(0, inclusive=True),
        default=0.0,
        metavar="SECONDS",
        help="wait up to SECONDS for the daemon to come up (scripts starting it)",
    )
    p.set_defaults(run=Client.status)
    return parser


def main(
    argv: Sequence[str] | None = None,
    *,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    env: Mapping[str, str] | None = None,
) -> int:
    """Run one command; return the exit code (see the module docstring)."""
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    parser = buildParser(out, err)
    try:
        opts = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as e:  # --help, --version, usage errors
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    opts.socket = getattr(opts, "socket", None) or defaultSocket(env)
    opts.json = getattr(opts, "json", False)
    opts.timeout = getattr(opts, "timeout", DEFAULT_TIMEOUT)
    run: Callable[[Client], None] = opts.run
    try:
        checkArguments(opts)
        run(Client(opts, out))
    except CommandError as e:
        err.write(f"xenddev {opts.command}: {_oneLine(e.message)}\n")
        return e.exitCode
    except KeyboardInterrupt:
        err.write(f"xenddev {opts.command}: interrupted\n")
        return 130
    return EXIT_OK


#: The arguments that are sent to the daemon as text, with their names in --help.
_TEXT_ARGUMENTS = (
    ("dom", "DOM"),
    ("disk", "SPEC"),
    ("dev", "DEV"),
    ("vdev", "VDEV"),
    ("target", "TARGET"),
    ("settings", "KEY=VALUE"),
    ("source", "--from"),
    ("source_dom", "--source-dom"),
)


def checkArguments(opts: argparse.Namespace) -> None:
    """
    Refuse, naming the argument, text that cannot reach the daemon: bytes
    that are not UTF-8, control characters XML cannot carry.

    @raise CommandError: a usage error (exit 2).
    """
    from xenddev.rpcclient import checkText

    for dest, name in _TEXT_ARGUMENTS:
        value = getattr(opts, dest, None)
        for text in [value] if isinstance(value, str) else value or ():
            try:
                checkText(text)
            except ValueError as e:
                raise CommandError(f"{name}: {e}", EXIT_USAGE) from None


def _oneLine(message: str) -> str:
    return " ".join(message.split())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
