# -*- test-case-name: tests.test_pool_etcdwire -*-
"""
etcd's v3 API as values, and their JSON on the gateway.

etcd serves its gRPC API as JSON over HTTP (the "gRPC gateway",
C{POST /v3/kv/range} and so on): field names are the protobuf names
(C{range_end}, C{create_revision}), keys and values are base64, 64-bit
integers are strings, and a field at its zero value is left out of an
answer (a range that found nothing has no C{kvs}; a put event has no
C{type}). This module turns the requests this client makes into that JSON
and the answers back into frozen values; it does no I/O, so every rule is
tested without a cluster.

An error answer is C{{"error": ..., "message": ..., "code": N}} from the
unary calls and C{{"error": {"grpc_code": N, "message": ...}}} from the
streaming ones (lease keepalive, watch); L{errorFrom} reads both.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeAlias

import attrs

from xenddev.pool.errors import EtcdBadAnswer, EtcdError, LeaseNotFound

__all__ = [
    "Compare",
    "Delete",
    "DeleteResult",
    "KeyValue",
    "Lease",
    "LeaseInfo",
    "MemberStatus",
    "Op",
    "Put",
    "PutResult",
    "Range",
    "RangeResult",
    "Result",
    "Txn",
    "TxnResult",
    "WatchEvent",
    "WatchResponse",
    "decodeJSON",
    "errorFrom",
    "isUnavailable",
    "keepAliveTTL",
    "prefixEnd",
    "watchRequest",
]

#: gRPC codes after which another member may well succeed: Unavailable
#: (no leader, leader changed, request timed out) and DeadlineExceeded.
_RETRY_CODES = frozenset({4, 14})
#: Messages of the gateway's own deadline, given with code 2 (Unknown).
_RETRY_MESSAGES = ("context deadline exceeded", "context canceled")


def prefixEnd(prefix: bytes) -> bytes:
    """
    The C{range_end} that makes a range cover every key starting with
    C{prefix}: the prefix with its last byte below 0xff incremented and the
    rest dropped; all of the keys when there is no such byte (etcd reads
    C{"\\0"} as "to the end").
    """
    for i in range(len(prefix) - 1, -1, -1):
        if prefix[i] < 0xFF:
            return prefix[:i] + bytes([prefix[i] + 1])
    return b"\0"


def _b64(data: bytes) -> str:
    """C{data} as the gateway's base64 text."""
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any, field: str) -> bytes:
    """The bytes of a base64 field of an answer (absent: empty)."""
    if text is None:
        return b""
    if not isinstance(text, str):
        raise EtcdBadAnswer(f"{field} is not base64 text: {text!r}")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise EtcdBadAnswer(f"{field} is not base64: {text!r}") from e


def _int(value: Any, field: str) -> int:
    """An int64 field of an answer (a string on the wire; absent: 0)."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise EtcdBadAnswer(f"{field} is not an integer: {value!r}")
    try:
        return int(value)
    except ValueError as e:
        raise EtcdBadAnswer(f"{field} is not an integer: {value!r}") from e


def _obj(value: Any, field: str) -> Mapping[str, Any]:
    """A nested object of an answer (absent: empty)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise EtcdBadAnswer(f"{field} is not an object: {value!r}")
    return value


def _list(value: Any, field: str) -> list[Any]:
    """A repeated field of an answer (absent: empty)."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise EtcdBadAnswer(f"{field} is not a list: {value!r}")
    return value


def decodeJSON(body: bytes) -> Mapping[str, Any]:
    """An answer's body as a JSON object, or L{EtcdBadAnswer}."""
    try:
        value = json.loads(body)
    except ValueError as e:
        raise EtcdBadAnswer(f"not JSON: {body[:200]!r}") from e
    if not isinstance(value, dict):
        raise EtcdBadAnswer(f"not a JSON object: {body[:200]!r}")
    return value


