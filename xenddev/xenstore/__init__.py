"""
XenStore on Twisted: the wire codec, the client protocol and Deferred API,
connection endpoints, and (later) the embedded xenstored.

Typical use::

    client = await connectXenStore(reactor, "unix:/var/run/xenstored/socket")
    await client.write("/local/domain/0/name", "Domain-0")
"""

from xenddev.xenstore.client import Transaction, WatchHandle, XenStoreClient
from xenddev.xenstore.connection import ReconnectingXenStore, connectXenStore
from xenddev.xenstore.endpoints import XenbusEndpoint, XenStoreAddress, endpointFor, parseAddress
from xenddev.xenstore.errors import (
    AccessDeniedError,
    ConflictError,
    ExistsError,
    InvalidArgumentError,
    InvalidPathError,
    InvalidPayloadError,
    InvalidPermissionError,
    InvalidRequestError,
    NoEntryError,
    QuotaError,
    TransactionRetriesExhausted,
    XenStoreConnectionLost,
    XenStoreError,
    XenStoreStalled,
    XenStoreTimeout,
)
from xenddev.xenstore.paths import Perm
from xenddev.xenstore.wire import Op, Packet, PacketParser

__all__ = [
    "AccessDeniedError",
    "ConflictError",
    "ExistsError",
    "InvalidArgumentError",
    "InvalidPathError",
    "InvalidPayloadError",
    "InvalidPermissionError",
    "InvalidRequestError",
    "NoEntryError",
    "Op",
    "Packet",
    "PacketParser",
    "Perm",
    "QuotaError",
    "ReconnectingXenStore",
    "Transaction",
    "TransactionRetriesExhausted",
    "WatchHandle",
    "XenStoreAddress",
    "XenStoreClient",
    "XenStoreConnectionLost",
    "XenStoreError",
    "XenStoreStalled",
    "XenStoreTimeout",
    "XenbusEndpoint",
    "connectXenStore",
    "endpointFor",
    "parseAddress",
]
