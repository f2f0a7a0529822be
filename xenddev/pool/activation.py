# -*- test-case-name: tests.test_pool_activation -*-
"""
Exclusive activation of a target across the pool (seed 000: "no two vdis
for the same target will simultaneously be active, even if the two vdis
are on different hosts").

Read-write: one etcd transaction creates C{/xenddev/pool/active/<target>}
under this host's session lease if no key of the target exists (neither
a writer nor any reader); if it fails, the same transaction has read who
holds the target, so the refusal (L{ActivationConflict}) names the holder
without a second round trip, and nothing was written. A target already
active read-write I{under our lease} is ours: activating it again answers
the same activation (a retried request is harmless).

Read-only: each host puts its own key under
C{/xenddev/pool/readers/<target>/} if no writer exists; any number of
hosts may share a target so, and a writer is refused while any reader is
there (and a reader while a writer is).

The B{fencing token} is the key's mod revision: the etcd revision at which
this holder got it — when it created the key, or when a migration's
handover moved the key to it (L{xenddev.pool.migration}: etcd refuses a
delete and a put of one key in one transaction, so the handover overwrites
the key, which keeps its create revision). It grows with every activation
and every handover of any target, so a storage layer that remembers the
highest token it has seen can refuse a write carrying an older one (a host
that was fenced and came back too late, or the source of a migration after
the handover).

Deactivation deletes only our own keys: each delete is guarded by a
comparison of the key's lease with ours, so a host whose lease expired and
whose target was taken by another host cannot delete the new holder's key.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Literal

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from xenddev.pool import etcdwire as wire
from xenddev.pool.errors import ActivationConflict, InvalidTarget
from xenddev.pool.interfaces import IActivations, IEtcd, IHostSession
from xenddev.pool.keys import activeKey, checkTarget, readerKey, readersPrefix

__all__ = ["Activation", "Activations", "Holder", "Holders", "Mode"]

Mode = Literal["rw", "ro"]

#: Transactions tried when the target's holders vanish between the
#: comparison and the read (each retry is one more round trip).
MAX_ATTEMPTS = 8


@attrs.frozen
class Activation:
    """
    A target active on this host.

    @ivar token: the fencing token (the key's mod revision: when this host got it).
    @ivar key: the activation's key in etcd.
    """

    target: str
    mode: Mode
    host: str
    lease: int
    token: int
    key: bytes


@attrs.frozen
class Holder:
    """A host holding a target, in a mode, since the revision C{token} (the key's mod revision)."""

    host: str
    mode: Mode
    lease: int
    token: int

    def toJSON(self) -> dict[str, Any]:
        """The holder as plain data."""
        return {
            "host": self.host,
            "mode": self.mode,
            "lease": f"{self.lease:x}",
            "token": self.token,
        }


@attrs.frozen
class Holders:
    """Who holds a target: its writer (if any) and its readers."""

    target: str
    writer: Holder | None = None
    readers: tuple[Holder, ...] = ()

    @property
    def active(self) -> bool:
        """Whether any host holds the target."""
        return self.writer is not None or bool(self.readers)

    def toJSON(self) -> dict[str, Any]:
        """The holders as plain data (for C{vdi-where} and C{pool.where})."""
        return {
            "target": self.target,
            "writer": None if self.writer is None else self.writer.toJSON(),
            "readers": [r.toJSON() for r in self.readers],
        }


@implementer(IActivations)
class Activations:
    """Activations of targets for the host of C{session}."""

    log = Logger()

    def __init__(self, etcd: IEtcd, session: IHostSession, clock: Any) -> None:
        self._etcd = etcd
        self._session = session
        self._clock = clock

    def activate(self, target: str, mode: Mode = "rw") -> Deferred[Activation]:
        """
        Take C{target} for this host: read-write (exclusive) or read-only
        (shared with other readers). Refused with L{ActivationConflict}
        (naming the holder) or L{SessionNotLive<xenddev.pool.errors.SessionNotLive>}
        before anything is written.
        """
        checkTarget(target)
        if mode not in ("rw", "ro"):
            raise InvalidTarget(f"activation mode {mode!r}: expected 'rw' or 'ro'")
        self._session.checkLive()
        if mode == "rw":
            return Deferred.fromCoroutine(self._activateWriter(target))
        return Deferred.fromCoroutine(self._activateReader(target))

    def deactivate(self, target: str) -> Deferred[bool]:
        """
        Delete this host's activation of C{target} (read-write or
        read-only), and only if it is under our lease; fires with whether
        one was deleted.
        """
        checkTarget(target)
        return Deferred.fromCoroutine(self._deactivate(target))

    def where(self, target: str) -> Deferred[Holders]:
        """Who holds C{target} now (one consistent read of writer and readers)."""
        checkTarget(target)

        async def where() -> Holders:
            result = await self._etcd.txn(wire.Txn(success=self._reads(target)))
            return _holders(target, result.responses)

        return Deferred.fromCoroutine(where())

    # --- the transactions ----------------------------------------------------

    def _record(self, target: str, mode: Mode) -> bytes:
        """The activation key's value."""
        return json.dumps(
            {
                "host": self._session.host,
                "mode": mode,
                "target": target,
                "since": self._clock.seconds(),
            }
        ).encode()

    def _reads(self, target: str) -> list[wire.Op]:
        """Read the writer's key and every reader's key of C{target}."""
        prefix = readersPrefix(target)
        return [wire.Range(activeKey(target)), wire.Range(prefix, wire.prefixEnd(prefix))]

    async def _activateWriter(self, target: str) -> Activation:
        """Create the writer's key if no key of the target exists."""
        key = activeKey(target)
        prefix = readersPrefix(target)
        for _ in range(MAX_ATTEMPTS):
            lease = self._session.lease
            result = await self._etcd.txn(
                wire.Txn(
                    compare=[
                        wire.Compare.absent(key),
                        wire.Compare.absent(prefix, wire.prefixEnd(prefix)),
                    ],
                    success=[wire.Put(key, self._record(target, "rw"), lease)],
                    failure=self._reads(target),
                )
            )
            if result.succeeded:
                return self._took(target, "rw", key, lease, result.revision)
            holders = _holders(target, result.responses)
            writer = holders.writer
            if writer is not None and writer.lease == lease:
                # Ours already (a retried request, or activated twice).
                return self._took(target, "rw", key, lease, writer.token)
            if holders.active:
                raise _conflict(holders)
            # Released between the comparison and the read: try again.
        raise ActivationConflict(target, None, ("(changing too fast to take)",))

    async def _activateReader(self, target: str) -> Activation:
        """Put this host's reader key if no writer exists."""
        key = activeKey(target)
        mine = readerKey(target, self._session.host)
        for _ in range(MAX_ATTEMPTS):
            lease = self._session.lease
            result = await self._etcd.txn(
                wire.Txn(
                    compare=[wire.Compare.absent(key)],
                    success=[
                        # Put unless ours already: a retried activation keeps
                        # its token (the key's mod revision).
                        wire.Txn(
                            compare=[wire.Compare.leaseIs(mine, lease)],
                            failure=[wire.Put(mine, self._record(target, "ro"), lease)],
                        ),
                        wire.Range(mine),
                    ],
                    failure=self._reads(target),
                )
            )
            if result.succeeded:
                found = result.responses[1]
                assert isinstance(found, wire.RangeResult) and found.kvs
                return self._took(target, "ro", mine, lease, found.kvs[0].modRevision)
            holders = _holders(target, result.responses)
            if holders.writer is not None:
                raise _conflict(holders)
        raise ActivationConflict(target, None, ("(changing too fast to take)",))

    def _took(self, target: str, mode: Mode, key: bytes, lease: int, token: int) -> Activation:
        """Note the key with the session (so its loss is reported) and describe it."""
        self._session.hold(key)
        return Activation(target, mode, self._session.host, lease, token, key)

    async def _deactivate(self, target: str) -> bool:
        """Delete our writer's key and our reader's key, each only if under our lease."""
        lease = self._session.lease
        keys = (activeKey(target), readerKey(target, self._session.host))
        result = await self._etcd.txn(
            wire.Txn(
                success=[
                    wire.Txn(compare=[wire.Compare.leaseIs(k, lease)], success=[wire.Delete(k)])
                    for k in keys
                ]
            )
        )
        deleted = False
        for k, inner in zip(keys, result.responses, strict=True):
            assert isinstance(inner, wire.TxnResult)
            if inner.succeeded:
                deleted = True
            # Ours or not (gone with an expired lease, or another host's
            # now), the key is no longer held by this session.
            self._session.release(k)
        return deleted


def _holders(target: str, responses: Sequence[wire.Result]) -> Holders:
    """The holders read by the two ranges of L{Activations._reads}."""
    writerRange, readersRange = responses
    assert isinstance(writerRange, wire.RangeResult)
    assert isinstance(readersRange, wire.RangeResult)
    writer = None
    if writerRange.kvs:
        writer = _holder(writerRange.kvs[0], "rw")
    readers = tuple(_holder(kv, "ro") for kv in readersRange.kvs)
    return Holders(target, writer, readers)


def _holder(kv: wire.KeyValue, mode: Mode) -> Holder:
    """A holder from its key (a record that cannot be read names no host)."""
    try:
        host = str(json.loads(kv.value)["host"])
    except (ValueError, KeyError, TypeError):
        host = "(unreadable record)"
    # The mod revision: a key moved by a handover keeps its create revision.
    return Holder(host=host, mode=mode, lease=kv.lease, token=kv.modRevision)


def _conflict(holders: Holders) -> ActivationConflict:
    """The refusal naming who holds the target."""
    writer = holders.writer
    return ActivationConflict(
        holders.target,
        writer.host if writer is not None else None,
        [r.host for r in holders.readers],
        writer.token if writer is not None else 0,
    )
