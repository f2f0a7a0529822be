"""
The embedded xenstored's watch index (issue 13 item 2): a change looks up
only the watches on its path and its ancestors, yet every watch fires
exactly as when the server scanned them all, in the same order.

L{WatchIndexTests} checks the index against L{Watch.matches}, the rule
itself, for generated watches and changes; L{IndexStateTests} drives the
server with generated requests from several clients and checks after each
that the index holds exactly the watches the connections hold, in their
order; L{FiringTests} covers, end to end, the cases an index could get
wrong: removal of an ancestor, unwatch, connection loss, RESET_WATCHES,
relative paths, special paths, permissions, transactions and order.
L{WideParentTests} covers the other cost that grew with devices present: a
commit under a parent with many children.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import TestCase

from tests.test_xenstored_units import Client
from xenddev.xenstore.server.core import Connection, XenStoreServer
from xenddev.xenstore.server.quota import Quotas
from xenddev.xenstore.server.tree import Entry, Tree
from xenddev.xenstore.server.watches import Watch, WatchIndex, watchedPaths
from xenddev.xenstore.wire import Op

#: Paths over a small alphabet, so that generated watches and changes meet.
_PATHS = st.lists(st.sampled_from([b"a", b"b", b"ab"]), min_size=0, max_size=4).map(
    lambda parts: b"/" + b"/".join(parts)
)
_NAMES = st.one_of(_PATHS, st.sampled_from([b"@introduceDomain", b"@releaseDomain"]))


def events(client: Client) -> list[tuple[bytes, bytes]]:
    """The (path, token) of each event C{client} received since last asked."""
    out = []
    for p in client.packets:
        if p.op == Op.WATCH_EVENT:
            path, token = p.payload.split(b"\0")[:2]
            out.append((path, token))
    client.packets = []
    return out


def scanned(server: XenStoreServer, name: bytes, exact: bool) -> list[tuple[Connection, Watch]]:
    """What a scan of every connection's watches, in order, finds for a change."""
    return [
        (c, w) for c in server.connections for w in c.watches.values() if w.matches(name, exact)
    ]


class WatchIndexTests(TestCase):
    """L{WatchIndex} finds what L{Watch.matches} says, in scan order."""

    def test_watchedPaths(self) -> None:
        """A change's candidate paths: itself, its ancestors and /; exact: itself."""
        self.assertEqual(list(watchedPaths(b"/a/b/c", False)), [b"/a/b/c", b"/a/b", b"/a", b"/"])
        self.assertEqual(list(watchedPaths(b"/a/b/c", True)), [b"/a/b/c"])
        self.assertEqual(list(watchedPaths(b"/", False)), [b"/"])
        self.assertEqual(list(watchedPaths(b"@releaseDomain", True)), [b"@releaseDomain"])

    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(st.tuples(st.integers(0, 3), _NAMES), max_size=30),
        st.lists(st.integers(0, 40), max_size=10),
        _NAMES,
        st.booleans(),
    )
    def test_sameAsMatches(
        self,
        registrations: list[tuple[int, bytes]],
        removals: list[int],
        name: bytes,
        exact: bool,
    ) -> None:
        """
        For any watches (registered by four owners in any order, some then
        removed) and any change, the index gives the watches that match,
        by owner rank, then registration.
        """
        index: WatchIndex[int] = WatchIndex()
        live: list[tuple[int, Watch]] = []
        for i, (owner, path) in enumerate(registrations):
            w = Watch(path, b"t%d" % i, None)
            index.add(w, owner, owner)
            live.append((owner, w))
        for r in removals:
            if live:
                _, w = live.pop(r % len(live))
                index.remove(w)
        self.assertEqual(len(index), len(live))
        expected = sorted(
            ((o, w) for o, w in live if w.matches(name, exact)),
            key=lambda ow: (ow[0], ow[1].serial),
        )
        self.assertEqual(index.matching(name, exact), expected)

    def test_belowIsNotAbove(self) -> None:
        """A watch below the changed node, or a sibling sharing a prefix, does not fire."""
        index: WatchIndex[str] = WatchIndex()
        for path in (b"/a/b/c", b"/a/bc", b"/ab"):
            index.add(Watch(path, b"t", None), "x", 0)
        self.assertEqual(index.matching(b"/a/b", False), [])
        self.assertEqual(index.matching(b"/a", False), [])


