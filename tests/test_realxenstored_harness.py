"""
Self-tests for L{tests.support.realxenstored}: the real C xenstored runs
under the LD_PRELOAD shim and the C{xenstore-*} tools can talk to it.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import time

from twisted.trial.unittest import TestCase

from tests.support.realxenstored import (
    XS_DIRECTORY,
    XS_ERROR,
    RealXenstored,
    rawRequest,
    requireRealXenstored,
)

XS_READ = 2
XS_WATCH = 4
XS_INTRODUCE = 8
XS_IS_DOMAIN_INTRODUCED = 17
XS_WATCH_EVENT = 15


def _recvMessage(sock: socket.socket) -> tuple[int, bytes]:
    """
    Read one whole xenstore message from C{sock}.
    """
    header = b""
    while len(header) < 16:
        chunk = sock.recv(16 - len(header))
        if not chunk:
            raise EOFError("xenstored hung up")
        header += chunk
    msgType = int.from_bytes(header[0:4], "little")
    length = int.from_bytes(header[12:16], "little")
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        if not chunk:
            raise EOFError("xenstored hung up")
        body += chunk
    return msgType, body


class RealXenstoredHarnessTests(TestCase):
    """
    Tests for L{RealXenstored}.
    """

    def setUp(self) -> None:
        """
        Skip (or fail, with XENDDEV_REQUIRE_REAL_XENSTORED=1) when the real
        daemon cannot run here.
        """
        requireRealXenstored(self, cli=True)

    def makeDaemon(self, **kwargs: object) -> RealXenstored:
        """
        Create and start a daemon in a fresh trial temp directory, stopped
        at cleanup.
        """
        daemon = RealXenstored(self.mktemp(), **kwargs)  # type: ignore[arg-type]
        self.addCleanup(daemon.stop)
        daemon.start()
        return daemon

    def cli(self, daemon: RealXenstored, *args: str) -> str:
        """
        Run a xenstore-* tool against C{daemon}; return its stdout.
        """
        result = subprocess.run(
            list(args),
            env=daemon.env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=10,
        )
        self.assertEqual(result.returncode, 0, f"{args} failed: {result.stderr.strip()}")
        return result.stdout

    def test_cliWriteReadList(self) -> None:
        """
        The real xenstore-write, xenstore-read and xenstore-ls work against
        the daemon.
        """
        daemon = self.makeDaemon()
        self.assertIsNotNone(daemon.pid)
        self.cli(daemon, "xenstore-write", "/a/b", "hello")
        self.assertEqual(self.cli(daemon, "xenstore-read", "/a/b"), "hello\n")
        listing = self.cli(daemon, "xenstore-ls", "/")
        self.assertIn('b = "hello"', listing)
        self.assertIn("tool", listing)

    def test_socketPathIsShortAndInRundir(self) -> None:
        """
        The socket lives in the rundir and fits AF_UNIX's limit even though
        trial's temp paths are long.
        """
        daemon = self.makeDaemon()
        self.assertEqual(os.path.dirname(daemon.socketPath), daemon.rundir)
        self.assertLessEqual(len(os.fsencode(daemon.socketPath)), 107)
        self.assertTrue(os.path.exists(daemon.socketPath))
        self.assertEqual(daemon.env()["XENSTORED_PATH"], daemon.socketPath)

    def test_errorRepliesCarryErrnoNames(self) -> None:
        """
        Reading a missing node gives an XS_ERROR reply naming ENOENT.
        """
        daemon = self.makeDaemon()
        replyType, body = rawRequest(daemon.socketPath, XS_READ, b"/nope\0")
        self.assertEqual((replyType, body), (XS_ERROR, b"ENOENT\0"))

    def test_restartGivesWorkingDaemonWithEmptyTree(self) -> None:
        """
        restart() keeps the socket path, gives a new answering process, and
        that process starts from an empty store.
        """
        daemon = self.makeDaemon()
        path, oldPid = daemon.socketPath, daemon.pid
        self.cli(daemon, "xenstore-write", "/survives", "no")
        daemon.restart()
        self.assertEqual(daemon.socketPath, path)
        self.assertNotEqual(daemon.pid, oldPid)
        self.assertTrue(daemon.isResponsive())
        self.cli(daemon, "xenstore-write", "/after", "yes")
        self.assertEqual(self.cli(daemon, "xenstore-read", "/after"), "yes\n")
        self.assertNotIn("survives", self.cli(daemon, "xenstore-ls", "/"))
        self.assertEqual(daemon.startCount, 2)

    def test_liveUpdateKeepsTree(self) -> None:
        """
        liveUpdate() re-executes xenstored in place: same pid, tree kept.
        """
        daemon = self.makeDaemon()
        pid = daemon.pid
        self.cli(daemon, "xenstore-write", "/kept", "yes")
        daemon.liveUpdate()
        self.assertEqual(daemon.pid, pid)
        self.assertEqual(self.cli(daemon, "xenstore-read", "/kept"), "yes\n")

    def test_killRefusesConnections(self) -> None:
        """
        kill() SIGKILLs the daemon: new connections are refused and an
        existing (accepted) connection sees EOF.
        """
        daemon = self.makeDaemon()
        existing = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(existing.close)
        existing.connect(daemon.socketPath)
        existing.settimeout(5)
        # Make sure xenstored has accepted the connection (a connection
        # still in the listen backlog gets ECONNRESET instead of EOF).
        existing.sendall(
            XS_DIRECTORY.to_bytes(4, "little") + bytes(8) + (2).to_bytes(4, "little") + b"/\0"
        )
        self.assertEqual(_recvMessage(existing)[0], XS_DIRECTORY)
        daemon.kill()
        self.assertIsNone(daemon.pid)
        self.assertFalse(daemon.isResponsive())
        self.assertEqual(existing.recv(16), b"")
        fresh = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(fresh.close)
        with self.assertRaises(ConnectionRefusedError) as caught:
            fresh.connect(daemon.socketPath)
        self.assertEqual(caught.exception.errno, errno.ECONNREFUSED)

    def test_startAfterKill(self) -> None:
        """
        start() after kill() brings the daemon back on the same socket.
        """
        daemon = self.makeDaemon()
        daemon.kill()
        daemon.start()
        self.assertTrue(daemon.isResponsive())

    def test_stopIsIdempotent(self) -> None:
        """
        stop() may be called repeatedly, also after kill().
        """
        daemon = self.makeDaemon()
        daemon.stop()
        daemon.stop()
        self.assertIsNone(daemon.pid)
        self.assertFalse(daemon.isRunning())
        daemon.start()
        daemon.kill()
        daemon.stop()
        self.assertIsNone(daemon.pid)

    def test_twoInstancesAreIndependent(self) -> None:
        """
        Two daemons run at once with separate sockets and separate trees.
        """
        first = self.makeDaemon()
        second = self.makeDaemon()
        self.assertNotEqual(first.socketPath, second.socketPath)
        self.assertNotEqual(first.pid, second.pid)
        self.cli(first, "xenstore-write", "/which", "first")
        self.cli(second, "xenstore-write", "/which", "second")
        self.assertEqual(self.cli(first, "xenstore-read", "/which"), "first\n")
        self.assertEqual(self.cli(second, "xenstore-read", "/which"), "second\n")
        first.kill()
        self.assertEqual(self.cli(second, "xenstore-read", "/which"), "second\n")

    def test_traceFile(self) -> None:
        """
        With trace=True every request is logged to tracePath; by default
        there is no trace file.
        """
        traced = self.makeDaemon(trace=True)
        self.cli(traced, "xenstore-write", "/traced", "1")
        assert traced.tracePath is not None
        with open(traced.tracePath) as f:
            self.assertIn("WRITE (/traced 1)", f.read())
        plain = self.makeDaemon()
        self.assertIsNone(plain.tracePath)
        self.assertFalse(os.path.exists(os.path.join(plain.workdir, "xenstored.trace")))

    def test_ownerMustBeExistingDomain(self) -> None:
        """
        Making an unknown domain the owner of a node fails; after
        setExistingDomains() lists it, it works.
        """
        daemon = self.makeDaemon()
        self.cli(daemon, "xenstore-write", "/local/domain/5/x", "y")
        failed = subprocess.run(
            ["xenstore-chmod", "/local/domain/5", "n5"],
            env=daemon.env(),
            capture_output=True,
            text=True,
            timeout=10,
        )
        self.assertNotEqual(failed.returncode, 0)
        daemon.setExistingDomains([0, 5])
        self.cli(daemon, "xenstore-chmod", "/local/domain/5", "n5")
        self.assertIn("(n5)", self.cli(daemon, "xenstore-ls", "-p", "/local"))

    def test_domainExceptionReleasesVanishedDomain(self) -> None:
        """
        An introduced domain that stops existing is released, with an
        @releaseDomain watch event, after fireDomainException().
        """
        daemon = self.makeDaemon(domains=[0, 7])
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(sock.close)
        sock.settimeout(5)
        sock.connect(daemon.socketPath)

        def request(msgType: int, payload: bytes) -> bytes:
            sock.sendall(
                msgType.to_bytes(4, "little")
                + (1).to_bytes(4, "little")
                + (0).to_bytes(4, "little")
                + len(payload).to_bytes(4, "little")
                + payload
            )
            while True:
                replyType, body = _recvMessage(sock)
                if replyType != XS_WATCH_EVENT:
                    self.assertEqual(replyType, msgType, body)
                    return body

        self.assertEqual(request(XS_INTRODUCE, b"7\x001234\x005\x00"), b"OK\0")
        self.assertEqual(request(XS_IS_DOMAIN_INTRODUCED, b"7\0"), b"T\0")
        self.assertEqual(request(XS_WATCH, b"@releaseDomain\0r\0"), b"OK\0")
        # The initial event that every new watch gets:
        self.assertEqual(_recvMessage(sock), (XS_WATCH_EVENT, b"@releaseDomain\0r\0"))
        daemon.setExistingDomains([0])
        daemon.fireDomainException()
        self.assertEqual(_recvMessage(sock), (XS_WATCH_EVENT, b"@releaseDomain\0r\0"))
        self.assertEqual(request(XS_IS_DOMAIN_INTRODUCED, b"7\0"), b"F\0")

    def test_startFailureReportsLog(self) -> None:
        """
        A daemon that cannot start raises XenstoredError including its
        output (here: an unknown quota name, which is fatal; unknown
        options are merely warned about).
        """
        from tests.support.realxenstored import XenstoredError

        daemon = RealXenstored(self.mktemp(), extraArgs=["-Q", "bogus=1"])
        self.addCleanup(daemon.stop)
        with self.assertRaises(XenstoredError) as caught:
            daemon.start()
        self.assertIn("exited with status", str(caught.exception))
        self.assertIn('unknown quota "bogus=1"', str(caught.exception))
        self.assertIsNone(daemon.pid)

    def test_repeatedStartStop(self) -> None:
        """
        Twenty start/stop cycles on one instance all succeed quickly.
        """
        daemon = RealXenstored(self.mktemp())
        self.addCleanup(daemon.stop)
        began = time.monotonic()
        for _ in range(20):
            daemon.start()
            replyType, _ = rawRequest(daemon.socketPath, XS_DIRECTORY, b"/\0")
            self.assertEqual(replyType, XS_DIRECTORY)
            daemon.stop()
        elapsed = time.monotonic() - began
        self.assertLess(elapsed, 60, f"20 start/stop cycles took {elapsed}s")
