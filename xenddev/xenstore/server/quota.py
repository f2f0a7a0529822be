# -*- test-case-name: tests.test_xenstored_units -*-
"""
Quotas of the embedded xenstored, with the defaults of C xenstored 4.17.

As in the C daemon they apply to unprivileged domains only (dom0 and the
privileged socket are exempt), and each failure uses the errno the C daemon
returns (noted on each field).
"""

from __future__ import annotations

import attrs

from xenddev.xenstore.wire import REL_PATH_MAX


@attrs.frozen
class Quotas:
    """
    Limits applied to unprivileged connections.

    @ivar nodesPerDomain: nodes a domain may own (C{-e}, ENOSPC).
    @ivar watchesPerDomain: watches of a domain (C{-w}, E2BIG; as in C the
        check is C{count > limit}, so one more than this fits).
    @ivar maxEntrySize: bytes of one node record (24-byte header, 8 bytes per
        permission, value, child names; C{-S}, ENOSPC when C{>=}).
    @ivar transactionsPerConnection: open transactions (C{-t}, ENOSPC; the C
        check is C{started > limit}, so one more than this fits).
    @ivar permsPerNode: entries of a SET_PERMS (C{-A}, ENOSPC).
    @ivar nodesPerTransaction: nodes one transaction may touch (C{-M
        transaction-nodes}, ENOSPC and the transaction fails).
    @ivar maxPathLength: path bytes after C{/local/domain/<id>/} (C{-M
        path-max}, EINVAL; applies to every connection, as in C).
    @ivar requestsOutstanding: replies and events not yet sent before the
        server stops reading the connection (C{-Q outstanding}; flow control,
        no errno).
    """

    nodesPerDomain: int = 1000
    watchesPerDomain: int = 128
    maxEntrySize: int = 2048
    transactionsPerConnection: int = 10
    permsPerNode: int = 5
    nodesPerTransaction: int = 1024
    maxPathLength: int = attrs.field(
        default=REL_PATH_MAX, converter=lambda v: min(int(v), REL_PATH_MAX)
    )
    requestsOutstanding: int = 20