_CLIENTS = ("A", "B", "g5")


@st.composite
def _requests(draw: st.DrawFn) -> tuple[str, int, bytes]:
    client = draw(st.sampled_from(_CLIENTS))
    op = draw(
        st.sampled_from([Op.WATCH, Op.WATCH, Op.UNWATCH, Op.WRITE, Op.RM, Op.RESET_WATCHES, -1, -2])
    )
    path = draw(_PATHS.map(lambda p: b"/t" + p if p != b"/" else b"/t"))
    if draw(st.booleans()) and client == "g5":
        path = b"rel" + path  # relative to /local/domain/5
    token = draw(st.sampled_from([b"x", b"y"]))
    if op in (Op.WATCH, Op.UNWATCH):
        return client, op, path + b"\0" + token + b"\0"
    if op == Op.WRITE:
        return client, op, path + b"\0v"
    if op == Op.RM:
        return client, op, path + b"\0"
    return client, op, b""  # -1: reconnect; -2: a write through a transaction


class IndexStateTests(TestCase):
    """The index always holds exactly the connections' watches."""

    @settings(max_examples=150, deadline=None)
    @given(st.lists(_requests(), min_size=5, max_size=40))
    def test_indexFollowsConnections(self, requests: list[tuple[str, int, bytes]]) -> None:
        """
        After any sequence of watch, unwatch, write, rm, RESET_WATCHES,
        transactions and reconnections, every change finds through the
        index what a scan of the connections finds, and the per-domain
        watch counts (the quota) are the connections' own.
        """
        server = XenStoreServer()
        dom0 = Client(server)
        dom0.write(b"/local/domain/5", b"")
        dom0.req(Op.SET_PERMS, b"/local/domain/5", b"n5")
        dom0.write(b"/t", b"")
        dom0.req(Op.SET_PERMS, b"/t", b"b5")
        clients = {"A": Client(server), "B": Client(server), "g5": Client(server, 5)}
        for name, op, payload in requests:
            client = clients[name]
            if op == -1:
                server.disconnect(client.conn)
                clients[name] = Client(server, client.conn.domid)
            elif op == -2:
                _, txId = client.req(Op.TRANSACTION_START, b"")
                tx = int(txId.rstrip(b"\0"))
                client.write(b"/t/a", b"tx", tx=tx)
                client.req(Op.TRANSACTION_END, b"T", tx=tx)
            else:
                client.req(op, raw=payload)
            for probe in (b"/t/a/b", b"/t/ab", b"/local/domain/5/rel/t/a", b"@releaseDomain"):
                for exact in (False, True):
                    self.assertEqual(
                        server.watches.matching(probe, exact), scanned(server, probe, exact)
                    )
        self.assertEqual(len(server.watches), sum(len(c.watches) for c in server.connections))
        for domid in (0, 5):
            own = sum(len(c.watches) for c in server.connections if c.domid == domid)
            self.assertEqual(server._watchCount(domid), own)


