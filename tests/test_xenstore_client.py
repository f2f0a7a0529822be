"""
Tests for L{xenddev.xenstore.client}: the Deferred API, watches,
transactions and L{XenStoreClient.waitFor}, against L{FakeXenStored}, a small
in-memory xenstored answering on the far side of a L{StringTransport}.
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from xenddev.interfaces import ITransaction, IWatchHandle, IXenStore
from xenddev.xenstore.client import Transaction, WatchHandle, XenStoreClient, newToken
from xenddev.xenstore.errors import (
    AccessDeniedError,
    ConflictError,
    InvalidArgumentError,
    InvalidPathError,
    InvalidPayloadError,
    InvalidPermissionError,
    InvalidRequestError,
    NoEntryError,
    QuotaError,
    TransactionRetriesExhausted,
    XenStoreConnectionLost,
    XenStoreTimeout,
)
from xenddev.xenstore.paths import Perm
from xenddev.xenstore.protocol import XenStoreProtocol
from xenddev.xenstore.wire import PAYLOAD_MAX, Op, Packet, PacketParser, splitStrings

OK = b"OK\0"


class FakeError(Exception):
    """Raised by a L{FakeXenStored} handler to answer with an ERROR reply."""

    def __init__(self, errname):
        super().__init__(errname)
        self.errname = errname


class FakeXenStored:
    """
    A minimal xenstored for unit tests.

    It reads what the client protocol wrote to its L{StringTransport} when
    L{pump} is called, records every request in C{received}, and answers from
    a dict-based tree (C{nodes}: absolute path to value, insertion order is
    the children's order, as in xenstored). Watches fire after the reply that
    caused them, including the registration event.

    Hooks: L{failNext} answers the next requests of an op with an errno
    name; C{hold} (every request) or C{holdOps} (requests of those ops)
    keeps requests unanswered in C{held} until L{releaseHeld}; C{denied}
    paths give EACCES on READ; C{partSize} replaces XENSTORE_PAYLOAD_MAX
    when cutting DIRECTORY_PART replies, and C{onDirectoryPart(path,
    offset)} runs before each part is computed.
    """

    domainPath = "/local/domain/0"

    def __init__(self, proto, transport):
        self.proto = proto
        self.transport = transport
        self.parser = PacketParser()
        self.nodes: dict[str, bytes] = {"/": b""}
        self.perms: dict[str, list[bytes]] = {}
        self.generations: dict[str, int] = {}
        self.watches: list[tuple[str, str]] = []
        self.transactions: dict[int, dict[str, bytes]] = {}
        self.introduced: set[int] = set()
        self.received: list[Packet] = []
        self.held: list[Packet] = []
        self.hold = False
        self.holdOps: set[int] = set()
        self.denied: set[str] = set()
        self.partSize = PAYLOAD_MAX
        self.onDirectoryPart = None
        self._errors: dict[int, list[str]] = {}
        self._events: list[tuple[str, str]] = []
        self._nextTxId = 1

    # Test-facing helpers

    def failNext(self, op, errname, count=1):
        """Answer the next C{count} requests of C{op} with ERROR C{errname}."""
        self._errors.setdefault(op, []).extend([errname] * count)

    def setNode(self, path, value=b""):
        """Create C{path} (and its parents) with C{value}, firing no watch."""
        self._create(self.nodes, path, value)

    def value(self, path):
        """The value of C{path} in the committed tree, or None."""
        return self.nodes.get(path)

    def requests(self, op):
        """Every request of C{op} received so far."""
        return [p for p in self.received if p.op == op]

    def fireEvent(self, path, token):
        """Send a WATCH_EVENT now."""
        self.proto.dataReceived(Packet(Op.WATCH_EVENT, 0, 0, joinArgs(path, token)).encode())

    def pump(self):
        """Answer everything the client has written, until it writes no more."""
        while True:
            data = self.transport.value()
            if not data:
                return
            self.transport.clear()
            for packet in self.parser.feed(data):
                self.received.append(packet)
                if self.hold or packet.op in self.holdOps:
                    self.held.append(packet)
                else:
                    self.answer(packet)

    def releaseHeld(self):
        """Stop holding; answer the held requests, then pump."""
        self.hold = False
        self.holdOps = set()
        held, self.held = self.held, []
        for packet in held:
            self.answer(packet)
        self.pump()

    # The server

    def answer(self, packet):
        """Answer one request (and send the events it caused)."""
        injected = self._errors.get(packet.op)
        try:
            if injected:
                raise FakeError(injected.pop(0))
            handler = getattr(self, "do_" + Op(packet.op).name)
            payload = handler(packet, self.tree(packet.txId), packet.payload)
        except FakeError as e:
            self.proto.dataReceived(
                Packet(Op.ERROR, packet.reqId, packet.txId, e.errname.encode() + b"\0").encode()
            )
            if packet.op == Op.TRANSACTION_END:
                self.transactions.pop(packet.txId, None)
            self._events = []
            return
        self.proto.dataReceived(Packet(packet.op, packet.reqId, packet.txId, payload).encode())
        events, self._events = self._events, []
        for path, token in events:
            self.fireEvent(path, token)

    def tree(self, txId):
        """The tree a request works on: a transaction's copy or the store."""
        if txId == 0:
            return self.nodes
        if txId not in self.transactions:
            raise FakeError("ENOENT")
        return self.transactions[txId]

    def absolute(self, path):
        """Resolve a relative path against the connection's domain path."""
        return path if path.startswith("/") else f"{self.domainPath}/{path}"

    def children(self, tree, path):
        """Names of the direct children of C{path}, in creation order."""
        prefix = "/" if path == "/" else path + "/"
        return [
            p[len(prefix) :]
            for p in tree
            if p != "/" and p.startswith(prefix) and "/" not in p[len(prefix) :]
        ]

    def _create(self, tree, path, value):
        parts = path.strip("/").split("/")
        current = ""
        for index, part in enumerate(parts):
            parent = current or "/"
            current = f"{current}/{part}"
            if current not in tree:
                tree[current] = b""
                self.generations[parent] = self.generations.get(parent, 0) + 1
            if index == len(parts) - 1 and value is not None:
                tree[current] = value

    def _changed(self, tree, path, removed=False):
        if tree is not self.nodes:
            return
        for wpath, token in self.watches:
            if wpath.startswith("@"):
                continue
            below = path == wpath or path.startswith(wpath.rstrip("/") + "/")
            above = removed and wpath.startswith(path + "/")
            if below or above:
                self._events.append((path, token))

    def _args(self, payload):
        return [a.decode() for a in splitStrings(payload)]

    def do_READ(self, packet, tree, payload):
        path = self.absolute(self._args(payload)[0])
        if path in self.denied:
            raise FakeError("EACCES")
        if path not in tree:
            raise FakeError("ENOENT")
        return tree[path]

    def do_WRITE(self, packet, tree, payload):
        rawPath, _, value = payload.partition(b"\0")
        path = self.absolute(rawPath.decode())
        self._create(tree, path, value)
        self._changed(tree, path)
        return OK

    def do_MKDIR(self, packet, tree, payload):
        path = self.absolute(self._args(payload)[0])
        if path not in tree:
            self._create(tree, path, b"")
            self._changed(tree, path)
        return OK

    def do_RM(self, packet, tree, payload):
        path = self.absolute(self._args(payload)[0])
        if path in tree:
            for p in [p for p in tree if p == path or p.startswith(path + "/")]:
                del tree[p]
            parent = path.rsplit("/", 1)[0] or "/"
            self.generations[parent] = self.generations.get(parent, 0) + 1
            self._changed(tree, path, removed=True)
        return OK

    def do_DIRECTORY(self, packet, tree, payload):
        path = self.absolute(self._args(payload)[0])
        if path not in tree:
            raise FakeError("ENOENT")
        listing = b"".join(c.encode() + b"\0" for c in self.children(tree, path))
        if len(listing) > PAYLOAD_MAX:
            raise FakeError("E2BIG")
        return listing

    def do_DIRECTORY_PART(self, packet, tree, payload):
        # A transcription of send_directory_part() of Xen 4.17 xenstored.
        rawPath, offsetText = self._args(payload)
        path = self.absolute(rawPath)
        offset = int(offsetText)
        if self.onDirectoryPart is not None:
            self.onDirectoryPart(path, offset)
        if path not in tree:
            raise FakeError("ENOENT")
        childList = b"".join(c.encode() + b"\0" for c in self.children(tree, path))
        gen = b"%d\0" % self.generations.get(path, 0)
        if offset >= len(childList):
            return gen + b"\0"
        maxlen = self.partSize - len(gen) - 1
        length = 0
        pos = offset
        while True:
            nameLength = childList.index(b"\0", pos) - pos
            if length + nameLength >= maxlen:
                break
            length += nameLength + 1
            pos += nameLength + 1
            if offset + length == len(childList):
                break
        data = gen + childList[offset : offset + length]
        if offset + length == len(childList):
            data += b"\0"
        return data

    def do_GET_PERMS(self, packet, tree, payload):
        path = self.absolute(self._args(payload)[0])
        if path not in tree:
            raise FakeError("ENOENT")
        return b"".join(p + b"\0" for p in self.perms.get(path, [b"n0"]))

    def do_SET_PERMS(self, packet, tree, payload):
        args = splitStrings(payload)
        path = self.absolute(args[0].decode())
        if path not in tree:
            raise FakeError("ENOENT")
        self.perms[path] = args[1:]
        return OK

    def do_WATCH(self, packet, tree, payload):
        path, token = self._args(payload)
        self.watches.append((path, token))
        self._events.append((path, token))
        return OK

    def do_UNWATCH(self, packet, tree, payload):
        path, token = self._args(payload)
        if (path, token) not in self.watches:
            raise FakeError("ENOENT")
        self.watches.remove((path, token))
        return OK

    def do_RESET_WATCHES(self, packet, tree, payload):
        self.watches = []
        self.transactions = {}
        return OK

    def do_TRANSACTION_START(self, packet, tree, payload):
        txId = self._nextTxId
        self._nextTxId += 1
        self.transactions[txId] = dict(self.nodes)
        return b"%d\0" % txId

    def do_TRANSACTION_END(self, packet, tree, payload):
        snapshot = self.transactions.pop(packet.txId)
        if payload == b"T\0":
            self.nodes = snapshot
        return OK

    def do_GET_DOMAIN_PATH(self, packet, tree, payload):
        return b"/local/domain/" + splitStrings(payload)[0] + b"\0"

    def do_INTRODUCE(self, packet, tree, payload):
        self.introduced.add(int(splitStrings(payload)[0]))
        return OK

    def do_RELEASE(self, packet, tree, payload):
        self.introduced.discard(int(splitStrings(payload)[0]))
        return OK

    def do_RESUME(self, packet, tree, payload):
        return OK

    def do_SET_TARGET(self, packet, tree, payload):
        return OK

    def do_IS_DOMAIN_INTRODUCED(self, packet, tree, payload):
        return b"T\0" if int(splitStrings(payload)[0]) in self.introduced else b"F\0"


def joinArgs(*args):
    """NUL-terminate each text argument, as on the wire."""
    return b"".join(a.encode() + b"\0" for a in args)


class ClientTestMixin:
    """Builds a client over a L{FakeXenStored} and a L{Clock}."""

    def makeClient(self, **kwargs):
        """Return C{(client, fake, clock)}; the client's log is captured in C{self.logged}."""
        kwargs.setdefault("random", lambda: 1.0)
        clock = Clock()
        proto = XenStoreProtocol()
        transport = StringTransport()
        proto.makeConnection(transport)
        client = XenStoreClient(proto, reactor=clock, **kwargs)
        self.logged = []
        client.log = Logger(observer=self.logged.append)
        fake = FakeXenStored(proto, transport)
        return client, fake, clock

    def call(self, fake, d):
        """Pump the fake and return the Deferred's result."""
        fake.pump()
        return self.successResultOf(d)

    def callFails(self, fake, d, *errorTypes):
        """Pump the fake and return the Deferred's failure."""
        fake.pump()
        return self.failureResultOf(d, *errorTypes)


class NodeOperationTests(ClientTestMixin, SynchronousTestCase):
    """read, write, mkdir, rm, ls, exists and permissions."""

    def test_read(self):
        """read sends READ with the NUL-terminated path and returns text."""
        client, fake, _ = self.makeClient()
        fake.setNode("/local/domain/3/name", b"guest\xc3\xa9")
        result = self.call(fake, client.read("/local/domain/3/name"))
        self.assertEqual(result, "guest\u00e9")
        [packet] = fake.received
        self.assertEqual((packet.op, packet.txId), (Op.READ, 0))
        self.assertEqual(packet.payload, b"/local/domain/3/name\0")

    def test_readUndecodable(self):
        """Bytes that are not UTF-8 survive read() via surrogateescape."""
        client, fake, _ = self.makeClient()
        fake.setNode("/bin", b"\xff\x00a")
        result = self.call(fake, client.read("/bin"))
        self.assertEqual(result.encode("utf-8", "surrogateescape"), b"\xff\x00a")

    def test_readBytes(self):
        """readBytes returns the raw value."""
        client, fake, _ = self.makeClient()
        fake.setNode("/bin", b"\x00\x01\xfe")
        self.assertEqual(self.call(fake, client.readBytes("/bin")), b"\x00\x01\xfe")

    def test_readMissing(self):
        """read of a missing node fails with NoEntryError naming the path."""
        client, fake, _ = self.makeClient()
        f = self.callFails(fake, client.read("/nope"), NoEntryError)
        self.assertEqual((f.value.op, f.value.path), ("READ", "/nope"))

    def test_readOrNone(self):
        """readOrNone gives None for a missing node and the value otherwise."""
        client, fake, _ = self.makeClient()
        fake.setNode("/a", b"1")
        self.assertIsNone(self.call(fake, client.readOrNone("/nope")))
        self.assertEqual(self.call(fake, client.readOrNone("/a")), "1")

    def test_readOrNoneOtherErrors(self):
        """readOrNone passes errors other than ENOENT on."""
        client, fake, _ = self.makeClient()
        fake.setNode("/secret", b"x")
        fake.denied.add("/secret")
        self.callFails(fake, client.readOrNone("/secret"), AccessDeniedError)

    def test_relativePath(self):
        """Relative paths are sent as given; xenstored resolves them."""
        client, fake, _ = self.makeClient()
        self.call(fake, client.write("device/vbd/51712/state", "1"))
        self.assertEqual(fake.received[0].payload, b"device/vbd/51712/state\0" + b"1")
        self.assertEqual(fake.value("/local/domain/0/device/vbd/51712/state"), b"1")

    def test_write(self):
        """write sends the path, a NUL and the value (no final NUL)."""
        client, fake, _ = self.makeClient()
        self.assertIsNone(self.call(fake, client.write("/a/b", "v\u00e9")))
        [packet] = fake.received
        self.assertEqual(packet.op, Op.WRITE)
        self.assertEqual(packet.payload, b"/a/b\0v\xc3\xa9")
        self.assertEqual(fake.value("/a/b"), b"v\xc3\xa9")

    def test_writeBytes(self):
        """write accepts bytes, bytearray and memoryview."""
        client, fake, _ = self.makeClient()
        self.call(fake, client.write("/a", b"\x00\xff"))
        self.call(fake, client.write("/b", bytearray(b"ba")))
        self.call(fake, client.write("/c", memoryview(b"mv")))
        self.assertEqual([fake.value(p) for p in "/a /b /c".split()], [b"\x00\xff", b"ba", b"mv"])

    def test_writeBadValueType(self):
        """A value that is not text or bytes is refused before sending."""
        client, fake, _ = self.makeClient()
        self.assertRaises(InvalidArgumentError, client.write, "/a", 5)
        self.assertEqual(fake.transport.value(), b"")

    def test_writeTooLarge(self):
        """
        A write whose payload would exceed 4096 bytes raises
        InvalidPayloadError and sends nothing; one byte less is sent.
        """
        client, fake, _ = self.makeClient()
        # "/a\0" is 3 bytes.
        exc = self.assertRaises(InvalidPayloadError, client.write, "/a", "x" * 4094)
        self.assertIn("4097", str(exc))
        self.assertEqual(fake.transport.value(), b"")
        self.assertEqual(client.protocol.requestsSent, 0)
        self.call(fake, client.write("/a", "x" * 4093))
        self.assertEqual(len(fake.value("/a")), 4093)

    def test_mkdir(self):
        """mkdir sends MKDIR and creates an empty node."""
        client, fake, _ = self.makeClient()
        self.assertIsNone(self.call(fake, client.mkdir("/d")))
        self.assertEqual(fake.received[0], Packet(Op.MKDIR, 1, 0, b"/d\0"))
        self.assertEqual(fake.value("/d"), b"")

    def test_rm(self):
        """rm sends RM and removes the subtree."""
        client, fake, _ = self.makeClient()
        fake.setNode("/d/e/f", b"x")
        self.assertIsNone(self.call(fake, client.rm("/d")))
        self.assertEqual(fake.received[0], Packet(Op.RM, 1, 0, b"/d\0"))
        self.assertIsNone(fake.value("/d/e/f"))
        self.assertIsNone(fake.value("/d"))

    def test_ls(self):
        """ls sends DIRECTORY and returns the child names."""
        client, fake, _ = self.makeClient()
        for name in ["b", "a", "c"]:
            fake.setNode(f"/d/{name}/x")
        self.assertEqual(self.call(fake, client.ls("/d")), ["b", "a", "c"])
        self.assertEqual(fake.received[0], Packet(Op.DIRECTORY, 1, 0, b"/d\0"))

    def test_lsEmpty(self):
        """A node without children lists as []."""
        client, fake, _ = self.makeClient()
        fake.setNode("/leaf")
        self.assertEqual(self.call(fake, client.ls("/leaf")), [])

    def test_lsOtherError(self):
        """Errors other than E2BIG are passed on without DIRECTORY_PART."""
        client, fake, _ = self.makeClient()
        self.callFails(fake, client.ls("/nope"), NoEntryError)
        fake.failNext(Op.DIRECTORY, "ENOSPC")
        fake.setNode("/d")
        f = self.callFails(fake, client.ls("/d"), QuotaError)
        self.assertEqual(f.value.errname, "ENOSPC")
        self.assertEqual(fake.requests(Op.DIRECTORY_PART), [])

    def test_exists(self):
        """exists: True if readable, False on ENOENT, True on EACCES."""
        client, fake, _ = self.makeClient()
        fake.setNode("/a", b"1")
        fake.setNode("/secret", b"x")
        fake.denied.add("/secret")
        self.assertIs(self.call(fake, client.exists("/a")), True)
        self.assertIs(self.call(fake, client.exists("/nope")), False)
        self.assertIs(self.call(fake, client.exists("/secret")), True)
        self.assertEqual([p.op for p in fake.received], [Op.READ] * 3)

    def test_existsOtherError(self):
        """exists passes other errors on."""
        client, fake, _ = self.makeClient()
        fake.failNext(Op.READ, "EINVAL")
        self.callFails(fake, client.exists("/a"), InvalidRequestError)

    def test_getPerms(self):
        """getPerms sends GET_PERMS and parses the entries."""
        client, fake, _ = self.makeClient()
        fake.setNode("/a")
        fake.perms["/a"] = [b"n0", b"r5", b"b7"]
        result = self.call(fake, client.getPerms("/a"))
        self.assertEqual(result, [Perm("n", 0), Perm("r", 5), Perm("b", 7)])
        self.assertEqual(fake.received[0], Packet(Op.GET_PERMS, 1, 0, b"/a\0"))

    def test_setPerms(self):
        """setPerms sends the path and each entry NUL-terminated."""
        client, fake, _ = self.makeClient()
        fake.setNode("/a")
        self.assertIsNone(self.call(fake, client.setPerms("/a", [Perm("n", 0), "r5"])))
        self.assertEqual(fake.received[0], Packet(Op.SET_PERMS, 1, 0, b"/a\0n0\0r5\0"))
        self.assertEqual(fake.perms["/a"], [b"n0", b"r5"])

    def test_setPermsInvalid(self):
        """Bad or empty permission lists are refused before sending."""
        client, fake, _ = self.makeClient()
        self.assertRaises(InvalidPermissionError, client.setPerms, "/a", [])
        self.assertRaises(InvalidPermissionError, client.setPerms, "/a", ["q1"])
        self.assertEqual(fake.transport.value(), b"")


class BadArgumentTests(ClientTestMixin, SynchronousTestCase):
    """Argument errors raise at the call and send nothing."""

    badPaths = ["", "/a/", "/a b", "/a//b", "/\u00e9", "a" * 2049, "/" + "a" * 3072]

    def assertNothingSent(self, client, fake, clock):
        """Nothing reached the wire and no timer was started."""
        self.assertEqual(fake.transport.value(), b"")
        self.assertEqual(client.protocol.requestsSent, 0)
        self.assertEqual(client.protocol.pendingCount, 0)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_badPathsRaiseSynchronously(self):
        """Every path operation validates its path before sending."""
        client, fake, clock = self.makeClient()
        operations = {
            "read": lambda p: client.read(p),
            "readBytes": lambda p: client.readBytes(p),
            "readOrNone": lambda p: client.readOrNone(p),
            "write": lambda p: client.write(p, "v"),
            "mkdir": lambda p: client.mkdir(p),
            "rm": lambda p: client.rm(p),
            "ls": lambda p: client.ls(p),
            "exists": lambda p: client.exists(p),
            "getPerms": lambda p: client.getPerms(p),
            "setPerms": lambda p: client.setPerms(p, ["n0"]),
            "watch": lambda p: client.watch(p, lambda e: None),
            "waitFor": lambda p: client.waitFor(p, timeout=5),
        }
        for name, op in operations.items():
            for path in self.badPaths:
                self.assertRaises(InvalidPathError, op, path)
                self.assertEqual(fake.transport.value(), b"", name)
                self.assertNothingSent(client, fake, clock)
        self.assertEqual(client.watchCount, 0)

    def test_badPathsInTransaction(self):
        """Transaction operations validate paths the same way."""
        client, fake, clock = self.makeClient()
        tx = self.call(fake, client.startTransaction())
        fake.received.clear()
        client.protocol.requestsSent = 0
        for path in self.badPaths:
            self.assertRaises(InvalidPathError, tx.read, path)
            self.assertRaises(InvalidPathError, tx.write, path, "v")
            self.assertRaises(InvalidPathError, tx.ls, path)
        self.assertNothingSent(client, fake, clock)

    def test_badWatchArguments(self):
        """Bad special watch paths and tokens are refused before sending."""
        client, fake, clock = self.makeClient()
        self.assertRaises(InvalidPathError, client.watch, "@other", lambda e: None)
        self.assertRaises(InvalidArgumentError, client.watch, "/a", lambda e: None, token="")
        self.assertRaises(InvalidArgumentError, client.watch, "/a", lambda e: None, token="a\0b")
        self.assertNothingSent(client, fake, clock)
        self.assertEqual(client.watchCount, 0)

    def test_badDomids(self):
        """Domain operations validate domids before sending."""
        client, fake, clock = self.makeClient()
        for bad in [-1, 65536, "x", True]:
            self.assertRaises(InvalidArgumentError, client.getDomainPath, bad)
            self.assertRaises(InvalidArgumentError, client.introduceDomain, bad, 1, 2)
            self.assertRaises(InvalidArgumentError, client.releaseDomain, bad)
            self.assertRaises(InvalidArgumentError, client.resumeDomain, bad)
            self.assertRaises(InvalidArgumentError, client.isDomainIntroduced, bad)
            self.assertRaises(InvalidArgumentError, client.setTarget, bad, 1)
            self.assertRaises(InvalidArgumentError, client.setTarget, 1, bad)
        self.assertRaises(InvalidArgumentError, client.introduceDomain, 1, "mfn", 2)
        self.assertRaises(InvalidArgumentError, client.introduceDomain, 1, 2, None)
        self.assertNothingSent(client, fake, clock)


class DirectoryPartTests(ClientTestMixin, SynchronousTestCase):
    """ls falls back to DIRECTORY_PART when DIRECTORY says E2BIG."""

    def makeBigDirectory(self, fake, count=400):
        """Create C{count} children of /big, too many for one reply."""
        names = [f"child-{i:04d}-abcdefghij" for i in range(count)]
        for name in names:
            fake.setNode(f"/big/{name}")
        return names

    def partOffsets(self, fake):
        """The offsets of the DIRECTORY_PART requests received."""
        return [int(splitStrings(p.payload)[1]) for p in fake.requests(Op.DIRECTORY_PART)]

    def test_fallbackToParts(self):
        """
        E2BIG on DIRECTORY makes ls fetch the listing in parts, each offset
        being the byte offset into the concatenated NUL-terminated names.
        """
        client, fake, _ = self.makeClient()
        names = self.makeBigDirectory(fake)
        self.assertEqual(self.call(fake, client.ls("/big")), names)
        self.assertEqual(fake.received[0].op, Op.DIRECTORY)
        offsets = self.partOffsets(fake)
        self.assertGreaterEqual(len(offsets), 3)
        self.assertEqual(offsets[0], 0)
        entry = len(names[0]) + 1
        for offset in offsets:
            self.assertEqual(offset % entry, 0)
        self.assertEqual(offsets, sorted(set(offsets)))
        [first] = fake.requests(Op.DIRECTORY_PART)[:1]
        self.assertEqual(first.payload, b"/big\x000\0")

    def test_smallParts(self):
        """Parts of any size are reassembled (here 64 bytes each)."""
        client, fake, _ = self.makeClient()
        names = [f"n{i}" for i in range(50)]
        for name in names:
            fake.setNode(f"/d/{name}")
        fake.partSize = 64
        fake.failNext(Op.DIRECTORY, "E2BIG")
        self.assertEqual(self.call(fake, client.ls("/d")), names)
        # 190 bytes of names, at most 60 per part.
        self.assertEqual(len(fake.requests(Op.DIRECTORY_PART)), 4)

    def test_partsOfEmptyNode(self):
        """A childless node listed in parts gives []."""
        client, fake, _ = self.makeClient()
        fake.setNode("/empty")
        fake.failNext(Op.DIRECTORY, "E2BIG")
        self.assertEqual(self.call(fake, client.ls("/empty")), [])
        self.assertEqual(self.partOffsets(fake), [0])

    def test_offsetAtEnd(self):
        """
        When the previous part ended exactly at the list's end without the
        final marker, the next request gets C{gen\\0\\0} and ls completes.
        """
        client, fake, _ = self.makeClient()
        fake.setNode("/d/a")
        fake.setNode("/d/b")
        originalPart = fake.do_DIRECTORY_PART

        def withoutFinalMarker(packet, tree, payload):
            data = originalPart(packet, tree, payload)
            if splitStrings(payload)[1] == b"0":
                return data[:-1]  # "a\0b\0" as if more might follow
            return data

        fake.do_DIRECTORY_PART = withoutFinalMarker
        fake.failNext(Op.DIRECTORY, "E2BIG")
        self.assertEqual(self.call(fake, client.ls("/d")), ["a", "b"])
        self.assertEqual(self.partOffsets(fake), [0, 4])

    def test_generationChangeRestarts(self):
        """If the node changes between parts, the listing starts again."""
        client, fake, _ = self.makeClient()
        names = self.makeBigDirectory(fake)
        calls = []

        def addChild(path, offset):
            calls.append(offset)
            if len(calls) == 2:
                fake.setNode("/big/zzz-new")

        fake.onDirectoryPart = addChild
        self.assertEqual(self.call(fake, client.ls("/big")), [*names, "zzz-new"])
        offsets = self.partOffsets(fake)
        self.assertEqual(offsets[0], 0)
        self.assertNotEqual(offsets[1], 0)
        self.assertEqual(offsets[2], 0)
        self.assertEqual(offsets[3], offsets[1])

    def test_restartsExhausted(self):
        """A node that keeps changing makes ls fail with ConflictError."""
        client, fake, _ = self.makeClient()
        self.makeBigDirectory(fake)
        counter = iter(range(1000))
        fake.onDirectoryPart = lambda path, offset: fake.setNode(f"/big/new{next(counter)}")
        f = self.callFails(fake, client.ls("/big"), ConflictError)
        self.assertEqual(f.value.op, "DIRECTORY_PART")
        self.assertEqual(f.value.path, "/big")
        self.assertEqual(self.partOffsets(fake).count(0), 8)

    def test_partsInTransaction(self):
        """In a transaction every part request carries the tx_id."""
        client, fake, _ = self.makeClient()
        names = self.makeBigDirectory(fake)
        tx = self.call(fake, client.startTransaction())
        self.assertEqual(self.call(fake, tx.ls("/big")), names)
        parts = fake.requests(Op.DIRECTORY_PART)
        self.assertTrue(parts)
        self.assertEqual({p.txId for p in parts}, {tx.txId})


class WatchTests(ClientTestMixin, SynchronousTestCase):
    """watch, WatchHandle and resetWatches."""

    def test_watchRegisters(self):
        """
        watch sends WATCH path and token, fires with a handle, and the
        callback sees the registration event and later changes.
        """
        client, fake, _ = self.makeClient()
        events = []
        handle = self.call(fake, client.watch("/a", events.append, token="tok-a"))
        self.assertIsInstance(handle, WatchHandle)
        self.assertEqual((handle.path, handle.token, handle.active), ("/a", "tok-a", True))
        self.assertEqual(fake.received[0], Packet(Op.WATCH, 1, 0, b"/a\0tok-a\0"))
        self.assertEqual(fake.watches, [("/a", "tok-a")])
        self.assertEqual(events, ["/a"])
        self.call(fake, client.write("/a/b", "1"))
        self.assertEqual(events, ["/a", "/a/b"])
        self.assertTrue(client.hasWatch("tok-a"))
        self.assertEqual(client.watchCount, 1)

    def test_generatedTokens(self):
        """Without a token, a unique one is generated."""
        client, fake, _ = self.makeClient()
        h1 = self.call(fake, client.watch("/a", lambda e: None))
        h2 = self.call(fake, client.watch("/a", lambda e: None))
        self.assertNotEqual(h1.token, h2.token)
        self.assertTrue(newToken().startswith("xenddev-"))

    def test_routingByToken(self):
        """An event reaches only the callback registered with its token."""
        client, fake, _ = self.makeClient()
        first, second = [], []
        self.call(fake, client.watch("/a", first.append, token="t1"))
        self.call(fake, client.watch("/a", second.append, token="t2"))
        del first[:], second[:]
        fake.fireEvent("/a/x", "t2")
        self.assertEqual((first, second), ([], ["/a/x"]))
        fake.fireEvent("/a/y", "t1")
        self.assertEqual((first, second), (["/a/y"], ["/a/x"]))

    def test_unknownToken(self):
        """An event with an unknown token is ignored."""
        client, fake, _ = self.makeClient()
        events = []
        self.call(fake, client.watch("/a", events.append, token="t1"))
        fake.fireEvent("/a", "other")
        self.assertEqual(events, ["/a"])
        self.assertEqual(self.logged[-1]["log_level"], LogLevel.debug)

    def test_specialWatchPath(self):
        """@introduceDomain can be watched."""
        client, fake, _ = self.makeClient()
        events = []
        self.call(fake, client.watch("@introduceDomain", events.append, token="intro"))
        self.assertEqual(fake.received[0].payload, b"@introduceDomain\0intro\0")
        self.assertEqual(events, ["@introduceDomain"])

    def test_duplicateToken(self):
        """A token already in use on the connection is refused."""
        client, fake, _ = self.makeClient()
        self.call(fake, client.watch("/a", lambda e: None, token="t"))
        self.assertRaises(InvalidArgumentError, client.watch, "/b", lambda e: None, token="t")
        self.assertEqual(len(fake.requests(Op.WATCH)), 1)

    def test_watchRefused(self):
        """If xenstored refuses the watch, its token is forgotten."""
        client, fake, _ = self.makeClient()
        fake.failNext(Op.WATCH, "EACCES")
        self.callFails(fake, client.watch("/a", lambda e: None, token="t"), AccessDeniedError)
        self.assertFalse(client.hasWatch("t"))
        self.assertEqual(client.watchCount, 0)

    def test_callbackRaises(self):
        """A raising callback is logged and does not stop later events."""
        client, fake, _ = self.makeClient()
        events = []

        def callback(path):
            events.append(path)
            raise ZeroDivisionError("subscriber bug")

        self.call(fake, client.watch("/a", callback, token="t"))
        fake.fireEvent("/a/b", "t")
        self.assertEqual(events, ["/a", "/a/b"])
        failures = [e["log_failure"] for e in self.logged if "log_failure" in e]
        self.assertEqual(len(failures), 2)
        self.assertTrue(failures[0].check(ZeroDivisionError))

    def test_stop(self):
        """stop sends UNWATCH and no callback runs afterwards."""
        client, fake, _ = self.makeClient()
        events = []
        handle = self.call(fake, client.watch("/a", events.append, token="t"))
        self.assertIsNone(self.call(fake, handle.stop()))
        self.assertFalse(handle.active)
        self.assertEqual(fake.requests(Op.UNWATCH)[0].payload, b"/a\0t\0")
        self.assertEqual(fake.watches, [])
        fake.fireEvent("/a", "t")
        self.assertEqual(events, ["/a"])
        self.assertFalse(client.hasWatch("t"))

    def test_stopIdempotent(self):
        """A second stop succeeds and sends nothing."""
        client, fake, _ = self.makeClient()
        handle = self.call(fake, client.watch("/a", lambda e: None))
        self.call(fake, handle.stop())
        self.assertIsNone(self.call(fake, handle.stop()))
        self.assertEqual(len(fake.requests(Op.UNWATCH)), 1)

    def test_stopAfterConnectionLost(self):
        """stop after the connection closed succeeds without sending."""
        client, fake, _ = self.makeClient()
        handle = self.call(fake, client.watch("/a", lambda e: None))
        client.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertIsNone(self.successResultOf(handle.stop()))
        self.assertEqual(fake.transport.value(), b"")

    def test_stopInterruptedByConnectionLoss(self):
        """An UNWATCH cut short by connection loss still counts as success."""
        client, fake, _ = self.makeClient()
        handle = self.call(fake, client.watch("/a", lambda e: None))
        fake.hold = True
        d = handle.stop()
        fake.pump()
        client.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertIsNone(self.successResultOf(d))

    def test_stopOtherError(self):
        """An UNWATCH refused by xenstored for another reason fails stop()."""
        client, fake, _ = self.makeClient()
        handle = self.call(fake, client.watch("/a", lambda e: None))
        fake.failNext(Op.UNWATCH, "EINVAL")
        self.callFails(fake, handle.stop(), InvalidRequestError)

    def test_resetWatches(self):
        """resetWatches sends RESET_WATCHES and forgets every watch."""
        client, fake, _ = self.makeClient()
        events = []
        self.call(fake, client.watch("/a", events.append, token="t1"))
        self.call(fake, client.watch("/b", events.append, token="t2"))
        self.assertIsNone(self.call(fake, client.resetWatches()))
        self.assertEqual(fake.requests(Op.RESET_WATCHES)[0].payload, b"")
        self.assertEqual(fake.watches, [])
        self.assertEqual(client.watchCount, 0)
        fake.fireEvent("/a", "t1")
        self.assertEqual(events, ["/a", "/b"])

    def test_watchSentAfterResetSurvives(self):
        """
        resetWatches forgets only the watches registered before it was
        sent: a watch requested while the RESET_WATCHES reply is on its way
        stays registered in xenstored and must keep receiving its events.
        """
        client, fake, _ = self.makeClient()
        events = []
        self.call(fake, client.watch("/a", lambda e: None, token="old"))
        reset = client.resetWatches()
        watch = client.watch("/b", events.append, token="new")
        fake.pump()
        self.successResultOf(reset)
        self.successResultOf(watch)
        self.assertEqual(fake.watches, [("/b", "new")])
        self.assertTrue(client.hasWatch("new"))
        self.assertFalse(client.hasWatch("old"))
        fake.fireEvent("/b/c", "new")
        self.assertEqual(events, ["/b", "/b/c"])

    def test_waitForSentAfterResetCompletes(self):
        """A waitFor started just after resetWatches still completes."""
        client, fake, _ = self.makeClient()
        fake.setNode("/a", b"1")
        client.resetWatches()
        d = client.waitFor("/a")
        fake.pump()
        self.assertEqual(self.successResultOf(d), "1")
        self.assertEqual(fake.watches, [])

    def test_stopAfterResetWatches(self):
        """
        Stopping a handle whose watch resetWatches already removed succeeds:
        the watch is gone, which is what stop() asks for (xenstored answers
        an UNWATCH of an unknown watch with ENOENT).
        """
        client, fake, _ = self.makeClient()
        handle = self.call(fake, client.watch("/a", lambda e: None, token="t1"))
        self.call(fake, client.resetWatches())
        self.assertIsNone(self.call(fake, handle.stop()))
        self.assertFalse(handle.active)
        self.assertEqual(fake.watches, [])


class DomainTests(ClientTestMixin, SynchronousTestCase):
    """Domain operations."""

    def test_getDomainPath(self):
        """getDomainPath sends the domid and returns the path."""
        client, fake, _ = self.makeClient()
        self.assertEqual(self.call(fake, client.getDomainPath(7)), "/local/domain/7")
        self.assertEqual(fake.received[0], Packet(Op.GET_DOMAIN_PATH, 1, 0, b"7\0"))

    def test_introduceReleaseResume(self):
        """introduce, isDomainIntroduced, resume and release send their arguments."""
        client, fake, _ = self.makeClient()
        self.assertIsNone(self.call(fake, client.introduceDomain(5, 0xFEFFF, 3)))
        self.assertEqual(fake.received[-1].payload, b"5\0%d\0003\0" % 0xFEFFF)
        self.assertIs(self.call(fake, client.isDomainIntroduced(5)), True)
        self.assertIsNone(self.call(fake, client.resumeDomain(5)))
        self.assertEqual(fake.received[-1], Packet(Op.RESUME, 3, 0, b"5\0"))
        self.assertIsNone(self.call(fake, client.releaseDomain(5)))
        self.assertEqual(fake.received[-1].op, Op.RELEASE)
        self.assertIs(self.call(fake, client.isDomainIntroduced(5)), False)

    def test_setTarget(self):
        """setTarget sends both domids."""
        client, fake, _ = self.makeClient()
        self.assertIsNone(self.call(fake, client.setTarget(5, 6)))
        self.assertEqual(fake.received[0], Packet(Op.SET_TARGET, 1, 0, b"5\x006\0"))


class ConnectionTests(ClientTestMixin, SynchronousTestCase):
    """connected, disconnect and interfaces."""

    def test_disconnect(self):
        """disconnect closes the transport and fires once the loss is reported."""
        client, fake, _ = self.makeClient()
        self.assertTrue(client.connected)
        d = client.disconnect()
        self.assertTrue(fake.transport.disconnecting)
        self.assertNoResult(d)
        client.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertIsNone(self.successResultOf(d))
        self.assertFalse(client.connected)
        self.assertIsNone(self.successResultOf(client.disconnect()))

    def test_pendingFailOnLoss(self):
        """Requests in flight fail with XenStoreConnectionLost."""
        client, _, _ = self.makeClient()
        d = client.read("/a")
        client.protocol.connectionLost(Failure(ConnectionDone()))
        f = self.failureResultOf(d, XenStoreConnectionLost)
        self.assertIn("pending READ /a", str(f.value))

    def test_abstractOperations(self):
        """The shared operations need a subclass providing _send."""
        from xenddev.xenstore.client import _Operations

        self.assertRaises(NotImplementedError, _Operations().read, "/a")

    def test_defaultReactor(self):
        """Without a reactor argument the global reactor is used."""
        from twisted.internet import reactor

        proto = XenStoreProtocol()
        proto.makeConnection(StringTransport())
        self.assertIs(XenStoreClient(proto).reactor, reactor)

    def test_interfaces(self):
        """The client, a transaction and a watch handle provide their interfaces."""
        client, fake, _ = self.makeClient()
        self.assertTrue(verifyObject(IXenStore, client))
        tx = self.call(fake, client.startTransaction())
        self.assertTrue(verifyObject(ITransaction, tx))
        handle = self.call(fake, client.watch("/a", lambda e: None))
        self.assertTrue(verifyObject(IWatchHandle, handle))


class TransactionTests(ClientTestMixin, SynchronousTestCase):
    """startTransaction and Transaction."""

    def test_startTransaction(self):
        """TRANSACTION_START's reply gives the transaction id."""
        client, fake, _ = self.makeClient()
        fake._nextTxId = 42
        tx = self.call(fake, client.startTransaction())
        self.assertIsInstance(tx, Transaction)
        self.assertEqual(tx.txId, 42)
        self.assertEqual(fake.received[0], Packet(Op.TRANSACTION_START, 1, 0, b"\0"))

    def test_operationsCarryTxId(self):
        """Operations of a transaction carry its id; commit sends T."""
        client, fake, _ = self.makeClient()
        tx = self.call(fake, client.startTransaction())
        self.call(fake, tx.write("/a", "1"))
        self.assertEqual(self.call(fake, tx.read("/a")), "1")
        self.assertIsNone(fake.value("/a"))
        self.assertIsNone(self.call(fake, tx.commit()))
        self.assertTrue(tx.ended)
        self.assertEqual({p.txId for p in fake.received[1:]}, {tx.txId})
        self.assertEqual(fake.received[-1].op, Op.TRANSACTION_END)
        self.assertEqual(fake.received[-1].payload, b"T\0")
        self.assertEqual(fake.value("/a"), b"1")

    def test_abort(self):
        """abort sends F and discards the changes."""
        client, fake, _ = self.makeClient()
        tx = self.call(fake, client.startTransaction())
        self.call(fake, tx.write("/a", "1"))
        self.assertIsNone(self.call(fake, tx.abort()))
        self.assertEqual(fake.received[-1].payload, b"F\0")
        self.assertIsNone(fake.value("/a"))

    def test_endedTransaction(self):
        """Operations on an ended transaction raise at once and send nothing."""
        client, fake, _ = self.makeClient()
        tx = self.call(fake, client.startTransaction())
        self.call(fake, tx.commit())
        sent = len(fake.received)
        self.assertRaises(InvalidArgumentError, tx.read, "/a")
        self.assertRaises(InvalidArgumentError, tx.commit)
        self.assertRaises(InvalidArgumentError, tx.abort)
        fake.pump()
        self.assertEqual(len(fake.received), sent)

    def test_commitConflict(self):
        """A conflicting commit fails with ConflictError."""
        client, fake, _ = self.makeClient()
        tx = self.call(fake, client.startTransaction())
        fake.failNext(Op.TRANSACTION_END, "EAGAIN")
        f = self.callFails(fake, tx.commit(), ConflictError)
        self.assertEqual(f.value.op, "TRANSACTION_END")
        self.assertTrue(tx.ended)


class TransactTests(ClientTestMixin, SynchronousTestCase):
    """transact: retries, backoff, abort on error."""

    def bump(self, calls):
        """A transaction body incrementing /counter, recording each attempt."""

        async def fn(tx):
            calls.append(tx.txId)
            value = await tx.readOrNone("/counter")
            await tx.write("/counter", str(int(value or 0) + 1))
            return "bumped"

        return fn

    def nextDelay(self, clock):
        """The delay of the single pending timer."""
        [call] = clock.getDelayedCalls()
        return call.getTime() - clock.seconds()

    def test_success(self):
        """Without conflicts fn runs once and its result is returned."""
        client, fake, clock = self.makeClient()
        calls = []
        d = client.transact(self.bump(calls))
        self.assertEqual(self.call(fake, d), "bumped")
        self.assertEqual(len(calls), 1)
        self.assertEqual(fake.value("/counter"), b"1")
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_plainValueAndDeferred(self):
        """fn may return a plain value or a Deferred."""
        client, fake, _ = self.makeClient()
        self.assertEqual(self.call(fake, client.transact(lambda tx: 17)), 17)
        self.assertEqual(self.call(fake, client.transact(lambda tx: succeed("d"))), "d")
        self.assertEqual([p.payload for p in fake.requests(Op.TRANSACTION_END)], [b"T\0"] * 2)

    def test_retriesConflicts(self):
        """
        Commit conflicting 3 times is retried with exponential backoff
        (1, 2, 4 ms with random() == 1) and then succeeds with fn's result.
        """
        client, fake, clock = self.makeClient()
        fake.setNode("/counter", b"0")
        fake.failNext(Op.TRANSACTION_END, "EAGAIN", 3)
        calls = []
        d = client.transact(self.bump(calls))
        delays = []
        for _ in range(3):
            fake.pump()
            self.assertNoResult(d)
            delays.append(self.nextDelay(clock))
            clock.advance(delays[-1] / 2)
            fake.pump()
            self.assertEqual(len(calls), len(delays))
            clock.advance(delays[-1] / 2)
        fake.pump()
        self.assertEqual(self.successResultOf(d), "bumped")
        for got, expected in zip(delays, [0.001, 0.002, 0.004], strict=True):
            self.assertAlmostEqual(got, expected)
        self.assertEqual(len(calls), 4)
        self.assertEqual(len(set(calls)), 4)
        self.assertEqual(fake.value("/counter"), b"1")
        self.assertEqual([p.payload for p in fake.requests(Op.TRANSACTION_END)], [b"T\0"] * 4)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_backoffJitterAndCap(self):
        """The delay is random() times the base doubling, capped."""
        client, fake, clock = self.makeClient(random=lambda: 0.5, backoffCap=0.003)
        fake.failNext(Op.TRANSACTION_END, "EAGAIN", 3)
        d = client.transact(lambda tx: "ok")
        delays = []
        for _ in range(3):
            fake.pump()
            delays.append(self.nextDelay(clock))
            clock.advance(delays[-1])
        fake.pump()
        self.assertEqual(self.successResultOf(d), "ok")
        for got, expected in zip(delays, [0.0005, 0.001, 0.0015], strict=True):
            self.assertAlmostEqual(got, expected)

    def test_retriesExhausted(self):
        """After maxAttempts conflicts transact gives up."""
        client, fake, clock = self.makeClient()
        fake.failNext(Op.TRANSACTION_END, "EAGAIN", 100)
        d = client.transact(lambda tx: "never", maxAttempts=3)
        for _ in range(10):
            fake.pump()
            clock.advance(1)
        f = self.failureResultOf(d, TransactionRetriesExhausted)
        self.assertEqual(f.value.attempts, 3)
        self.assertEqual(len(fake.requests(Op.TRANSACTION_START)), 3)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_defaultMaxAttempts(self):
        """The client's maxAttempts is the default budget."""
        client, fake, clock = self.makeClient(maxAttempts=2)
        fake.failNext(Op.TRANSACTION_END, "EAGAIN", 100)
        d = client.transact(lambda tx: None)
        for _ in range(5):
            fake.pump()
            clock.advance(1)
        self.assertEqual(self.failureResultOf(d, TransactionRetriesExhausted).value.attempts, 2)

    def test_noBackoffAfterLastAttempt(self):
        """
        Once the last attempt has conflicted, transact fails at once: no
        backoff delay is spent before giving up, since nothing is retried.
        """
        client, fake, clock = self.makeClient()
        fake.failNext(Op.TRANSACTION_END, "EAGAIN", 2)
        d = client.transact(lambda tx: None, maxAttempts=2)
        fake.pump()
        clock.advance(self.nextDelay(clock))
        fake.pump()
        self.failureResultOf(d, TransactionRetriesExhausted)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_conflictInsideFn(self):
        """EAGAIN from an operation inside fn aborts the attempt and retries."""
        client, fake, clock = self.makeClient()
        fake.failNext(Op.WRITE, "EAGAIN")
        calls = []
        d = client.transact(self.bump(calls))
        fake.pump()
        self.assertEqual([p.payload for p in fake.requests(Op.TRANSACTION_END)], [b"F\0"])
        clock.advance(self.nextDelay(clock))
        fake.pump()
        self.assertEqual(self.successResultOf(d), "bumped")
        self.assertEqual(len(calls), 2)
        self.assertEqual(fake.value("/counter"), b"1")

    def test_errorAborts(self):
        """
        A non-conflict error from fn aborts the transaction (TRANSACTION_END
        F) and is raised, without retrying.
        """
        client, fake, clock = self.makeClient()

        async def fn(tx):
            await tx.write("/a", "1")
            raise ValueError("bad input")

        f = self.callFails(fake, client.transact(fn), ValueError)
        self.assertEqual(str(f.value), "bad input")
        ends = fake.requests(Op.TRANSACTION_END)
        self.assertEqual([p.payload for p in ends], [b"F\0"])
        self.assertEqual(ends[0].txId, fake.requests(Op.WRITE)[0].txId)
        self.assertEqual(len(fake.requests(Op.TRANSACTION_START)), 1)
        self.assertIsNone(fake.value("/a"))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_xenstoreErrorAborts(self):
        """A XenStore error other than EAGAIN aborts and is raised."""
        client, fake, _ = self.makeClient()
        f = self.callFails(fake, client.transact(lambda tx: tx.read("/missing")), NoEntryError)
        self.assertEqual(f.value.path, "/missing")
        self.assertEqual([p.payload for p in fake.requests(Op.TRANSACTION_END)], [b"F\0"])

    def test_abortFailureIgnored(self):
        """If the abort itself fails, fn's error is still the one raised."""
        client, fake, _ = self.makeClient()
        fake.failNext(Op.TRANSACTION_END, "EINVAL")

        def fn(tx):
            raise KeyError("original")

        self.callFails(fake, client.transact(fn), KeyError)

    def test_commitErrorNotRetried(self):
        """A commit failing with an error other than EAGAIN is raised."""
        client, fake, _ = self.makeClient()
        fake.failNext(Op.TRANSACTION_END, "ENOSPC")
        self.callFails(fake, client.transact(lambda tx: None), QuotaError)
        self.assertEqual(len(fake.requests(Op.TRANSACTION_END)), 1)

    def test_connectionLost(self):
        """Connection loss during fn fails transact with XenStoreConnectionLost."""
        client, fake, _ = self.makeClient()
        d = client.transact(lambda tx: tx.read("/a"))
        fake.pump()
        fake.hold = True
        d2 = client.transact(lambda tx: tx.read("/a"))
        fake.pump()
        client.protocol.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(d, NoEntryError)
        self.failureResultOf(d2, XenStoreConnectionLost)


class WaitForTests(ClientTestMixin, SynchronousTestCase):
    """waitFor: success, timeout, cancel, errors; always cleaned up."""

    def assertCleanedUp(self, client, fake, clock):
        """No watch is left on the fake or the client, and no timer runs."""
        fake.pump()
        self.assertEqual(fake.watches, [])
        self.assertEqual(client.watchCount, 0)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_success(self):
        """The Deferred fires with the value once the predicate holds."""
        client, fake, clock = self.makeClient()
        d = client.waitFor("/vm/state", lambda v: v == "4", timeout=10)
        fake.pump()
        self.assertNoResult(d)
        [watch] = fake.requests(Op.WATCH)
        self.assertTrue(watch.payload.startswith(b"/vm/state\0"))
        self.assertEqual(len(fake.watches), 1)
        self.call(fake, client.write("/vm/state", "3"))
        self.assertNoResult(d)
        self.call(fake, client.write("/vm/state", "4"))
        self.assertEqual(self.successResultOf(d), "4")
        [unwatch] = fake.requests(Op.UNWATCH)
        self.assertEqual(unwatch.payload, watch.payload)
        self.assertCleanedUp(client, fake, clock)

    def test_alreadyTrue(self):
        """A value already there is found via the registration event."""
        client, fake, clock = self.makeClient()
        fake.setNode("/vm/state", b"up")
        d = client.waitFor("/vm/state")
        fake.pump()
        self.assertEqual(self.successResultOf(d), "up")
        self.assertCleanedUp(client, fake, clock)

    def test_manualEvent(self):
        """A value written behind the client's back is seen on the next event."""
        client, fake, clock = self.makeClient()
        d = client.waitFor("/x", timeout=5)
        fake.pump()
        fake.nodes["/x"] = b"hello"
        [(_, token)] = fake.watches
        fake.fireEvent("/x", token)
        fake.pump()
        self.assertEqual(self.successResultOf(d), "hello")
        self.assertCleanedUp(client, fake, clock)

    def test_timeout(self):
        """
        After the timeout the Deferred fails with XenStoreTimeout carrying
        the last value seen.
        """
        client, fake, clock = self.makeClient()
        d = client.waitFor("/vm/state", lambda v: v == "4", timeout=10)
        fake.pump()
        self.call(fake, client.write("/vm/state", "3"))
        clock.advance(9.9)
        self.assertNoResult(d)
        clock.advance(0.1)
        f = self.failureResultOf(d, XenStoreTimeout)
        self.assertEqual(f.value.path, "/vm/state")
        self.assertEqual(f.value.timeout, 10)
        self.assertEqual(f.value.last, "3")
        self.assertCleanedUp(client, fake, clock)
        self.assertEqual(len(fake.requests(Op.UNWATCH)), 1)

    def test_timeoutBeforeWatchAck(self):
        """A watch acknowledged after the timeout is removed at once."""
        client, fake, clock = self.makeClient()
        fake.hold = True
        d = client.waitFor("/a", timeout=1)
        fake.pump()
        clock.advance(1)
        self.failureResultOf(d, XenStoreTimeout)
        self.assertEqual(fake.requests(Op.UNWATCH), [])
        fake.releaseHeld()
        self.assertEqual(len(fake.requests(Op.UNWATCH)), 1)
        self.assertCleanedUp(client, fake, clock)

    def test_cancel(self):
        """Cancelling fails with CancelledError and cleans up."""
        client, fake, clock = self.makeClient()
        d = client.waitFor("/a", timeout=10)
        fake.pump()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertCleanedUp(client, fake, clock)
        fake.nodes["/a"] = b"late"
        fake.fireEvent("/a", "ignored")
        self.assertEqual(len(fake.requests(Op.READ)), 1)

    def test_cancelWithoutTimeout(self):
        """Cancelling a waitFor without timeout also removes the watch."""
        client, fake, clock = self.makeClient()
        d = client.waitFor("/a")
        fake.pump()
        self.assertEqual(len(fake.watches), 1)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertCleanedUp(client, fake, clock)

    def test_cancelBeforeWatchAck(self):
        """Cancelling before the WATCH is acknowledged removes it when it is."""
        client, fake, clock = self.makeClient()
        fake.hold = True
        d = client.waitFor("/a", timeout=10)
        fake.pump()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        fake.releaseHeld()
        self.assertCleanedUp(client, fake, clock)

    def test_predicateRaises(self):
        """A predicate that raises fails the wait and cleans up."""
        client, fake, clock = self.makeClient()

        def predicate(value):
            raise RuntimeError("predicate bug")

        d = client.waitFor("/a", predicate, timeout=10)
        fake.pump()
        f = self.failureResultOf(d, RuntimeError)
        self.assertEqual(str(f.value), "predicate bug")
        self.assertCleanedUp(client, fake, clock)

    def test_readError(self):
        """A read error other than ENOENT fails the wait and cleans up."""
        client, fake, clock = self.makeClient()
        fake.setNode("/secret", b"x")
        fake.denied.add("/secret")
        d = client.waitFor("/secret", timeout=10)
        fake.pump()
        self.failureResultOf(d, AccessDeniedError)
        self.assertCleanedUp(client, fake, clock)

    def test_watchRefused(self):
        """If the watch is refused, the wait fails and the timer is cancelled."""
        client, fake, clock = self.makeClient()
        fake.failNext(Op.WATCH, "ENOSPC")
        d = client.waitFor("/a", timeout=10)
        fake.pump()
        self.failureResultOf(d, QuotaError)
        self.assertCleanedUp(client, fake, clock)

    def test_connectionLost(self):
        """Connection loss fails the wait and cancels the timer."""
        client, fake, clock = self.makeClient()
        d = client.waitFor("/a", timeout=10)
        fake.pump()
        fake.hold = True
        fake.fireEvent("/a", fake.watches[0][1])
        fake.pump()
        client.protocol.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(d, XenStoreConnectionLost)
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(client.watchCount, 0)

    def test_eventsAfterSuccessIgnored(self):
        """Events arriving after success (before UNWATCH lands) read nothing."""
        client, fake, _ = self.makeClient()
        fake.setNode("/a", b"1")
        d = client.waitFor("/a")
        fake.hold = True
        fake.pump()
        fake.releaseHeld()
        self.assertEqual(self.successResultOf(d), "1")
        reads = len(fake.requests(Op.READ))
        fake.fireEvent("/a", "whatever")
        fake.pump()
        self.assertEqual(len(fake.requests(Op.READ)), reads)

    def test_lateReadAfterTimeout(self):
        """A read answered after the timeout does not fire the Deferred again."""
        client, fake, clock = self.makeClient()
        fake.setNode("/b", b"2")
        fake.holdOps = {Op.READ}
        d = client.waitFor("/b", timeout=1)
        fake.pump()
        self.assertEqual(len(fake.held), 1)
        clock.advance(1)
        f = self.failureResultOf(d, XenStoreTimeout)
        self.assertIsNone(f.value.last)
        fake.releaseHeld()
        self.assertCleanedUp(client, fake, clock)

    def test_lateReadErrorAfterTimeout(self):
        """A read failing after the timeout leaves the timeout as the outcome."""
        client, fake, clock = self.makeClient()
        fake.holdOps = {Op.READ}
        d = client.waitFor("/b", timeout=1)
        fake.pump()
        clock.advance(1)
        fake.failNext(Op.READ, "EACCES")
        fake.releaseHeld()
        self.failureResultOf(d, XenStoreTimeout)
        self.assertEqual(len(fake.requests(Op.READ)), 1)
        self.assertCleanedUp(client, fake, clock)

    def test_eventBeforeAckAfterTimeout(self):
        """
        An event for the watch arriving after the timeout but before the
        WATCH ack triggers no read.
        """
        client, fake, clock = self.makeClient()
        fake.hold = True
        d = client.waitFor("/a", timeout=1)
        fake.pump()
        [watch] = fake.held
        token = splitStrings(watch.payload)[1].decode()
        clock.advance(1)
        self.failureResultOf(d, XenStoreTimeout)
        fake.fireEvent("/a", token)
        self.assertEqual(fake.transport.value(), b"")
        fake.releaseHeld()
        self.assertEqual(fake.requests(Op.READ), [])
        self.assertCleanedUp(client, fake, clock)


class DeferredTypeTests(ClientTestMixin, SynchronousTestCase):
    """Every operation returns a Deferred."""

    def test_operationsReturnDeferreds(self):
        """Node, watch, transaction and domain operations return Deferreds."""
        client, fake, _ = self.makeClient()
        fake.setNode("/a", b"1")
        calls = [
            client.read("/a"),
            client.readBytes("/a"),
            client.readOrNone("/a"),
            client.write("/a", "2"),
            client.mkdir("/m"),
            client.rm("/m"),
            client.ls("/"),
            client.exists("/a"),
            client.getPerms("/a"),
            client.setPerms("/a", ["n0"]),
            client.watch("/a", lambda e: None),
            client.startTransaction(),
            client.transact(lambda tx: None),
            client.waitFor("/a"),
            client.getDomainPath(1),
            client.introduceDomain(1, 2, 3),
            client.isDomainIntroduced(1),
            client.resumeDomain(1),
            client.releaseDomain(1),
            client.setTarget(1, 2),
        ]
        for d in calls:
            self.assertIsInstance(d, Deferred)
        fake.pump()
        for d in calls:
            self.successResultOf(d)


class FastPathTests(ClientTestMixin, SynchronousTestCase):
    """
    Results converted inside the protocol (no callbacks added per request)
    and error replies that are answers: the same results as before.
    """

    def test_readOrNone(self):
        """ENOENT is None; any other error still fails."""
        client, fake, _ = self.makeClient()
        fake.setNode("/a", b"\xff1")
        fake.denied.add("/d")
        fake.setNode("/d", b"x")
        self.assertEqual(self.call(fake, client.readOrNone("/a")), "\udcff1")
        self.assertIsNone(self.call(fake, client.readOrNone("/missing")))
        self.callFails(fake, client.readOrNone("/d"), AccessDeniedError)

    def test_exists(self):
        """Present or unreadable is True, missing is False, other errors fail."""
        client, fake, _ = self.makeClient()
        fake.setNode("/a", b"")
        fake.setNode("/d", b"x")
        fake.denied.add("/d")
        self.assertIs(self.call(fake, client.exists("/a")), True)
        self.assertIs(self.call(fake, client.exists("/d")), True)
        self.assertIs(self.call(fake, client.exists("/missing")), False)
        fake.failNext(Op.READ, "EINVAL")
        self.callFails(fake, client.exists("/a"), InvalidRequestError)

    def test_rmMissingOk(self):
        """With missingOk ENOENT is success, other errors fail; without it ENOENT fails."""
        client, fake, _ = self.makeClient()
        fake.failNext(Op.RM, "ENOENT")
        self.assertIsNone(self.call(fake, client.rm("/x/y", missingOk=True)))
        fake.failNext(Op.RM, "EACCES")
        self.callFails(fake, client.rm("/x/y", missingOk=True), AccessDeniedError)
        fake.failNext(Op.RM, "ENOENT")
        self.callFails(fake, client.rm("/x/y"), NoEntryError)

    def test_writeValueTypes(self):
        """Text, bytes and bytes-like values are sent as the same bytes."""
        client, fake, _ = self.makeClient()

        class Text(str):
            pass

        for value, raw in [
            ("t\udcff", b"t\xff"),
            (Text("sub"), b"sub"),
            (b"b", b"b"),
            (bytearray(b"ba"), b"ba"),
            (memoryview(b"mv"), b"mv"),
            ("", b""),
        ]:
            self.assertIsNone(self.call(fake, client.write("/v", value)))
            self.assertEqual(fake.received[-1].payload, b"/v\0" + raw)
        self.assertRaises(InvalidArgumentError, client.write, "/v", 5)

    def test_pathAsBytes(self):
        """A path given as ASCII bytes works and is named as text in errors."""
        client, fake, _ = self.makeClient()
        f = self.callFails(fake, client.read(b"/missing"), NoEntryError)
        self.assertEqual(f.value.path, "/missing")

    def test_badTransactionId(self):
        """A TRANSACTION_START reply that is not a number fails the start."""
        client, fake, _ = self.makeClient()
        d = client.startTransaction()
        [packet] = fake.parser.feed(fake.transport.value())
        fake.transport.clear()
        client.protocol.dataReceived(Packet(Op.TRANSACTION_START, packet.reqId, 0, b"x\0").encode())
        self.failureResultOf(d, ValueError)

    def test_endedTransactionNamed(self):
        """The refusal of an ended transaction names it, for every operation."""
        client, fake, _ = self.makeClient()
        tx = self.call(fake, client.startTransaction())
        self.call(fake, tx.abort())
        for call in (lambda: tx.write("/a", "v"), lambda: tx.ls("/"), tx.commit):
            exc = self.assertRaises(InvalidArgumentError, call)
            self.assertIn(f"transaction {tx.txId} has already ended", str(exc))
        # A bad path is still reported as such, before the transaction's state.
        self.assertRaises(InvalidPathError, tx.read, "/a b")

    def test_protocolReplaced(self):
        """Setting the client's protocol makes its requests go there."""
        client, fake, _ = self.makeClient()
        other = XenStoreProtocol()
        transport = StringTransport()
        other.makeConnection(transport)
        client.protocol = other
        self.assertIs(client.protocol, other)
        client.read("/a")
        client.transact(lambda tx: None)
        self.assertEqual(len(PacketParser().feed(transport.value())), 2)
        self.assertEqual(fake.transport.value(), b"")

    def test_namesLikeSplitting(self):
        """Listing names are decoded as splitting then decoding each would."""
        from xenddev.xenstore.client import _names, _text

        samples = [
            b"",
            b"\0",
            b"a\0",
            b"a\0b\0",
            b"a\0b",
            b"\xc3\0\xa9\0",
            b"\xc3\xa9\0\xff\xfe\0",
            b"\0\0",
            b"x\0\0y\0",
        ]
        for raw in samples:
            self.assertEqual(_names(raw), [_text(n) for n in splitStrings(raw)], raw)

    def test_standInProtocol(self):
        """
        Any object with XenStoreProtocol.request's signature still serves as
        the protocol (test doubles do this): requests go through its
        request, with the same results.
        """
        seen = []

        class StandIn:
            connected = 1
            transport = None
            eventReceived = None

            def request(self, op, payload, txId, context):
                seen.append((op, txId, context))
                if op == Op.READ and payload == b"/there\0":
                    return succeed(b"v")
                if op == Op.READ:
                    return fail(NoEntryError("ENOENT", "READ", context))
                if op == Op.TRANSACTION_START:
                    return succeed(b"9\0")
                return succeed(b"OK\0")

        client = XenStoreClient(StandIn(), reactor=Clock())
        self.assertEqual(self.successResultOf(client.read("/there")), "v")
        self.assertIsNone(self.successResultOf(client.readOrNone("/gone")))
        self.assertIs(self.successResultOf(client.exists("/gone")), False)
        self.assertIsNone(self.successResultOf(client.write("/w", "x")))
        self.failureResultOf(client.read("/gone"), NoEntryError)
        self.assertEqual(self.successResultOf(client.transact(lambda tx: tx.read("/there"))), "v")
        self.assertEqual(
            seen,
            [
                (Op.READ, 0, "/there"),
                (Op.READ, 0, "/gone"),
                (Op.READ, 0, "/gone"),
                (Op.WRITE, 0, "/w"),
                (Op.READ, 0, "/gone"),
                (Op.TRANSACTION_START, 0, None),
                (Op.READ, 9, "/there"),
                (Op.TRANSACTION_END, 9, "tx 9"),
            ],
        )
