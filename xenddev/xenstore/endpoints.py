# -*- test-case-name: tests.test_xenstore_endpoints -*-
"""
Where XenStore is and how to connect to it.

Addresses are strings: C{unix:PATH} (xenstored's socket), C{xenbus:PATH}
(the kernel's xenbus device, used inside a domain), or C{auto}, which applies
pyxs's (and libxenstore's) discovery rules: C{XENSTORED_PATH}, else
C{XENSTORED_RUNDIR}/socket, else C{/var/run/xenstored/socket}; and when that
socket does not exist but C{/dev/xen/xenbus} does, the xenbus device.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Callable, Iterable, Mapping

import attrs
from twisted.internet import abstract, fdesc
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.python.failure import Failure
from zope.interface import implementer

from xenddev.xenstore.errors import InvalidArgumentError

DEFAULT_RUNDIR = "/var/run/xenstored"
XENBUS_PATHS = ("/dev/xen/xenbus", "/proc/xen/xenbus")


def unixSocketPath(environ: Mapping[str, str] | None = None) -> str:
    """
    The xenstored socket path, by pyxs's rules (C{XENSTORED_PATH}, else
    C{XENSTORED_RUNDIR} or C{/var/run/xenstored}, plus C{/socket}).
    """
    env = os.environ if environ is None else environ
    if env.get("XENSTORED_PATH"):
        return env["XENSTORED_PATH"]
    return os.path.join(env.get("XENSTORED_RUNDIR") or DEFAULT_RUNDIR, "socket")


def xenbusPath(exists: Callable[[str], bool] = os.path.exists) -> str:
    """The xenbus device: C{/dev/xen/xenbus}, or the old C{/proc/xen/xenbus}."""
    for path in XENBUS_PATHS:
        if exists(path):
            return path
    return XENBUS_PATHS[0]


@attrs.frozen
class XenStoreAddress:
    """
    A parsed XenStore address.

    @ivar kind: C{"unix"} or C{"xenbus"}.
    @ivar path: the socket or device path.
    """

    kind: str
    path: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.path}"


def parseAddress(
    address: str | None = None,
    environ: Mapping[str, str] | None = None,
    exists: Callable[[str], bool] = os.path.exists,
) -> XenStoreAddress:
    """
    Parse C{unix:PATH}, C{xenbus:PATH}, C{xenbus} or C{auto}/C{None}.

    @raise InvalidArgumentError: naming the bad address.
    """
    if address is None or address == "auto":
        sock = unixSocketPath(environ)
        if not exists(sock):
            bus = xenbusPath(exists)
            if exists(bus):
                return XenStoreAddress("xenbus", bus)
        return XenStoreAddress("unix", sock)
    kind, sep, path = address.partition(":")
    if kind == "xenbus" and not sep:
        return XenStoreAddress("xenbus", xenbusPath(exists))
    if kind not in ("unix", "xenbus") or not sep or not path:
        raise InvalidArgumentError(
            f"bad XenStore address {address!r}: expected auto, unix:PATH or xenbus:PATH"
        )
    return XenStoreAddress(kind, path)


#: A XenStore message's header (type, req_id, tx_id, len: four uint32s),
#: and its payload length field, little-endian as on x86.
_HEADER = struct.Struct("<IIII")
_HEADER_SIZE = _HEADER.size
_WATCH_EVENT = 15


class _DeviceTransport(abstract.FileDescriptor):
    """A read/write transport over a character device's file descriptor."""

    def __init__(self, fd: int, protocol: IProtocol, reactor: object) -> None:
        super().__init__(reactor)  # type: ignore[arg-type]
        self._fd = fd
        self.protocol = protocol
        self._outgoing = bytearray()
        self._incoming = bytearray()
        #: The req_id of the request awaiting its reply, if any.
        self._pending: int | None = None
        fdesc.setNonBlocking(fd)

    def fileno(self) -> int:
        return self._fd

    def write(self, data: bytes) -> None:
        """
        Send whole XenStore messages to the device one at a time: each in a
        write(2) of its own, made at once (no FileDescriptor buffering),
        and the next only once the previous one is answered.

        Linux's xenbus device is made for one request in flight, as
        libxenstore uses it, and differs from a socket in ways that broke
        pipelining (all seen on real Xen, the agent in a driver domain):
        its poll never reports it writable (a buffered write waiting for
        writability was never made); it handles the first complete message
        of a write and drops the rest; it files each TRANSACTION_START
        reply under the transaction started last (two starts in flight
        lost one transaction, whose requests it then answered ENOENT); and
        it hands the ring a pointer into its one message buffer, which the
        next write overwrites before the message is sent (payloads of
        pipelined requests were mixed up: xenstored saw an RM of
        C{.../request 172} and answered ENOMEM). A write of one message
        always completes at once.
        """
        if self.disconnected or self.disconnecting or not data:
            return
        self._outgoing += data
        self._flush()

    def _flush(self) -> None:
        while self._pending is None and len(self._outgoing) >= _HEADER_SIZE:
            _kind, reqId, _tx, length = _HEADER.unpack_from(self._outgoing)
            size = _HEADER_SIZE + length
            if len(self._outgoing) < size:
                return
            try:
                os.write(self._fd, self._outgoing[:size])
            except OSError as e:
                self._outgoing.clear()
                why = os.strerror(e.errno or errno.EIO)
                reason = Failure(ConnectionLost(f"xenbus write failed: {why}"))
                self.reactor.callLater(0, self.connectionLost, reason)  # type: ignore[attr-defined]
                return
            del self._outgoing[:size]
            self._pending = reqId

    def _received(self, data: bytes) -> None:
        """Pass replies on; once the request in flight is answered, send the next."""
        self._incoming += data
        answered = False
        while len(self._incoming) >= _HEADER_SIZE:
            kind, reqId, _tx, length = _HEADER.unpack_from(self._incoming)
            if len(self._incoming) < _HEADER_SIZE + length:
                break
            del self._incoming[: _HEADER_SIZE + length]
            if kind != _WATCH_EVENT and reqId == self._pending:
                answered = True
        self.protocol.dataReceived(data)
        if answered:
            self._pending = None
            self._flush()

    def writeSequence(self, data: Iterable[bytes]) -> None:
        """See L{write}."""
        self.write(b"".join(data))

    def writeSomeData(self, data: bytes) -> int:
        # Nothing is ever buffered in FileDescriptor (see write).
        return len(data)

    def loseConnection(self, _connDone: Failure | None = None) -> None:
        """
        Close at once: nothing is buffered, and waiting for writability (as
        FileDescriptor does) would wait for ever on the xenbus device.
        """
        if self.disconnected or self.disconnecting:
            return
        self.stopReading()
        self.stopWriting()
        self.disconnecting = True
        reason = _connDone if _connDone is not None else Failure(ConnectionDone())
        self.reactor.callLater(0, self.connectionLost, reason)  # type: ignore[attr-defined]

    def doRead(self) -> Exception | None:
        return fdesc.readFromFD(self._fd, self._received)

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        try:
            os.close(self._fd)
        except OSError:
            pass
        self.protocol.connectionLost(reason)

    def getPeer(self) -> str:
        return "xenbus"

    def getHost(self) -> str:
        return "xenbus"


