"""
Tests for L{xenddev.xenstore.wire} (packets, the incremental parser, payload
helpers) and L{xenddev.xenstore.errors} (ERROR replies and the exception
hierarchy shared with pyxs).
"""

from __future__ import annotations

import errno
import os
import struct

import pyxs._internal
import pyxs.exceptions
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tests.support.profiles import examples
from xenddev.xenstore import errors, wire
from xenddev.xenstore.errors import (
    XSD_ERRORS,
    AccessDeniedError,
    BusyError,
    ConflictError,
    ExistsError,
    InvalidArgumentError,
    InvalidPathError,
    InvalidPayloadError,
    InvalidPermissionError,
    InvalidRequestError,
    MalformedPacket,
    NoEntryError,
    QuotaError,
    TransactionRetriesExhausted,
    UnexpectedPacket,
    XenStoreConnectionLost,
    XenStoreError,
    XenStoreTimeout,
    errorFromReply,
)
from xenddev.xenstore.wire import (
    HEADER_SIZE,
    PAYLOAD_MAX,
    UINT32_MAX,
    Op,
    Packet,
    PacketParser,
    decodeError,
    encodePacket,
    joinStrings,
    opName,
    splitStrings,
)

packets = st.builds(
    Packet,
    op=st.integers(min_value=0, max_value=22),
    reqId=st.integers(min_value=0, max_value=UINT32_MAX),
    txId=st.integers(min_value=0, max_value=UINT32_MAX),
    payload=st.binary(min_size=0, max_size=PAYLOAD_MAX),
)


def rawHeader(op: int, reqId: int, txId: int, length: int) -> bytes:
    """A header in host byte order, built independently of L{wire.HEADER}."""
    return struct.pack("=4I", op, reqId, txId, length)


class PacketEncodingTests(SynchronousTestCase):
    """L{Packet.encode} and L{encodePacket}."""

    def test_headerLayout(self):
        """
        The header is four host-order uint32 (type, req_id, tx_id, len)
        followed by the payload.
        """
        data = Packet(Op.READ, 7, 3, b"/a\0").encode()
        self.assertEqual(HEADER_SIZE, 16)
        self.assertEqual(data, rawHeader(2, 7, 3, 3) + b"/a\0")

    def test_encodePacketSameAsPacketEncode(self):
        """The fast path produces the same bytes as L{Packet.encode}."""
        self.assertEqual(
            encodePacket(Op.WRITE, 0xFFFFFFFF, 12, b"/x\0value"),
            Packet(Op.WRITE, 0xFFFFFFFF, 12, b"/x\0value").encode(),
        )

    def test_roundTrip(self):
        """A packet encoded then parsed is the same packet."""
        for packet in [
            Packet(Op.CONTROL, 1, 0, b""),
            Packet(Op.WATCH_EVENT, 0, 0, b"/p\0tok\0"),
            Packet(Op.DIRECTORY_PART, UINT32_MAX, UINT32_MAX, b"x" * PAYLOAD_MAX),
        ]:
            self.assertEqual(PacketParser().feed(packet.encode()), [packet])

    def test_maximumPayloadAccepted(self):
        """A payload of exactly XENSTORE_PAYLOAD_MAX bytes is allowed."""
        data = encodePacket(Op.WRITE, 1, 0, b"v" * 4096)
        self.assertEqual(len(data), HEADER_SIZE + 4096)

    def test_encodePacketRejectsOversizedPayload(self):
        """
        encodePacket refuses a payload over 4096 bytes with
        L{InvalidPayloadError}, which is a L{ValueError} and pyxs's
        C{InvalidPayload}.
        """
        exc = self.assertRaises(InvalidPayloadError, encodePacket, Op.WRITE, 1, 0, b"v" * 4097)
        self.assertIsInstance(exc, ValueError)
        self.assertIsInstance(exc, pyxs.exceptions.InvalidPayload)
        self.assertIn("4097", str(exc))

    def test_packetEncodeRejectsOversizedPayload(self):
        """L{Packet.encode} applies the same limit."""
        exc = self.assertRaises(InvalidPayloadError, Packet(Op.WRITE, 1, 0, b"v" * 5000).encode)
        self.assertIn("5000", str(exc))


