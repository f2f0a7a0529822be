"""
The command-line client: C{main([...])} runs in a thread against
C{rpcSite(manager)} served by the test reactor on a UNIX socket (over the C
xenstored and the embedded one); C{--dry-run}, C{--help}, the argument
checks and the daemon-less errors need no server; subprocesses list the
modules the console entry point and each kind of command load (no Twisted,
attrs, C{xmlrpc.client}...); L{xenddev.rpcclient}'s codec is checked against
C{xmlrpc.client}'s, and its transport against a socket whose backlog is full.
"""

from __future__ import annotations

import io
import json
import math
import os
import socket
import subprocess
import sys
import threading
import xmlrpc.client
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from tests.support.fixtures import EmbeddedXenstoredFixture, RealXenstoredFixture
from tests.support.host import shortTempDir
from tests.support.xenstoresuite import deferredTest
from tests.test_xmlrpc import GUEST, DeviceServiceFixture
from xenddev import cli, diskspec, rpcclient
from xenddev import xmlrpc as daemonrpc
from xenddev.cli import (
    EXIT_BAD_CONFIG,
    EXIT_EXISTS,
    EXIT_NO_DEVICE,
    EXIT_NO_DOMAIN,
    EXIT_OK,
    EXIT_TIMEOUT,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    blockTable,
    defaultSocket,
    isXmForm,
    main,
    networkTable,
)

COMMANDS = (
    "block-attach",
    "block-detach",
    "block-list",
    "cd-insert",
    "cd-eject",
    "network-attach",
    "network-detach",
    "network-list",
    "status",
)


