"""
An in-memory stand-in for etcd (L{IEtcd}) for unit tests on L{task.Clock}.

It keeps keys with revisions and leases and runs transactions of the
shapes the pool uses (create-if-absent, lease and value comparisons,
ranges, nested transactions), each in one step; leases expire when the
test says so (L{FakeEtcd.expire}), not by time. Keepalives follow
C{keepAliveMode}: C{"ok"} answers at once, C{"hang"} never answers (as a
member that lost its leader), C{"down"} fails with L{EtcdUnavailable}.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from xenddev.pool import etcdwire as wire
from xenddev.pool.errors import EtcdUnavailable, LeaseNotFound
from xenddev.pool.interfaces import IEtcd


@implementer(IEtcd)
class FakeEtcd:
    """A single-process etcd: keys, revisions, leases, transactions."""

    def __init__(self) -> None:
        self.endpoints = ("fake://etcd",)
        self.timeout = 1.0
        self.revision = 1
        self.kvs: dict[bytes, wire.KeyValue] = {}
        self.leases: dict[int, int] = {}
        self.revoked: list[int] = []
        self.keepAlives: list[int] = []
        self.hanging: list[tuple[Deferred[int], int]] = []
        self.keepAliveMode = "ok"
        self.down = False
        self.failGrants = False
        self._nextLease = 0x1000

    # --- test controls -------------------------------------------------------

    def expire(self, lease: int) -> None:
        """The lease expires now: its keys go."""
        self.leases.pop(lease, None)
        self._dropLeaseKeys(lease)

    def answerHanging(self) -> None:
        """Answer every hanging keepalive as etcd would now."""
        hanging, self.hanging = self.hanging, []
        for d, lease in hanging:
            if lease in self.leases:
                d.callback(self.leases[lease])
            else:
                d.errback(LeaseNotFound(lease))

    # --- IEtcd ---------------------------------------------------------------

    def _check(self) -> Deferred[Any] | None:
        """Fail the call when the fake is down."""
        if self.down:
            return fail(EtcdUnavailable("fake", {"fake://etcd": "down"}))
        return None

    def range(self, request: wire.Range) -> Deferred[wire.RangeResult]:
        """Keys in the range."""
        return self._check() or succeed(self._range(request))

    def get(self, key: bytes) -> Deferred[wire.KeyValue | None]:
        """The key, or None."""
        return self._check() or succeed(self.kvs.get(key))

    def put(self, key: bytes, value: bytes, lease: int = 0) -> Deferred[wire.PutResult]:
        """Write a key."""
        return self._check() or succeed(self._put(wire.Put(key, value, lease)))

    def delete(self, key: bytes, rangeEnd: bytes = b"") -> Deferred[wire.DeleteResult]:
        """Delete a key or range."""
        return self._check() or succeed(self._delete(wire.Delete(key, rangeEnd)))

    def txn(self, request: wire.Txn) -> Deferred[wire.TxnResult]:
        """Run a transaction in one step."""
        return self._check() or succeed(self._txn(request, bump=True))

    def grantLease(self, ttl: int) -> Deferred[wire.Lease]:
        """A new lease."""
        failed = self._check()
        if failed:
            return failed
        if self.failGrants:
            return fail(EtcdUnavailable("/lease/grant", {"fake://etcd": "no leader"}))
        self._nextLease += 1
        self.leases[self._nextLease] = ttl
        return succeed(wire.Lease(self._nextLease, ttl))

    def keepAlive(self, lease: int) -> Deferred[int]:
        """Renew, as C{keepAliveMode} says."""
        self.keepAlives.append(lease)
        if self.keepAliveMode == "hang":
            d: Deferred[int] = Deferred()
            self.hanging.append((d, lease))
            return d
        if self.keepAliveMode == "down" or self.down:
            return fail(EtcdUnavailable("/lease/keepalive", {"fake://etcd": "down"}))
        if lease not in self.leases:
            return fail(LeaseNotFound(lease))
        return succeed(self.leases[lease])

    def revokeLease(self, lease: int) -> Deferred[None]:
        """Revoke a lease and its keys."""
        failed = self._check()
        if failed:
            return failed
        if lease not in self.leases:
            return fail(LeaseNotFound(lease))
        self.revoked.append(lease)
        self.expire(lease)
        return succeed(None)

    def leaseTimeToLive(self, lease: int, keys: bool = False) -> Deferred[wire.LeaseInfo]:
        """The lease's TTL (-1 when gone)."""
        ttl = self.leases.get(lease, -1)
        held = tuple(k for k, kv in self.kvs.items() if kv.lease == lease) if keys else ()
        return succeed(wire.LeaseInfo(lease, ttl, max(ttl, 0), held))

    def status(self) -> Deferred[wire.MemberStatus]:
        """A single member that leads itself."""
        return succeed(wire.MemberStatus(1, 1, "3.4.23", 1))

    def watch(
        self,
        key: bytes,
        callback: Callable[[wire.WatchEvent], object],
        rangeEnd: bytes = b"",
        startRevision: int = 0,
        prevKv: bool = False,
    ) -> Any:
        """Not used by the session's unit tests."""
        raise NotImplementedError("FakeEtcd has no watches")

    def close(self) -> Deferred[None]:
        """Nothing to close."""
        return succeed(None)

    # --- the store -------------------------------------------------------------

    def _inRange(self, key: bytes, start: bytes, end: bytes) -> bool:
        """Whether C{key} is C{start}, or in [C{start}, C{end}) when C{end} is given."""
        if not end:
            return key == start
        return start <= key and (end == b"\0" or key < end)

    def _range(self, request: wire.Range) -> wire.RangeResult:
        """Read a range."""
        kvs = tuple(
            self.kvs[k] for k in sorted(self.kvs) if self._inRange(k, request.key, request.rangeEnd)
        )
        return wire.RangeResult(kvs, len(kvs), False, self.revision)

    def _put(self, request: wire.Put, bump: bool = True) -> wire.PutResult:
        """Write one key (a new revision unless inside a transaction)."""
        if request.lease and request.lease not in self.leases:
            raise LeaseNotFound(request.lease)
        if bump:
            self.revision += 1
        old = self.kvs.get(request.key)
        self.kvs[request.key] = wire.KeyValue(
            request.key,
            request.value,
            old.createRevision if old else self.revision,
            self.revision,
            (old.version if old else 0) + 1,
            request.lease,
        )
        return wire.PutResult(self.revision)

    def _delete(self, request: wire.Delete, bump: bool = True) -> wire.DeleteResult:
        """Delete keys."""
        gone = [k for k in self.kvs if self._inRange(k, request.key, request.rangeEnd)]
        if gone and bump:
            self.revision += 1
        for k in gone:
            del self.kvs[k]
        return wire.DeleteResult(self.revision, len(gone))

    def _holds(self, compare: wire.Compare) -> bool:
        """Evaluate one comparison (every key of a range; a missing key as zeros)."""
        keys = [k for k in self.kvs if self._inRange(k, compare.key, compare.rangeEnd)]
        kvs = [self.kvs[k] for k in keys] or [wire.KeyValue(compare.key)]
        if compare.target == "VALUE" and not keys:
            return False
        for kv in kvs:
            actual: Any = {
                "CREATE": kv.createRevision,
                "MOD": kv.modRevision,
                "VERSION": kv.version,
                "LEASE": kv.lease,
                "VALUE": kv.value,
            }[compare.target]
            ok = {
                "EQUAL": actual == compare.operand,
                "NOT_EQUAL": actual != compare.operand,
                "LESS": actual < compare.operand,
                "GREATER": actual > compare.operand,
            }[compare.result]
            if not ok:
                return False
        return True

    def _txn(self, request: wire.Txn, bump: bool) -> wire.TxnResult:
        """Run a transaction: one new revision if it writes anything."""
        succeeded = all(self._holds(c) for c in request.compare)
        ops = request.success if succeeded else request.failure
        writes = any(isinstance(op, (wire.Put, wire.Delete, wire.Txn)) for op in ops)
        if bump and writes:
            self.revision += 1
        results: list[wire.Result] = []
        for op in ops:
            if isinstance(op, wire.Range):
                results.append(self._range(op))
            elif isinstance(op, wire.Put):
                results.append(self._put(op, bump=False))
            elif isinstance(op, wire.Delete):
                results.append(self._delete(op, bump=False))
            else:
                results.append(self._txn(op, bump=False))
        return wire.TxnResult(succeeded, self.revision, tuple(results))

    def _dropLeaseKeys(self, lease: int) -> None:
        """Delete every key under C{lease}."""
        for key in [k for k, kv in self.kvs.items() if kv.lease == lease]:
            del self.kvs[key]
