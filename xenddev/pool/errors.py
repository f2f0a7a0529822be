# -*- test-case-name: tests.test_pool_etcd -*-
"""
The pool's errors, each with the fault code a client gets for it.

etcd's own refusals carry the gateway's gRPC code and message
(L{EtcdError}); a cluster that cannot be reached, or answers nothing in
time, is L{EtcdUnavailable}. The pool's decisions (a target held
elsewhere, a session that is fenced, a configuration that could not be
safe) have their own classes, so a caller can tell them apart without
reading messages.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from xenddev.errors import FaultCode, XenddevError

__all__ = [
    "ActivationConflict",
    "EtcdAuthError",
    "EtcdBadAnswer",
    "EtcdError",
    "EtcdTimeout",
    "EtcdUnavailable",
    "HostNameInUse",
    "InvalidTarget",
    "LeaseNotFound",
    "PoolConfigError",
    "PoolSettingError",
    "SessionNotLive",
    "TokenRejected",
    "WatchCompacted",
]

#: gRPC's code for "not found" (the gateway gives it for an unknown lease).
GRPC_NOT_FOUND = 5


class EtcdUnavailable(XenddevError):
    """
    No member of the cluster could serve a request: each refused the
    connection, dropped it, or said it has no leader.

    @ivar operation: the gateway path asked for (C{/v3/kv/put}).
    @ivar reasons: what each member tried answered (URL -> reason).
    """

    faultCode = FaultCode.UNAVAILABLE

    def __init__(self, operation: str, reasons: Mapping[str, str]) -> None:
        self.operation = operation
        self.reasons = dict(reasons)
        detail = "; ".join(f"{url}: {why}" for url, why in self.reasons.items())
        super().__init__(f"etcd unavailable for {operation}: {detail or 'no member tried'}")


class EtcdTimeout(EtcdUnavailable):
    """No member answered a request within the client's timeout."""

    faultCode = FaultCode.TIMEOUT

    def __init__(self, operation: str, timeout: float, reasons: Mapping[str, str]) -> None:
        self.timeout = timeout
        super().__init__(operation, reasons)
        detail = "; ".join(f"{url}: {why}" for url, why in self.reasons.items())
        self.args = (f"etcd did not answer {operation} within {timeout:g} s ({detail})",)


class EtcdError(XenddevError):
    """
    etcd refused a request: the gateway's gRPC code and message.

    @ivar code: the gRPC status code (3 invalid argument, 5 not found, ...).
    @ivar message: etcd's message (C{etcdserver: requested lease not found}).
    @ivar status: the HTTP status of the answer.
    """

    faultCode = FaultCode.GENERIC

    def __init__(self, code: int, message: str, status: int = 0) -> None:
        self.code = code
        self.message = message
        self.status = status
        super().__init__(f"etcd refused the request (code {code}): {message}")


class LeaseNotFound(EtcdError):
    """The lease named does not exist (it expired, or was revoked)."""

    def __init__(self, lease: int, message: str = "etcdserver: requested lease not found") -> None:
        self.lease = lease
        super().__init__(GRPC_NOT_FOUND, message, 404)


class EtcdAuthError(EtcdError):
    """
    etcd refused this host's credentials or what its user asked for: a
    wrong user name or password, a user without permission on the pool's
    keys, authentication on in etcd with no C{pool.user} here. The message
    says what to change; it never holds the password or a token.
    """

    faultCode = FaultCode.PERMISSION

    def __init__(self, code: int, message: str, status: int = 0, advice: str = "") -> None:
        super().__init__(code, message, status)
        if advice:
            self.args = (f"{advice} (etcd: {message}, code {code})",)


class TokenRejected(EtcdAuthError):
    """
    etcd no longer accepts the token the request carried (expired, made by
    a member that restarted, or older than a change of users or roles):
    the client renews it once and runs the request again.
    """


class EtcdBadAnswer(EtcdError):
    """The gateway answered something this client cannot read."""

    def __init__(self, detail: str, status: int = 0) -> None:
        super().__init__(-1, f"unreadable answer: {detail}", status)


class WatchCompacted(EtcdError):
    """
    A watch asked for revisions etcd has compacted away.

    @ivar compactRevision: the oldest revision etcd still has.
    """

    def __init__(self, compactRevision: int) -> None:
        self.compactRevision = compactRevision
        super().__init__(
            -1, f"watch start revision compacted (oldest kept: {compactRevision})", 200
        )


class PoolConfigError(XenddevError, ValueError):
    """The pool's settings are unsafe or malformed (named with their values)."""

    faultCode = FaultCode.BAD_CONFIG


class PoolSettingError(PoolConfigError):
    """
    One C{pool:} setting cannot be used (a missing or unsafe file, a
    certificate that does not fit its key, ...).

    @ivar field: the key under C{pool:} (C{key_file}).
    @ivar value: its value (a path, a user name; never a secret).
    @ivar why: what is wrong and what to do.
    """

    def __init__(self, field: str, value: object, why: str) -> None:
        self.field = field
        self.value = value
        self.why = why
        super().__init__(f"pool.{field} = {value!r}: {why}")


class HostNameInUse(XenddevError):
    """
    Another live session holds this host's name in the pool.

    @ivar host: the name.
    @ivar lease: the lease of the session that holds it.
    """

    faultCode = FaultCode.DEVICE_EXISTS

    def __init__(self, host: str, lease: int) -> None:
        self.host = host
        self.lease = lease
        super().__init__(
            f"host name {host!r} is held in the pool by another session (lease {lease:x}); "
            "it frees when that session's lease expires"
        )


class SessionNotLive(XenddevError):
    """
    The host's session cannot vouch for its lease now (not started, fenced,
    rejoining or stopped): nothing may be activated under it.
    """

    faultCode = FaultCode.UNAVAILABLE

    def __init__(self, host: str, state: str) -> None:
        self.host = host
        self.state = state
        super().__init__(f"the pool session of host {host!r} is {state}, not live")


class InvalidTarget(XenddevError, ValueError):
    """A target identity (or the path it was made from) is not usable."""

    faultCode = FaultCode.BAD_CONFIG


class ActivationConflict(XenddevError):
    """
    The target is active elsewhere in a mode that excludes the request.

    @ivar target: the normalised target.
    @ivar holder: the host holding it read-write, or None.
    @ivar readers: the hosts holding it read-only.
    @ivar token: the fencing token of the read-write holder (0 if none).
    """

    faultCode = FaultCode.DEVICE_EXISTS

    def __init__(
        self, target: str, holder: str | None, readers: Sequence[str] = (), token: int = 0
    ) -> None:
        self.target = target
        self.holder = holder
        self.readers = tuple(readers)
        self.token = token
        if holder is not None:
            where = f"read-write on host {holder} (fencing token {token})"
        else:
            where = "read-only on host" + ("s " if len(self.readers) > 1 else " ")
            where += ", ".join(self.readers)
        super().__init__(f"{target} is active {where}")