@implementer(IStreamClientEndpoint)
class XenbusEndpoint:
    """
    Connects to XenStore through the kernel's xenbus device, as a guest or
    driver domain does.

    @param opener: opens the device and returns a file descriptor; tests
        substitute one end of a socket pair.
    """

    def __init__(
        self,
        reactor: object,
        path: str = XENBUS_PATHS[0],
        opener: Callable[[str], int] | None = None,
    ) -> None:
        self._reactor = reactor
        self._path = path
        self._opener = opener or (lambda p: os.open(p, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC))

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        """Open the device and start the protocol on it."""
        try:
            fd = self._opener(self._path)
        except OSError as e:
            return fail(
                ConnectionLost(f"cannot open {self._path}: {os.strerror(e.errno or errno.EIO)}")
            )
        protocol = protocolFactory.buildProtocol(None)  # type: ignore[arg-type]
        if protocol is None:
            os.close(fd)
            return fail(ConnectionDone("factory refused the connection"))
        transport = _DeviceTransport(fd, protocol, self._reactor)
        transport.connected = 1
        protocol.makeConnection(transport)
        transport.startReading()
        return succeed(protocol)


def endpointFor(reactor: object, address: str | XenStoreAddress | None = None) -> object:
    """An L{IStreamClientEndpoint} for a XenStore address (see L{parseAddress})."""
    addr = address if isinstance(address, XenStoreAddress) else parseAddress(address)
    if addr.kind == "xenbus":
        return XenbusEndpoint(reactor, addr.path)
    return UNIXClientEndpoint(reactor, addr.path)
