# -*- test-case-name: tests.test_tapctl -*-
"""
Tapdisk control: the C{tap-ctl} command of blktap (L{TapCtl}) and the old
blktap2 kernel interface in sysfs (L{BlktapSysfs}).

Facts from blktap's C{control/tap-ctl.c} (xapi-project/blktap; our own code):

  - C{list} writes, when its output is not a terminal, one line per tapdisk
    of the form C{pid=<n> minor=<n> state=<%#x> args=<type>:<path>}; each
    field is present only if known, C{args} comes last and its path is the
    rest of the line (it may contain spaces, which broke xend's parser);
    C{state} is printed with C{%#x} (C{0}, C{0x20}).
  - C{allocate} and C{create} print the new device node
    (C{/dev/xen/blktap-2/tapdev<minor>}); C{spawn} prints the new pid.
  - C{destroy}, C{attach}, C{detach}, C{close}, C{pause}, C{unpause},
    C{stats} take C{-p <pid> -m <minor>}; C{open} and C{create} take
    C{-a <type>:<path>} (and C{-R} for read-only); C{unpause -a} reopens
    the tapdisk on new parameters; C{free} takes C{-m <minor>}.
  - C{create} = allocate + spawn + attach + open, undone on failure;
    C{destroy} = close + detach + free.
  - Tapdisk VBD state bits (C{tapdisk-vbd.h}): C{0x2} closed, C{0x20} paused.

Everything is run with C{reactor.spawnProcess} and an argument list (no
shell); a non-zero exit becomes L{TapCtlError} with the command, the exit
code and the standard error.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
from twisted.internet import error as ierror
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from xenddev.errors import XenddevError
from xenddev.interfaces import ITapCtl

__all__ = [
    "TAPDISK_CLOSED",
    "TAPDISK_PAUSED",
    "BlktapSysfs",
    "TapCtl",
    "TapCtlError",
    "TapdiskInfo",
    "minorOfDevice",
    "parseList",
    "parseListLine",
    "pidAlive",
]

#: Tapdisk VBD state bits (blktap's tapdisk-vbd.h).
TAPDISK_CLOSED = 0x2
TAPDISK_PAUSED = 0x20

DEVICE_DIR = "/dev/xen/blktap-2"
_TAPDEV = re.compile(r"tapdev(\d+)\Z")
_FIELD = re.compile(r"(pid|minor|state)=(\S*)")


class TapCtlError(XenddevError):
    """
    C{tap-ctl} failed: a non-zero exit, a signal, or output we cannot read.

    @ivar command: the argument list (binary first).
    @ivar exitCode: the exit status, or L{None} if killed by a signal or
        the output was unreadable.
    @ivar stderr: what the command wrote on its standard error.
    """

    def __init__(self, command: Sequence[str], exitCode: int | None, stderr: str) -> None:
        self.command = list(command)
        self.exitCode = exitCode
        self.stderr = stderr
        super().__init__(command, exitCode, stderr)

    def __str__(self) -> str:
        status = "killed" if self.exitCode is None else f"exit {self.exitCode}"
        detail = self.stderr.strip()
        return f"{' '.join(self.command)} failed ({status}){': ' + detail if detail else ''}"


@attrs.frozen
class TapdiskInfo:
    """
    One row of C{tap-ctl list}.

    @ivar pid: the tapdisk process, or L{None}.
    @ivar minor: the blktap minor, or L{None} (spawned, not attached).
    @ivar state: the VBD state bits, or L{None}.
    @ivar type: the image driver (C{vhd}, C{aio}...), or L{None} (not open).
    @ivar path: the image path (may contain spaces), or L{None}.
    """

    pid: int | None = None
    minor: int | None = None
    state: int | None = None
    type: str | None = None
    path: str | None = None

    @property
    def args(self) -> str | None:
        """C{<type>:<path>}, as given to C{open}."""
        if self.type is None or self.path is None:
            return None
        return f"{self.type}:{self.path}"

    @property
    def paused(self) -> bool:
        """Whether the VBD is paused."""
        return self.state is not None and bool(self.state & TAPDISK_PAUSED)


def _int(text: str, base: int = 10) -> int:
    if not text or not text.isascii():
        raise ValueError(text)
    return int(text, base)


def parseListLine(line: str) -> TapdiskInfo:
    """
    Parse one C{tap-ctl list} line. C{args=} takes the rest of the line
    (paths with spaces survive); the type is what precedes its first colon.

    @raise ValueError: a line that is not in that format.
    """
    text = line.rstrip("\n")
    head, sep, args = text.partition("args=")
    if sep and head and not head.endswith(" "):
        raise ValueError(f"unexpected tap-ctl list line {line!r}")
    values: dict[str, int] = {}
    rest = _FIELD.sub("", head).strip()
    if rest:
        raise ValueError(f"unexpected tap-ctl list line {line!r}")
    for name, value in _FIELD.findall(head):
        if name in values:
            raise ValueError(f"{name} repeated in tap-ctl list line {line!r}")
        try:
            # state is printed with %#x: "0" or "0x20".
            values[name] = int(value, 0) if name == "state" else _int(value)
        except ValueError:
            raise ValueError(f"bad {name} in tap-ctl list line {line!r}") from None
    typ: str | None = None
    path: str | None = None
    if sep:
        typ, colon, path = args.partition(":")
        if not colon or not typ:
            raise ValueError(f"bad args in tap-ctl list line {line!r}")
    return TapdiskInfo(values.get("pid"), values.get("minor"), values.get("state"), typ, path)


def parseList(text: str) -> list[TapdiskInfo]:
    """Parse the whole output of C{tap-ctl list} (blank lines skipped)."""
    return [parseListLine(line) for line in text.split("\n") if line.strip()]


def pidAlive(pid: int) -> bool:
    """
    Whether a process exists and is not a zombie (an orphaned tapdisk may
    stay a zombie until its new parent reaps it). Reads C{/proc}.
    """
    try:
        with open(f"/proc/{int(pid)}/stat") as f:
            text = f.read()
    except (OSError, ValueError):
        return False
    fields = text.rsplit(")", 1)[-1].split()
    return bool(fields) and fields[0] not in ("Z", "X")


def minorOfDevice(path: str) -> int:
    """The minor of C{.../tapdev<N>}; ValueError for anything else."""
    m = _TAPDEV.search(path.strip())
    if m is None:
        raise ValueError(f"{path!r} is not a blktap2 device node")
    return int(m.group(1))


class _Collect(ProcessProtocol):
    def __init__(self, done: Deferred[tuple[int | None, str, str]]) -> None:
        self.done = done
        self.out: list[bytes] = []
        self.err: list[bytes] = []

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self.out.append(data)

    def errReceived(self, data: bytes) -> None:
        self.err.append(data)

    def processEnded(self, reason: Failure) -> None:
        code: int | None = 0
        if reason.check(ierror.ProcessTerminated):
            value: Any = reason.value
            code = value.exitCode  # None when killed by a signal
        out = b"".join(self.out).decode("utf-8", "surrogateescape")
        err = b"".join(self.err).decode("utf-8", "surrogateescape")
        self.done.callback((code, out, err))


@implementer(ITapCtl)
class TapCtl:
    """
    Runs C{tap-ctl}.

    @param binary: the program, or an argument-list prefix (e.g. an
        interpreter and a script).
    @param reactor: provides C{spawnProcess} (the global reactor by default).
    @param env: extra environment variables (added to this process's).
    """

    def __init__(
        self,
        binary: str | Sequence[str] = "tap-ctl",
        reactor: Any = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.command = [binary] if isinstance(binary, str) else list(binary)
        if reactor is None:
            from twisted.internet import reactor as default

            reactor = default
        self.reactor = reactor
        self.env = dict(env or {})

    def run(self, *args: str) -> Deferred[str]:
        """Run C{tap-ctl <args>}; fire with its standard output."""
        argv = [*self.command, *args]
        done: Deferred[tuple[int | None, str, str]] = Deferred()
        env = {**os.environ, **self.env}
        try:
            self.reactor.spawnProcess(_Collect(done), argv[0], argv, env=env)
        except OSError as e:
            raise TapCtlError(argv, None, str(e)) from None

        def check(result: tuple[int | None, str, str]) -> str:
            code, out, err = result
            if code != 0:
                raise TapCtlError(argv, code, err)
            return out

        return done.addCallback(check)

    def _value(self, args: Sequence[str], convert: Any) -> Deferred[Any]:
        argv = [*self.command, *args]

        def parse(out: str) -> Any:
            try:
                return convert(out.strip())
            except ValueError:
                raise TapCtlError(argv, None, f"unexpected output {out!r}") from None

        return self.run(*args).addCallback(parse)

    def _none(self, *args: str) -> Deferred[None]:
        return self.run(*args).addCallback(lambda _: None)

    @staticmethod
    def _pm(pid: int, minor: int) -> list[str]:
        return ["-p", str(int(pid)), "-m", str(int(minor))]

    def list(
        self,
        pid: int | None = None,
        minor: int | None = None,
        type: str | None = None,
        path: str | None = None,
    ) -> Deferred[list[TapdiskInfo]]:
        """Every tapdisk (filtered like C{tap-ctl list -p -m -t -f})."""
        args = ["list"]
        for flag, value in (("-p", pid), ("-m", minor), ("-t", type), ("-f", path)):
            if value is not None:
                args += [flag, str(value)]
        return self._value(args, parseList)

    def allocate(self) -> Deferred[str]:
        """Allocate a minor; fire with its device node."""
        return self._value(["allocate"], _devicePath)

    def free(self, minor: int) -> Deferred[None]:
        """Release a minor."""
        return self._none("free", "-m", str(int(minor)))

    def create(self, args: str, readonly: bool = False) -> Deferred[str]:
        """allocate + spawn + attach + open; fire with the device node."""
        return self._value(["create", "-a", args, *(["-R"] if readonly else [])], _devicePath)

    def destroy(self, pid: int, minor: int) -> Deferred[None]:
        """close + detach + free; the tapdisk exits."""
        return self._none("destroy", *self._pm(pid, minor))

    def spawn(self) -> Deferred[int]:
        """Start a tapdisk; fire with its pid."""
        return self._value(["spawn"], _int)

    def attach(self, pid: int, minor: int) -> Deferred[None]:
        """Attach a tapdisk to a minor."""
        return self._none("attach", *self._pm(pid, minor))

    def detach(self, pid: int, minor: int) -> Deferred[None]:
        """Detach a tapdisk from a minor."""
        return self._none("detach", *self._pm(pid, minor))

    def open(self, pid: int, minor: int, args: str, readonly: bool = False) -> Deferred[None]:
        """Open the image C{<type>:<path>}."""
        extra = ["-R"] if readonly else []
        return self._none("open", *self._pm(pid, minor), "-a", args, *extra)

    def close(self, pid: int, minor: int, force: bool = False) -> Deferred[None]:
        """Close the image."""
        return self._none("close", *self._pm(pid, minor), *(["-f"] if force else []))

    def pause(self, pid: int, minor: int) -> Deferred[None]:
        """Quiesce and pause I/O."""
        return self._none("pause", *self._pm(pid, minor))

    def unpause(self, pid: int, minor: int, args: str | None = None) -> Deferred[None]:
        """Resume I/O; with C{args}, reopen on new parameters first."""
        extra = ["-a", args] if args is not None else []
        return self._none("unpause", *self._pm(pid, minor), *extra)

    def stats(self, pid: int, minor: int) -> Deferred[str]:
        """The tapdisk's statistics, as printed (JSON)."""
        return self.run("stats", *self._pm(pid, minor))


def _devicePath(text: str) -> str:
    minorOfDevice(text)
    return text


class BlktapSysfs:
    """
    The blktap2 kernel interface of Xen 4.0: C{/sys/class/blktap2/blktap<N>}
    with C{pause}, C{resume} and C{remove} nodes, and device nodes
    C{/dev/xen/blktap-2/tapdev<N>}, under a configurable root directory.

    The writes are tiny and go to sysfs, so they are made synchronously;
    each method still returns a Deferred like the tap-ctl ones.
    """

    def __init__(self, root: str = "/") -> None:
        self.root = root

    def _under(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    def devicePath(self, minor: int) -> str:
        """C{<root>/dev/xen/blktap-2/tapdev<minor>}."""
        return self._under(f"{DEVICE_DIR}/tapdev{int(minor)}")

    def controlDir(self, minor: int) -> str:
        """C{<root>/sys/class/blktap2/blktap<minor>}."""
        return self._under(f"/sys/class/blktap2/blktap{int(minor)}")

    def installed(self) -> bool:
        """Whether C{<root>/proc/devices} lists C{blktap2} (xend's check)."""
        try:
            with open(self._under("/proc/devices")) as f:
                return any(line.split()[-1:] == ["blktap2"] for line in f)
        except OSError:
            return False

    def minors(self) -> list[int]:
        """The minors with a control directory."""
        try:
            names = os.listdir(self._under("/sys/class/blktap2"))
        except OSError:
            return []
        return sorted(int(n[6:]) for n in names if n.startswith("blktap") and n[6:].isdigit())

    def _write(self, minor: int, node: str) -> Deferred[None]:
        path = os.path.join(self.controlDir(minor), node)
        with open(path, "w") as f:
            f.write(node)
        return succeed(None)

    def pause(self, minor: int) -> Deferred[None]:
        """Write C{pause} to the minor's C{pause} node."""
        return self._write(minor, "pause")

    def resume(self, minor: int) -> Deferred[None]:
        """Write C{resume} to the minor's C{resume} node."""
        return self._write(minor, "resume")

    def remove(self, minor: int) -> Deferred[None]:
        """Write C{remove} to the minor's C{remove} node (close the disk)."""
        return self._write(minor, "remove")
