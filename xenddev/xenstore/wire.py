# -*- test-case-name: tests.test_xenstore_wire -*-
"""
The XenStore wire format: operation numbers, packets, and an incremental
parser.

A packet is a 16-byte header (type, req_id, tx_id, len; four uint32 in host
byte order, C{struct xsd_sockmsg}) followed by C{len} bytes of payload, at most
L{PAYLOAD_MAX}. Both the client protocol and the embedded server use this
module; it knows nothing about sockets or Deferreds.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from enum import IntEnum

import attrs

from xenddev.xenstore.errors import InvalidPayloadError, MalformedPacket

#: C{XENSTORE_PAYLOAD_MAX}: "Violating this is very bad" — xenstored drops the
#: connection of a client that sends more.
PAYLOAD_MAX = 4096

#: C{XENSTORE_ABS_PATH_MAX} and C{XENSTORE_REL_PATH_MAX}.
ABS_PATH_MAX = 3072
REL_PATH_MAX = 2048

HEADER = struct.Struct("=IIII")
HEADER_SIZE = HEADER.size

#: req_id and tx_id are uint32 on the wire.
UINT32_MAX = 0xFFFFFFFF


class Op(IntEnum):
    """
    C{enum xsd_sockmsg_type} of Xen 4.17.

    Numbers 0–19 are pyxs's C{Op} (checked by a test). pyxs stops at 19 and
    calls RESTRICT 128; in xs_wire.h RESTRICT was 20 and is gone, and 21/22 are
    RESET_WATCHES and DIRECTORY_PART, which pyxs lacks (workaround: this enum
    replaces pyxs's table).
    """

    CONTROL = 0  # called DEBUG before Xen 4.7
    DIRECTORY = 1
    READ = 2
    GET_PERMS = 3
    WATCH = 4
    UNWATCH = 5
    TRANSACTION_START = 6
    TRANSACTION_END = 7
    INTRODUCE = 8
    RELEASE = 9
    GET_DOMAIN_PATH = 10
    WRITE = 11
    MKDIR = 12
    RM = 13
    SET_PERMS = 14
    WATCH_EVENT = 15
    ERROR = 16
    IS_DOMAIN_INTRODUCED = 17
    RESUME = 18
    SET_TARGET = 19
    # 20 was XS_RESTRICT: removed from xenstored, never sent.
    RESET_WATCHES = 21
    DIRECTORY_PART = 22

    INVALID = 0xFFFF  # "Guaranteed to remain an invalid type"


#: C{DEBUG} is the pre-4.7 name of C{CONTROL}; pyxs still uses it.
DEBUG = Op.CONTROL


#: Operation names by number (error replies and metrics name operations;
#: calling the enum costs several times this lookup).
_OP_NAMES: dict[int, str] = {int(op): op.name for op in Op}


def opName(op: int) -> str:
    """Return the name of operation number C{op}, or C{"OP<n>"} if unknown."""
    name = _OP_NAMES.get(op)
    return name if name is not None else f"OP{op}"


@attrs.frozen
class Packet:
    """
    One XenStore message, request or reply.

    @ivar op: the operation (L{Op} value, or any int for a malformed peer).
    @ivar reqId: request id, echoed by xenstored in the reply; 0 in events.
    @ivar txId: transaction id, 0 outside a transaction.
    @ivar payload: the raw payload, at most L{PAYLOAD_MAX} bytes.
    """

    op: int
    reqId: int
    txId: int
    payload: bytes

    def encode(self) -> bytes:
        """Serialise the packet: header then payload."""
        if len(self.payload) > PAYLOAD_MAX:
            raise InvalidPayloadError(
                f"payload of {len(self.payload)} bytes exceeds XENSTORE_PAYLOAD_MAX ({PAYLOAD_MAX})"
            )
        return HEADER.pack(self.op, self.reqId, self.txId, len(self.payload)) + self.payload


#: Bound once: the hot send path packs a header per request.
_PACK_HEADER = HEADER.pack
_UNPACK_HEADER = HEADER.unpack_from

#: One parsed packet without the L{Packet} object: C{(op, reqId, txId,
#: payload)}, what L{PacketParser.feedRaw} returns.
RawPacket = tuple[int, int, int, bytes]


def encodePacket(op: int, reqId: int, txId: int, payload: bytes) -> bytes:
    """
    Serialise one packet without building a L{Packet} (the hot send path).

    @raise InvalidPayloadError: if C{payload} is longer than L{PAYLOAD_MAX}.
    """
    if len(payload) > PAYLOAD_MAX:
        raise InvalidPayloadError(
            f"payload of {len(payload)} bytes exceeds XENSTORE_PAYLOAD_MAX ({PAYLOAD_MAX})"
        )
    return _PACK_HEADER(op, reqId, txId, len(payload)) + payload


class PacketParser:
    """
    Incremental parser: feed it bytes as they arrive, in any split, and it
    returns the complete packets.

    A header announcing more than C{maxPayload} bytes raises
    L{MalformedPacket}; the stream cannot be resynchronised after that, so the
    caller must drop the connection (as xenstored does).
    """

    def __init__(self, maxPayload: int = PAYLOAD_MAX) -> None:
        # The bytes of an incomplete packet. Usually empty: a chunk then
        # parses in place, each payload one slice of it (no copy of the
        # chunk into a buffer and out again).
        self._buffer = b""
        self._maxPayload = maxPayload

    def feed(self, data: bytes) -> list[Packet]:
        """Add C{data} to the buffer and return every packet now complete."""
        try:
            raw = self.feedRaw(data)
        except MalformedPacket as e:
            e.packets = [Packet(*p) for p in e.packets]
            raise
        return [Packet(*p) for p in raw]

    def feedRaw(self, data: bytes) -> list[RawPacket]:
        """
        Like L{feed}, but each packet is a plain C{(op, reqId, txId,
        payload)} tuple (the client's receive path: a L{Packet} costs more
        to build than the rest of a reply's parsing). The L{MalformedPacket}
        it raises carries such tuples too.
        """
        if type(data) is not bytes:
            data = bytes(data)  # slices must be bytes, not bytearray/memoryview
        if self._buffer:
            data = self._buffer + data
        packets: list[RawPacket] = []
        append = packets.append
        unpack = _UNPACK_HEADER
        maxPayload = self._maxPayload
        offset = 0
        end = len(data)
        while end - offset >= HEADER_SIZE:
            op, reqId, txId, length = unpack(data, offset)
            if length > maxPayload:
                self._buffer = data[offset:]
                raise MalformedPacket(
                    f"packet announces a payload of {length} bytes "
                    f"(more than {maxPayload}); stream is unusable",
                    packets,
                )
            start = offset + HEADER_SIZE
            stop = start + length
            if stop > end:
                break
            append((op, reqId, txId, data[start:stop]))
            offset = stop
        self._buffer = data[offset:] if offset < end else b""
        return packets

    def pending(self) -> int:
        """How many bytes of an incomplete packet are buffered."""
        return len(self._buffer)


def joinStrings(strings: Iterable[bytes]) -> bytes:
    """Encode a request's string arguments, each followed by a NUL."""
    return b"".join(s + b"\0" for s in strings)


def splitStrings(payload: bytes) -> list[bytes]:
    """
    Decode a payload made of NUL-terminated strings (DIRECTORY, GET_PERMS,
    WATCH_EVENT replies). A missing final NUL is tolerated.
    """
    if not payload:
        return []
    if payload.endswith(b"\0"):
        payload = payload[:-1]
    return payload.split(b"\0")


def decodeError(payload: bytes) -> str:
    """The errno name carried by an ERROR reply (NUL-terminated string)."""
    return payload.split(b"\0", 1)[0].decode("ascii", "replace") or "EINVAL"