class FiringTests(TestCase):
    """Events through the index, end to end, for the cases an index can miss."""

    def setUp(self) -> None:
        self.server = XenStoreServer(quotas=Quotas(watchesPerDomain=2))
        self.dom0 = Client(self.server)
        self.watcher = Client(self.server)

    def watch(self, client: Client, path: bytes, token: bytes) -> None:
        """Register a watch and swallow its initial event."""
        self.assertEqual(client.req(Op.WATCH, path, token)[0], "OK")
        self.assertEqual(events(client), [(path, token)])

    def test_rmOfAncestorFiresWatchesBelow(self) -> None:
        """
        Removing /r fires the watches on /r, on /, and on each removed
        node below (with its own path), but not one on a path below that
        never existed.
        """
        self.dom0.write(b"/r/a/b/c", b"1")
        self.dom0.write(b"/r/x", b"1")
        for path, token in [
            (b"/r/a/b/c", b"c"),
            (b"/r/a/b/c/none", b"none"),
            (b"/r", b"r"),
            (b"/r/x", b"x"),
            (b"/", b"root"),
            (b"/rr", b"sibling"),
        ]:
            self.watch(self.watcher, path, token)
        self.assertEqual(self.dom0.req(Op.RM, b"/r")[0], "OK")
        got = events(self.watcher)
        self.assertEqual(
            sorted(got),
            sorted(
                [
                    (b"/r", b"r"),
                    (b"/r", b"root"),
                    (b"/r/a/b/c", b"c"),
                    (b"/r/x", b"x"),
                ]
            ),
        )

    def test_rmInTransactionFiresWatchesBelowAtCommit(self) -> None:
        """A removal in a transaction fires the watches below at commit, not before."""
        self.dom0.write(b"/r/a/b", b"1")
        self.watch(self.watcher, b"/r/a/b", b"below")
        _, txId = self.dom0.req(Op.TRANSACTION_START, b"")
        tx = int(txId.rstrip(b"\0"))
        self.assertEqual(self.dom0.req(Op.RM, b"/r", tx=tx)[0], "OK")
        self.assertEqual(events(self.watcher), [])
        self.assertEqual(self.dom0.req(Op.TRANSACTION_END, b"T", tx=tx)[0], "OK")
        self.assertEqual(events(self.watcher), [(b"/r/a/b", b"below")])

    def test_commitFiresEveryChangedPath(self) -> None:
        """
        A commit fires for each path it wrote, in the order of access (not
        for /c, made implicitly: C fires only for the node written).
        """
        self.watch(self.watcher, b"/c", b"c")
        _, txId = self.dom0.req(Op.TRANSACTION_START, b"")
        tx = int(txId.rstrip(b"\0"))
        for path in (b"/c/2", b"/c/1", b"/c/3"):
            self.dom0.write(path, b"v", tx=tx)
        self.dom0.req(Op.TRANSACTION_END, b"T", tx=tx)
        self.assertEqual([p for p, _ in events(self.watcher)], [b"/c/2", b"/c/1", b"/c/3"])

    def test_unwatch(self) -> None:
        """An unwatched watch no longer fires; the others on its path do."""
        self.watch(self.watcher, b"/u", b"one")
        self.watch(self.watcher, b"/u", b"two")
        self.assertEqual(self.watcher.req(Op.UNWATCH, b"/u", b"one")[0], "OK")
        self.assertEqual(self.watcher.req(Op.UNWATCH, b"/u", b"one")[0], "ENOENT")
        self.dom0.write(b"/u", b"1")
        self.assertEqual(events(self.watcher), [(b"/u", b"two")])
        self.assertEqual(len(self.server.watches), 1)

    def test_orderOfRegistration(self) -> None:
        """
        One change fires a connection's watches in the order they were
        registered, whatever their paths; one unwatched and registered
        again comes last.
        """
        for path, token in [(b"/o/a", b"1"), (b"/o", b"2"), (b"/", b"3"), (b"/o/a/b", b"4")]:
            self.watch(self.watcher, path, token)
        self.dom0.write(b"/o/a/b", b"v")
        self.assertEqual([t for _, t in events(self.watcher)], [b"1", b"2", b"3", b"4"])
        self.watcher.req(Op.UNWATCH, b"/o/a", b"1")
        self.watch(self.watcher, b"/o/a", b"1")
        self.dom0.write(b"/o/a/b", b"w")
        self.assertEqual([t for _, t in events(self.watcher)], [b"2", b"3", b"4", b"1"])

    def test_orderOfConnections(self) -> None:
        """
        Connections get a change's events in order of connection, even
        when a later one registered first (each write is flushed in turn).
        """
        seen: list[str] = []
        first = Client(self.server)
        second = Client(self.server)
        for name, client in (("first", first), ("second", second)):

            def record(data: bytes, name: str = name, got: object = client.conn.write) -> None:
                seen.append(name)
                got(data)  # type: ignore[operator]

            client.conn.write = record
        for client in (second, first):
            client.req(Op.WATCH, b"/n", b"t")
        seen.clear()
        self.dom0.write(b"/n", b"v")
        self.assertEqual(seen, ["first", "second"])

    def test_connectionLoss(self) -> None:
        """A lost connection's watches leave the index and its domain's quota."""
        self.dom0.write(b"/local/domain/5", b"")
        self.dom0.req(Op.SET_PERMS, b"/local/domain/5", b"n5", b"r0")
        guest = Client(self.server, 5)
        for i in range(3):
            self.assertEqual(guest.req(Op.WATCH, b"/local/domain/5", b"%d" % i)[0], "OK")
        self.assertEqual(guest.req(Op.WATCH, b"/local/domain/5", b"more")[0], "E2BIG")
        events(guest)
        self.server.disconnect(guest.conn)
        self.assertEqual(len(self.server.watches), 0)
        self.dom0.write(b"/local/domain/5/x", b"v")
        self.assertEqual(events(guest), [])
        again = Client(self.server, 5)
        self.assertEqual(again.req(Op.WATCH, b"/local/domain/5", b"new")[0], "OK")

    def test_resetWatches(self) -> None:
        """RESET_WATCHES empties the connection's watches, from the index too."""
        self.watch(self.watcher, b"/z", b"z")
        self.assertEqual(self.watcher.req(Op.RESET_WATCHES, raw=b"")[0], "OK")
        self.dom0.write(b"/z", b"v")
        self.assertEqual(events(self.watcher), [])
        self.assertEqual(len(self.server.watches), 0)
        self.watch(self.watcher, b"/z", b"z")  # no EEXIST

    def test_relativePaths(self) -> None:
        """
        A relative watch is indexed under its domain's home and reports
        paths relative to it; the same relative path of another domain is
        another watch; an absolute watch on the same node reports absolute.
        """
        for domid in (5, 6):
            home = b"/local/domain/%d" % domid
            self.dom0.write(home, b"")
            self.dom0.req(Op.SET_PERMS, home, b"n%d" % domid)
        five, six = Client(self.server, 5), Client(self.server, 6)
        self.watch(five, b"device", b"rel")
        self.watch(six, b"device", b"rel")
        self.watch(five, b"/local/domain/5/device", b"abs")
        self.assertEqual(five.write(b"device/vbd", b"1"), "OK")
        self.assertEqual(
            events(five), [(b"device/vbd", b"rel"), (b"/local/domain/5/device/vbd", b"abs")]
        )
        self.assertEqual(events(six), [])
        self.assertEqual(five.req(Op.UNWATCH, b"device", b"rel")[0], "OK")
        self.assertEqual(five.write(b"device/vbd", b"2"), "OK")
        self.assertEqual(events(five), [(b"/local/domain/5/device/vbd", b"abs")])

    def test_specialPaths(self) -> None:
        """
        @introduceDomain and @releaseDomain fire only their own watches
        (not one on /), and only for who may read them.
        """
        guest = Client(self.server, 5)
        self.watch(self.watcher, b"@introduceDomain", b"i")
        self.watch(self.watcher, b"@releaseDomain", b"r")
        self.watch(self.watcher, b"/", b"root")
        self.watch(guest, b"@releaseDomain", b"g")
        self.dom0.req(Op.INTRODUCE, b"3", b"0", b"1")
        self.assertEqual(events(self.watcher), [(b"@introduceDomain", b"i")])
        self.dom0.req(Op.RELEASE, b"3")
        self.assertEqual(events(self.watcher), [(b"@releaseDomain", b"r")])
        self.assertEqual(events(guest), [])
        self.dom0.req(Op.SET_PERMS, b"@releaseDomain", b"n0", b"r5")
        self.dom0.req(Op.INTRODUCE, b"4", b"0", b"1")
        self.dom0.req(Op.RELEASE, b"4")
        self.assertEqual(events(guest), [(b"@releaseDomain", b"g")])

    def test_permissions(self) -> None:
        """
        A guest's watch fires for a node it may read, or whose parent it
        may read, not otherwise; after SET_PERMS it fires if it could read
        the node before or after; a dom0 watcher on the same path always.
        """
        guest = Client(self.server, 5)
        self.dom0.write(b"/p/hidden/deep", b"")
        self.dom0.write(b"/p/open", b"")
        self.dom0.req(Op.SET_PERMS, b"/p/open", b"n0", b"r5")
        self.watch(guest, b"/p", b"g")
        self.watch(self.watcher, b"/p", b"d")
        self.dom0.write(b"/p/hidden/deep", b"1")
        self.assertEqual(events(guest), [])
        self.assertEqual(events(self.watcher), [(b"/p/hidden/deep", b"d")])
        self.dom0.write(b"/p/open/new", b"1")  # readable parent
        self.assertEqual(events(guest), [(b"/p/open/new", b"g")])
        self.dom0.req(Op.SET_PERMS, b"/p/open", b"n0")  # readable before
        self.assertEqual(events(guest), [(b"/p/open", b"g")])
        self.dom0.req(Op.SET_PERMS, b"/p/open", b"n0")  # readable neither time
        self.assertEqual(events(guest), [])


