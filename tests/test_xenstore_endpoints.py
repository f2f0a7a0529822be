"""
Tests for L{xenddev.xenstore.endpoints}: address parsing and socket
discovery (checked against pyxs's rules), and L{XenbusEndpoint} over one end
of a socket pair on the real reactor.
"""

from __future__ import annotations

import errno
import os
import socket
from unittest import mock

import pyxs.connection
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from xenddev.xenstore.client import XenStoreClient
from xenddev.xenstore.endpoints import (
    XenbusEndpoint,
    XenStoreAddress,
    endpointFor,
    parseAddress,
    unixSocketPath,
    xenbusPath,
)
from xenddev.xenstore.errors import InvalidArgumentError, NoEntryError, XenStoreConnectionLost
from xenddev.xenstore.protocol import XenStoreClientFactory
from xenddev.xenstore.wire import Op, Packet, PacketParser


def existing(*paths):
    """An C{exists} function true for exactly C{paths}."""
    return lambda path: path in paths


class UnixSocketPathTests(SynchronousTestCase):
    """L{unixSocketPath} follows pyxs's discovery rules."""

    environments = [
        {},
        {"XENSTORED_PATH": "/tmp/xs.sock"},
        {"XENSTORED_RUNDIR": "/run/xen"},
        {"XENSTORED_PATH": "/tmp/xs.sock", "XENSTORED_RUNDIR": "/run/xen"},
        {"XENSTORED_PATH": "", "XENSTORED_RUNDIR": "/run/xen"},
    ]

    def test_rules(self):
        """XENSTORED_PATH wins, else XENSTORED_RUNDIR/socket, else the default."""
        self.assertEqual(unixSocketPath({}), "/var/run/xenstored/socket")
        self.assertEqual(unixSocketPath({"XENSTORED_RUNDIR": "/run/xen"}), "/run/xen/socket")
        self.assertEqual(
            unixSocketPath({"XENSTORED_PATH": "/p", "XENSTORED_RUNDIR": "/run/xen"}), "/p"
        )

    def test_agreesWithPyxs(self):
        """For each environment, the result is pyxs's private helper's."""
        for env in self.environments:
            with mock.patch.dict(os.environ, env, clear=True):
                self.assertEqual(
                    unixSocketPath(), pyxs.connection._get_unix_socket_path(), repr(env)
                )
                self.assertEqual(unixSocketPath(dict(env)), unixSocketPath(), repr(env))

    def test_xenbusPath(self):
        """/dev/xen/xenbus is preferred, then /proc/xen/xenbus, else the former."""
        self.assertEqual(xenbusPath(existing("/dev/xen/xenbus")), "/dev/xen/xenbus")
        self.assertEqual(xenbusPath(existing("/proc/xen/xenbus")), "/proc/xen/xenbus")
        self.assertEqual(xenbusPath(existing()), "/dev/xen/xenbus")


