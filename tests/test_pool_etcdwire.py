"""
etcd's gateway JSON (xenddev.pool.etcdwire) and the client's settings
(xenddev.pool.etcd), without a cluster: requests as the gateway reads
them, answers (with their zero values left out) read back, both error
shapes, and which errors another member may serve.
"""

from __future__ import annotations

import base64

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from xenddev.pool import etcdwire as wire
from xenddev.pool.errors import EtcdBadAnswer, EtcdError, LeaseNotFound, PoolConfigError
from xenddev.pool.etcd import EtcdClient, apiPrefixFor, normaliseEndpoint


def b64(data: bytes) -> str:
    """Base64 text, as the gateway writes it."""
    return base64.b64encode(data).decode()


class RequestTests(SynchronousTestCase):
    """Requests as JSON bodies."""

    def test_prefixEnd(self) -> None:
        """The range end of a prefix: last byte below 0xff incremented, 0xff bytes dropped."""
        self.assertEqual(wire.prefixEnd(b"/a/"), b"/a0")
        self.assertEqual(wire.prefixEnd(b"a\xff\xff"), b"b")
        self.assertEqual(wire.prefixEnd(b"\xff"), b"\0")
        self.assertEqual(wire.prefixEnd(b""), b"\0")

    def test_range(self) -> None:
        """Keys are base64, int64s strings, and unset options left out."""
        self.assertEqual(wire.Range(b"k").toJSON(), {"key": b64(b"k")})
        self.assertEqual(
            wire.Range(b"k", b"l", limit=5, countOnly=True).toJSON(),
            {"key": b64(b"k"), "range_end": b64(b"l"), "limit": "5", "count_only": True},
        )

    def test_txn(self) -> None:
        """A transaction's comparisons and operations under their protobuf names."""
        txn = wire.Txn(
            [wire.Compare.absent(b"k"), wire.Compare.leaseIs(b"k", 7)],
            [wire.Put(b"k", b"v", lease=7), wire.Txn(success=[wire.Delete(b"k")])],
            [wire.Range(b"k")],
        )
        self.assertEqual(
            txn.toJSON(),
            {
                "compare": [
                    {
                        "target": "CREATE",
                        "result": "EQUAL",
                        "key": b64(b"k"),
                        "create_revision": "0",
                    },
                    {"target": "LEASE", "result": "EQUAL", "key": b64(b"k"), "lease": "7"},
                ],
                "success": [
                    {"request_put": {"key": b64(b"k"), "value": b64(b"v"), "lease": "7"}},
                    {
                        "request_txn": {
                            "compare": [],
                            "success": [{"request_delete_range": {"key": b64(b"k")}}],
                            "failure": [],
                        }
                    },
                ],
                "failure": [{"request_range": {"key": b64(b"k")}}],
            },
        )

    def test_compareOperandType(self) -> None:
        """A value comparison takes bytes, the others ints."""
        self.assertEqual(wire.Compare.valueIs(b"k", b"v").toJSON()["value"], b64(b"v"))
        self.assertRaises(TypeError, wire.Compare(b"k", "VALUE", "EQUAL", 1).toJSON)
        self.assertRaises(TypeError, wire.Compare(b"k", "MOD", "LESS", b"1").toJSON)

    def test_watchRequest(self) -> None:
        """A watch from a revision, over a range, with previous values."""
        self.assertEqual(
            wire.watchRequest(b"a", b"b", 12, True),
            {
                "create_request": {
                    "key": b64(b"a"),
                    "range_end": b64(b"b"),
                    "start_revision": "12",
                    "prev_kv": True,
                }
            },
        )


