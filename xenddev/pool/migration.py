# -*- test-case-name: tests.test_pool_migration -*-
"""
The storage side of a guest's migration between two hosts of the pool, in
etcd: the activation key of a target moves from the source to the
destination in one transaction (seed 000: activation is separate from
prepare "to allow as much of the setup for an incoming migration domain's
storage to be done before committing to the migration and entering the
'domain is down' stage, during which access is switched from the old to the
new host").

  - B{Intent} (L{Migrations.intend}): when the destination prepares, it
    creates C{/xenddev/pool/migrations/<target>} under I{its} session lease
    (JSON: C{from}, C{to}, C{domain}, C{since}) if the target's writer is
    the named source (or nobody) and no other destination intends it; so
    the intent vanishes with the destination if it dies, and two
    destinations cannot prepare one target.
  - B{Handover} (L{Migrations.handover}): one transaction compares that
    C{active/<target>} is under the source's lease (the lease its key had
    when the intent was made, checked then against C{hosts/<from>}; read
    again from C{hosts/<from>} if that fails) and that the intent is under
    the destination's, then
    puts C{active/<target>} under the destination's lease (its value names
    the new host) and deletes the intent. The key is overwritten, not
    deleted and made again (etcd refuses a delete and a put of one key in
    one transaction): its create revision stays, its mod revision — the
    fencing token (L{xenddev.pool.activation}) — grows, so storage can
    refuse the source's writes from then on. With nobody holding the
    target (the source's lease expired: it self-fenced, or died), the same
    transaction takes it if no key of the target exists.
  - B{Handback} (L{Migrations.handback}): the reverse, for an abort after a
    handover: the key moves back under the source's lease (a new token
    again).
  - L{Migrations.withdraw} deletes our intent (an abort before the
    handover).

Read-only targets need none of this: the destination adds its own reader
key when it prepares (readers share a target) and the source's goes when
it detaches.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from xenddev.errors import FaultCode, XenddevError
from xenddev.pool import etcdwire as wire
from xenddev.pool.activation import Activation
from xenddev.pool.errors import ActivationConflict
from xenddev.pool.interfaces import IEtcd, IHostSession, IMigrations
from xenddev.pool.keys import (
    MIGRATIONS,
    activeKey,
    checkHostName,
    checkTarget,
    hostKey,
    migrationKey,
    readersPrefix,
    targetOf,
)

__all__ = ["HostGone", "Intent", "IntentConflict", "IntentMissing", "Migrations", "StillHeld"]

#: Transactions tried when what was read changed before the write.
MAX_ATTEMPTS = 8


class IntentConflict(XenddevError):
    """
    Another destination intends the target (its intent stands under its
    lease): two migrations of one target cannot be prepared at once.
    """

    faultCode = FaultCode.DEVICE_EXISTS

    def __init__(self, target: str, intent: Intent) -> None:
        self.target = target
        self.intent = intent
        super().__init__(
            f"{target} is being migrated from host {intent.source} to host "
            f"{intent.destination} (domain {intent.domain})"
        )


class IntentMissing(XenddevError):
    """
    No intent of this destination stands for the target: the migration was
    not prepared here, was aborted, or the intent went with an expired
    lease. Nothing was moved.
    """

    faultCode = FaultCode.WRONG_STATE

    def __init__(self, target: str, host: str, found: Intent | None = None) -> None:
        self.target = target
        self.found = found
        other = (
            f" (host {found.destination} intends it)"
            if found is not None and found.destination != host
            else ""
        )
        super().__init__(f"no migration of {target} to host {host} is prepared{other}")


class StillHeld(ActivationConflict):
    """
    The source still holds the target under a live lease, and the handover
    was asked not to trust it (the source could not be asked to release
    it): it is taken once that lease has expired.
    """

    def __init__(self, target: str, holder: str, token: int) -> None:
        super().__init__(target, holder, (), token)
        self.args = (
            f"{target} is still held read-write by host {holder} (fencing token {token}), "
            "which could not be asked to release it: it can be taken once that host's "
            "lease expires",
        )


class HostGone(XenddevError):
    """A host named in a migration has no live session in the pool."""

    faultCode = FaultCode.UNAVAILABLE

    def __init__(self, host: str) -> None:
        self.host = host
        super().__init__(f"host {host} is not in the pool (no live session)")


@attrs.frozen
class Intent:
    """
    A migration's intent: C{target} is to move from C{source} to
    C{destination} (for guest C{domain}), under the destination's C{lease}.
    """

    target: str
    source: str
    destination: str
    domain: str
    since: float
    lease: int
    revision: int

    def toJSON(self) -> dict[str, Any]:
        """The intent as plain data."""
        return {
            "target": self.target,
            "from": self.source,
            "to": self.destination,
            "domain": self.domain,
            "since": self.since,
            "lease": f"{self.lease:x}",
            "revision": self.revision,
        }


@attrs.frozen
class _State:
    """A target's keys read in one revision, with the source's lease."""

    writer: wire.KeyValue | None
    readers: tuple[wire.KeyValue, ...]
    intent: Intent | None
    sourceLease: int


@implementer(IMigrations)
class Migrations:
    """The migration transactions of the host of C{session}."""

    log = Logger()

    def __init__(self, etcd: IEtcd, session: IHostSession, clock: Any) -> None:
        self._etcd = etcd
        self._session = session
        self._clock = clock
        #: target -> (source, the source's writer lease) read when we intended
        #: it: the handover's first try compares with it, saving a read.
        self._seen: dict[str, tuple[str, int]] = {}

    # --- the intent --------------------------------------------------------

    def intend(self, target: str, source: str, domain: str) -> Deferred[Intent]:
        """
        Record this host's intent to take C{target} from C{source} for
        guest C{domain}, under our lease: refused (L{ActivationConflict})
        if the target's writer is another host than the source, or readers
        hold it; L{IntentConflict} if another destination intends it. Our
        own intent of the same migration is answered again.
        """
        checkTarget(target)
        checkHostName(source)
        self._session.checkLive()
        return Deferred.fromCoroutine(self._intend(target, source, str(domain)))

    async def _intend(self, target: str, source: str, domain: str) -> Intent:
        key = migrationKey(target)
        for _ in range(MAX_ATTEMPTS):
            lease = self._session.lease
            state = await self._read(target, source)
            if state.intent is not None:
                if state.intent.lease == lease and state.intent.source == source:
                    return state.intent  # ours already: a repeated prepare
                raise IntentConflict(target, state.intent)
            writer = state.writer
            if writer is not None and (not state.sourceLease or writer.lease != state.sourceLease):
                raise ActivationConflict(target, _host(writer), (), writer.modRevision)
            if writer is None and state.readers:
                raise ActivationConflict(target, None, [_host(r) for r in state.readers])
            # Unchanged since the read: the same writer (or none), no reader.
            pinned = (
                wire.Compare(activeKey(target), "MOD", "EQUAL", writer.modRevision)
                if writer is not None
                else wire.Compare.absent(activeKey(target))
            )
            prefix = readersPrefix(target)
            since = self._clock.seconds()
            record = {"from": source, "to": self._session.host, "domain": domain, "since": since}
            result = await self._etcd.txn(
                wire.Txn(
                    compare=[
                        wire.Compare.absent(key),
                        pinned,
                        wire.Compare.absent(prefix, wire.prefixEnd(prefix)),
                    ],
                    success=[wire.Put(key, json.dumps(record).encode(), lease)],
                )
            )
            if result.succeeded:
                self._session.hold(key)
                if writer is not None:
                    self._seen[target] = (source, writer.lease)
                return Intent(
                    target, source, self._session.host, domain, since, lease, result.revision
                )
        raise IntentConflict(
            target, Intent(target, source, "(changing too fast)", domain, 0.0, 0, 0)
        )

    def withdraw(self, target: str) -> Deferred[bool]:
        """Delete our intent of C{target} (only ours); fires with whether one was."""
        checkTarget(target)
        key = migrationKey(target)
        self._seen.pop(target, None)

        async def withdraw() -> bool:
            result = await self._etcd.txn(
                wire.Txn(
                    compare=[wire.Compare.leaseIs(key, self._session.lease)],
                    success=[wire.Delete(key)],
                )
            )
            self._session.release(key)
            return result.succeeded

        return Deferred.fromCoroutine(withdraw())

    def intents(self) -> Deferred[list[Intent]]:
        """Every migration intent of the pool, by target."""

        async def intents() -> list[Intent]:
            found = await self._etcd.range(wire.Range(MIGRATIONS, wire.prefixEnd(MIGRATIONS)))
            out = [i for i in (_intent(kv) for kv in found.kvs) if i is not None]
            return sorted(out, key=lambda i: i.target)

        return Deferred.fromCoroutine(intents())

    # --- moving the key ----------------------------------------------------

    def handover(
        self, target: str, fromHost: str, toHost: str, released: bool = True
    ) -> Deferred[Activation]:
        """
        Move C{target}'s activation from C{fromHost} to C{toHost} (whose
        intent must stand) in one transaction; fires with the new holder's
        L{Activation} (its token: the revision of the move). With
        C{released} false (the source could not be asked to release the
        target) only a target nobody holds is taken: L{StillHeld} while the
        source's key stands. Refused with L{IntentMissing} without the
        intent, L{ActivationConflict} if a third host holds the target.
        """
        checkTarget(target)
        checkHostName(fromHost)
        checkHostName(toHost)
        return Deferred.fromCoroutine(self._handover(target, fromHost, toHost, released))

    async def _handover(
        self, target: str, fromHost: str, toHost: str, released: bool
    ) -> Activation:
        key, intentKey = activeKey(target), migrationKey(target)
        prefix = readersPrefix(target)
        toLease = await self._leaseOf(toHost)
        seen = self._seen.pop(target, None)
        if released and seen is not None and seen[0] == fromHost:
            # The writer we saw when we intended it is likely still there:
            # one transaction, no read first. Anything else: read and decide.
            moved = await self._move(
                target,
                fromHost,
                toHost,
                toLease,
                [
                    wire.Compare.leaseIs(key, seen[1]),
                    wire.Compare.leaseIs(intentKey, toLease),
                ],
            )
            if moved is not None:
                return moved
        for _ in range(MAX_ATTEMPTS):
            state = await self._read(target, fromHost)
            writer = state.writer
            if writer is not None and writer.lease == toLease and state.intent is None:
                # Moved already (a repeated commit): answered again.
                return self._took(target, toHost, toLease, writer.modRevision)
            intent = state.intent
            if intent is None or intent.lease != toLease or intent.source != fromHost:
                raise IntentMissing(target, toHost, intent)
            if writer is not None:
                if not state.sourceLease or writer.lease != state.sourceLease:
                    raise ActivationConflict(target, _host(writer), (), writer.modRevision)
                if not released:
                    raise StillHeld(target, fromHost, writer.modRevision)
                held = wire.Compare.leaseIs(key, writer.lease)
                compare = [held, wire.Compare.leaseIs(intentKey, toLease)]
            elif state.readers:
                raise ActivationConflict(target, None, [_host(r) for r in state.readers])
            else:
                compare = [
                    wire.Compare.absent(key),
                    wire.Compare.absent(prefix, wire.prefixEnd(prefix)),
                    wire.Compare.leaseIs(intentKey, toLease),
                ]
            moved = await self._move(target, fromHost, toHost, toLease, compare)
            if moved is not None:
                return moved
        raise ActivationConflict(target, None, ("(changing too fast to move)",))

    async def _move(
        self,
        target: str,
        fromHost: str,
        toHost: str,
        toLease: int,
        compare: list[wire.Compare],
    ) -> Activation | None:
        """
        The handover's transaction: if C{compare} holds, the key under
        C{toLease} and the intent deleted; None if it did not hold.
        """
        intentKey = migrationKey(target)
        result = await self._etcd.txn(
            wire.Txn(
                compare=compare,
                success=[
                    wire.Put(activeKey(target), self._record(target, toHost, fromHost), toLease),
                    wire.Delete(intentKey),
                ],
            )
        )
        if not result.succeeded:
            return None
        self._session.release(intentKey)
        self.log.info(
            "Handover of {target}: {source} -> {destination}, token {token}",
            target=target,
            source=fromHost,
            destination=toHost,
            token=result.revision,
        )
        return self._took(target, toHost, toLease, result.revision)

    def handback(self, target: str, fromHost: str, toHost: str) -> Deferred[Activation]:
        """
        The reverse of a handover (an abort after it): C{target}'s key,
        held by C{fromHost} (the destination), is put under C{toHost}'s
        (the source's) lease in one transaction; fires with the source's
        L{Activation} (a new token). L{ActivationConflict} if C{fromHost}
        does not hold it; L{HostGone} (fault 16) if either host is not in
        the pool (a key cannot be put under the lease of a host that left).
        """
        checkTarget(target)
        checkHostName(fromHost)
        checkHostName(toHost)

        async def handback() -> Activation:
            key = activeKey(target)
            fromLease = await self._leaseOf(fromHost)
            toLease = await self._leaseOf(toHost)
            result = await self._etcd.txn(
                wire.Txn(
                    compare=[wire.Compare.leaseIs(key, fromLease)],
                    success=[wire.Put(key, self._record(target, toHost, fromHost), toLease)],
                    failure=[wire.Range(key)],
                )
            )
            if not result.succeeded:
                found = result.responses[0]
                assert isinstance(found, wire.RangeResult)
                kv = found.kvs[0] if found.kvs else None
                if kv is not None and kv.lease == toLease:
                    return self._took(target, toHost, toLease, kv.modRevision)
                raise ActivationConflict(
                    target, _host(kv) if kv else None, (), kv.modRevision if kv else 0
                )
            if fromHost == self._session.host:
                self._session.release(key)
            return self._took(target, toHost, toLease, result.revision)

        return Deferred.fromCoroutine(handback())

    # --- helpers -----------------------------------------------------------

    async def _leaseOf(self, host: str) -> int:
        """The session lease of C{host}: ours, or read from its membership key."""
        if host == self._session.host:
            self._session.checkLive()
            lease: int = self._session.lease
            return lease
        kv = await self._etcd.get(hostKey(host))
        if kv is None:
            raise HostGone(host)
        return kv.lease

    async def _read(self, target: str, source: str) -> _State:
        """The target's writer, readers and intent, and C{source}'s lease, in one revision."""
        prefix = readersPrefix(target)
        result = await self._etcd.txn(
            wire.Txn(
                success=[
                    wire.Range(activeKey(target)),
                    wire.Range(prefix, wire.prefixEnd(prefix)),
                    wire.Range(migrationKey(target)),
                    wire.Range(hostKey(source)),
                ]
            )
        )
        writer, readers, intent, host = result.responses
        assert isinstance(writer, wire.RangeResult) and isinstance(readers, wire.RangeResult)
        assert isinstance(intent, wire.RangeResult) and isinstance(host, wire.RangeResult)
        return _State(
            writer.kvs[0] if writer.kvs else None,
            readers.kvs,
            _intent(intent.kvs[0]) if intent.kvs else None,
            host.kvs[0].lease if host.kvs else 0,
        )

    def _record(self, target: str, host: str, source: str) -> bytes:
        """The activation key's value once moved to C{host}."""
        return json.dumps(
            {
                "host": host,
                "mode": "rw",
                "target": target,
                "since": self._clock.seconds(),
                "from": source,
            }
        ).encode()

    def _took(self, target: str, host: str, lease: int, token: int) -> Activation:
        """The new holder's activation (noted with our session if it is us)."""
        key = activeKey(target)
        if host == self._session.host:
            self._session.hold(key)
        return Activation(target, "rw", host, lease, token, key)


def _host(kv: wire.KeyValue) -> str:
    """The host an activation key's record names."""
    try:
        return str(json.loads(kv.value)["host"])
    except (ValueError, KeyError, TypeError):
        return "(unreadable record)"


def _intent(kv: wire.KeyValue) -> Intent | None:
    """An intent from its key (None if unreadable)."""
    try:
        record = json.loads(kv.value)
        return Intent(
            targetOf(kv.key),
            str(record["from"]),
            str(record["to"]),
            str(record.get("domain", "")),
            float(record.get("since", 0.0)),
            kv.lease,
            kv.modRevision,
        )
    except (ValueError, KeyError, TypeError):
        return None