class ParseAddressTests(SynchronousTestCase):
    """L{parseAddress}."""

    def test_unix(self):
        """C{unix:PATH} is a Unix socket address."""
        address = parseAddress("unix:/x")
        self.assertEqual(address, XenStoreAddress("unix", "/x"))
        self.assertEqual(str(address), "unix:/x")

    def test_xenbusWithPath(self):
        """C{xenbus:PATH} names the device."""
        self.assertEqual(
            parseAddress("xenbus:/dev/xen/xenbus"), XenStoreAddress("xenbus", "/dev/xen/xenbus")
        )

    def test_xenbusAlone(self):
        """C{xenbus} finds the device."""
        self.assertEqual(
            parseAddress("xenbus", exists=existing("/proc/xen/xenbus")),
            XenStoreAddress("xenbus", "/proc/xen/xenbus"),
        )

    def test_autoXenstoredPath(self):
        """C{auto} uses XENSTORED_PATH first."""
        env = {"XENSTORED_PATH": "/tmp/s", "XENSTORED_RUNDIR": "/run/xen"}
        address = parseAddress("auto", environ=env, exists=existing("/tmp/s"))
        self.assertEqual(address, XenStoreAddress("unix", "/tmp/s"))

    def test_autoRundir(self):
        """C{auto} uses XENSTORED_RUNDIR/socket without XENSTORED_PATH."""
        address = parseAddress(
            "auto", environ={"XENSTORED_RUNDIR": "/run/xen"}, exists=existing("/run/xen/socket")
        )
        self.assertEqual(address, XenStoreAddress("unix", "/run/xen/socket"))

    def test_autoDefault(self):
        """C{auto} (or None) defaults to /var/run/xenstored/socket."""
        for spec in ["auto", None]:
            address = parseAddress(
                spec, environ={}, exists=existing("/var/run/xenstored/socket", "/dev/xen/xenbus")
            )
            self.assertEqual(address, XenStoreAddress("unix", "/var/run/xenstored/socket"))

    def test_autoFallsBackToXenbus(self):
        """C{auto} picks xenbus only when the socket is absent and the device present."""
        self.assertEqual(
            parseAddress("auto", environ={}, exists=existing("/dev/xen/xenbus")),
            XenStoreAddress("xenbus", "/dev/xen/xenbus"),
        )
        self.assertEqual(
            parseAddress("auto", environ={}, exists=existing("/proc/xen/xenbus")),
            XenStoreAddress("xenbus", "/proc/xen/xenbus"),
        )

    def test_autoNothingExists(self):
        """With neither socket nor device, C{auto} names the socket."""
        self.assertEqual(
            parseAddress(None, environ={"XENSTORED_PATH": "/s"}, exists=existing()),
            XenStoreAddress("unix", "/s"),
        )

    def test_badAddresses(self):
        """Unknown schemes and empty paths raise InvalidArgumentError."""
        for bad in ["tcp:1", "unix:", "foo", "unix", "xenbus:", "", ":/x"]:
            exc = self.assertRaises(InvalidArgumentError, parseAddress, bad)
            self.assertIn(repr(bad), str(exc))
            self.assertIsInstance(exc, ValueError)


class EndpointForTests(SynchronousTestCase):
    """L{endpointFor} picks the endpoint class from the address."""

    def test_unix(self):
        """A Unix address gives a UNIXClientEndpoint on that path."""
        ep = endpointFor(reactor, "unix:/tmp/xs")
        self.assertIsInstance(ep, UNIXClientEndpoint)
        self.assertEqual(ep._path, "/tmp/xs")

    def test_xenbus(self):
        """A xenbus address (string or parsed) gives a XenbusEndpoint."""
        for address in ["xenbus:/dev/x", XenStoreAddress("xenbus", "/dev/x")]:
            ep = endpointFor(reactor, address)
            self.assertIsInstance(ep, XenbusEndpoint)
            self.assertEqual(ep._path, "/dev/x")
        self.assertTrue(verifyObject(IStreamClientEndpoint, ep))


class RawPeer:
    """
    The xenstored end of a socket pair: the test reads the client's raw
    bytes from it and writes raw replies, with the reactor telling it when
    data is there.
    """

    def __init__(self, sock):
        self.sock = sock
        sock.setblocking(False)
        self.parser = PacketParser()
        self.packets: list[Packet] = []
        self.waiting: list[Deferred] = []
        self.eof = Deferred()
        self.reading = False

    def fileno(self):
        """The socket's descriptor, for the reactor."""
        return self.sock.fileno()

    def logPrefix(self):
        """Log prefix for the reactor."""
        return "RawPeer"

    def doRead(self):
        """Read raw bytes and parse the client's packets."""
        data = self.sock.recv(65536)
        if not data:
            self.stop()
            self.eof.callback(None)
            return
        self.packets.extend(self.parser.feed(data))
        while self.packets and self.waiting:
            self.waiting.pop(0).callback(self.packets.pop(0))

    def connectionLost(self, reason):
        """Called by the reactor if the descriptor fails."""

    def start(self):
        """Start watching for data."""
        self.reading = True
        reactor.addReader(self)

    def stop(self):
        """Stop watching for data."""
        if self.reading:
            self.reading = False
            reactor.removeReader(self)

    def nextPacket(self):
        """A Deferred firing with the next packet the client sends."""
        d = Deferred()
        if self.packets:
            d.callback(self.packets.pop(0))
        else:
            self.waiting.append(d)
        return d

    def send(self, packet):
        """Write a raw packet to the client."""
        self.sock.sendall(packet.encode())

    def close(self):
        """Stop reading and close the socket."""
        self.stop()
        self.sock.close()


