"""
The protocol-level XenStore suite: our client against a server.

It is a mixin: combine it with a fixture from L{tests.support.fixtures}
(real C xenstored, or the embedded server) and L{twisted.trial.unittest.TestCase}.
Everything here is checked against the real C xenstored first; the embedded
server must behave the same.
"""

from __future__ import annotations

import functools
import shutil
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, gatherResults
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue

from xenddev.xenstore import (
    ConflictError,
    InvalidRequestError,
    NoEntryError,
    Perm,
    XenStoreConnectionLost,
)
from xenddev.xenstore.errors import QuotaError, XenStoreError
from xenddev.xenstore.interfaces import ITransaction
from xenddev.xenstore.wire import Op

_E = TypeVar("_E", bound=BaseException)


def deferredTest(
    f: Callable[..., Coroutine[Any, Any, Any]],
) -> Callable[..., Deferred[Any]]:
    """
    Wrap an C{async def} so that calling it returns a Deferred.

    Not needed for tests: trial runs C{async def} test methods (and
    C{setUp}/C{tearDown}) itself, and this project's tests are written that
    way. It remains for the modules that still use it (the real-Xen lane, the
    CLI and a few kinds' tests) until they are converted.
    """

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Deferred[Any]:
        return Deferred.fromCoroutine(f(*args, **kwargs))

    return wrapper