class PacketParserTests(SynchronousTestCase):
    """L{PacketParser} reassembles packets from arbitrary byte splits."""

    def test_severalPacketsInOneFeed(self):
        """Every complete packet in one chunk is returned, in order."""
        ps = [
            Packet(Op.READ, 1, 0, b"value"),
            Packet(Op.WATCH_EVENT, 0, 0, b"/a\0t\0"),
            Packet(Op.WRITE, 2, 5, b"OK\0"),
        ]
        parser = PacketParser()
        self.assertEqual(parser.feed(b"".join(p.encode() for p in ps)), ps)
        self.assertEqual(parser.pending(), 0)

    def test_headerSplitAcrossFeeds(self):
        """A header arriving in pieces yields nothing until it is complete."""
        packet = Packet(Op.READ, 9, 0, b"abc")
        data = packet.encode()
        parser = PacketParser()
        self.assertEqual(parser.feed(data[:5]), [])
        self.assertEqual(parser.pending(), 5)
        self.assertEqual(parser.feed(data[5:11]), [])
        self.assertEqual(parser.feed(data[11:]), [packet])
        self.assertEqual(parser.pending(), 0)

    def test_payloadSplitAcrossFeeds(self):
        """A payload arriving in pieces is reassembled."""
        packet = Packet(Op.DIRECTORY, 4, 0, b"a\0b\0c\0" * 100)
        data = packet.encode()
        parser = PacketParser()
        self.assertEqual(parser.feed(data[: HEADER_SIZE + 10]), [])
        self.assertEqual(parser.pending(), HEADER_SIZE + 10)
        self.assertEqual(parser.feed(data[HEADER_SIZE + 10 : -1]), [])
        self.assertEqual(parser.feed(data[-1:]), [packet])

    def test_packetFollowedByPartialPacket(self):
        """A complete packet is returned and the rest stays buffered."""
        first = Packet(Op.READ, 1, 0, b"x")
        second = Packet(Op.READ, 2, 0, b"yy")
        parser = PacketParser()
        self.assertEqual(parser.feed(first.encode() + second.encode()[:3]), [first])
        self.assertEqual(parser.pending(), 3)
        self.assertEqual(parser.feed(second.encode()[3:]), [second])

    def test_emptyFeed(self):
        """Feeding no bytes returns no packets."""
        self.assertEqual(PacketParser().feed(b""), [])

    def test_oversizedHeaderRaises(self):
        """
        A header announcing more than 4096 bytes raises L{MalformedPacket}
        as soon as the header is complete (before any payload), since the
        stream cannot be resynchronised.
        """
        parser = PacketParser()
        exc = self.assertRaises(MalformedPacket, parser.feed, rawHeader(Op.READ, 1, 0, 4097))
        self.assertIn("4097", str(exc))
        self.assertIsInstance(exc, pyxs.exceptions.ConnectionError)

    def test_customMaximum(self):
        """The payload limit is a parameter of the parser."""
        parser = PacketParser(maxPayload=8)
        self.assertEqual(
            parser.feed(Packet(Op.READ, 1, 0, b"12345678").encode()),
            [Packet(Op.READ, 1, 0, b"12345678")],
        )
        self.assertRaises(MalformedPacket, parser.feed, rawHeader(Op.READ, 2, 0, 9))

    @settings(max_examples=examples(200), deadline=None)
    @given(ps=st.lists(packets, max_size=6), data=st.data())
    def test_anySplitYieldsSamePackets(self, ps, data):
        """
        Any list of packets, encoded and concatenated, then fed in chunks cut
        at arbitrary points, comes out as exactly the same packets.
        """
        stream = b"".join(p.encode() for p in ps)
        cuts = sorted(
            data.draw(st.lists(st.integers(min_value=0, max_value=len(stream)), max_size=20))
        )
        parser = PacketParser()
        out: list[Packet] = []
        start = 0
        for cut in [*cuts, len(stream)]:
            out.extend(parser.feed(stream[start:cut]))
            start = cut
        self.assertEqual(out, ps)
        self.assertEqual(parser.pending(), 0)