class XenbusEndpointTests(TestCase):
    """L{XenbusEndpoint} on the real reactor, a socket pair standing in for the device."""

    def setUp(self):
        """Make a socket pair: the client's end is opened via the opener."""
        self.clientSock, peerSock = socket.socketpair()
        self.addCleanup(self.clientSock.close)
        self.peer = RawPeer(peerSock)
        self.addCleanup(self.peer.close)
        self.peer.start()
        self.opened: list[tuple[str, int]] = []

    def opener(self, path):
        """
        Return a descriptor for the client's end of the pair; the socket
        object is closed so the descriptor is the end's only reference.
        """
        fd = os.dup(self.clientSock.fileno())
        self.clientSock.close()
        self.opened.append((path, fd))
        return fd

    async def connectClient(self):
        """Connect a XenStoreClient through the endpoint and the socket pair."""
        ep = XenbusEndpoint(reactor, "/dev/xen/xenbus", opener=self.opener)
        proto = await ep.connect(XenStoreClientFactory())
        client = XenStoreClient(proto, reactor)

        async def disconnect():
            await client.disconnect()

        self.addCleanup(lambda: Deferred.fromCoroutine(disconnect()))
        return client

    async def test_requestAndReply(self):
        """
        A request goes out as a raw packet on the device; the raw reply
        written back fires the client's Deferred.
        """
        client = await self.connectClient()
        self.assertEqual([p for p, _ in self.opened], ["/dev/xen/xenbus"])
        self.assertTrue(client.connected)
        self.assertEqual(client.protocol.transport.getPeer(), "xenbus")
        self.assertEqual(client.protocol.transport.getHost(), "xenbus")
        d = client.read("/local/domain/0/name")
        packet = await self.peer.nextPacket()
        self.assertEqual(packet.op, Op.READ)
        self.assertEqual(packet.payload, b"/local/domain/0/name\0")
        self.peer.send(Packet(Op.READ, packet.reqId, 0, b"Domain-0"))
        self.assertEqual(await d, "Domain-0")

        d2 = client.readOrNone("/missing")
        packet2 = await self.peer.nextPacket()
        self.peer.send(Packet(Op.ERROR, packet2.reqId, 0, b"ENOENT\0"))
        self.assertIsNone(await d2)

    async def test_oneRequestInFlight(self):
        """
        Requests reach the device one message per write(2), the first at
        once (no reactor turn: Linux's xenbus device never reports itself
        writable), each next one once the previous is answered: the device
        handles one message per write, and its ring gets a pointer into
        its one message buffer, which a second write would overwrite.
        A watch event does not count as an answer. A SOCK_SEQPACKET pair
        keeps write boundaries as the device does.
        """
        clientSock, deviceSock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.addCleanup(deviceSock.close)

        def opener(path):
            fd = os.dup(clientSock.fileno())
            clientSock.close()
            return fd

        ep = XenbusEndpoint(reactor, "/dev/xen/xenbus", opener=opener)
        client = XenStoreClient(await ep.connect(XenStoreClientFactory()), reactor)
        deviceSock.setblocking(False)
        reads = [client.read(f"/n{i}") for i in range(3)]
        seen = []
        for _ in range(3):
            (packet,) = PacketParser().feed(deviceSock.recv(65536))
            self.assertRaises(BlockingIOError, deviceSock.recv, 65536)
            seen.append(packet.payload)
            deviceSock.send(Packet(Op.WATCH_EVENT, 0, 0, b"/w\0t\0").encode())
            await deferLater(reactor, 0.02, lambda: None)
            self.assertRaises(BlockingIOError, deviceSock.recv, 65536)
            deviceSock.send(Packet(Op.READ, packet.reqId, 0, b"v").encode())
            await deferLater(reactor, 0.02, lambda: None)
        self.assertEqual(seen, [b"/n0\0", b"/n1\0", b"/n2\0"])
        self.assertEqual([self.successResultOf(r) for r in reads], ["v", "v", "v"])
        client.protocol.transport.loseConnection()
        await deferLater(reactor, 0, lambda: None)
        self.assertFalse(client.connected)

    async def test_errorReply(self):
        """An ERROR written on the device fails the request."""
        client = await self.connectClient()
        d = client.read("/x")
        packet = await self.peer.nextPacket()
        self.peer.send(Packet(Op.ERROR, packet.reqId, 0, b"ENOENT\0"))
        with self.assertRaises(NoEntryError):
            await d

    async def test_deviceClosed(self):
        """
        When the other end closes, pending requests fail with
        XenStoreConnectionLost and the descriptor is closed.
        """
        client = await self.connectClient()
        d = client.read("/x")
        await self.peer.nextPacket()
        lost = client.protocol.whenConnectionLost()
        self.peer.close()
        await lost
        with self.assertRaises(XenStoreConnectionLost):
            await d
        self.assertFalse(client.connected)
        [(_, fd)] = self.opened
        self.assertRaises(OSError, os.fstat, fd)

    async def test_disconnectClosesDescriptor(self):
        """disconnect() closes the device descriptor; the peer sees EOF."""
        client = await self.connectClient()
        [(_, fd)] = self.opened
        await client.disconnect()
        self.assertRaises(OSError, os.fstat, fd)
        await self.peer.eof

    def test_openerFails(self):
        """An opener raising OSError fails connect with ConnectionLost naming the path."""

        def opener(path):
            raise OSError(errno.ENOENT, "No such file or directory", path)

        ep = XenbusEndpoint(reactor, "/dev/xen/nonexistent", opener=opener)
        f = self.failureResultOf(ep.connect(XenStoreClientFactory()), ConnectionLost)
        self.assertIn("/dev/xen/nonexistent", str(f.value))
        self.assertIn(os.strerror(errno.ENOENT), str(f.value))

    def test_openerFailsWithoutErrno(self):
        """An OSError without errno is reported as EIO."""

        def opener(path):
            raise OSError("weird")

        ep = XenbusEndpoint(reactor, "/dev/xen/xenbus", opener=opener)
        f = self.failureResultOf(ep.connect(XenStoreClientFactory()), ConnectionLost)
        self.assertIn(os.strerror(errno.EIO), str(f.value))

    def test_factoryRefuses(self):
        """A factory returning None fails connect and the descriptor is closed."""
        ep = XenbusEndpoint(reactor, "/dev/xen/xenbus", opener=self.opener)
        factory = Factory.forProtocol(lambda: None)
        factory.buildProtocol = lambda addr: None
        self.failureResultOf(ep.connect(factory), ConnectionDone)
        [(_, fd)] = self.opened
        self.assertRaises(OSError, os.fstat, fd)

    def test_descriptorAlreadyClosed(self):
        """
        If the descriptor is already closed when the transport is lost, the
        protocol is still told of the loss.
        """
        from xenddev.xenstore.endpoints import _DeviceTransport

        proto = XenStoreClientFactory().buildProtocol(None)
        fd = self.opener("/dev/xen/xenbus")
        transport = _DeviceTransport(fd, proto, reactor)
        transport.connected = 1
        proto.makeConnection(transport)
        lost = proto.whenConnectionLost()
        os.close(fd)
        transport.connectionLost(Failure(ConnectionDone()))
        self.assertIsNone(self.successResultOf(lost))
        self.assertFalse(transport.connected)
        self.failureResultOf(proto.request(Op.READ, b"/a\0"), XenStoreConnectionLost)

    def test_defaultOpener(self):
        """Without an opener, the device path is opened with os.open."""
        calls = []

        def fakeOpen(path, flags):
            calls.append((path, flags))
            raise OSError(errno.EACCES, "denied")

        self.patch(os, "open", fakeOpen)
        ep = XenbusEndpoint(reactor, "/dev/xen/xenbus")
        f = self.failureResultOf(ep.connect(XenStoreClientFactory()), ConnectionLost)
        self.assertIn(os.strerror(errno.EACCES), str(f.value))
        [(path, flags)] = calls
        self.assertEqual(path, "/dev/xen/xenbus")
        self.assertTrue(flags & os.O_RDWR)
        self.assertTrue(flags & os.O_NONBLOCK)