def _revision(answer: Mapping[str, Any]) -> int:
    """The store revision in an answer's header."""
    return _int(_obj(answer.get("header"), "header").get("revision"), "header.revision")


@attrs.frozen
class KeyValue:
    """A key as etcd keeps it: its value, revisions and lease (0: none)."""

    key: bytes
    value: bytes = b""
    createRevision: int = 0
    modRevision: int = 0
    version: int = 0
    lease: int = 0

    @classmethod
    def fromJSON(cls, data: Any) -> KeyValue:
        """Read a C{mvccpb.KeyValue} of an answer."""
        d = _obj(data, "kv")
        return cls(
            key=_unb64(d.get("key"), "kv.key"),
            value=_unb64(d.get("value"), "kv.value"),
            createRevision=_int(d.get("create_revision"), "kv.create_revision"),
            modRevision=_int(d.get("mod_revision"), "kv.mod_revision"),
            version=_int(d.get("version"), "kv.version"),
            lease=_int(d.get("lease"), "kv.lease"),
        )


def _kvs(value: Any, field: str) -> tuple[KeyValue, ...]:
    """A list of key-values of an answer."""
    return tuple(KeyValue.fromJSON(kv) for kv in _list(value, field))


# --- requests -------------------------------------------------------------


@attrs.frozen
class Range:
    """
    Read C{key}, or the keys in [C{key}, C{rangeEnd}) (see L{prefixEnd}).
    C{serializable} reads the member's own copy without asking the leader
    (fast, possibly stale: never for decisions).
    """

    key: bytes
    rangeEnd: bytes = b""
    limit: int = 0
    revision: int = 0
    keysOnly: bool = False
    countOnly: bool = False
    serializable: bool = False

    path = "/kv/range"

    def toJSON(self) -> dict[str, Any]:
        """The C{RangeRequest} body."""
        body: dict[str, Any] = {"key": _b64(self.key)}
        if self.rangeEnd:
            body["range_end"] = _b64(self.rangeEnd)
        if self.limit:
            body["limit"] = str(self.limit)
        if self.revision:
            body["revision"] = str(self.revision)
        for name, flag in (
            ("keys_only", self.keysOnly),
            ("count_only", self.countOnly),
            ("serializable", self.serializable),
        ):
            if flag:
                body[name] = True
        return body

    def result(self, answer: Mapping[str, Any], revision: int = 0) -> RangeResult:
        """Read this request's answer."""
        return RangeResult(
            kvs=_kvs(answer.get("kvs"), "kvs"),
            count=_int(answer.get("count"), "count"),
            more=bool(answer.get("more", False)),
            revision=_revision(answer) or revision,
        )


@attrs.frozen
class Put:
    """Write C{value} at C{key}, attached to C{lease} (0: none)."""

    key: bytes
    value: bytes
    lease: int = 0
    prevKv: bool = False

    path = "/kv/put"

    def toJSON(self) -> dict[str, Any]:
        """The C{PutRequest} body."""
        body: dict[str, Any] = {"key": _b64(self.key), "value": _b64(self.value)}
        if self.lease:
            body["lease"] = str(self.lease)
        if self.prevKv:
            body["prev_kv"] = True
        return body

    def result(self, answer: Mapping[str, Any], revision: int = 0) -> PutResult:
        """Read this request's answer."""
        prev = answer.get("prev_kv")
        return PutResult(
            revision=_revision(answer) or revision,
            prevKv=None if prev is None else KeyValue.fromJSON(prev),
        )


@attrs.frozen
class Delete:
    """Delete C{key}, or the keys in [C{key}, C{rangeEnd})."""

    key: bytes
    rangeEnd: bytes = b""
    prevKv: bool = False

    path = "/kv/deleterange"

    def toJSON(self) -> dict[str, Any]:
        """The C{DeleteRangeRequest} body."""
        body: dict[str, Any] = {"key": _b64(self.key)}
        if self.rangeEnd:
            body["range_end"] = _b64(self.rangeEnd)
        if self.prevKv:
            body["prev_kv"] = True
        return body

    def result(self, answer: Mapping[str, Any], revision: int = 0) -> DeleteResult:
        """Read this request's answer."""
        return DeleteResult(
            revision=_revision(answer) or revision,
            deleted=_int(answer.get("deleted"), "deleted"),
            prevKvs=_kvs(answer.get("prev_kvs"), "prev_kvs"),
        )