class AnswerTests(SynchronousTestCase):
    """Answers read back, zero values absent."""

    def test_range(self) -> None:
        """A range answer with one key; an empty one has no kvs nor count."""
        answer = {
            "header": {"revision": "9"},
            "kvs": [
                {
                    "key": b64(b"k"),
                    "create_revision": "3",
                    "mod_revision": "9",
                    "version": "2",
                    "value": b64(b"v"),
                    "lease": "42",
                }
            ],
            "count": "1",
        }
        result = wire.Range(b"k").result(answer)
        self.assertEqual(result.kvs, (wire.KeyValue(b"k", b"v", 3, 9, 2, 42),))
        self.assertEqual((result.count, result.revision), (1, 9))
        empty = wire.Range(b"k").result({"header": {"revision": "9"}})
        self.assertEqual((empty.kvs, empty.count), ((), 0))

    def test_txnResponsesByBranch(self) -> None:
        """Each response is read by the operation of the branch that ran."""
        txn = wire.Txn([], [wire.Put(b"k", b"v")], [wire.Range(b"k")])
        ok = txn.result(
            {
                "header": {"revision": "5"},
                "succeeded": True,
                "responses": [{"response_put": {"header": {"revision": "5"}}}],
            }
        )
        self.assertEqual(ok, wire.TxnResult(True, 5, (wire.PutResult(5),)))
        failed = txn.result(
            {"header": {"revision": "5"}, "responses": [{"response_range": {"header": {}}}]}
        )
        self.assertFalse(failed.succeeded)
        self.assertEqual(failed.responses, (wire.RangeResult((), 0, False, 5),))
        with self.assertRaises(EtcdBadAnswer):
            txn.result({"succeeded": True, "responses": []})

    def test_keepAlive(self) -> None:
        """A keepalive's TTL; none (an unknown lease) is LeaseNotFound."""
        self.assertEqual(wire.keepAliveTTL(1, {"result": {"ID": "1", "TTL": "5"}}), 5)
        with self.assertRaises(LeaseNotFound) as caught:
            wire.keepAliveTTL(1, {"result": {"ID": "1"}})
        self.assertEqual(caught.exception.lease, 1)

    def test_watchResponse(self) -> None:
        """Events (a put has no type), creation and compaction."""
        response = wire.WatchResponse.fromJSON(
            {
                "result": {
                    "header": {"revision": "7"},
                    "events": [
                        {"kv": {"key": b64(b"a"), "mod_revision": "6"}},
                        {"type": "DELETE", "kv": {"key": b64(b"a"), "mod_revision": "7"}},
                    ],
                }
            }
        )
        self.assertEqual([e.type for e in response.events], ["PUT", "DELETE"])
        compacted = wire.WatchResponse.fromJSON(
            {"result": {"header": {}, "canceled": True, "compact_revision": "5"}}
        )
        self.assertEqual((compacted.canceled, compacted.compactRevision), (True, 5))

    def test_garbage(self) -> None:
        """What is not the gateway's JSON is EtcdBadAnswer."""
        for body in (b"404 page not found", b"[1]", b"{"):
            self.assertRaises(EtcdBadAnswer, wire.decodeJSON, body)
        self.assertRaises(EtcdBadAnswer, wire.Range(b"k").result, {"kvs": [{"key": "%%"}]})
        self.assertRaises(EtcdBadAnswer, wire.Range(b"k").result, {"count": "x"})


class ErrorTests(SynchronousTestCase):
    """Both error shapes, and which may succeed elsewhere."""

    def test_unaryShape(self) -> None:
        """C{{"error", "message", "code"}} from the unary calls."""
        error = wire.errorFrom(
            503,
            {
                "error": "etcdserver: request timed out",
                "message": "etcdserver: request timed out",
                "code": 14,
            },
        )
        self.assertEqual(
            (error.code, error.message, error.status), (14, "etcdserver: request timed out", 503)
        )
        self.assertTrue(wire.isUnavailable(error))

    def test_streamShape(self) -> None:
        """C{{"error": {"grpc_code", "message"}}} from the streams."""
        error = wire.errorFrom(
            503, {"error": {"grpc_code": 14, "http_code": 503, "message": "etcdserver: no leader"}}
        )
        self.assertEqual((error.code, error.message), (14, "etcdserver: no leader"))

    def test_retryable(self) -> None:
        """No leader, timeouts and deadlines may succeed elsewhere; refusals may not."""
        self.assertTrue(wire.isUnavailable(EtcdError(2, "context deadline exceeded")))
        self.assertTrue(wire.isUnavailable(EtcdError(4, "deadline")))
        self.assertFalse(wire.isUnavailable(EtcdError(3, "etcdserver: duplicate key given")))
        self.assertFalse(wire.isUnavailable(EtcdError(5, "etcdserver: requested lease not found")))


class ClientSettingsTests(SynchronousTestCase):
    """The client's endpoints and gateway prefix."""

    def test_endpoints(self) -> None:
        """C{host:port} means http; anything but http(s)://HOST:PORT is refused."""
        self.assertEqual(normaliseEndpoint("127.0.0.1:2379"), "http://127.0.0.1:2379")
        self.assertEqual(normaliseEndpoint("http://[::1]:2379/"), "http://[::1]:2379")
        self.assertEqual(normaliseEndpoint("https://e.example:2379"), "https://e.example:2379")
        for bad in ("ftp://a:1", "http://a", "http://a:1/x", "http://a:port", "https://a"):
            self.assertRaises(PoolConfigError, normaliseEndpoint, bad)
        self.assertRaises(PoolConfigError, EtcdClient, Clock(), [])
        self.assertRaises(PoolConfigError, EtcdClient, Clock(), "a:1")
        self.assertRaises(PoolConfigError, EtcdClient, Clock(), ["a:1", "http://a:1"])
        self.assertRaises(PoolConfigError, EtcdClient, Clock(), ["a:1"], timeout=0)

    def test_apiPrefix(self) -> None:
        """/v3 from 3.4 on, /v3beta on 3.3, /v3alpha before; nothing from a cluster starting."""
        self.assertEqual(apiPrefixFor("3.4.0"), "/v3")
        self.assertEqual(apiPrefixFor("3.5.9"), "/v3")
        self.assertEqual(apiPrefixFor("3.3.0"), "/v3beta")
        self.assertEqual(apiPrefixFor("3.2.26"), "/v3alpha")
        self.assertIsNone(apiPrefixFor("not_decided"))