def run(argv: list[str], env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """main(argv) → (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code = main(argv, stdout=out, stderr=err, env=env or {})
    return code, out.getvalue(), err.getvalue()


class OfflineTests(SynchronousTestCase):
    """What works without a daemon."""

    def dryRun(self, *args: str) -> dict[str, Any]:
        """block-attach --dry-run; the JSON it printed."""
        code, out, err = run(["block-attach", "5", *args, "--dry-run"])
        self.assertEqual((code, err), (0, ""))
        result: dict[str, Any] = json.loads(out)
        return result

    def test_dryRunComponents(self) -> None:
        """The spec in several components is joined as xl joins it."""
        disk = self.dryRun("format=raw", "vdev=xvda", "access=rw", "target=/tmp/d.img")
        self.assertEqual(
            disk,
            {
                "target": "/tmp/d.img",
                "format": "raw",
                "vdev": "xvda",
                "access": "w",
                "devtype": "disk",
                "discard": True,
                "trusted": True,
                "direct-io-safe": False,
                "virtual-device": 51712,
            },
        )
        self.assertEqual(disk, self.dryRun("format=raw, vdev=xvda, access=rw, target=/tmp/d.img"))

    def test_dryRunAllKeys(self) -> None:
        """Every key the spec sets appears; an empty cdrom has no target."""
        disk = self.dryRun(
            "vdev=xvdb,access=ro,backend=3,backendtype=phy,script=block-iscsi,"
            "no-discard,untrusted,direct-io-safe,target=iqn.x"
        )
        self.assertEqual(
            (disk["backend"], disk["backendtype"], disk["script"], disk["access"]),
            ("3", "phy", "block-iscsi", "r"),
        )
        self.assertEqual(
            (disk["discard"], disk["trusted"], disk["direct-io-safe"]), (False, False, True)
        )
        cdrom = self.dryRun(",hdc:cdrom,r")
        self.assertNotIn("target", cdrom)
        self.assertEqual((cdrom["devtype"], cdrom["virtual-device"]), ("cdrom", 5632))

    def test_dryRunXmForm(self) -> None:
        """xm's <uname> <dev> <mode> [backdom] is recognised."""
        disk = self.dryRun("phy:/dev/sda", "xvdc", "w", "2")
        self.assertEqual(
            (disk["target"], disk["vdev"], disk["access"], disk["backend"]),
            ("/dev/sda", "xvdc", "w", "2"),
        )
        self.assertTrue(isXmForm(["file:/a.img", "hda", "r"]))
        self.assertFalse(isXmForm(["/a.img", "raw", "xvda", "w"]))
        self.assertFalse(isXmForm(["target=/a:b", "xvda", "w"]))

    def test_dryRunBadSpec(self) -> None:
        """A bad spec: exit 4, xl's parser message on one stderr line, nothing on stdout."""
        code, out, err = run(["block-attach", "5", "/x,raw,nonsense,w", "-N"])
        self.assertEqual((code, out), (EXIT_BAD_CONFIG, ""))
        self.assertTrue(err.startswith("xenddev block-attach: config parsing error"))
        self.assertEqual(err.count("\n"), 1)
        code, _, err = run(["block-attach", "5", "phy:/dev/sda", "bogus", "w", "-N"])
        self.assertEqual(code, EXIT_BAD_CONFIG)
        self.assertIn("vdev", err)

    def test_helpEverywhere(self) -> None:
        """--help works for the program and every command, exit 0."""
        code, out, _ = run(["--help"])
        self.assertEqual(code, 0)
        for command in COMMANDS:
            self.assertIn(command, out)
            code, out2, err = run([command, "--help"])
            self.assertEqual((code, err), (0, ""), command)
            self.assertTrue(out2.startswith(f"usage: xenddev {command}"), out2)

    def test_usageErrors(self) -> None:
        """Unknown commands, missing arguments and bad key=value: exit 2."""
        self.assertEqual(run(["bogus"])[0], EXIT_USAGE)
        self.assertEqual(run(["block-detach", "5"])[0], EXIT_USAGE)
        code, _, err = run(["network-attach", "5", "bridge"], {"XENDDEV_SOCKET": "/nonexistent"})
        self.assertEqual(code, EXIT_USAGE)
        self.assertIn("expected key=value", err)

    def test_unreachable(self) -> None:
        """No daemon on the socket: exit 10 and a hint, from --socket or XENDDEV_SOCKET."""
        code, _, err = run(["status", "--socket", "/nonexistent/x.sock"])
        self.assertEqual(code, EXIT_UNREACHABLE)
        self.assertIn("cannot reach the xenddev daemon at /nonexistent/x.sock", err)
        code, _, err = run(["block-list", "5"], {"XENDDEV_SOCKET": "/nonexistent/y.sock"})
        self.assertEqual(code, EXIT_UNREACHABLE)
        self.assertIn("/nonexistent/y.sock", err)

    def test_defaultSocket(self) -> None:
        """The socket default depends on the user; XENDDEV_SOCKET wins."""
        self.assertEqual(defaultSocket({"XENDDEV_SOCKET": "/s"}), "/s")
        expected = "/var/run/xenddev/xenddev.sock" if os.geteuid() == 0 else "./run/xenddev.sock"
        self.assertEqual(defaultSocket({}), expected)

    def test_tables(self) -> None:
        """xl's column headers; unknown values as -1."""
        self.assertEqual(
            blockTable([{"devid": 51712, "backend-id": 0, "handle": 51712}]).splitlines(),
            [
                "Vdev  BE  handle state evt-ch ring-ref BE-path",
                "51712 0   51712  -1    -1     -1       -",
            ],
        )
        header = networkTable([]).splitlines()[0]
        self.assertEqual(
            header, "Idx BE Mac Addr.         handle state evt-ch   tx-/rx-ring-ref BE-path"
        )

    def test_subprocessWithoutTwisted(self) -> None:
        """The console entry point runs a dry run in a process that never imports Twisted."""
        script = (
            "import sys\n"
            "from xenddev.cli import main\n"
            "code = main(['block-attach', '5', 'vhd:/srv/a.vhd,xvdb,w', '--dry-run'])\n"
            "assert not [m for m in sys.modules if m.startswith('twisted')], 'twisted imported'\n"
            "sys.exit(code)\n"
        )
        proc = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
        )
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(json.loads(proc.stdout)["format"], "vhd")


#: Modules a command of the client must never load: the daemon's stack, and
#: the standard library's heavy modules the client does without.
HEAVY = (
    "twisted",
    "zope",
    "attr",
    "attrs",
    "yaml",
    "pyxs",
    "xenddev.diskspec",
    "xenddev.xmlrpc",
    "xmlrpc",
    "http",
    "email",
    "ssl",
    "socket",
    "selectors",
    "threading",
    "urllib",
    "base64",
    "datetime",
    "decimal",
    "json",
    "typing",
    "shutil",
    "xml",
    "importlib.metadata",
    "pkg_resources",
)