CompareTarget: TypeAlias = Literal["VERSION", "CREATE", "MOD", "VALUE", "LEASE"]
CompareResult: TypeAlias = Literal["EQUAL", "GREATER", "LESS", "NOT_EQUAL"]

#: The C{Compare} field that holds the operand of each target.
_OPERAND_FIELD: Mapping[str, str] = {
    "VERSION": "version",
    "CREATE": "create_revision",
    "MOD": "mod_revision",
    "VALUE": "value",
    "LEASE": "lease",
}


@attrs.frozen
class Compare:
    """
    One condition of a transaction: C{target} of C{key} (of every key in
    [C{key}, C{rangeEnd}) when given, etcd 3.3+) compared with C{operand}.

    A key that does not exist compares as revision, version and lease 0,
    so C{absent} is "create revision equals 0"; over a range it holds when
    no key of the range exists.
    """

    key: bytes
    target: CompareTarget
    result: CompareResult
    operand: int | bytes
    rangeEnd: bytes = b""

    @classmethod
    def absent(cls, key: bytes, rangeEnd: bytes = b"") -> Compare:
        """C{key} (every key of the range) does not exist."""
        return cls(key, "CREATE", "EQUAL", 0, rangeEnd)

    @classmethod
    def leaseIs(cls, key: bytes, lease: int) -> Compare:
        """C{key} exists under C{lease}."""
        return cls(key, "LEASE", "EQUAL", lease)

    @classmethod
    def valueIs(cls, key: bytes, value: bytes) -> Compare:
        """C{key} exists with C{value}."""
        return cls(key, "VALUE", "EQUAL", value)

    @classmethod
    def modifiedBefore(cls, key: bytes, revision: int, rangeEnd: bytes = b"") -> Compare:
        """C{key} (every key of the range) was last written before C{revision}."""
        return cls(key, "MOD", "LESS", revision, rangeEnd)

    def toJSON(self) -> dict[str, Any]:
        """The C{Compare} body."""
        body: dict[str, Any] = {
            "target": self.target,
            "result": self.result,
            "key": _b64(self.key),
        }
        if self.rangeEnd:
            body["range_end"] = _b64(self.rangeEnd)
        field = _OPERAND_FIELD[self.target]
        if self.target == "VALUE":
            if not isinstance(self.operand, bytes):
                raise TypeError("a VALUE comparison takes bytes")
            body[field] = _b64(self.operand)
        else:
            if not isinstance(self.operand, int):
                raise TypeError(f"a {self.target} comparison takes an int")
            body[field] = str(self.operand)
        return body


@attrs.frozen
class Txn:
    """
    If every C{compare} holds, do C{success}, else C{failure}, in one
    revision (a nested C{Txn} as an operation needs etcd 3.3+).
    """

    compare: Sequence[Compare] = ()
    success: Sequence[Op] = ()
    failure: Sequence[Op] = ()

    path = "/kv/txn"

    def toJSON(self) -> dict[str, Any]:
        """The C{TxnRequest} body."""
        return {
            "compare": [c.toJSON() for c in self.compare],
            "success": [_requestOp(op) for op in self.success],
            "failure": [_requestOp(op) for op in self.failure],
        }

    def result(self, answer: Mapping[str, Any], revision: int = 0) -> TxnResult:
        """Read this request's answer, each response by the operation that asked for it."""
        revision = _revision(answer) or revision
        succeeded = bool(answer.get("succeeded", False))
        ops = self.success if succeeded else self.failure
        responses = _list(answer.get("responses"), "responses")
        if len(responses) != len(ops):
            raise EtcdBadAnswer(f"{len(responses)} responses to {len(ops)} operations")
        results = []
        for op, response in zip(ops, responses, strict=True):
            field = _RESPONSE_FIELD[type(op)]
            inner = _obj(response, "responses[]").get(field)
            if inner is None:
                raise EtcdBadAnswer(f"expected {field} in {response!r}")
            results.append(op.result(_obj(inner, field), revision))
        return TxnResult(succeeded=succeeded, revision=revision, responses=tuple(results))


