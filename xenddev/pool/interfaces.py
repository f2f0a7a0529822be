# -*- test-case-name: tests.test_pool_etcd -*-
"""
The pool's contracts: the etcd client (L{IEtcd}, L{IWatch}), a host's
session (L{IHostSession}), exclusive activation (L{IActivations}) and the
moves of activations a migration makes (L{IMigrations}).
"""

from __future__ import annotations

from zope.interface import Attribute, Interface

__all__ = ["IActivations", "IEtcd", "IHostSession", "IMigrations", "IWatch"]


class IEtcd(Interface):
    """
    An etcd v3 client: every method returns a Deferred and never blocks.

    Requests go to one member at a time and move to the next on a
    connection error or an answer that another member may do better with
    (no leader, timed out); each call is bounded by the client's timeout.
    Failures are L{xenddev.pool.errors.EtcdUnavailable} (nobody could
    serve it; L{EtcdTimeout<xenddev.pool.errors.EtcdTimeout>} when time
    ran out) or L{xenddev.pool.errors.EtcdError} (etcd refused it).
    """

    endpoints = Attribute("The members' client URLs, in the order tried.")
    timeout = Attribute("Seconds a call may take in all, across members.")

    def range(request):
        """Run an L{etcdwire.Range}; fires with an L{etcdwire.RangeResult}."""

    def get(key):
        """Fires with the L{etcdwire.KeyValue} at C{key}, or None."""

    def put(key, value, lease=0):
        """Write C{value} at C{key} (under C{lease}); fires with an L{etcdwire.PutResult}."""

    def delete(key, rangeEnd=b""):
        """Delete C{key} (or the range); fires with an L{etcdwire.DeleteResult}."""

    def txn(request):
        """Run an L{etcdwire.Txn}; fires with an L{etcdwire.TxnResult}."""

    def grantLease(ttl):
        """Grant a lease of C{ttl} seconds; fires with an L{etcdwire.Lease}."""

    def keepAlive(lease):
        """
        Renew C{lease} once; fires with its TTL, or fails with
        L{xenddev.pool.errors.LeaseNotFound} when it has expired.
        """

    def revokeLease(lease):
        """Revoke C{lease} (its keys go with it); fires with None."""

    def leaseTimeToLive(lease, keys=False):
        """Fires with the L{etcdwire.LeaseInfo} of C{lease} (TTL -1: gone)."""

    def status():
        """Fires with the L{etcdwire.MemberStatus} of the member answering."""

    def watch(key, callback, rangeEnd=b"", startRevision=0, prevKv=False):
        """
        Call C{callback} with each L{etcdwire.WatchEvent} on C{key} (or the
        range) from C{startRevision} (0: from now); returns an L{IWatch}.
        """

    def close():
        """Cancel every watch and close the cached connections; fires when done."""


class IWatch(Interface):
    """A running watch."""

    nextRevision = Attribute("The revision the watch would resume from (0 before it is created).")

    def whenCreated():
        """Fires with the revision the watch was created at (fails if it ended first)."""

    def whenDone():
        """
        Fires with None when cancelled; fails when the watch cannot go on
        (its revisions compacted, or no member to resume it on).
        """

    def cancel():
        """Stop the watch; C{done} fires."""


class IHostSession(Interface):
    """A host's membership of the pool, held by a lease it keeps alive."""

    host = Attribute("This host's name in the pool.")
    lease = Attribute("The session's current lease id (0 before it starts).")
    state = Attribute("starting, live, fenced, rejoining or stopped.")
    held = Attribute("The keys held under the lease (a frozenset of bytes).")
    token = Attribute("The etcd revision at which this session joined the pool.")

    def start():
        """Grant the lease, register the host, start the renewals; fires when live."""

    def stop(revoke=True):
        """Stop renewing (and revoke the lease, dropping every key under it)."""

    def checkLive():
        """Raise L{xenddev.pool.errors.SessionNotLive} unless the session is live."""

    def hold(key):
        """Record that C{key} is held under the lease (to be reported if lost)."""

    def release(key):
        """Forget C{key} (it was deleted on purpose)."""

    def onFence(callback):
        """Call C{callback()} when renewals stop before the self-fence deadline."""

    def onRecover(callback):
        """Call C{callback()} when renewals work again and the lease survived."""

    def onLost(callback):
        """Call C{callback(keys)} with the keys lost when the lease expired."""

    def onRejoin(callback):
        """Call C{callback()} once joined again under a new lease after a lost one."""

    def hosts():
        """Fires with the hosts of the pool (L{session.HostInfo}), by name."""


class IActivations(Interface):
    """Exclusive (read-write) and shared (read-only) activation of targets."""

    def activate(target, mode="rw"):
        """
        Take C{target} (a normalised identity) for this host; fires with an
        L{activation.Activation} whose C{token} is the fencing token, or
        fails with L{xenddev.pool.errors.ActivationConflict}.
        """

    def deactivate(target):
        """Delete this host's activation of C{target} (only ours); fires with whether one was."""

    def where(target):
        """Fires with the L{activation.Holders} of C{target}."""


class IMigrations(Interface):
    """A migration's intents and the moves of activation keys between hosts."""

    def intend(target, source, domain):
        """
        Record this host's intent to take C{target} from host C{source}
        (its writer, or nobody) for guest C{domain}, under our lease;
        fires with the L{migration.Intent}.
        """

    def withdraw(target):
        """Delete our intent of C{target}; fires with whether one was."""

    def intents():
        """Fires with every migration intent of the pool."""

    def handover(target, fromHost, toHost, released=True):
        """
        Move C{target}'s activation key from C{fromHost} to C{toHost} (whose
        intent stands) in one transaction; fires with the new
        L{activation.Activation} (its token: the move's revision).
        """

    def handback(target, fromHost, toHost):
        """The reverse of a handover (an abort); fires with the L{activation.Activation}."""
