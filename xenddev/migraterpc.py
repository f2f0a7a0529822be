# -*- test-case-name: tests.test_pool_migration -*-
"""
C{migrate.*}: the storage side of a guest's migration between hosts of the
pool over XML-RPC (L{xenddev.poolmigration}; docs/xmlrpc.md, docs/pool.md).

On the B{destination} (an operator, C{xenddev migrate-*}, or the source's
xend steps through the peer channel): C{prepare}, C{commit}, C{abort},
C{finish}, C{list}. On the B{source}, asked by the destination over the peer
channel: C{describe}, C{release}, C{reinstate}, C{handedOver}.

Every argument is checked, and named when refused, before anything is
written; without a pool (or without its peer channel) every method is
fault 19. The daemon's wiring (L{xenddev.service}) adds this namespace to
each XML-RPC resource it serves.
"""

from __future__ import annotations

from typing import Any

from xenddev.errors import FaultCode
from xenddev.pool.errors import PoolConfigError
from xenddev.pool.keys import checkHostName
from xenddev.poolmigration import PoolMigrations
from xenddev.xmlrpc import DOMID_MAX, DeviceRPC, _Namespace, rpcFault, rpcMethod

__all__ = ["MigrateNamespace", "addMigrateNamespace"]

_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.:-")


def checkHost(value: object, what: str) -> str:
    """A pool host name (fault 10 naming C{what} otherwise)."""
    if not isinstance(value, str):
        raise rpcFault(FaultCode.BAD_CONFIG, f"{what} must be a host name, not {value!r}")
    try:
        return checkHostName(value)
    except PoolConfigError as e:
        raise rpcFault(FaultCode.BAD_CONFIG, f"{what}: {e}") from None


def checkRemoteDomain(value: object) -> int | str:
    """
    A domain as another host names it: an id (0..DOMID_MAX) or a name,
    passed on unresolved (fault 10 or 3 naming it otherwise).
    """
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value <= DOMID_MAX:
            raise rpcFault(
                FaultCode.INVALID_DOMAIN,
                f"invalid source domain id {value}: must be 0..{DOMID_MAX}",
            )
        return value
    if isinstance(value, str) and 0 < len(value) <= 64 and set(value) <= _NAME_CHARS:
        return value
    raise rpcFault(
        FaultCode.BAD_CONFIG, f"source domain must be a domain id or name, not {value!r}"
    )