Op: TypeAlias = Range | Put | Delete | Txn

_REQUEST_FIELD: Mapping[type, str] = {
    Range: "request_range",
    Put: "request_put",
    Delete: "request_delete_range",
    Txn: "request_txn",
}
_RESPONSE_FIELD: Mapping[type, str] = {
    Range: "response_range",
    Put: "response_put",
    Delete: "response_delete_range",
    Txn: "response_txn",
}


def _requestOp(op: Op) -> dict[str, Any]:
    """A C{RequestOp}: the operation under its kind's field."""
    return {_REQUEST_FIELD[type(op)]: op.toJSON()}


# --- results --------------------------------------------------------------


@attrs.frozen
class RangeResult:
    """The keys found (C{count} of them in all; C{more} when C{limit} cut them)."""

    kvs: tuple[KeyValue, ...]
    count: int
    more: bool
    revision: int


@attrs.frozen
class PutResult:
    """The revision the put made (its key's create or mod revision)."""

    revision: int
    prevKv: KeyValue | None = None


@attrs.frozen
class DeleteResult:
    """How many keys a delete removed, at which revision."""

    revision: int
    deleted: int
    prevKvs: tuple[KeyValue, ...] = ()


@attrs.frozen
class TxnResult:
    """Which branch ran, and its operations' results in order."""

    succeeded: bool
    revision: int
    responses: tuple[Result, ...]


Result: TypeAlias = RangeResult | PutResult | DeleteResult | TxnResult


@attrs.frozen
class Lease:
    """A granted lease: its id and the TTL etcd gave (may exceed the one asked)."""

    id: int
    ttl: int

    @classmethod
    def fromJSON(cls, answer: Mapping[str, Any]) -> Lease:
        """Read a C{LeaseGrantResponse} (an C{error} field in it is a refusal)."""
        if answer.get("error"):
            raise EtcdError(-1, str(answer["error"]), 200)
        return cls(id=_int(answer.get("ID"), "ID"), ttl=_int(answer.get("TTL"), "TTL"))


@attrs.frozen
class LeaseInfo:
    """
    A lease's remaining C{ttl} (-1: expired or unknown), the TTL it was
    granted with and, when asked, the keys attached to it.
    """

    id: int
    ttl: int
    grantedTtl: int
    keys: tuple[bytes, ...] = ()

    @classmethod
    def fromJSON(cls, answer: Mapping[str, Any]) -> LeaseInfo:
        """Read a C{LeaseTimeToLiveResponse}."""
        return cls(
            id=_int(answer.get("ID"), "ID"),
            ttl=_int(answer.get("TTL"), "TTL"),
            grantedTtl=_int(answer.get("grantedTTL"), "grantedTTL"),
            keys=tuple(_unb64(k, "keys[]") for k in _list(answer.get("keys"), "keys")),
        )


def keepAliveTTL(lease: int, answer: Mapping[str, Any]) -> int:
    """
    The TTL a C{LeaseKeepAliveResponse} renewed C{lease} to. The gateway
    streams it as C{{"result": {...}}}; etcd answers an unknown lease with
    no TTL (0), which is L{LeaseNotFound}.
    """
    result = _obj(answer.get("result"), "result")
    ttl = _int(result.get("TTL"), "result.TTL")
    if ttl <= 0:
        raise LeaseNotFound(lease)
    return ttl


