"""
L{xenddev.qmp}: the QMP client against a scripted fake server on a real
UNIX socket, and against a real C{qemu-storage-daemon}.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from typing import Any

from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from xenddev.qmp import (
    QMPConnectionLost,
    QMPError,
    QMPProtocolError,
    QMPTimeout,
    connectQMP,
)

QSD = shutil.which("qemu-storage-daemon")
QEMU_IMG = shutil.which("qemu-img")

GREETING = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 22}}, "capabilities": []}}


class FakeQMPServer(Protocol):
    """
    A scripted QMP server: greets, then hands every command to
    C{factory.handle(server, msg)}.
    """

    factory: Any

    def connectionMade(self) -> None:
        self.factory.servers.append(self)
        self.buffer = b""
        if self.factory.greeting is not None:
            self.send(self.factory.greeting)

    def send(self, msg: Any) -> None:
        raw = msg if isinstance(msg, bytes) else json.dumps(msg).encode()
        self.transport.write(raw + b"\n")  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            msg = json.loads(line)
            self.factory.received.append(msg)
            if msg["execute"] == "qmp_capabilities":
                self.send({"return": {}, "id": msg["id"]})
            else:
                self.factory.handle(self, msg)


class FakeServerMixin:
    """Starts a fake QMP server on a UNIX socket in a short temporary directory."""

    addCleanup: Any

    def fakeServer(self, handle: Any, greeting: Any = GREETING) -> tuple[str, Any]:
        workdir = tempfile.mkdtemp(prefix="qmp-")
        self.addCleanup(shutil.rmtree, workdir, True)
        path = os.path.join(workdir, "qmp")
        factory = Factory.forProtocol(FakeQMPServer)
        factory.servers = []  # type: ignore[attr-defined]
        factory.received = []  # type: ignore[attr-defined]
        factory.greeting = greeting  # type: ignore[attr-defined]
        factory.handle = handle  # type: ignore[attr-defined]
        port = reactor.listenUNIX(path, factory)  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        return path, factory


class QMPClientFakeServerTests(FakeServerMixin, TestCase):
    """The client's protocol handling, against a scripted server."""

    async def test_greetingAndNegotiation(self) -> None:
        """
        The client reads the greeting (version parsed), sends
        qmp_capabilities before anything else, and fires once negotiated.
        """
        path, factory = self.fakeServer(lambda s, m: None)
        client = await connectQMP(reactor, path)
        self.addCleanup(client.close)
        self.assertEqual(client.greeting.version, (7, 2, 22))
        self.assertEqual([m["execute"] for m in factory.received], ["qmp_capabilities"])

    async def test_repliesMatchedById(self) -> None:
        """
        Two commands in flight answered in reverse order each get their
        own return value.
        """
        held: list[Any] = []

        def handle(server: FakeQMPServer, msg: Any) -> None:
            held.append((server, msg))
            if len(held) == 2:
                for s, m in reversed(held):
                    s.send({"return": {"cmd": m["execute"]}, "id": m["id"]})

        path, _ = self.fakeServer(handle)
        client = await connectQMP(reactor, path)
        self.addCleanup(client.close)
        a = client.execute("query-a")
        b = client.execute("query-b", {"x": 1})
        self.assertEqual(await a, {"cmd": "query-a"})
        self.assertEqual(await b, {"cmd": "query-b"})
        self.assertEqual(held[1][1]["arguments"], {"x": 1})
        self.assertNotEqual(held[0][1]["id"], held[1][1]["id"])

    async def test_errorIsTyped(self) -> None:
        """An error reply fails the command with QMPError(class, desc, command)."""

        def handle(server: FakeQMPServer, msg: Any) -> None:
            server.send(
                {"error": {"class": "DeviceNotFound", "desc": "no such node"}, "id": msg["id"]}
            )

        path, _ = self.fakeServer(handle)
        client = await connectQMP(reactor, path)
        self.addCleanup(client.close)
        with self.assertRaises(QMPError) as cm:
            await client.execute("blockdev-del", {"node-name": "x"})
        self.assertEqual(cm.exception.errorClass, "DeviceNotFound")
        self.assertEqual(cm.exception.desc, "no such node")
        self.assertEqual(cm.exception.command, "blockdev-del")

    async def test_eventsDelivered(self) -> None:
        """
        Events interleaved with replies reach every subscriber, in order;
        waitForEvent fires on the first matching one only.
        """

        def handle(server: FakeQMPServer, msg: Any) -> None:
            ts = {"seconds": 1, "microseconds": 500000}
            server.send(
                {
                    "event": "JOB_STATUS_CHANGE",
                    "data": {"id": "j", "status": "running"},
                    "timestamp": ts,
                }
            )
            server.send({"return": {}, "id": msg["id"]})
            server.send(
                {
                    "event": "JOB_STATUS_CHANGE",
                    "data": {"id": "j", "status": "ready"},
                    "timestamp": ts,
                }
            )

        path, _ = self.fakeServer(handle)
        client = await connectQMP(reactor, path)
        self.addCleanup(client.close)
        seen: list[str] = []
        client.subscribe(lambda e: seen.append(e.data["status"]))
        ready = client.waitForEvent("JOB_STATUS_CHANGE", lambda e: e.data["status"] == "ready")
        await client.execute("block-commit")
        event = await ready
        self.assertEqual(event.timestamp, 1.5)
        self.assertEqual(seen, ["running", "ready"])

    async def test_connectionLossFailsPending(self) -> None:
        """
        The server closes with two commands and an event wait pending: all
        fail with QMPConnectionLost, whenClosed fires, and a later command
        fails at once.
        """
        pending: list[FakeQMPServer] = []

        def handle(server: FakeQMPServer, msg: Any) -> None:
            pending.append(server)
            if len(pending) == 2:
                server.transport.loseConnection()  # type: ignore[union-attr]

        path, _ = self.fakeServer(handle)
        client = await connectQMP(reactor, path)
        a = client.execute("a")
        b = client.execute("b")
        ev = client.waitForEvent("NEVER")
        for d in (a, b, ev):
            with self.assertRaises(QMPConnectionLost):
                await d
        await client.whenClosed()
        self.assertFalse(client.connected)
        with self.assertRaises(QMPConnectionLost):
            await client.execute("c")

    async def test_notQMP(self) -> None:
        """A server whose first line is not a QMP greeting is refused."""
        path, _ = self.fakeServer(lambda s, m: None, greeting={"hello": 1})
        with self.assertRaises(QMPProtocolError):
            await connectQMP(reactor, path)

    async def test_timeout(self) -> None:
        """A command never answered fails with QMPTimeout after its timeout."""
        path, _ = self.fakeServer(lambda s, m: None)
        client = await connectQMP(reactor, path)
        self.addCleanup(client.close)
        with self.assertRaises(QMPTimeout):
            await client.execute("query-slow", timeout=0.1)

    async def test_noGreeting(self) -> None:
        """A server that never greets: connectQMP fails with QMPTimeout."""
        path, _ = self.fakeServer(lambda s, m: None, greeting=None)
        with self.assertRaises(QMPTimeout):
            await connectQMP(reactor, path, timeout=0.2)


