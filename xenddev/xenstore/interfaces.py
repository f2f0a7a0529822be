# -*- test-case-name: tests.test_xenstore_client,tests.test_xenstore_connection -*-
"""
The zope.interface contracts of the XenStore layer.

Code above the layer depends on these, never on a concrete client:
L{XenStoreClient} (one connection) and L{ReconnectingXenStore} (durable)
both provide L{IXenStore}, their transactions L{ITransaction} and their
watches L{IWatchHandle}; tests check each with C{verifyObject}.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class IXenStoreOps(Interface):
    """Node operations; each returns a Deferred."""

    def read(path):
        """Fire with the node's value as text; ENOENT if missing."""

    def readBytes(path):
        """Fire with the node's value as bytes."""

    def readOrNone(path):
        """Fire with the node's value, or None if missing."""

    def write(path, value):
        """Write a node, creating missing parents."""

    def mkdir(path):
        """Create an empty node (no error if it exists)."""

    def rm(path, missingOk=False):
        """Remove a subtree (ENOENT only if the parent is missing too, unless missingOk)."""

    def ls(path, missingOk=False):
        """Fire with the list of child names (ENOENT if missing, unless missingOk: empty)."""

    def exists(path):
        """Fire with whether the node exists."""

    def getPerms(path):
        """Fire with the node's list of Perm (owner first)."""

    def setPerms(path, perms):
        """Replace the node's permissions."""


class ITransaction(IXenStoreOps):
    """An open XenStore transaction."""

    txId = Attribute("The transaction id allocated by xenstored.")

    def commit():
        """Commit; fails with ConflictError (EAGAIN) on a conflict."""

    def abort():
        """Discard the transaction's changes."""


class IWatchHandle(Interface):
    """A registered watch."""

    path = Attribute("The watched path.")
    token = Attribute("The watch token.")
    active = Attribute("False once stop() was called.")

    def stop():
        """Remove the watch; a Deferred. Idempotent."""


class IXenStore(IXenStoreOps):
    """A XenStore connection: node operations plus watches, transactions, domains."""

    reactor = Attribute(
        "The IReactorTime that times this store's transaction backoff and"
        " waitFor timeouts; code above it times its own waits on the same"
        " clock (WatchDispatch, DriverDomainClient)."
    )
    connections = Attribute(
        "Connections to xenstored made so far: 1 for a single connection,"
        " counting up on each reconnection of a ReconnectingXenStore. A"
        " change tells a caller that a restarted xenstored may have lost"
        " what it wrote before (DriverDomainClient.ensureArea)."
    )
    connected = Attribute("Whether a connection to xenstored is open now.")
    watchCount = Attribute("Watches registered through this connection.")

    def watch(path, callback, token=None):
        """Watch path; callback(eventPath) per event. Fires with an IWatchHandle."""

    def resetWatches():
        """Drop every watch of this connection (XS_RESET_WATCHES)."""

    def startTransaction():
        """Fire with an ITransaction."""

    def transact(fn, maxAttempts=None):
        """Run fn(tx) in a transaction, retrying on EAGAIN; fire with fn's result."""

    def waitFor(path, predicate, timeout=None):
        """Fire with the value once predicate(value) holds; XenStoreTimeout otherwise."""

    def getDomainPath(domid):
        """Fire with /local/domain/<domid>."""

    def introduceDomain(domid, mfn, port):
        """XS_INTRODUCE."""

    def releaseDomain(domid):
        """XS_RELEASE."""

    def resumeDomain(domid):
        """XS_RESUME: re-arm @releaseDomain for a domain."""

    def isDomainIntroduced(domid):
        """Fire with a bool."""

    def setTarget(domid, target):
        """XS_SET_TARGET."""