class FeedRawTests(SynchronousTestCase):
    """L{PacketParser.feedRaw}: the client's receive path, tuples instead of Packets."""

    def test_tuples(self):
        """Each packet comes out as C{(op, reqId, txId, payload)} with a bytes payload."""
        ps = [Packet(Op.READ, 1, 0, b"value"), Packet(Op.WRITE, 2, 5, b"OK\0")]
        raw = PacketParser().feedRaw(b"".join(p.encode() for p in ps))
        self.assertEqual(raw, [(Op.READ, 1, 0, b"value"), (Op.WRITE, 2, 5, b"OK\0")])
        self.assertEqual([Packet(*t) for t in raw], ps)

    def test_bufferedThenInPlace(self):
        """
        A partial packet is kept; the next chunk completes it; a chunk after
        that (buffer empty again) parses in place. The parser keeps no
        reference to a chunk it has fully consumed.
        """
        first = Packet(Op.READ, 1, 0, b"abc").encode()
        second = Packet(Op.READ, 2, 0, b"defg").encode()
        parser = PacketParser()
        self.assertEqual(parser.feedRaw(first[:7]), [])
        self.assertEqual(parser.pending(), 7)
        self.assertEqual(parser.feedRaw(first[7:]), [(Op.READ, 1, 0, b"abc")])
        self.assertEqual(parser.pending(), 0)
        self.assertEqual(parser.feedRaw(second), [(Op.READ, 2, 0, b"defg")])
        self.assertEqual(parser._buffer, b"")

    def test_bytesLikeInput(self):
        """A bytearray or memoryview chunk still gives bytes payloads."""
        data = Packet(Op.READ, 1, 0, b"xy").encode()
        for chunk in (bytearray(data), memoryview(data)):
            [(_, _, _, payload)] = PacketParser().feedRaw(chunk)
            self.assertIs(type(payload), bytes)
            self.assertEqual(payload, b"xy")

    def test_malformedCarriesTuples(self):
        """
        L{MalformedPacket} from feedRaw carries the complete packets before
        the bad header as tuples; from feed, as L{Packet}s.
        """
        good = Packet(Op.READ, 1, 0, b"v")
        data = good.encode() + rawHeader(Op.READ, 2, 0, 4097)
        exc = self.assertRaises(MalformedPacket, PacketParser().feedRaw, data)
        self.assertEqual(exc.packets, [(Op.READ, 1, 0, b"v")])
        exc = self.assertRaises(MalformedPacket, PacketParser().feed, data)
        self.assertEqual(exc.packets, [good])

    def test_zeroLengthPayloads(self):
        """Packets without a payload, back to back, each come out."""
        data = Packet(Op.RESET_WATCHES, 1, 0, b"").encode() * 3
        self.assertEqual(PacketParser().feedRaw(data), [(Op.RESET_WATCHES, 1, 0, b"")] * 3)


class OpTests(SynchronousTestCase):
    """L{Op} numbering against xs_wire.h and pyxs."""

    def test_agreesWithPyxs(self):
        """
        Every operation pyxs numbers below 20 has the same number here; pyxs's
        DEBUG is our CONTROL (with a DEBUG alias).
        """
        checked = 0
        for name, value in pyxs._internal.Op._asdict().items():
            if value >= 20:
                continue
            if name == "DEBUG":
                self.assertEqual(Op.CONTROL, value)
                self.assertIs(wire.DEBUG, Op.CONTROL)
            else:
                self.assertEqual(Op[name], value, name)
            checked += 1
        self.assertEqual(checked, 20)

    def test_newerOperations(self):
        """The operations pyxs lacks have their Xen 4.17 numbers."""
        self.assertEqual(Op.RESET_WATCHES, 21)
        self.assertEqual(Op.DIRECTORY_PART, 22)
        self.assertNotIn(20, [op.value for op in Op])

    def test_opName(self):
        """opName names known operations and marks unknown numbers."""
        self.assertEqual(opName(2), "READ")
        self.assertEqual(opName(Op.DIRECTORY_PART), "DIRECTORY_PART")
        self.assertEqual(opName(20), "OP20")