class MigrateNamespace(_Namespace):
    """
    C{migrate.*} over the daemon's L{PoolMigrations} (see the module
    docstring); fault 19 for every method without one.
    """

    prefix = "migrate"

    def __init__(self, service: DeviceRPC, migrations: PoolMigrations | None) -> None:
        super().__init__(service)
        self.migrations = migrations

    @property
    def coordinator(self) -> PoolMigrations:
        """The daemon's migrations; fault 19 without a pool."""
        if self.migrations is None:
            raise rpcFault(
                FaultCode.UNSUPPORTED,
                "storage migration needs a pool (pool: in the configuration, with "
                "pool.advertise and pool.peer_password_file)",
            )
        return self.migrations

    # --- the destination ------------------------------------------------------

    @rpcMethod([["struct", "string", "int", "int"], ["struct", "string", "string", "string"]])
    async def xmlrpc_prepare(self, source: object, sourceDom: object, dom: object) -> Any:
        """
        prepare(source, sourceDom, dom) → {domain, from, state, devices, ...}

        On the destination, while the guest still runs on host source
        (where it is sourceDom, an id or name): make guest dom's disks
        here as the source has them, each vdi prepared and its vbd plugged
        but not activated (the backends do not connect); each read-write
        target's migration intent is recorded in etcd under this host's
        lease (a read-only target gets this host's reader key). Fault 12 if
        another host holds a target or intends it, 16 if the source cannot
        be asked, 19 without a pool. A failure leaves nothing here.
        """
        host = checkHost(source, "source")
        remote = checkRemoteDomain(sourceDom)
        coordinator = self.coordinator
        domid = await self.service.resolveDomain(dom)
        return await coordinator.prepare(host, remote, domid)

    @rpcMethod([["struct", "int"], ["struct", "string"]])
    async def xmlrpc_commit(self, dom: object) -> Any:
        """
        commit(dom) → {domain, from, state, moved, timings-ms, ...}

        The handover (the guest suspended on the source): the source
        deactivates its vdis, each read-write target's activation key moves
        to this host in one etcd transaction (moved: target → its new
        fencing token), the vdis here are activated and connect. Fault 17
        if no migration of dom is prepared here; 12 if the source could not
        be asked to release its disks and its lease still holds a target
        (retry once it has expired, or abort).
        """
        coordinator = self.coordinator
        return await coordinator.commit(await self.service.resolveDomain(dom))

    @rpcMethod([["struct", "int"], ["struct", "string"]])
    async def xmlrpc_abort(self, dom: object) -> Any:
        """
        abort(dom) → {domain, from, state: "aborted", reinstated, ...}

        Put everything back: after a handover the keys go back to the
        source; the source's vdis are activated again (reinstated: whether
        it could be asked); the disks made here are detached and the
        intents withdrawn. Fault 17 if no migration of dom is prepared here.
        """
        coordinator = self.coordinator
        return await coordinator.abort(await self.service.resolveDomain(dom))

    @rpcMethod([["struct", "int"], ["struct", "string"]])
    async def xmlrpc_finish(self, dom: object) -> Any:
        """
        finish(dom) → {domain, from, state: "finished", ...}

        A committed migration is over (the guest runs here): it can no
        longer be aborted. Fault 17 unless it is committed.
        """
        coordinator = self.coordinator
        return await coordinator.finish(await self.service.resolveDomain(dom))

    @rpcMethod([["array"]])
    async def xmlrpc_list(self) -> Any:
        """
        list() → [{direction, domain, state, ...}, ...]

        This host's migrations: guests coming in (direction "in": from,
        state, devices, moved) and going out (direction "out": to).
        """
        return self.coordinator.listAll()

    # --- the source, asked by the destination ------------------------------------

    @rpcMethod([["array", "int", "string"], ["array", "string", "string"]])
    async def xmlrpc_describe(self, dom: object, destination: object) -> Any:
        """
        describe(dom, destination) → [{class, devid, config, target, mode, token}, ...]

        On the source, for the destination's prepare: guest dom's disks,
        each with the configuration that makes it again and its grant.
        """
        host = checkHost(destination, "destination")
        coordinator = self.coordinator
        return await coordinator.describe(await self.service.resolveDomain(dom), host)

    @rpcMethod([["struct", "int", "string"], ["struct", "string", "string"]])
    async def xmlrpc_release(self, dom: object, destination: object) -> Any:
        """
        release(dom, destination) → {domain, released}

        On the source, the handover's first phase: deactivate each of
        guest dom's vdis (the data paths flush and pause; the vbds stay).
        """
        host = checkHost(destination, "destination")
        coordinator = self.coordinator
        return await coordinator.release(await self.service.resolveDomain(dom), host)

    @rpcMethod([["struct", "int", "string"], ["struct", "string", "string"]])
    async def xmlrpc_reinstate(self, dom: object, destination: object) -> Any:
        """
        reinstate(dom, destination) → {domain, tokens}

        On the source, after an abort: take guest dom's read-write targets
        back (fault 12 if another host holds one) and activate its vdis.
        """
        host = checkHost(destination, "destination")
        coordinator = self.coordinator
        return await coordinator.reinstate(await self.service.resolveDomain(dom), host)

    @rpcMethod([["struct", "int", "string"], ["struct", "string", "string"]])
    async def xmlrpc_handedOver(self, dom: object, destination: object) -> Any:
        """
        handedOver(dom, destination) → {domain, forgotten}

        On the source, after the handover: forget the activations of guest
        dom's targets that moved away (a later detach gives nothing back).
        """
        host = checkHost(destination, "destination")
        coordinator = self.coordinator
        return await coordinator.handedOver(await self.service.resolveDomain(dom), host)


def addMigrateNamespace(resource: Any, migrations: PoolMigrations | None) -> None:
    """Serve C{migrate.*} on C{resource} (a L{DeviceRPC}; anything else is left alone)."""
    if isinstance(resource, DeviceRPC):
        resource.putSubHandler("migrate", MigrateNamespace(resource, migrations))