@attrs.frozen
class MemberStatus:
    """
    A member's C{maintenance/status}: its id, the leader it follows, its
    version, and the cluster's id (what tells one cluster from another).
    """

    memberId: int
    leader: int
    version: str
    raftTerm: int
    clusterId: int = 0

    @classmethod
    def fromJSON(cls, answer: Mapping[str, Any]) -> MemberStatus:
        """Read a C{StatusResponse}."""
        header = _obj(answer.get("header"), "header")
        return cls(
            memberId=_int(header.get("member_id"), "header.member_id"),
            leader=_int(answer.get("leader"), "leader"),
            version=str(answer.get("version", "")),
            raftTerm=_int(answer.get("raftTerm"), "raftTerm"),
            clusterId=_int(header.get("cluster_id"), "header.cluster_id"),
        )


def watchRequest(
    key: bytes, rangeEnd: bytes = b"", startRevision: int = 0, prevKv: bool = False
) -> dict[str, Any]:
    """The body of C{POST /v3/watch}: a C{WatchCreateRequest} (revision 0: from now)."""
    create: dict[str, Any] = {"key": _b64(key)}
    if rangeEnd:
        create["range_end"] = _b64(rangeEnd)
    if startRevision:
        create["start_revision"] = str(startRevision)
    if prevKv:
        create["prev_kv"] = True
    return {"create_request": create}


@attrs.frozen
class WatchEvent:
    """A change seen by a watch: the key after it (and before, when asked)."""

    type: Literal["PUT", "DELETE"]
    kv: KeyValue
    prevKv: KeyValue | None = None

    @classmethod
    def fromJSON(cls, data: Any) -> WatchEvent:
        """Read an C{mvccpb.Event} (a put has no C{type}: it is the zero value)."""
        d = _obj(data, "event")
        kind = d.get("type", "PUT")
        if kind not in ("PUT", "DELETE"):
            raise EtcdBadAnswer(f"unknown event type {kind!r}")
        prev = d.get("prev_kv")
        return cls(
            type=kind,
            kv=KeyValue.fromJSON(d.get("kv")),
            prevKv=None if prev is None else KeyValue.fromJSON(prev),
        )


@attrs.frozen
class WatchResponse:
    """One message of a watch stream."""

    revision: int
    created: bool = False
    canceled: bool = False
    compactRevision: int = 0
    cancelReason: str = ""
    events: tuple[WatchEvent, ...] = ()

    @classmethod
    def fromJSON(cls, answer: Mapping[str, Any]) -> WatchResponse:
        """Read one streamed C{{"result": WatchResponse}} (an C{error} is raised)."""
        if "error" in answer:
            raise errorFrom(200, answer)
        result = _obj(answer.get("result"), "result")
        return cls(
            revision=_revision(result),
            created=bool(result.get("created", False)),
            canceled=bool(result.get("canceled", False)),
            compactRevision=_int(result.get("compact_revision"), "compact_revision"),
            cancelReason=str(result.get("cancel_reason", "")),
            events=tuple(WatchEvent.fromJSON(e) for e in _list(result.get("events"), "events")),
        )


# --- errors ---------------------------------------------------------------


def errorFrom(status: int, answer: Mapping[str, Any]) -> EtcdError:
    """
    The L{EtcdError} of an error answer: C{{"error", "message", "code"}}
    (unary calls) or C{{"error": {"grpc_code", "message"}}} (streams).
    """
    error = answer.get("error")
    if isinstance(error, dict):
        code = error.get("grpc_code", error.get("code", -1))
        message = error.get("message", "")
    else:
        code = answer.get("code", -1)
        message = answer.get("message") or error or ""
    if not isinstance(code, int) or isinstance(code, bool):
        code = -1
    return EtcdError(code, str(message), status)


def isUnavailable(error: EtcdError) -> bool:
    """
    Whether another member (or a later try) may succeed where C{error}
    came from: the member has no leader, lost it, or timed out waiting
    for the cluster.
    """
    if error.code in _RETRY_CODES:
        return True
    return error.code == 2 and any(m in error.message for m in _RETRY_MESSAGES)
