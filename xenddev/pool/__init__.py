# -*- test-case-name: tests.test_pool_etcd -*-
"""
Pools: several xenddev hosts coordinated through etcd (issue 14).

XenStore is per host; what must hold across hosts lives in etcd:

  - L{etcd}: a Twisted-native etcd v3 client over the JSON gateway, with
    failover between members (L{etcdwire}: the requests and answers as
    values; L{etcdwatch}: watches that resume on another member);
  - L{session}: a host's session lease, kept alive, with the self-fence
    that pauses the host's data paths before the lease can expire;
  - L{activation}: exclusive (read-write) and shared (read-only)
    activation of a target under the session's lease, with the etcd
    revision as fencing token;
  - L{migration}: a migration's intent and the handover moving an
    activation key from the source's lease to the destination's in one
    transaction;
  - L{keys}: the key layout under C{/xenddev/pool/} and target identities.

docs/pool.md has the design. This package imports only the error root.
"""