#: Runs main(argv) and prints, last, the modules the process loaded.
MODULES_SCRIPT = (
    "import sys\n"
    "from xenddev.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "print(' '.join(sorted(sys.modules)))\n"
    "sys.exit(code)\n"
)


def heavy(modules: str) -> list[str]:
    """The L{HEAVY} modules (or their submodules) among space-separated names."""
    return [m for m in modules.split() if any(m == h or m.startswith(h + ".") for h in HEAVY)]


def cleanEnv(**extra: str) -> dict[str, str]:
    """
    This process's environment without the coverage hooks (which would load
    coverage's modules into the process whose modules a test lists).
    """
    drop = ("XENDDEV_COVERAGE_RC", "COVERAGE_PROCESS_START", "COVERAGE_PROCESS_CONFIG")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **extra}


class StartupTests(SynchronousTestCase):
    """The client loads only what a command needs (a dom0 under TCG pays for each module)."""

    def modules(self, *argv: str) -> tuple[int, str]:
        """Run main(argv) in a fresh interpreter: (exit code, the modules it loaded)."""
        proc = subprocess.run(
            [sys.executable, "-c", MODULES_SCRIPT, *argv],
            capture_output=True,
            text=True,
            timeout=60,
            env=cleanEnv(XENDDEV_SOCKET="/nonexistent/x.sock"),
        )
        self.assertNotIn("Traceback", proc.stderr)
        return proc.returncode, proc.stdout.splitlines()[-1]

    def test_commandsLoadNothingHeavy(self) -> None:
        """
        --help, and commands that reach for the daemon (a block-attach, a
        list, status; no daemon here, so each goes as far as connecting)
        load none of L{HEAVY}.
        """
        for argv, exitCode in (
            (["--help"], EXIT_OK),
            (["block-attach", "5", "format=raw,vdev=xvdb,access=ro,target=/x"], EXIT_UNREACHABLE),
            (["block-attach", "5", "phy:/dev/sda", "xvdc", "w"], EXIT_UNREACHABLE),
            (["block-detach", "5", "xvdb"], EXIT_UNREACHABLE),
            (["--json", "block-list", "5"], EXIT_UNREACHABLE),
            (["status", "--timeout", "5"], EXIT_UNREACHABLE),
        ):
            code, modules = self.modules(*argv)
            self.assertEqual(code, exitCode, argv)
            self.assertEqual(heavy(modules), [], argv)
            self.assertIn("xenddev.cli", modules.split())

    def test_dryRunLoadsOnlyTheParser(self) -> None:
        """--dry-run parses locally (diskspec, attrs) but loads no Twisted and no HTTP."""
        code, modules = self.modules("block-attach", "5", "/x.img,raw,xvdb,r", "-N")
        self.assertEqual(code, EXIT_OK)
        self.assertIn("xenddev.diskspec", modules.split())
        self.assertEqual(
            [m for m in heavy(modules) if m.split(".")[0] in ("twisted", "http", "xmlrpc", "ssl")],
            [],
        )

    def test_consoleScript(self) -> None:
        """
        The installed console script (pip's: imports xenddev.cli and calls
        main) loads no importlib.metadata or pkg_resources, nor anything
        else of L{HEAVY}.
        """
        script = os.path.join(os.path.dirname(sys.executable), "xenddev")
        if not os.path.exists(script):
            raise SkipTest(f"no console script at {script} (the project is not installed here)")
        proc = subprocess.run(
            [sys.executable, "-X", "importtime", script, "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            env=cleanEnv(),
        )
        self.assertEqual(proc.returncode, 0, proc.stderr)
        loaded = [
            line.rsplit("|", 1)[1].strip()
            for line in proc.stderr.splitlines()
            if line.startswith("import time:") and "|" in line
        ]
        self.assertIn("xenddev.cli", loaded)
        self.assertEqual(heavy(" ".join(loaded)), [])


class ArgumentTests(SynchronousTestCase):
    """Every bad field: one line naming it, the documented exit code, no call, no traceback."""

    env = {"XENDDEV_SOCKET": "/nonexistent/x.sock"}  # a call that gets through exits 10

    def test_badFields(self) -> None:
        """Out-of-range ids, text XML or UTF-8 cannot carry, malformed settings."""
        huge = "9" * 5000  # more digits than int() converts by default
        for argv, exitCode, words in (
            (
                ["block-attach", "99999999999999999999999", "/x,raw,xvdb,w"],
                EXIT_NO_DOMAIN,
                "invalid domain id 99999999999999999999999: must be 0..32751",
            ),
            (["block-attach", "32752", "/x,raw,xvdb,w", "-N"], EXIT_NO_DOMAIN, "id 32752"),
            (["block-list", huge], EXIT_NO_DOMAIN, "invalid domain id 999"),
            (
                ["block-detach", "5", "99999999999"],
                EXIT_BAD_CONFIG,
                "invalid device 99999999999: a device number is at most 2147483647",
            ),
            (["network-detach", "5", huge], EXIT_BAD_CONFIG, "invalid device 999"),
            (["cd-eject", "5", "/dev/4294967296"], EXIT_BAD_CONFIG, "invalid device 4294967296"),
            (["block-list", "\udcff"], EXIT_USAGE, "DOM: '\\udcff' is not valid UTF-8"),
            (["block-attach", "5", "target=/x\x07,vdev=xvdb"], EXIT_USAGE, "SPEC: 'target"),
            (["block-detach", "5", "xvd\x1bb"], EXIT_USAGE, "DEV: "),
            (["cd-insert", "5", "hdc", "/a\x00.iso"], EXIT_USAGE, "TARGET: "),
            (["cd-insert", "5", "hd\x01c", "/a.iso"], EXIT_USAGE, "VDEV: "),
            (["network-attach", "5", "mac=\x1b"], EXIT_USAGE, "KEY=VALUE: 'mac=\\x1b'"),
            (["network-attach", "5", "=x"], EXIT_USAGE, ": expected key=value, not '=x'"),
            (["network-attach", "5", "a=1", "a=2"], EXIT_USAGE, ": a given twice"),
        ):
            code, out, err = run(argv, self.env)
            self.assertEqual((code, out), (exitCode, ""), (argv[:2], err))
            self.assertEqual(err.count("\n"), 1, err)
            self.assertTrue(err.startswith(f"xenddev {argv[0]}: "), err)
            self.assertIn(words, err)

    def test_badOptions(self) -> None:
        """--timeout, --wait and --socket out of range: argparse's usage error naming them."""
        for argv, option in (
            (["--timeout", "-1", "status"], "--timeout"),
            (["--timeout", "nan", "status"], "--timeout"),
            (["--timeout", "inf", "block-list", "5"], "--timeout"),
            (["--timeout", "0", "status"], "--timeout"),
            (["--timeout", "1e400", "status"], "--timeout"),
            (["status", "--timeout", "2e6"], "--timeout"),
            (["status", "--timeout", "soon"], "--timeout"),
            (["status", "--wait", "-5"], "--wait"),
            (["status", "--wait", "NaN"], "--wait"),
            (["--socket", "", "status"], "--socket"),
            (["--socket", "/a\x00b", "status"], "--socket"),
        ):
            code, out, err = run(argv, self.env)
            self.assertEqual((code, out), (EXIT_USAGE, ""), argv)
            self.assertIn(f"error: argument {option}: expected", err)

    def test_inRange(self) -> None:
        """The largest domain id and device number, and leading zeros, are sent as they are."""
        for argv in (
            ["block-list", "32751"],
            ["block-list", "0000000000000000000000000005"],
            ["block-detach", "0", "2147483647"],
            ["--timeout", "1e6", "status", "--wait", "0"],
        ):
            code, _, err = run(argv, self.env)
            self.assertEqual(code, EXIT_UNREACHABLE, (argv, err))

    def test_limitsAgreeWithTheDaemon(self) -> None:
        """The client's limits are the daemon's (kept apart so the client imports neither)."""
        self.assertEqual(cli.DOMID_MAX, daemonrpc.DOMID_MAX)
        self.assertEqual(cli.DEVID_MAX, diskspec.MAX_DEVICE_NUMBER)


def xmlText() -> st.SearchStrategy[str]:
    """Text XML 1.0 carries (no surrogates, no C0 controls but TAB, LF, CR)."""
    return st.text(
        st.characters(
            exclude_categories=["Cs"],
            exclude_characters="".join(map(chr, range(9)))
            + "\x0b\x0c"
            + "".join(map(chr, range(14, 32)))
            + "\ufffe\uffff",
        ),
        max_size=20,
    )


XML_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**31), 2**31 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | xmlText(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(xmlText(), children, max_size=4)
    ),
    max_leaves=12,
)