class StringHelperTests(SynchronousTestCase):
    """joinStrings, splitStrings and decodeError."""

    def test_joinStrings(self):
        """Each string is followed by a NUL."""
        self.assertEqual(joinStrings([b"/a", b"tok"]), b"/a\0tok\0")
        self.assertEqual(joinStrings([]), b"")

    def test_splitStrings(self):
        """NUL-terminated strings are split; the final NUL is optional."""
        self.assertEqual(splitStrings(b"a\0bb\0c\0"), [b"a", b"bb", b"c"])
        self.assertEqual(splitStrings(b"a\0bb"), [b"a", b"bb"])
        self.assertEqual(splitStrings(b""), [])

    def test_splitJoinRoundTrip(self):
        """splitStrings inverts joinStrings."""
        strings = [b"backend", b"device", b"@introduceDomain"]
        self.assertEqual(splitStrings(joinStrings(strings)), strings)

    def test_decodeError(self):
        """decodeError returns the errno name, ignoring what follows the NUL."""
        self.assertEqual(decodeError(b"ENOENT\0"), "ENOENT")
        self.assertEqual(decodeError(b"EAGAIN\0junk"), "EAGAIN")
        self.assertEqual(decodeError(b"EACCES"), "EACCES")

    def test_decodeErrorEmpty(self):
        """An empty ERROR payload is treated as EINVAL."""
        self.assertEqual(decodeError(b""), "EINVAL")
        self.assertEqual(decodeError(b"\0"), "EINVAL")


class ErrorFromReplyTests(SynchronousTestCase):
    """L{errorFromReply} and the L{XenStoreError} hierarchy."""

    specific = {
        "ENOENT": NoEntryError,
        "EAGAIN": ConflictError,
        "EACCES": AccessDeniedError,
        "E2BIG": QuotaError,
        "ENOSPC": QuotaError,
        "EEXIST": ExistsError,
        "EINVAL": InvalidRequestError,
        "EBUSY": BusyError,
    }

    def test_xsdErrorsTable(self):
        """XSD_ERRORS holds the 15 errno names of xs_wire.h."""
        self.assertEqual(len(XSD_ERRORS), 15)
        self.assertEqual(len(set(XSD_ERRORS)), 15)

    def test_everyNameMapsToItsErrno(self):
        """
        Each errno name becomes a pyxs C{PyXSError} whose errno is the errno
        module's number and whose args are C{(errno, strerror)}.
        """
        for name in XSD_ERRORS:
            exc = errorFromReply(name, "READ", "/a")
            number = getattr(errno, name)
            self.assertIsInstance(exc, XenStoreError)
            self.assertIsInstance(exc, pyxs.exceptions.PyXSError)
            self.assertEqual(exc.errno, number, name)
            self.assertEqual(exc.errname, name)
            self.assertEqual(exc.strerror, os.strerror(number))
            self.assertEqual(exc.args, (number, os.strerror(number)))

    def test_specificSubclasses(self):
        """The errors callers react to have their own classes."""
        for name, cls in self.specific.items():
            self.assertIs(type(errorFromReply(name)), cls, name)

    def test_otherNamesAreGeneric(self):
        """The remaining names give a plain L{XenStoreError}."""
        for name in set(XSD_ERRORS) - set(self.specific):
            self.assertIs(type(errorFromReply(name)), XenStoreError, name)

    def test_unknownName(self):
        """A name xenstored should not send still becomes an error, errno 0."""
        exc = errorFromReply("EWEIRD", "READ", "/a")
        self.assertIs(type(exc), XenStoreError)
        self.assertEqual(exc.errno, 0)
        self.assertEqual(exc.strerror, "EWEIRD")
        self.assertIn("EWEIRD", str(exc))

    def test_errnoTextCached(self):
        """
        Errno numbers and texts are computed once per known name; names the
        errno module does not know are never kept (a peer cannot grow the
        cache), and every error gets the same values either way.
        """
        for _ in range(2):
            exc = errorFromReply("EAGAIN")
            self.assertEqual(exc.args, (errno.EAGAIN, os.strerror(errno.EAGAIN)))
            self.assertEqual(errorFromReply("EBOGUS-1").args, (0, "EBOGUS-1"))
        self.assertIn("EAGAIN", errors._ERRNOS)
        self.assertNotIn("EBOGUS-1", errors._ERRNOS)

    def test_strMentionsOpAndPath(self):
        """str() names the errno, the operation and the path."""
        text = str(errorFromReply("ENOENT", "READ", "/local/domain/7/name"))
        self.assertIn("ENOENT", text)
        self.assertIn("READ", text)
        self.assertIn("/local/domain/7/name", text)
        self.assertIn(os.strerror(errno.ENOENT), text)

    def test_strWithoutContext(self):
        """Without op or path, str() is just the errno and its text."""
        self.assertEqual(str(errorFromReply("EAGAIN")), f"EAGAIN: {os.strerror(errno.EAGAIN)}")
        self.assertEqual(
            str(errorFromReply("EAGAIN", "TRANSACTION_END")),
            f"EAGAIN: {os.strerror(errno.EAGAIN)} (TRANSACTION_END)",
        )

    def test_catchableAsPyxsError(self):
        """Code written against pyxs catches our errors."""
        try:
            raise errorFromReply("EACCES", "WRITE", "/tool")
        except pyxs.exceptions.PyXSError as e:
            self.assertEqual(e.args[0], errno.EACCES)