class EventRecorder:
    """Collects watch events, and lets a test wait until N have arrived."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self._waiters: list[tuple[Callable[[list[str]], bool], Deferred[None]]] = []

    def __call__(self, path: str) -> None:
        self.events.append(path)
        for cond, d in list(self._waiters):
            if cond(self.events):
                self._waiters.remove((cond, d))
                d.callback(None)

    def waitUntil(self, cond: Callable[[list[str]], bool], timeout: float = 5.0) -> Deferred[None]:
        """Fire when C{cond(events)} holds; fail after C{timeout} seconds."""
        d: Deferred[None] = Deferred()
        if cond(self.events):
            d.callback(None)
            return d
        self._waiters.append((cond, d))
        d.addTimeout(timeout, reactor)
        return d

    def waitFor(self, path: str, count: int = 1) -> Deferred[None]:
        """Fire once C{path} has been seen C{count} times."""
        return self.waitUntil(lambda evs: evs.count(path) >= count)


def settle(seconds: float = 0.05) -> Deferred[None]:
    """Let the reactor run briefly (for asserting that nothing more arrives)."""
    return deferLater(reactor, seconds, lambda: None)


class FailureAssertions:
    """C{assertFails} for suites of C{async def} tests; mixed with TestCase."""

    fail: Callable[..., None]

    async def assertFails(self, d: Awaitable[object], exc: type[_E]) -> _E:
        """Await C{d} and check it fails with C{exc} (a subclass will do); the exception."""
        try:
            result = await d
        except exc as e:
            return e
        self.fail(f"expected {exc.__name__}, got result {result!r}")
        raise AssertionError("unreachable")


class XenStoreClientSuite(FailureAssertions):
    """Protocol-level tests; needs C{startServer}, C{connect}, C{cliEnv}."""

    # Provided by the fixture and TestCase mixed in.
    startServer: Callable[[], str]
    connect: Callable[..., Deferred[Any]]
    cliEnv: Callable[[], dict[str, str]]
    assertEqual: Callable[..., None]
    assertTrue: Callable[..., None]
    assertFalse: Callable[..., None]
    assertIn: Callable[..., None]
    assertIsInstance: Callable[..., None]

    def setUp(self) -> Deferred[Any]:  # type: ignore[override]
        self.startServer()
        d = self.connect()

        def got(client: Any) -> None:
            self.client = client

        return d.addCallback(got)

    async def cli(self, *argv: str) -> str:
        """
        Run a real xenstore-* tool against the server (argument list, no
        shell) without blocking the reactor, which may be serving the store.
        """
        exe = shutil.which(argv[0])
        if exe is None:
            self.fail(f"{argv[0]} is not installed")
            raise AssertionError("unreachable")
        out, err, code = await getProcessOutputAndValue(
            exe, argv[1:], env=self.cliEnv(), reactor=reactor
        )
        if code != 0:
            self.fail(f"{' '.join(argv)} exited {code}: {err.decode(errors='replace')}")
        return out.decode()

    # Node operations

    async def test_writeRead(self) -> None:
        """A written value reads back, as text and as bytes."""
        await self.client.write("/test/a", "hello")
        self.assertEqual(await self.client.read("/test/a"), "hello")
        self.assertEqual(await self.client.readBytes("/test/a"), b"hello")

    async def test_binaryValue(self) -> None:
        """Values are byte strings: NUL and high bytes survive a round trip."""
        value = bytes(range(256))
        await self.client.write("/test/bin", value)
        self.assertEqual(await self.client.readBytes("/test/bin"), value)

    async def test_writeCreatesParents(self) -> None:
        """WRITE creates every missing ancestor with an empty value."""
        await self.client.write("/test/x/y/z", "1")
        self.assertEqual(await self.client.read("/test/x/y"), "")
        self.assertEqual(await self.client.ls("/test/x"), ["y"])

    async def test_readMissing(self) -> None:
        """Reading a missing node fails with ENOENT; readOrNone gives None."""
        e = await self.assertFails(self.client.read("/test/missing"), NoEntryError)
        self.assertEqual(e.errname, "ENOENT")  # type: ignore[attr-defined]
        self.assertEqual(e.args[0], 2)  # pyxs-style (errno, strerror)
        self.assertEqual(await self.client.readOrNone("/test/missing"), None)

    async def test_lsMissingOk(self) -> None:
        """ls of a missing node is ENOENT, or a fresh empty list with missingOk."""
        await self.assertFails(self.client.ls("/test/missing"), NoEntryError)
        first = await self.client.ls("/test/missing", missingOk=True)
        self.assertEqual(first, [])
        first.append("changed")
        self.assertEqual(await self.client.ls("/test/missing", missingOk=True), [])
        await self.client.write("/test/here/a", "1")
        self.assertEqual(await self.client.ls("/test/here", missingOk=True), ["a"])

        async def inTx(tx: ITransaction) -> list[str]:
            return await tx.ls("/test/gone", missingOk=True)

        self.assertEqual(await self.client.transact(inTx), [])

    async def test_mkdir(self) -> None:
        """MKDIR creates an empty node and is idempotent."""
        await self.client.mkdir("/test/dir")
        await self.client.mkdir("/test/dir")
        self.assertEqual(await self.client.read("/test/dir"), "")
        self.assertTrue(await self.client.exists("/test/dir"))

    async def test_rmSubtree(self) -> None:
        """RM removes the whole subtree; removing it again is not an error."""
        await self.client.write("/test/r/a/b", "1")
        await self.client.write("/test/r/c", "2")
        await self.client.rm("/test/r")
        self.assertFalse(await self.client.exists("/test/r/a/b"))
        self.assertFalse(await self.client.exists("/test/r"))
        await self.client.rm("/test/r")

    async def test_rmWithoutParent(self) -> None:
        """RM of a node whose parent is missing too fails with ENOENT."""
        await self.assertFails(self.client.rm("/nope/nope"), NoEntryError)

    async def test_ls(self) -> None:
        """DIRECTORY lists the immediate children's leaf names."""
        for name in ("c", "a", "b"):
            await self.client.write(f"/test/ls/{name}/deep", name)
        self.assertEqual(sorted(await self.client.ls("/test/ls")), ["a", "b", "c"])
        self.assertEqual(await self.client.ls("/test/ls/a/deep"), [])

    async def test_lsLarge(self) -> None:
        """
        A listing larger than one reply (E2BIG for DIRECTORY) is fetched with
        DIRECTORY_PART: 400 children with 40-byte names (16 KiB of names).
        """
        names = [f"child-{i:04d}-" + "x" * 29 for i in range(400)]
        await gatherResults([self.client.write(f"/test/big/{n}", "v") for n in names])
        raw = self.client.protocol.request(Op.DIRECTORY, b"/test/big\0")
        e = await self.assertFails(raw, QuotaError)
        self.assertEqual(e.errname, "E2BIG")  # type: ignore[attr-defined]
        self.assertEqual(sorted(await self.client.ls("/test/big")), names)

    async def test_exists(self) -> None:
        """exists() is False for a missing node and True for an existing one."""
        self.assertFalse(await self.client.exists("/test/e"))
        await self.client.write("/test/e", "")
        self.assertTrue(await self.client.exists("/test/e"))

    async def test_permissions(self) -> None:
        """
        A new node belongs to dom0 with no default access; SET_PERMS replaces
        the list and GET_PERMS reads it back, owner first.
        """
        await self.client.write("/test/p", "v")
        self.assertEqual(await self.client.getPerms("/test/p"), [Perm("n", 0)])
        await self.client.setPerms("/test/p", ["b5", "r7", Perm("w", 9)])
        self.assertEqual(
            await self.client.getPerms("/test/p"), [Perm("b", 5), Perm("r", 7), Perm("w", 9)]
        )

    async def test_childInheritsPermissions(self) -> None:
        """A node created under a node inherits its parent's permissions."""
        await self.client.write("/test/inh", "")
        await self.client.setPerms("/test/inh", ["n5", "r6"])
        await self.client.write("/test/inh/child", "v")
        perms = await self.client.getPerms("/test/inh/child")
        self.assertEqual([str(p) for p in perms], ["n5", "r6"])

    async def test_relativePath(self) -> None:
        """A relative path resolves under /local/domain/0 for dom0."""
        await self.client.write("rel/x", "1")
        self.assertEqual(await self.client.read("/local/domain/0/rel/x"), "1")

    async def test_domainPath(self) -> None:
        """GET_DOMAIN_PATH gives /local/domain/<domid>."""
        self.assertEqual(await self.client.getDomainPath(7), "/local/domain/7")

    async def test_isDomainIntroduced(self) -> None:
        """dom0 is introduced; an unknown domain is not."""
        self.assertTrue(await self.client.isDomainIntroduced(0))
        self.assertFalse(await self.client.isDomainIntroduced(42))

    async def test_introduceAndReleaseDomain(self) -> None:
        """
        INTRODUCE fires @introduceDomain and makes the domain introduced;
        RELEASE fires @releaseDomain and forgets it.
        """
        introduced, released = EventRecorder(), EventRecorder()
        hi = await self.client.watch("@introduceDomain", introduced)
        hr = await self.client.watch("@releaseDomain", released)
        await introduced.waitFor("@introduceDomain")
        await released.waitFor("@releaseDomain")
        self.assertFalse(await self.client.isDomainIntroduced(7))
        await self.client.introduceDomain(7, 4096, 1)
        await introduced.waitFor("@introduceDomain", 2)
        self.assertTrue(await self.client.isDomainIntroduced(7))
        await self.client.releaseDomain(7)
        await released.waitFor("@releaseDomain", 2)
        self.assertFalse(await self.client.isDomainIntroduced(7))
        await hi.stop()
        await hr.stop()

    # Errors from the server

    async def test_serverRejectsInvalidPath(self) -> None:
        """A path our validation would refuse, sent raw, gets EINVAL from the server."""
        d = self.client.protocol.request(Op.READ, b"/bad path\0")
        e = await self.assertFails(d, InvalidRequestError)
        self.assertEqual(e.errname, "EINVAL")  # type: ignore[attr-defined]

    async def test_unknownTransaction(self) -> None:
        """A request naming a transaction that does not exist fails with ENOENT."""
        d = self.client.protocol.request(Op.READ, b"/\0", txId=12345)
        e = await self.assertFails(d, NoEntryError)
        self.assertEqual(e.errname, "ENOENT")  # type: ignore[attr-defined]

    async def test_unknownOperation(self) -> None:
        """An operation number the server does not know gets an error reply."""
        d = self.client.protocol.request(99, b"\0")
        e = await self.assertFails(d, XenStoreError)
        self.assertIn(e.errname, ("EINVAL", "ENOSYS"))  # type: ignore[attr-defined]
        # The connection is still usable afterwards.
        await self.client.write("/test/after", "ok")

    # Watches

    async def test_watchFiresOnRegistration(self) -> None:
        """A new watch fires once at once, with the watched path."""
        rec = EventRecorder()
        handle = await self.client.watch("/test/w", rec)
        await rec.waitFor("/test/w")
        await handle.stop()

    async def test_watchChildren(self) -> None:
        """A watch fires for writes to the node and to any descendant."""
        rec = EventRecorder()
        handle = await self.client.watch("/test/wc", rec)
        await rec.waitFor("/test/wc")
        await self.client.write("/test/wc/a/b", "1")
        await rec.waitFor("/test/wc/a/b")
        await self.client.write("/test/wc", "2")
        await rec.waitFor("/test/wc", 2)
        await handle.stop()

    async def test_watchAncestorRemoved(self) -> None:
        """Removing an ancestor fires the watch with the watched path."""
        await self.client.write("/test/wa/x/y", "1")
        rec = EventRecorder()
        handle = await self.client.watch("/test/wa/x/y", rec)
        await rec.waitFor("/test/wa/x/y")
        await self.client.rm("/test/wa")
        await rec.waitFor("/test/wa/x/y", 2)
        await handle.stop()

    async def test_unwatchStopsEvents(self) -> None:
        """After stop(), changes no longer reach the callback."""
        rec = EventRecorder()
        handle = await self.client.watch("/test/uw", rec)
        await rec.waitFor("/test/uw")
        await handle.stop()
        await self.client.write("/test/uw/x", "1")
        await settle()
        self.assertEqual(rec.events, ["/test/uw"])

    async def test_twoWatchesSamePath(self) -> None:
        """Two watches on one path each get their own events (routed by token)."""
        a, b = EventRecorder(), EventRecorder()
        ha = await self.client.watch("/test/two", a)
        hb = await self.client.watch("/test/two", b)
        await self.client.write("/test/two/k", "1")
        await a.waitFor("/test/two/k")
        await b.waitFor("/test/two/k")
        await ha.stop()
        await self.client.write("/test/two/k", "2")
        await b.waitFor("/test/two/k", 2)
        self.assertEqual(a.events.count("/test/two/k"), 1)
        await hb.stop()

    async def test_relativeWatch(self) -> None:
        """A relative watch reports relative event paths."""
        rec = EventRecorder()
        handle = await self.client.watch("relw", rec)
        await rec.waitFor("relw")
        await self.client.write("/local/domain/0/relw/k", "1")
        await rec.waitFor("relw/k")
        await handle.stop()

    async def test_resetWatches(self) -> None:
        """RESET_WATCHES removes every watch of the connection."""
        rec = EventRecorder()
        await self.client.watch("/test/rw", rec)
        await rec.waitFor("/test/rw")
        await self.client.resetWatches()
        await self.client.write("/test/rw/x", "1")
        await settle()
        self.assertEqual(rec.events, ["/test/rw"])

    async def test_independentWatcherSeesOurWrite(self) -> None:
        """A second connection's watch sees the first connection's writes."""
        other = await self.connect()
        rec = EventRecorder()
        handle = await other.watch("/test/ind", rec)
        await self.client.write("/test/ind/v", "1")
        await rec.waitFor("/test/ind/v")
        await handle.stop()

    # Transactions

    async def test_transactionIsolation(self) -> None:
        """Writes inside a transaction are invisible outside until commit."""
        tx = await self.client.startTransaction()
        await tx.write("/test/tx", "inside")
        self.assertEqual(await self.client.readOrNone("/test/tx"), None)
        self.assertEqual(await tx.read("/test/tx"), "inside")
        await tx.commit()
        self.assertEqual(await self.client.read("/test/tx"), "inside")

    async def test_transactionAbort(self) -> None:
        """An aborted transaction leaves no trace."""
        tx = await self.client.startTransaction()
        await tx.write("/test/txa", "x")
        await tx.abort()
        self.assertFalse(await self.client.exists("/test/txa"))

    async def test_transactionConflict(self) -> None:
        """A commit after another write to a node it read fails with EAGAIN."""
        await self.client.write("/test/c", "0")
        tx = await self.client.startTransaction()
        await tx.read("/test/c")
        await tx.write("/test/c", "1")
        await self.client.write("/test/c", "2")
        e = await self.assertFails(tx.commit(), ConflictError)
        self.assertEqual(e.errname, "EAGAIN")  # type: ignore[attr-defined]
        self.assertEqual(await self.client.read("/test/c"), "2")

    async def test_watchFiresOnlyOnCommit(self) -> None:
        """Changes made in a transaction fire watches only when committed."""
        rec = EventRecorder()
        handle = await self.client.watch("/test/twc", rec)
        await rec.waitFor("/test/twc")
        tx = await self.client.startTransaction()
        await tx.write("/test/twc/k", "1")
        await settle()
        self.assertEqual(rec.events, ["/test/twc"])
        await tx.commit()
        await rec.waitFor("/test/twc/k")
        await handle.stop()

    async def test_concurrentIncrements(self) -> None:
        """
        200 concurrent read-increment-write transactions on one counter, over
        four connections, end with the exact count: conflicts are retried.
        """
        await self.client.write("/test/counter", "0")
        clients = [self.client] + [await self.connect() for _ in range(3)]

        async def increment(tx: Any) -> None:
            value = int(await tx.read("/test/counter"))
            await tx.write("/test/counter", str(value + 1))

        results = await DeferredList(
            [clients[i % 4].transact(increment, maxAttempts=1000) for i in range(200)],
            consumeErrors=True,
        )
        failures = [r for ok, r in results if not ok]
        self.assertEqual(failures, [])
        self.assertEqual(await self.client.read("/test/counter"), "200")

    # Volume and pipelining

    async def test_pipelinedWritesThenReads(self) -> None:
        """10 000 writes in flight at once, then 10 000 reads, all correct."""
        n = 10000
        await gatherResults([self.client.write(f"/test/pipe/{i}", str(i * 7)) for i in range(n)])
        values = await gatherResults([self.client.read(f"/test/pipe/{i}") for i in range(n)])
        self.assertEqual(values, [str(i * 7) for i in range(n)])

    # Interoperability with independent clients

    async def test_cliSeesOurWrites(self) -> None:
        """The real xenstore-read and xenstore-ls see what we wrote."""
        await self.client.write("/test/cli/key", "from-xenddev")
        self.assertEqual((await self.cli("xenstore-read", "/test/cli/key")).strip(), "from-xenddev")
        self.assertIn("key", await self.cli("xenstore-ls", "/test/cli"))

    async def test_weSeeCliWrites(self) -> None:
        """What xenstore-write writes, we read; xenstore-rm removes it for us too."""
        await self.cli("xenstore-write", "/test/cli2/key", "from-cli")
        self.assertEqual(await self.client.read("/test/cli2/key"), "from-cli")
        await self.cli("xenstore-chmod", "/test/cli2/key", "b3", "r4")
        self.assertEqual(
            [str(p) for p in await self.client.getPerms("/test/cli2/key")], ["b3", "r4"]
        )
        await self.cli("xenstore-rm", "/test/cli2")
        self.assertFalse(await self.client.exists("/test/cli2"))

    async def test_pyxsInterop(self) -> None:
        """pyxs's blocking Client reads our writes and we read its writes."""
        from pyxs import Client

        await self.client.write("/test/pyxs/a", "ours")

        def pyxsSide() -> bytes:
            with Client(unix_socket_path=self.socketPath) as c:  # type: ignore[attr-defined]
                c.write(b"/test/pyxs/b", b"theirs")
                return bytes(c.read(b"/test/pyxs/a"))

        from twisted.internet.threads import deferToThread

        self.assertEqual(await deferToThread(pyxsSide), b"ours")
        self.assertEqual(await self.client.read("/test/pyxs/b"), "theirs")