def readRequest(conn: socket.socket) -> bytes:
    """One HTTP request with a Content-Length body, read from C{conn}."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += conn.recv(65536)
    return body


def httpAnswer(body: bytes, status: str = "200 OK", length: int | None = None) -> bytes:
    """An HTTP/1.0 answer carrying C{body} (its Content-Length can be made to lie)."""
    size = len(body) if length is None else length
    return (
        f"HTTP/1.0 {status}\r\nContent-Type: text/xml\r\nContent-Length: {size}\r\n\r\n".encode()
        + body
    )


def statusAnswer() -> bytes:
    """What daemon.status answers, as the daemon encodes it."""
    info = {"version": "0.1.0", "pid": 1, "uptime": 2.5, "in-flight": 0, "classes": ["vbd"]}
    return httpAnswer(xmlrpc.client.dumps((info,), methodresponse=True, allow_none=True).encode())


class RpcClientTests(SynchronousTestCase):
    """L{xenddev.rpcclient}: its codec against xmlrpc.client's, its transport against servers."""

    @settings(max_examples=300, deadline=None)
    @given(XML_VALUES)
    def test_requestsReadByXmlrpcClient(self, value: Any) -> None:
        """What encodeCall writes, xmlrpc.client reads back as the same value."""
        self.assertEqual(
            xmlrpc.client.loads(rpcclient.encodeCall("device.attach", [value, 5])),
            ((value, 5), "device.attach"),
        )

    @settings(max_examples=300, deadline=None)
    @given(XML_VALUES)
    def test_responsesOfXmlrpcClient(self, value: Any) -> None:
        """
        What xmlrpc.client (the daemon's encoder) writes, decodeResponse reads
        as xmlrpc.client does (which gets a CR back as LF: it writes it bare).
        """
        body = xmlrpc.client.dumps((value,), methodresponse=True, allow_none=True)
        ((expected,), _) = xmlrpc.client.loads(body)
        self.assertEqual(rpcclient.decodeResponse(body.encode("utf-8")), expected)
        if "\r" not in body:
            self.assertEqual(expected, value)

    def test_otherTypesAndFaults(self) -> None:
        """Untyped values, i8, base64, dateTime; a fault raises Fault; junk ProtocolError."""
        body = (
            b"<methodResponse><params><param><value><array><data>"
            b"<value> a b </value><value><i8>8589934592</i8></value>"
            b"<value><base64>aGk=</base64></value>"
            b"<value><dateTime.iso8601>20260101T00:00:00</dateTime.iso8601></value>"
            b"</data></array></value></param></params></methodResponse>"
        )
        self.assertEqual(
            rpcclient.decodeResponse(body), [" a b ", 2**33, b"hi", "20260101T00:00:00"]
        )
        fault = xmlrpc.client.dumps(xmlrpc.client.Fault(11, "Device 5 not connected"))
        error = self.assertRaises(rpcclient.Fault, rpcclient.decodeResponse, fault.encode())
        self.assertEqual((error.faultCode, error.faultString), (11, "Device 5 not connected"))
        for junk in (
            b"<methodResponse><params>",
            b"<methodResponse><params><param><value><int>x</int></value>",
            b"<methodResponse><params></params></methodResponse>",
            b"<methodResponse><params><param><value><blob/></value></param></params>"
            b"</methodResponse>",
            b"<methodResponse><fault><value><string>no</string></value></fault></methodResponse>",
        ):
            self.assertRaises(rpcclient.ProtocolError, rpcclient.decodeResponse, junk)

    def test_unsendable(self) -> None:
        """Values XML-RPC or XML cannot carry are refused before anything is sent."""
        for value in (2**31, -(2**31) - 1, math.nan, math.inf, "a\x00", "\udcff", "\uffff"):
            self.assertRaises(ValueError, rpcclient.encodeCall, "m", [value])
        self.assertRaises(TypeError, rpcclient.encodeCall, "m", [object()])
        self.assertRaises(TypeError, rpcclient.encodeCall, "m", [{1: 2}])

    def serve(self, *answers: bytes) -> tuple[str, list[bytes]]:
        """
        A socket whose server answers each connection with the next of
        C{answers}: (its path, the request bodies it got).
        """
        path = os.path.join(shortTempDir(self, "cli-"), "s.sock")
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(path)
        server.listen(8)
        server.settimeout(30)
        requests: list[bytes] = []

        def loop() -> None:
            for answer in answers:
                conn, _ = server.accept()
                with conn:
                    requests.append(readRequest(conn))
                    conn.sendall(answer)

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        self.addCleanup(server.close)
        self.addCleanup(thread.join, 30)
        return path, requests

    def test_badAnswers(self) -> None:
        """HTTP errors, truncated or empty answers: exit 10 naming the problem."""
        ok = xmlrpc.client.dumps((True,), methodresponse=True).encode()
        path, requests = self.serve(
            httpAnswer(b"oops", "500 Internal Server Error"),
            httpAnswer(ok, length=len(ok) + 10),
            b"",
            b"SMTP ready\r\n\r\n",
            httpAnswer(b"<html>"),
        )
        for words in (
            "HTTP 500 Internal Server Error",
            "answer truncated",
            "without a complete answer",
            "not an HTTP answer",
            "malformed XML-RPC response",
        ):
            code, _, err = run(["block-detach", "5", "xvdb", "--socket", path])
            self.assertEqual(code, EXIT_UNREACHABLE, err)
            self.assertIn(f"talking to the daemon at {path} failed: ", err)
            self.assertIn(words, err)
        self.assertEqual(
            xmlrpc.client.loads(requests[0]), ((5, "vbd", "xvdb", False), "device.detach")
        )

    def fullBacklog(self) -> tuple[str, socket.socket, list[socket.socket]]:
        """A listening socket nobody accepts on, its backlog full: (path, it, the queued)."""
        path = os.path.join(shortTempDir(self, "cli-"), "s.sock")
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(path)
        server.listen(0)
        server.settimeout(30)
        self.addCleanup(server.close)
        queued: list[socket.socket] = []
        while len(queued) < 100:
            filler = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            filler.setblocking(False)
            self.addCleanup(filler.close)
            try:
                filler.connect(path)
            except BlockingIOError:
                return path, server, queued
            queued.append(filler)
        self.fail("the backlog never filled")

    def test_backlogFullWaits(self) -> None:
        """
        While the daemon's backlog is full (EAGAIN) the client tries again; once
        the daemon accepts, the command succeeds (it used to exit 10 at once).
        """
        path, server, queued = self.fullBacklog()
        retried = threading.Event()
        realSleep = rpcclient.sleep

        def sleep(seconds: float) -> None:
            retried.set()
            realSleep(seconds)

        self.patch(rpcclient, "sleep", sleep)

        def daemon() -> None:
            retried.wait(30)
            for _ in queued:
                server.accept()[0].close()
            conn, _ = server.accept()
            with conn:
                readRequest(conn)
                conn.sendall(statusAnswer())

        thread = threading.Thread(target=daemon, daemon=True)
        thread.start()
        code, out, err = run(["status", "--socket", path, "--timeout", "30"])
        thread.join(30)
        self.assertEqual((code, err), (EXIT_OK, ""))
        self.assertTrue(retried.is_set())
        self.assertIn("device classes: vbd", out)

    def test_backlogFullTimesOut(self) -> None:
        """A backlog full until --timeout: exit 7, as any call past the timeout."""
        path, _, _ = self.fullBacklog()
        code, _, err = run(["block-list", "5", "--socket", path, "--timeout", "0.2"])
        self.assertEqual(code, EXIT_TIMEOUT)
        self.assertIn("the daemon did not answer within 0.2 s", err)


