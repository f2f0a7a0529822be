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
_TRANSACTION_START = 6


class _DeviceTransport(abstract.FileDescriptor):
    """A read/write transport over a character device's file descriptor."""

    def __init__(self, fd: int, protocol: IProtocol, reactor: object) -> None:
        super().__init__(reactor)  # type: ignore[arg-type]
        self._fd = fd
        self.protocol = protocol
        self._outgoing = bytearray()
        self._incoming = bytearray()
        #: The req_id of the TRANSACTION_START awaiting its reply, if any.
        self._startPending: int | None = None
        fdesc.setNonBlocking(fd)

    def fileno(self) -> int:
        return self._fd

    def write(self, data: bytes) -> None:
        """
        Write whole XenStore messages to the device at once, one per
        write(2), without FileDescriptor's buffering; hold the messages
        after a TRANSACTION_START until its reply has come.

        Linux's xenbus device differs from a socket three times: its poll
        never reports it writable (so a buffered write waiting for
        writability was never made: the agent in a real driver domain hung
        at start); it takes one message per write, handling the first
        complete message of a write and dropping the rest (so requests
        pipelined into one write were lost); and it files each
        TRANSACTION_START reply under the transaction started last, so with
        two starts outstanding one transaction's id is unknown to it and it
        answers that transaction's requests ENOENT itself (real Xen: the
        agent's reads of a target failed). A write of one message always
        completes at once.
        """
        if self.disconnected or self.disconnecting or not data:
            return
        self._outgoing += data
        self._flush()

    def _flush(self) -> None:
        while self._startPending is None and len(self._outgoing) >= _HEADER_SIZE:
            kind, reqId, _tx, length = _HEADER.unpack_from(self._outgoing)
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
            if kind == _TRANSACTION_START:
                self._startPending = reqId

    def _received(self, data: bytes) -> None:
        """Pass replies on; once a pending TRANSACTION_START is answered, send on."""
        self._incoming += data
        answered = False
        while len(self._incoming) >= _HEADER_SIZE:
            _kind, reqId, _tx, length = _HEADER.unpack_from(self._incoming)
            if len(self._incoming) < _HEADER_SIZE + length:
                break
            del self._incoming[: _HEADER_SIZE + length]
            if self._startPending is not None and reqId == self._startPending:
                answered = True
        self.protocol.dataReceived(data)
        if answered:
            self._startPending = None
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