class XenStoreFaultSuite:
    """Server crash and restart; needs C{killServer}/C{restartServer} too."""

    startServer: Callable[[], str]
    connect: Callable[..., Deferred[Any]]
    killServer: Callable[[], None]
    restartServer: Callable[[], None]
    socketPath: str
    assertEqual: Callable[..., None]
    assertIsInstance: Callable[..., None]
    assertTrue: Callable[..., None]
    addCleanup: Callable[..., None]

    async def test_killFailsPendingCalls(self) -> None:
        """
        Killing the server with requests in flight fails every one of them
        with XenStoreConnectionLost, and later calls fail at once.
        """
        self.startServer()
        client = await self.connect()
        await client.write("/test/k", "1")
        pending = [client.read("/test/k") for _ in range(2000)]
        self.killServer()
        results = await DeferredList(pending, consumeErrors=True)
        lost = [r for ok, r in results if not ok]
        # Some reads may have been answered before the kill; none may hang,
        # and every failure is a clean connection-lost error.
        self.assertTrue(len(lost) > 0)
        for f in lost:
            self.assertIsInstance(f.value, XenStoreConnectionLost)
        try:
            await client.read("/test/k")
        except XenStoreConnectionLost:
            pass
        else:
            raise AssertionError("a read after the kill succeeded")

    async def test_reconnectResumesWatches(self) -> None:
        """
        After a server restart the reconnecting client re-registers its
        watches, fires each once (events may have been missed), and sees new
        changes.
        """
        from twisted.internet.endpoints import UNIXClientEndpoint

        from xenddev.xenstore import ReconnectingXenStore

        self.startServer()
        store = ReconnectingXenStore(
            UNIXClientEndpoint(reactor, self.socketPath),
            reactor,
            retryPolicy=lambda attempt: 0.05,
        )
        store.start()
        self.addCleanup(store.stop)
        rec = EventRecorder()
        await store.watch("/test/rc", rec)
        await rec.waitFor("/test/rc")
        self.killServer()
        self.restartServer()
        # The registration event on the new connection.
        await rec.waitFor("/test/rc", 2)
        await store.write("/test/rc/after", "1")
        await rec.waitFor("/test/rc/after")
        self.assertEqual(await store.read("/test/rc/after"), "1")
        self.assertEqual(store.connections, 2)