class WideParentTests(TestCase):
    """
    A commit under a parent with many children changes the parent's
    children in place (L{Tree.rewrite}), with the result of rebuilding them.
    """

    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(st.sampled_from([b"a", b"b", b"c", b"d", b"e"]), unique=True),
        st.data(),
    )
    def test_updateChildrenSameAsRebuild(self, before: list[bytes], data: st.DataObject) -> None:
        """
        Whatever the new list (names dropped, added, re-added, reordered)
        and whatever the hint of dropped names, the children are the names
        in the new order, each with the entry it had, a new one empty.
        """
        names = data.draw(
            st.one_of(
                st.permutations(before),
                st.lists(st.sampled_from([b"a", b"b", b"c", b"d", b"e", b"f"]), unique=True),
            )
        )
        dropped = data.draw(st.lists(st.sampled_from(before or [b"z"])))
        tree = Tree()
        old: dict[bytes, Entry] = {n: b"value of " + n for n in before}
        original = dict(old)
        got = tree._updateChildren(old, list(names), dropped)
        self.assertEqual(list(got.items()), [(n, original.get(n, b"")) for n in names])

    def test_dropAndAddInOneTransaction(self) -> None:
        """
        Removing one child, adding another and re-creating a removed one
        in one transaction gives the order and contents C gives: the
        survivors in place, then the new ones in order of creation.
        """
        server = XenStoreServer()
        dom0 = Client(server)
        for name in (b"a", b"b", b"c"):
            dom0.write(b"/w/" + name + b"/x", b"old " + name)
        _, txId = dom0.req(Op.TRANSACTION_START, b"")
        tx = int(txId.rstrip(b"\0"))
        self.assertEqual(dom0.req(Op.RM, b"/w/a", tx=tx)[0], "OK")
        self.assertEqual(dom0.req(Op.RM, b"/w/b", tx=tx)[0], "OK")
        self.assertEqual(dom0.write(b"/w/d", b"new d", tx=tx), "OK")
        self.assertEqual(dom0.write(b"/w/b", b"new b", tx=tx), "OK")
        self.assertEqual(dom0.req(Op.TRANSACTION_END, b"T", tx=tx)[0], "OK")
        self.assertEqual(dom0.req(Op.DIRECTORY, b"/w")[1], b"c\0d\0b\0")
        self.assertEqual(dom0.read(b"/w/b"), ("OK", b"new b"))
        self.assertEqual(dom0.read(b"/w/b/x")[0], "ENOENT")
        self.assertEqual(dom0.read(b"/w/c/x"), ("OK", b"old c"))
        self.assertEqual(dom0.req(Op.DIRECTORY, b"/w/b")[1], b"")