class CLIClientMixin:
    """Runs the command-line client against the XML-RPC socket C{self.rpcPath}."""

    rpcPath: str
    assertEqual: Any

    def cli(self, *argv: str) -> Deferred[tuple[int, str, str]]:
        """Run main() in a thread against the test's socket: (exit code, stdout, stderr)."""
        return deferToThread(run, [*argv, "--socket", self.rpcPath])

    async def ok(self, *argv: str) -> str:
        """Run a command that must succeed; its stdout."""
        code, out, err = await self.cli(*argv)
        self.assertEqual((code, err), (0, ""), argv)
        return out


class CLISuite(CLIClientMixin, DeviceServiceFixture):
    """The CLI against the served XML-RPC resource; mixed with a fixture and TestCase."""

    @deferredTest
    async def test_blockWalkthrough(self) -> None:
        """block-attach (xl components), block-list (table and JSON), block-detach."""
        img = self.image()
        before = await self.tree()
        out = await self.ok(
            "block-attach", str(GUEST), "format=raw", "vdev=xvda", "access=ro", f"target={img}"
        )
        self.assertEqual(out, "")
        await self.connected("vbd", 51712)
        table = (await self.ok("block-list", str(GUEST))).splitlines()
        self.assertEqual(table[0], "Vdev  BE  handle state evt-ch ring-ref BE-path")
        self.assertEqual(table[1].split()[:4], ["51712", "0", str(GUEST), "4"])
        self.assertTrue(table[1].endswith(f"/local/domain/0/backend/vbd/{GUEST}/51712"))
        (row,) = json.loads(await self.ok("block-list", "guest", "--json"))
        self.assertEqual((row["vdev"], row["state"]), ("xvda", 4))
        self.assertEqual(await self.ok("block-detach", str(GUEST), "xvda"), "")
        self.assertEqual(len((await self.ok("block-list", str(GUEST))).splitlines()), 1)
        await self.assertTreeIs(before)

    @deferredTest
    async def test_blockAttachProcessLoadsNothingHeavy(self) -> None:
        """
        A real block-attach, by the client in a process of its own, succeeds
        having loaded none of L{HEAVY} (no Twisted, attrs, diskspec,
        xmlrpc.client...); its bad spec is refused by the daemon, exit 4.
        """
        img = self.image()
        before = await self.tree()
        out, err, code = await getProcessOutputAndValue(
            sys.executable,
            ["-c", MODULES_SCRIPT, "block-attach", str(GUEST), f"{img},raw,xvdb,r"],
            env=cleanEnv(XENDDEV_SOCKET=self.rpcPath),
        )
        self.assertEqual((code, err), (EXIT_OK, b""))
        self.assertEqual(heavy(out.decode()), [])
        await self.connected("vbd", 51728)
        await self.ok("block-detach", str(GUEST), "xvdb")
        out, err, code = await getProcessOutputAndValue(
            sys.executable,
            ["-c", MODULES_SCRIPT, "block-attach", str(GUEST), f"{img},raw,xvdb,rw!"],
            env=cleanEnv(XENDDEV_SOCKET=self.rpcPath),
        )
        self.assertEqual(code, EXIT_BAD_CONFIG)
        self.assertIn(b"config parsing error in disk specification", err)
        self.assertEqual(heavy(out.decode()), [])
        await self.assertTreeIs(before)

    @deferredTest
    async def test_cdInsertAndEject(self) -> None:
        """
        cd-insert changes a cdrom drive's medium and cd-eject empties it (the
        backend's params follow); on a disk that is not a cdrom cd-insert
        fails with the refusal; a bad target is refused locally.
        """
        first, second = self.image(), self.image()
        before = await self.tree()
        await self.ok("block-attach", str(GUEST), f"{first},raw,hdc,devtype=cdrom")
        await self.ok("block-attach", str(GUEST), f"{first},raw,xvdb,r")
        backend = f"/local/domain/0/backend/vbd/{GUEST}/5632"
        self.assertEqual(await self.ok("cd-insert", str(GUEST), "hdc", f"raw:{second}"), "")
        self.assertEqual(await self.xs.read(f"{backend}/params"), second)
        self.assertEqual(await self.ok("cd-eject", str(GUEST), "/dev/hdc"), "")
        self.assertEqual(await self.xs.read(f"{backend}/params"), "")
        code, _, err = await self.cli("cd-insert", str(GUEST), "xvdb", second)
        self.assertEqual(code, EXIT_BAD_CONFIG)
        self.assertIn(f"Device xvdb (51728) of domain {GUEST} is not a cdrom drive", err)
        code, _, err = await self.cli("cd-insert", str(GUEST), "hdc", "bogus:/x")
        self.assertEqual(code, EXIT_BAD_CONFIG)
        self.assertIn("config parsing error in disk specification", err)
        await self.ok("block-detach", str(GUEST), "hdc")
        await self.ok("block-detach", str(GUEST), "xvdb")
        await self.assertTreeIs(before)

    @deferredTest
    async def test_xmBlockAttachJson(self) -> None:
        """xm's form attaches; --json prints the new device; -f detaches forcibly."""
        img = self.image()
        before = await self.tree()
        out = await self.ok("--json", "block-attach", str(GUEST), f"file:{img}", "xvdb", "r")
        self.assertEqual(json.loads(out), {"domain": GUEST, "class": "vbd", "devid": 51728})
        await self.ok("block-detach", str(GUEST), "51728", "-f")
        await self.assertTreeIs(before)

    @deferredTest
    async def test_network(self) -> None:
        """network-attach with settings, network-list's table, network-detach by MAC."""
        before = await self.tree()
        mac = "00:16:3e:0a:0b:0c"
        await self.ok("network-attach", str(GUEST), f"mac={mac}", "bridge=xenbr0")
        await self.connected("vif", 0)
        table = (await self.ok("network-list", str(GUEST))).splitlines()
        self.assertTrue(table[0].startswith("Idx BE Mac Addr."))
        self.assertEqual(table[1].split()[:5], ["0", "0", mac, "0", "4"])
        await self.ok("network-detach", str(GUEST), mac)
        await self.assertTreeIs(before)

    @deferredTest
    async def test_status(self) -> None:
        """status says the daemon runs, its classes, and where; --json too."""
        out = await self.ok("status")
        self.assertIn("running", out)
        self.assertIn("device classes: tap tap2 vbd vif", out)
        info = json.loads(await self.ok("status", "--json"))
        self.assertEqual(
            (info["classes"], info["socket"]), (["tap", "tap2", "vbd", "vif"], self.rpcPath)
        )

    @deferredTest
    async def test_errorExitCodes(self) -> None:
        """Each fault class has its exit code and a one-line message; failures leave no trace."""
        img = self.image()
        await self.ok("block-attach", str(GUEST), f"{img},raw,xvdb,r")
        await self.connected("vbd", 51728)
        before = await self.tree()
        for argv, exitCode, words in (
            (["block-attach", str(GUEST), f"{img},raw,xvdb,r"], EXIT_EXISTS, "already connected"),
            (["block-detach", str(GUEST), "xvdc"], EXIT_NO_DEVICE, "not connected"),
            (["block-list", "77"], EXIT_NO_DOMAIN, "Domain 77 does not exist"),
            (["block-list", "nosuch"], EXIT_NO_DOMAIN, "no domain named"),
            (["network-attach", str(GUEST), "colour=red"], EXIT_BAD_CONFIG, "colour"),
            (["network-detach", str(GUEST), "00:16:3e:00:00:09"], EXIT_NO_DEVICE, "no vif"),
            (["block-attach", str(GUEST), "/x,raw,nonsense,w"], EXIT_BAD_CONFIG, "vdev"),
        ):
            code, out, err = await self.cli(*argv)
            self.assertEqual(code, exitCode, (argv, err))
            self.assertEqual(out, "")
            self.assertEqual(err.count("\n"), 1, err)
            self.assertTrue(err.startswith(f"xenddev {argv[0]}: "), err)
            self.assertIn(words, err)
            self.assertNotIn("Traceback", err)
        await self.assertTreeIs(before)
        await self.ok("block-detach", str(GUEST), "xvdb")


class RealXenstoredCLITests(CLISuite, RealXenstoredFixture, TestCase):  # type: ignore[misc]
    """The CLI over the C xenstored."""


class EmbeddedXenstoredCLITests(CLISuite, EmbeddedXenstoredFixture, TestCase):  # type: ignore[misc]
    """The CLI over the embedded xenstored."""