class ArgumentErrorTests(SynchronousTestCase):
    """The argument errors are ValueErrors and pyxs errors."""

    def test_valueErrors(self):
        """Every argument error is a L{ValueError} and a pyxs C{PyXSError}."""
        for exc in [
            InvalidPathError("a b", "bad"),
            InvalidPermissionError("bad perm"),
            InvalidPayloadError("too big"),
            InvalidArgumentError("bad domid"),
        ]:
            self.assertIsInstance(exc, ValueError)
            self.assertIsInstance(exc, pyxs.exceptions.PyXSError)

    def test_pyxsSpecificBases(self):
        """Each argument error extends the matching pyxs class."""
        self.assertTrue(issubclass(InvalidPathError, pyxs.exceptions.InvalidPath))
        self.assertTrue(issubclass(InvalidPermissionError, pyxs.exceptions.InvalidPermission))
        self.assertTrue(issubclass(InvalidPayloadError, pyxs.exceptions.InvalidPayload))

    def test_invalidPathErrorText(self):
        """InvalidPathError keeps the path and the problem and shows both."""
        exc = InvalidPathError("/a b", "character ' ' not allowed")
        self.assertEqual(exc.path, "/a b")
        self.assertEqual(exc.problem, "character ' ' not allowed")
        self.assertEqual(str(exc), "invalid XenStore path '/a b': character ' ' not allowed")

    def test_messagesAsStr(self):
        """The message is str() of the other argument errors."""
        self.assertEqual(str(InvalidPermissionError("perm!")), "perm!")
        self.assertEqual(str(InvalidPayloadError("payload!")), "payload!")
        self.assertEqual(str(InvalidArgumentError("arg!")), "arg!")
        self.assertEqual(str(UnexpectedPacket("packet!")), "packet!")
        self.assertEqual(str(MalformedPacket("stream!")), "stream!")


class OtherErrorTests(SynchronousTestCase):
    """Connection, timeout and retry errors."""

    def test_connectionLost(self):
        """XenStoreConnectionLost is pyxs's ConnectionError and shows its reason."""
        exc = XenStoreConnectionLost("gone (pending READ /a)")
        self.assertIsInstance(exc, pyxs.exceptions.ConnectionError)
        self.assertEqual(exc.reason, "gone (pending READ /a)")
        self.assertEqual(str(exc), "gone (pending READ /a)")
        self.assertEqual(str(XenStoreConnectionLost()), "connection to xenstored lost")

    def test_unexpectedPacket(self):
        """UnexpectedPacket is pyxs's UnexpectedPacket."""
        self.assertTrue(issubclass(UnexpectedPacket, pyxs.exceptions.UnexpectedPacket))

    def test_timeout(self):
        """XenStoreTimeout names the path, the timeout and the last value."""
        exc = XenStoreTimeout("/a/state", 2.5, "3")
        self.assertEqual((exc.path, exc.timeout, exc.last), ("/a/state", 2.5, "3"))
        self.assertIn("/a/state", str(exc))
        self.assertIn("2.5 s", str(exc))
        self.assertIn("'3'", str(exc))
        self.assertIsInstance(exc, pyxs.exceptions.PyXSError)

    def test_retriesExhausted(self):
        """TransactionRetriesExhausted records and reports the attempts."""
        exc = TransactionRetriesExhausted(5)
        self.assertEqual(exc.attempts, 5)
        self.assertIn("5 attempts", str(exc))
        self.assertIsInstance(exc, pyxs.exceptions.PyXSError)

    def test_errorsModuleTable(self):
        """Every class in the errno table extends L{XenStoreError}."""
        for cls in errors._ERROR_CLASSES.values():
            self.assertTrue(issubclass(cls, XenStoreError))
