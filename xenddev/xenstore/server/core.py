# -*- test-case-name: tests.test_xenstored_units -*-
"""
What each XenStore request does: the operations of C xenstored 4.17, with
its argument checks, permission rules and errno values, on the L{Tree}.

This module knows nothing about sockets: a L{Connection} is a client's
state (identity, watches, transactions) plus a sink for the bytes to send;
L{XenStoreServer.handle} runs one request. The Twisted protocol lives in
L{xenddev.xenstore.server.protocol}.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from twisted.logger import Logger

from xenddev.xenstore.server.quota import Quotas
from xenddev.xenstore.server.transaction import Transaction, TransactionQuotaExceeded, TxNode
from xenddev.xenstore.server.tree import (
    DEFAULT_PERMS,
    NO_GENERATION,
    PERM_ALL,
    PERM_IGNORE,
    PERM_OWNER,
    PERM_READ,
    PERM_WRITE,
    RECORD_HEADER,
    RECORD_PERM,
    Entry,
    Node,
    PermSet,
    Tree,
    baseName,
    cAtoi,
    childPath,
    isValidNodename,
    parentOf,
    parsePerms,
)
from xenddev.xenstore.server.watches import Watch, WatchIndex, encodeEvent
from xenddev.xenstore.wire import HEADER, PAYLOAD_MAX, REL_PATH_MAX, Op

AnyNode = Node | TxNode

#: DOMID_SELF: IS_DOMAIN_INTRODUCED answers "T" for it.
DOMID_SELF = 0x7FF0
_SPECIAL = (b"@introduceDomain", b"@releaseDomain")
_OK = b"OK\0"


class XsError(Exception):
    """A request fails with this errno name (sent as an ERROR reply)."""

    def __init__(self, errname: str) -> None:
        super().__init__(errname)
        self.errname = errname


def _onearg(payload: bytes) -> bytes | None:
    # C onearg(): exactly one NUL, at the end.
    if not payload or payload.find(b"\0") != len(payload) - 1:
        return None
    return payload[:-1]


def _strings(payload: bytes) -> list[bytes]:
    # C get_strings(): the NUL-terminated strings; bytes after the last NUL
    # are ignored.
    parts = payload.split(b"\0")
    parts.pop()
    return parts


class Connection:
    """
    One client of the server.

    @ivar domid: the domain the client acts as (0 on the privileged socket).
    @ivar privileged: whether permission checks and quotas are skipped.
    @ivar write: called with the bytes to send.
    @ivar rank: the order of connection among the server's clients (events
        for one change reach clients in this order).
    @ivar watches: this client's watches by (absolute path, token), in
        order of registration.
    """

    def __init__(
        self, server: XenStoreServer, domid: int, write: Callable[[bytes], None], rank: int = 0
    ) -> None:
        self.server = server
        self.domid = domid
        self.privileged = domid == 0
        self.home = b"/local/domain/%d" % domid
        self.write = write
        self.rank = rank
        self.watches: dict[tuple[bytes, bytes], Watch] = {}
        self.transactions: dict[int, Transaction] = {}
        self.nextTxId = 0
        self._out: list[bytes] = []
        self._events: set[bytes] = set()
        #: Replies and events not handed to the transport yet.
        self.outstanding = 0

    @property
    def target(self) -> int | None:
        """The domain this one was given SET_TARGET rights over."""
        return self.server.targets.get(self.domid)

    def queue(self, data: bytes) -> None:
        """Queue an encoded packet; L{flush} sends it."""
        if not self._out and self in self.server.connections:
            self.server._unsent[self] = None  # for _flushOthers
        self._out.append(data)
        self.outstanding += 1

    def queueEvent(self, path: bytes, token: bytes) -> None:
        """
        Queue a WATCH_EVENT. An identical event already queued and not sent
        is dropped, as C does for non-special events.
        """
        payload = encodeEvent(path, token)
        if payload is None:
            return
        if path[:1] != b"@":
            if payload in self._events:
                return
            self._events.add(payload)
        self.queue(HEADER.pack(Op.WATCH_EVENT, 0, 0, len(payload)) + payload)

    def flush(self) -> None:
        """Send everything queued."""
        self._events.clear()
        if self._out:
            self.server._unsent.pop(self, None)
            out, self._out = self._out, []
            self.outstanding = 0
            self.write(b"".join(out))

    def endRequest(self) -> None:
        """A request is done: later identical events are new events."""
        self._events.clear()


class XenStoreServer:
    """
    The store and its clients: the tree, the domains, every connection.

    @param quotas: limits for unprivileged connections.
    @param domainExists: whether a domain exists (the hypervisor's answer in
        C); permission entries for other domains are ignored. By default
        every ordinary domid exists: there is no hypervisor to ask.
    @param reactor: used only for deferred work; injected, never imported at
        module level.
    """

    log = Logger()

    def __init__(
        self,
        quotas: Quotas | None = None,
        domainExists: Callable[[int], bool] | None = None,
        reactor: Any = None,
        tree: Tree | None = None,
    ) -> None:
        self.quotas = quotas if quotas is not None else Quotas()
        self.domainExists = domainExists if domainExists is not None else _ordinaryDomain
        self.reactor = reactor
        #: Every client, in order of connection.
        self.connections: dict[Connection, None] = {}
        self.watches: WatchIndex[Connection] = WatchIndex()
        #: Watches per domain (the watch quota), over all its connections.
        self._watchCounts: dict[int, int] = {}
        #: The connections with output queued and not flushed.
        self._unsent: dict[Connection, None] = {}
        self._lastRank = 0
        self.introduced: set[int] = {0}
        self.targets: dict[int, int] = {}
        self.specialPerms: dict[bytes, PermSet] = {s: DEFAULT_PERMS for s in _SPECIAL}
        self.trace: Callable[[str], None] | None = None
        if tree is None:
            tree = Tree()
            self._initialNodes(tree)
        self.tree = tree
        self._ops: dict[int, Callable[[Connection, Transaction | None, bytes], bytes]] = {
            Op.CONTROL: self._control,
            Op.DIRECTORY: self._directory,
            Op.READ: self._read,
            Op.GET_PERMS: self._getPerms,
            Op.WATCH: self._watch,
            Op.UNWATCH: self._unwatch,
            Op.TRANSACTION_START: self._transactionStart,
            Op.TRANSACTION_END: self._transactionEnd,
            Op.INTRODUCE: self._introduce,
            Op.RELEASE: self._release,
            Op.GET_DOMAIN_PATH: self._getDomainPath,
            Op.WRITE: self._write,
            Op.MKDIR: self._mkdir,
            Op.RM: self._rm,
            Op.SET_PERMS: self._setPerms,
            Op.IS_DOMAIN_INTRODUCED: self._isDomainIntroduced,
            Op.RESUME: self._resume,
            Op.SET_TARGET: self._setTarget,
            Op.RESET_WATCHES: self._resetWatches,
            Op.DIRECTORY_PART: self._directoryPart,
        }

    @staticmethod
    def _initialNodes(tree: Tree) -> None:
        # C 4.17 starts with /tool/xenstored; the toolstack's init creates
        # /local/domain. We start with both, as the issue asks.
        for path in (b"/tool", b"/tool/xenstored", b"/local", b"/local/domain"):
            tree.insert(path, b"", DEFAULT_PERMS)
        tree.recount()

    # Connections

    def connect(self, domid: int, write: Callable[[bytes], None]) -> Connection:
        """Register a new client acting as C{domid}."""
        self._lastRank += 1
        conn = Connection(self, domid, write, self._lastRank)
        self.connections[conn] = None
        return conn

    def disconnect(self, conn: Connection) -> None:
        """Forget a client: its watches and transactions go with it."""
        self.connections.pop(conn, None)
        self._unsent.pop(conn, None)
        self._dropWatches(conn)
        conn.transactions = {}

    def _dropWatches(self, conn: Connection) -> None:
        for w in conn.watches.values():
            self.watches.remove(w)
        if conn.watches:
            self._watchCounts[conn.domid] -= len(conn.watches)
            if not self._watchCounts[conn.domid]:
                del self._watchCounts[conn.domid]
        conn.watches = {}

    def _flushOthers(self, conn: Connection | None) -> None:
        unsent = self._unsent
        if not unsent or (len(unsent) == 1 and conn in unsent):
            return
        # In order of connection, as a scan of every client would.
        for c in sorted(unsent, key=_rank):
            if c is not conn:
                c.flush()

    # Dispatch

    def handle(self, conn: Connection, op: int, reqId: int, txId: int, payload: bytes) -> None:
        """
        Run one request and queue its reply on C{conn} (the caller flushes
        C{conn}); events for other connections are sent at once.
        """
        if self.trace is not None:
            self.trace(f"IN  {conn.domid} {op} {reqId} {txId} {payload!r}")
        try:
            func = self._ops.get(op)
            if func is None:
                raise XsError("ENOSYS")
            if op in _PRIV_OPS and not conn.privileged:
                raise XsError("EACCES")
            tx = None
            if txId and op not in _NOTID_OPS:
                tx = conn.transactions.get(txId)
                if tx is None:
                    raise XsError("ENOENT")
            reply = func(conn, tx, payload)
            if len(reply) > PAYLOAD_MAX:
                raise XsError("E2BIG")
            conn.queue(HEADER.pack(op, reqId, txId, len(reply)) + reply)
            if op == Op.WATCH:
                self._firstEvent(conn)
        except XsError as e:
            err = e.errname.encode() + b"\0"
            conn.queue(HEADER.pack(Op.ERROR, reqId, txId, len(err)) + err)
        except TransactionQuotaExceeded:
            conn.queue(HEADER.pack(Op.ERROR, reqId, txId, 7) + b"ENOSPC\0")
        conn.endRequest()
        self._flushOthers(conn)

    # Permissions

    def permFor(self, conn: Connection, perms: PermSet) -> int:
        """C{perm_for_conn}: the access bits C{conn} has on a node."""
        if conn.privileged:
            return PERM_ALL
        entries = perms.entries
        owner = entries[0][0]
        target = self.targets.get(conn.domid)
        if owner == conn.domid or (target is not None and owner == target):
            return PERM_ALL
        for domid, bits in entries[1:]:
            if not bits & PERM_IGNORE and (domid == conn.domid or domid == target):
                return bits & PERM_ALL
        return entries[0][1] & PERM_ALL

    # Node access (global or through a transaction)

    def _readNode(self, tx: Transaction | None, path: bytes) -> AnyNode | None:
        if tx is None:
            return self.tree.lookup(path)
        return tx.read(path)

    def _canonical(self, conn: Connection, path: bytes | None) -> bytes | None:
        if path is None or path[:1] in (b"/", b"@"):
            return path
        return conn.home + b"/" + path

    def _getNode(
        self, conn: Connection, tx: Transaction | None, path: bytes | None, perm: int
    ) -> AnyNode:
        """C{get_node}: the node, or the errno C would give (hiding existence)."""
        if path is None:
            raise XsError("EINVAL")
        maxPath = self.quotas.maxPathLength
        node: AnyNode | None
        # Validating a path costs a fifth of a read: skip it for a path that
        # names a node (created from a valid path; only the length rule
        # could fail, for an ancestor that C, and we, made implicitly) or
        # that the transaction has already accessed (validated then).
        if tx is None:
            node = self.tree.lookup(path) if path[:1] == b"/" else None
            if (node is None or len(path) > maxPath) and not isValidNodename(path, maxPath):
                raise XsError("EINVAL")
        else:
            if path not in tx.accessed and not isValidNodename(path, maxPath):
                raise XsError("EINVAL")
            node = tx.read(path)
        if node is not None:
            if conn.privileged or (self.permFor(conn, node.perms) & perm) == perm:
                return node
            err = "EACCES"
        else:
            err = "ENOENT"
            if conn.privileged and tx is None:
                raise XsError(err)  # the parents' answer cannot differ
        # errno_from_parents(): only say ENOENT to who may see the parent.
        name = path
        parent = None
        while name != b"/":
            name = parentOf(name)
            parent = self._readNode(tx, name)
            if parent is not None:
                break
        if parent is not None and self.permFor(conn, parent.perms) & perm:
            raise XsError(err)
        raise XsError("EACCES")

    # Watches

    def _watchPermitted(
        self,
        watcher: Connection,
        name: bytes,
        perms: PermSet | None,
        parentPerms: PermSet | None,
        oldPerms: PermSet | None,
    ) -> bool:
        if oldPerms is not None and self.permFor(watcher, oldPerms) & PERM_READ:
            return True
        if perms is None:
            node = self.tree.lookup(name)
            if node is None:
                return False
            perms = node.perms
        if self.permFor(watcher, perms) & PERM_READ:
            return True
        if parentPerms is None:
            parent = self.tree.lookup(parentOf(name))
            if parent is None:
                return False
            parentPerms = parent.perms
        return bool(self.permFor(watcher, parentPerms) & PERM_READ)

    def fireWatches(
        self,
        conn: Connection | None,
        tx: Transaction | None,
        name: bytes,
        perms: PermSet | None,
        exact: bool,
        oldPerms: PermSet | None = None,
        parentPerms: PermSet | None = None,
    ) -> None:
        """
        C{fire_watches}: queue events (or remember them in C{tx}) for a
        change of C{name}, whose permissions are C{perms} (and its parent's
        C{parentPerms}; looked up when None).
        """
        if tx is not None:
            tx.queueWatch(name, exact)
            return
        matching = self.watches.matching(name, exact)
        if not matching:
            return
        special = name[:1] == b"@"
        # Grouped by connection (the index orders them so): each client's
        # right to see the change is decided once.
        last: Connection | None = None
        permitted = False
        for c, w in matching:
            if c is not last:
                last = c
                if special:
                    permitted = bool(self.permFor(c, self.specialPerms[name]) & PERM_READ)
                else:
                    permitted = (perms is not None and c.privileged) or self._watchPermitted(
                        c, name, perms, parentPerms, oldPerms
                    )
            if permitted:
                c.queueEvent(w.eventPath(name), w.token)

    def _firstEvent(self, conn: Connection) -> None:
        w = next(reversed(conn.watches.values()))
        conn.queueEvent(w.eventPath(w.path), w.token)

    # Quota helpers

    def _entries(self, conn: Connection) -> int:
        return self.tree.entries.get(conn.domid, 0)

    def _checkSize(self, conn: Connection, tx: Transaction | None, size: int) -> None:
        if not conn.privileged and size >= self.quotas.maxEntrySize:
            if tx is not None:
                tx.failed = True
            raise XsError("ENOSPC")

    def _countEntry(self, tx: Transaction | None, domid: int, delta: int) -> None:
        if tx is None:
            self.tree.countEntry(domid, delta)
        else:
            tx.countEntry(domid, delta)

    # Node-changing primitives

    def _create(
        self, conn: Connection, tx: Transaction | None, path: bytes, value: bytes
    ) -> tuple[PermSet, PermSet]:
        """
        C{create_node}: make C{path} and its missing ancestors; return the
        permissions of the new node and of its parent.
        """
        names: list[bytes] = []
        cur = path
        while True:
            names.append(cur)
            cur = parentOf(cur)
            parent = self._readNode(tx, cur)
            if parent is not None:
                break
            if cur == b"/":  # pragma: no cover - the root always exists
                raise XsError("ENOENT")
        names.reverse()  # top-down: names[0] is the parent's new child
        perms = parent.perms if conn.privileged else parent.perms.withOwner(conn.domid)
        # Checks first (C writes bottom-up and undoes on failure: same errno).
        if not conn.privileged:
            count = self._entries(conn)
            quota = self.quotas.nodesPerDomain
            if (count + len(names) - 1 if tx is None else count) >= quota:
                raise XsError("ENOSPC")
            base = RECORD_HEADER + RECORD_PERM * len(perms.entries)
            sizes = [base + len(value)]
            sizes += [base + len(baseName(n)) + 1 for n in names[1:]]
            sizes.append(parent.recordSize() + len(baseName(names[0])) + 1)
            for size in sizes:
                self._checkSize(conn, tx, size)
        if tx is not None:
            tx.nodeCreated = True
            leaf = TxNode(value, perms, 0, [])
            newNodes = [TxNode(b"", perms, 0, []) for _ in names[:-1]] + [leaf]
            # Bottom-up, like C, so generations are handed out in its order.
            for i in range(len(names) - 1, -1, -1):
                if i + 1 < len(names):
                    newNodes[i].children.append(baseName(names[i + 1]))
                tx.write(names[i], newNodes[i])
                tx.countEntry(perms.owner, 1)
            assert isinstance(parent, TxNode)
            parent.children.append(baseName(names[0]))
            tx.write(parentOf(names[0]), parent)
            top = newNodes[-2] if len(newNodes) > 1 else parent
            return perms, top.perms
        assert isinstance(parent, Node)
        return perms, self.tree.create(parent, names, value, perms)

    def _removeSubtree(
        self, conn: Connection | None, tx: Transaction | None, path: bytes, node: AnyNode
    ) -> None:
        """C{rm_node}: delete C{path} and below, firing watches as C does."""
        parentPath = parentOf(path)
        parent = self._readNode(tx, parentPath)
        if parent is None:
            raise XsError("EINVAL")
        if tx is None:
            assert isinstance(node, Node) and isinstance(parent, Node)
            tree = self.tree
            events = tree.subtree(path, node, parent)
            for _, perms, _ in events:
                tree.nextGeneration()
                tree.countEntry(perms.owner, -1)
            tree.removeChild(parent, baseName(path))
            for p, perms, parentPerms in events:
                self.fireWatches(conn, None, p, perms, p != path, parentPerms=parentPerms)
            return
        # In a transaction, C's tree walk: read each node through the
        # overlay on the way down (recording the access), delete it on the
        # way up, taking its entry out of its parent's copy. A child its
        # parent lists but that is missing stops the walk with EIO, keeping
        # what was deleted so far; so does a top node its parent does not
        # list. Both happen only when the transaction's copy of a parent is
        # stale, so that it cannot commit anyway.
        assert isinstance(node, TxNode) and isinstance(parent, TxNode)
        walk: list[tuple[bytes, TxNode, list[bytes]]] = [(path, node, list(node.children))]
        while walk:
            wp, wn, todo = walk[-1]
            if todo:
                cp = childPath(wp, todo.pop(0))
                child = tx.read(cp)
                if child is None:
                    raise XsError("EIO")
                walk.append((cp, child, list(child.children)))
                continue
            walk.pop()
            tx.delete(wp)
            tx.countEntry(wn.perms.owner, -1)
            self.fireWatches(conn, tx, wp, wn.perms, wp != path)
            if walk:
                up, upNode, _ = walk[-1]
                upNode.removeChild(baseName(wp))
                tx.write(up, upNode)
        name = baseName(path)
        if name not in parent.children:
            raise XsError("EIO")
        parent.removeChild(name)
        tx.write(parentPath, parent)

    # Operations. Each returns the reply payload or raises XsError.

    def _read(self, conn: Connection, tx: Transaction | None, payload: bytes) -> bytes:
        node = self._getNode(conn, tx, self._canonical(conn, _onearg(payload)), PERM_READ)
        return node.value

    def _directory(self, conn: Connection, tx: Transaction | None, payload: bytes) -> bytes:
        node = self._getNode(conn, tx, self._canonical(conn, _onearg(payload)), PERM_READ)
        return node.childBytes()

    def _directoryPart(self, conn: Connection, tx: Transaction | None, payload: bytes) -> bytes:
        if payload.count(b"\0") != 2:
            raise XsError("EINVAL")
        first, second, _ = payload.split(b"\0")
        node = self._getNode(conn, tx, self._canonical(conn, first), PERM_READ)
        off = cAtoi(second) & 0xFFFFFFFF
        gen = b"%d\0" % (self.tree.observe(node) if isinstance(node, Node) else node.generation)
        children = node.childBytes()
        total = len(children)
        if off >= total:
            return gen + b"\0"
        maxlen = PAYLOAD_MAX - len(gen) - 1
        length = 0
        pos = off
        while True:
            end = children.index(b"\0", pos)
            if length + (end - pos) >= maxlen:
                break
            length += end - pos + 1
            pos = end + 1
            if off + length == total:
                break
        data = gen + children[off : off + length]
        if off + length == total:
            data += b"\0"
        return data

    def _getPerms(self, conn: Connection, tx: Transaction | None, payload: bytes) -> bytes:
        node = self._getNode(conn, tx, self._canonical(conn, _onearg(payload)), PERM_READ)
        return node.perms.wire

    def _write(self, conn: Connection, tx: Transaction | None, payload: bytes) -> bytes:
        nul = payload.find(b"\0")
        if nul < 0:
            raise XsError("EINVAL")
        value = payload[nul + 1 :]
        name = self._canonical(conn, payload[:nul])
        assert name is not None
        try:
            node = self._getNode(conn, tx, name, PERM_WRITE)
        except XsError as e:
            if e.errname != "ENOENT":
                raise
            perms, parentPerms = self._create(conn, tx, name, value)
            self.fireWatches(conn, tx, name, perms, False, parentPerms=parentPerms)
            return _OK
        if not conn.privileged:
            self._checkSize(conn, tx, node.recordSize() - len(node.value) + len(value))
        if tx is None:
            assert isinstance(node, Node)
            self.tree.setValue(node, value)
        else:
            assert isinstance(node, TxNode)
            node.value = value
            tx.write(name, node)
        self.fireWatches(conn, tx, name, node.perms, False)
        return _OK

    def _mkdir(self, conn: Connection, tx: Transaction | None, payload: bytes) -> bytes:
        name = self._canonical(conn, _onearg(payload))
        try:
            self._getNode(conn, tx, name, PERM_WRITE)
        except XsError as e:
            if e.errname != "ENOENT":
                raise
            assert name is not None
            perms, parentPerms = self._create(conn, tx, name, b"")
            self.fireWatches(conn, tx, name, perms, False, parentPerms=parentPerms)
        return _OK

    def _rm(self, conn: Connection, tx: Transaction | None, payload: bytes) -> bytes:
        name = self._canonical(conn, _onearg(payload))
        try:
            node = self._getNode(conn, tx, name, PERM_WRITE)
        except XsError as e:
            if e.errname != "ENOENT":
                raise
            assert name is not None
            # Removing a missing node is fine if its parent exists.
            if self._readNode(tx, parentOf(name)) is not None:
                return _OK
            raise
        assert name is not None
        if name == b"/":
            raise XsError("EINVAL")
        self._removeSubtree(conn, tx, name, node)
        return _OK

    def _setPerms(self, conn: Connection, tx: Transaction | None, payload: bytes) -> bytes:
        strings = _strings(payload)
        if len(strings) < 2:
            raise XsError("EINVAL")
        if not conn.privileged and len(strings) - 1 > self.quotas.permsPerNode:
            raise XsError("ENOSPC")
        perms = parsePerms(strings[1:])
        if perms is None:
            raise XsError("EINVAL")
        if any(not self.domainExists(d) for d, _ in perms.entries):
            perms = PermSet.make(
                tuple((d, b if self.domainExists(d) else b | PERM_IGNORE) for d, b in perms.entries)
            )
        if perms.entries[0][1] & PERM_IGNORE:
            raise XsError("ENOENT")
        path = strings[0]
        if path[:1] == b"@":
            if path not in self.specialPerms:
                raise XsError("EINVAL")
            need = PERM_WRITE | PERM_OWNER
            if self.permFor(conn, self.specialPerms[path]) & need != need:
                raise XsError("EACCES")
            self.specialPerms[path] = perms
            return _OK
        name = self._canonical(conn, path)
        node = self._getNode(conn, tx, name, PERM_WRITE | PERM_OWNER)
        assert name is not None
        old = node.perms
        if not conn.privileged and perms.owner != old.owner:
            raise XsError("EPERM")  # the last entry of C's xsd_errors table
        if not conn.privileged:
            self._checkSize(
                conn, tx, node.recordSize() + RECORD_PERM * (len(perms.entries) - len(old.entries))
            )
        if perms.owner != old.owner:
            self._countEntry(tx, old.owner, -1)
            self._countEntry(tx, perms.owner, 1)
        if tx is None:
            assert isinstance(node, Node)
            self.tree.setPerms(node, perms)
        else:
            assert isinstance(node, TxNode)
            node.perms = perms
            tx.write(name, node)
        self.fireWatches(conn, tx, name, perms, False, oldPerms=old)
        return _OK

    def _watch(self, conn: Connection, tx: Transaction | None, payload: bytes) -> bytes:
        if payload.count(b"\0") != 2:
            raise XsError("EINVAL")
        path, token, _ = payload.split(b"\0")
        if path[:1] == b"@":
            prefix = None
            if len(path) > REL_PATH_MAX:
                raise XsError("EINVAL")
        else:
            prefix = None if path[:1] == b"/" else conn.home
            canon = self._canonical(conn, path)
            assert canon is not None
            path = canon
            if not isValidNodename(path, self.quotas.maxPathLength):
                raise XsError("EINVAL")
        if (path, token) in conn.watches:
            raise XsError("EEXIST")
        if not conn.privileged and self._watchCount(conn.domid) > self.quotas.watchesPerDomain:
            raise XsError("E2BIG")
        w = Watch(path, token, prefix)
        conn.watches[path, token] = w
        self.watches.add(w, conn, conn.rank)
        self._watchCounts[conn.domid] = self._watchCounts.get(conn.domid, 0) + 1
        return _OK

    def _watchCount(self, domid: int) -> int:
        return self._watchCounts.get(domid, 0)

    def _unwatch(self, conn: Connection, tx: Transaction | None, payload: bytes) -> bytes:
        if payload.count(b"\0") != 2:
            raise XsError("EINVAL")
        path, token, _ = payload.split(b"\0")
        path = self._canonical(conn, path) or b""
        w = conn.watches.pop((path, token), None)
        if w is None:
            raise XsError("ENOENT")
        self.watches.remove(w)
        self._watchCounts[conn.domid] -= 1
        if not self._watchCounts[conn.domid]:
            del self._watchCounts[conn.domid]
        return _OK

    def _transactionStart(self, conn: Connection, tx: Transaction | None, payload: bytes) -> bytes:
        if tx is not None:
            raise XsError("EBUSY")
        if not conn.privileged and len(conn.transactions) > self.quotas.transactionsPerConnection:
            raise XsError("ENOSPC")
        while True:
            txId = conn.nextTxId
            conn.nextTxId = (conn.nextTxId + 1) & 0xFFFFFFFF
            if txId and txId not in conn.transactions:
                break
        maxNodes = None if conn.privileged else self.quotas.nodesPerTransaction
        conn.transactions[txId] = Transaction(txId, self.tree, maxNodes)
        return b"%d\0" % txId

    def _transactionEnd(self, conn: Connection, tx: Transaction | None, payload: bytes) -> bytes:
        arg = _onearg(payload)
        if arg not in (b"T", b"F"):
            raise XsError("EINVAL")
        if tx is None:
            raise XsError("ENOENT")
        del conn.transactions[tx.txId]
        if arg == b"F":
            return _OK
        if tx.failed:
            raise XsError("ENOMEM")
        if tx.nodeCreated and not conn.privileged:
            for domid, delta in tx.entryDeltas.items():
                if domid != 0 and self.tree.entries.get(domid, 0) + delta >= (
                    self.quotas.nodesPerDomain
                ):
                    raise XsError("ENOSPC")
        if tx.conflicts():
            raise XsError("EAGAIN")
        for path, exact, oldPerms in tx.apply():
            self.fireWatches(conn, None, path, None, exact, oldPerms)
        return _OK

    # Domains

    def _introduce(self, conn: Connection, tx: Transaction | None, payload: bytes) -> bytes:
        strings = _strings(payload)
        if len(strings) < 3:
            raise XsError("EINVAL")
        domid = cAtoi(strings[0]) & 0xFFFFFFFF
        if cAtoi(strings[2]) & 0xFFFFFFFF == 0:
            raise XsError("EINVAL")
        if domid not in self.introduced:
            self.introduced.add(domid)
            if domid != 0:
                self.fireWatches(None, None, b"@introduceDomain", None, True)
        return _OK

    def _domainArg(self, payload: bytes) -> int:
        arg = _onearg(payload)
        if arg is None:
            raise XsError("EINVAL")
        domid = cAtoi(arg) & 0xFFFFFFFF
        if domid == 0:
            raise XsError("EINVAL")
        if domid not in self.introduced:
            raise XsError("ENOENT")
        return domid

    def _release(self, conn: Connection, tx: Transaction | None, payload: bytes) -> bytes:
        domid = self._domainArg(payload)
        self.releaseDomain(domid)
        return _OK

    def releaseDomain(self, domid: int) -> None:
        """
        Forget domain C{domid}: remove the nodes it owns, ignore from now on
        the permission entries naming it, fire @releaseDomain.
        """
        self.introduced.discard(domid)
        self.targets.pop(domid, None)
        if self.tree.entries.get(domid, 0) > 0:
            for path in self._ownedTops(domid):
                node = self.tree.lookup(path)
                if node is not None:
                    self._removeSubtree(None, None, path, node)
        self._ignoreEntries(domid)
        for key, perms in list(self.specialPerms.items()):
            self.specialPerms[key] = _withoutDomain(perms, domid)
        self.fireWatches(None, None, b"@releaseDomain", None, True)

    def _ignoreEntries(self, domid: int) -> None:
        """
        Mark the non-owner entries naming C{domid} ignored, on every node
        and in every open transaction: a domain introduced later with the
        same id must not inherit them (C 4.17 ignores the entries of a
        domain newer than the node's last write; GET_PERMS still lists
        them, a new SET_PERMS replaces them).
        """
        fixed: dict[PermSet, PermSet] = {}

        def fix(perms: PermSet) -> PermSet:
            new = fixed.get(perms)
            if new is None:
                entries = perms.entries
                if any(d == domid and not b & PERM_IGNORE for d, b in entries[1:]):
                    rest = tuple((d, b | PERM_IGNORE if d == domid else b) for d, b in entries[1:])
                    new = PermSet.make((entries[0], *rest))
                else:
                    new = perms
                fixed[perms] = new
            return new

        # Most releases name no permission set: skip the walk then.
        if all(fix(p) is p for p in PermSet.interned()):
            return
        # Plain leaves have their parent's permissions, fixed alike.
        for node in self.tree.nodes():
            node.perms = fix(node.perms)
        for conn in self.connections:
            for tx in conn.transactions.values():
                for entry in tx.accessed.values():
                    if entry.node is not None:
                        entry.node.perms = fix(entry.node.perms)

    def _ownedTops(self, domid: int) -> list[bytes]:
        tops: list[bytes] = []
        root = self.tree.root
        stack: list[tuple[bytes, Entry, PermSet]] = [(b"/", root, root.perms)]
        while stack:
            p, n, parentPerms = stack.pop()
            # A plain leaf has its parent's permissions.
            perms = parentPerms if isinstance(n, bytes) else n.perms
            if perms.owner == domid and p != b"/":
                tops.append(p)
                continue
            if isinstance(n, Node) and n.children:
                stack.extend((childPath(p, k), c, perms) for k, c in reversed(n.children.items()))
        return tops

    def _resume(self, conn: Connection, tx: Transaction | None, payload: bytes) -> bytes:
        self._domainArg(payload)
        return _OK

    def _getDomainPath(self, conn: Connection, tx: Transaction | None, payload: bytes) -> bytes:
        arg = _onearg(payload)
        if arg is None:
            raise XsError("EINVAL")
        return b"/local/domain/%d\0" % (cAtoi(arg) & 0xFFFFFFFF)

    def _isDomainIntroduced(
        self, conn: Connection, tx: Transaction | None, payload: bytes
    ) -> bytes:
        arg = _onearg(payload)
        if arg is None:
            raise XsError("EINVAL")
        domid = cAtoi(arg) & 0xFFFFFFFF
        return b"T\0" if domid == DOMID_SELF or domid in self.introduced else b"F\0"

    def _setTarget(self, conn: Connection, tx: Transaction | None, payload: bytes) -> bytes:
        strings = _strings(payload)
        if len(strings) < 2:
            raise XsError("EINVAL")
        domid = cAtoi(strings[0]) & 0xFFFFFFFF
        target = cAtoi(strings[1]) & 0xFFFFFFFF
        if domid not in self.introduced or target not in self.introduced:
            raise XsError("ENOENT")
        self.targets[domid] = target
        return _OK

    def _resetWatches(self, conn: Connection, tx: Transaction | None, payload: bytes) -> bytes:
        self._dropWatches(conn)
        conn.transactions = {}
        return _OK

    def _control(self, conn: Connection, tx: Transaction | None, payload: bytes) -> bytes:
        strings = _strings(payload)
        if not strings:
            raise XsError("EINVAL")
        cmd = strings[0]
        if cmd == b"check":
            self.tree.recount()
            return _OK
        if cmd == b"print":
            self.log.info("CONTROL print: {text}", text=b" ".join(strings[1:]))
            return _OK
        if cmd == b"quota":
            q = self.quotas
            text = (
                f"Quota settings:\nnodes: {q.nodesPerDomain}\nwatches: {q.watchesPerDomain}\n"
                f"transactions: {q.transactionsPerConnection}\n"
                f"node-size: {q.maxEntrySize}\npermissions: {q.permsPerNode}\n"
            )
            return text.encode() + b"\0"
        if cmd == b"help":
            return b"Valid commands:\ncheck\nprint <string>\nquota\nhelp\n\0"
        raise XsError("EINVAL")

    # Conveniences

    def introduceDomain(self, domid: int) -> None:
        """Mark C{domid} introduced, firing @introduceDomain, as INTRODUCE does."""
        if domid not in self.introduced:
            self.introduced.add(domid)
            if domid != 0:
                self.fireWatches(None, None, b"@introduceDomain", None, True)
            self._flushOthers(None)

    def allNodes(self) -> Iterable[tuple[bytes, Node]]:
        """Every (path, node) of the tree, parents first."""
        return self.tree.walk()


def _rank(conn: Connection) -> int:
    return conn.rank


def _ordinaryDomain(domid: int) -> bool:
    return domid < DOMID_SELF


def _withoutDomain(perms: PermSet, domid: int) -> PermSet:
    entries = list(perms.entries)
    if entries[0][0] == domid:
        entries[0] = (0, entries[0][1])
    entries = entries[:1] + [e for e in entries[1:] if e[0] != domid]
    return PermSet.make(tuple(entries))


_PRIV_OPS = frozenset(
    {
        Op.CONTROL,
        Op.INTRODUCE,
        Op.RELEASE,
        Op.IS_DOMAIN_INTRODUCED,
        Op.RESUME,
        Op.SET_TARGET,
    }
)
_NOTID_OPS = frozenset({Op.WATCH, Op.UNWATCH})

__all__ = ["NO_GENERATION", "Connection", "XenStoreServer", "XsError"]