def requireDaemon(case: TestCase) -> None:
    """Skip unless qemu-storage-daemon and qemu-img are installed."""
    if QSD is None or QEMU_IMG is None:
        case.skipTest(
            "qemu-storage-daemon/qemu-img not installed "
            "(Debian packages qemu-system-common, qemu-utils)"
        )


class QMPClientRealDaemonTests(TestCase):
    """The client against a real qemu-storage-daemon."""

    async def test_realDaemon(self) -> None:
        """
        Greeting and negotiation with the real daemon; query-version; the
        image's nodes; an unknown command is a CommandNotFound QMPError; a
        node added and its BLOCK_EXPORT_DELETED event after an export is
        removed; quit closes the connection and the daemon exits.
        """
        requireDaemon(self)
        assert QSD is not None and QEMU_IMG is not None
        workdir = tempfile.mkdtemp(prefix="qmp-")
        self.addCleanup(shutil.rmtree, workdir, True)
        img = os.path.join(workdir, "a.qcow2")
        subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", img, "4M"], check=True)
        sock = os.path.join(workdir, "qmp")
        blockdev = {
            "driver": "qcow2",
            "node-name": "n0",
            "file": {"driver": "file", "filename": img},
        }
        proc = subprocess.Popen(
            [
                QSD,
                "--blockdev",
                json.dumps(blockdev),
                "--chardev",
                f"socket,id=m,path={sock},server=on,wait=off",
                "--monitor",
                "chardev=m",
            ]
        )
        self.addCleanup(proc.wait)  # cleanups run last-in first-out: kill, then reap
        self.addCleanup(proc.kill)
        for _ in range(250):
            if os.path.exists(sock):
                break
            await deferLater(reactor, 0.02, lambda: None)
        client = await connectQMP(reactor, sock)
        self.assertEqual(client.greeting.version[0], 7)
        version = await client.execute("query-version")
        self.assertEqual(version["qemu"]["major"], client.greeting.version[0])
        nodes = await client.execute("query-named-block-nodes", {"flat": True})
        self.assertIn("n0", [n["node-name"] for n in nodes])
        with self.assertRaises(QMPError) as cm:
            await client.execute("no-such-command")
        self.assertEqual(cm.exception.errorClass, "CommandNotFound")
        nbd = os.path.join(workdir, "nbd")
        await client.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": nbd}}})
        await client.execute(
            "block-export-add", {"type": "nbd", "id": "e", "node-name": "n0", "name": "a"}
        )
        deleted = client.waitForEvent("BLOCK_EXPORT_DELETED", timeout=10)
        await client.execute("block-export-del", {"id": "e"})
        self.assertEqual((await deleted).data, {"id": "e"})
        closed = client.whenClosed()
        await client.execute("quit")
        await closed
        for _ in range(250):
            if proc.poll() is not None:
                break
            await deferLater(reactor, 0.02, lambda: None)
        self.assertEqual(proc.poll(), 0)
