"""
The benchmarks' wiretap (C{bench/_wiretap.py}): with no seam left in the
protocol's request path, it is how round trips are counted, so it must see
every request a client sends and every reply, transactions included.
"""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from bench._wiretap import Counts, RequestCounter, WireTap
from tests.support.fixtures import EmbeddedXenstoredFixture
from xenddev.xenstore.wire import Op


class _Trace(WireTap):
    """Every request and reply, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.trace: list[tuple[str, int, int]] = []

    def sent(self, reqId: int, op: int, payload: bytes) -> None:
        self.trace.append(("sent", reqId, op))

    def answered(self, reqId: int, requestOp: int, op: int, payload: bytes) -> None:
        self.trace.append(("answered", reqId, requestOp))


class WireTapTests(EmbeddedXenstoredFixture, TestCase):
    """A tapped client's traffic, on the embedded xenstored."""

    async def test_everyRequestAndReply(self) -> None:
        """Reads, writes, an ENOENT answer and a transaction are all seen, each answered."""
        self.startServer()
        xs = await self.connect()
        tap = _Trace().tap(xs.protocol)
        await xs.write("/tap/a", "1")
        self.assertEqual(await xs.read("/tap/a"), "1")
        self.assertIsNone(await xs.readOrNone("/tap/missing"))
        await xs.transact(lambda tx: tx.write("/tap/b", "2"))
        tap.untap()
        await xs.write("/tap/c", "3")  # not seen: untapped
        ops = [op for kind, _, op in tap.trace if kind == "sent"]
        self.assertEqual(
            ops,
            [
                Op.WRITE,
                Op.READ,
                Op.READ,
                Op.TRANSACTION_START,
                Op.WRITE,
                Op.TRANSACTION_END,
            ],
        )
        sent = sorted(r for kind, r, _ in tap.trace if kind == "sent")
        answered = sorted(r for kind, r, _ in tap.trace if kind == "answered")
        self.assertEqual(sent, answered)

    async def test_counterIgnores(self) -> None:
        """A RequestCounter counts what its filter does not ignore."""
        self.startServer()
        xs = await self.connect()
        counts = Counts()
        RequestCounter(counts, ignore=lambda op, payload: op == Op.READ).tap(xs.protocol)
        await xs.write("/tap/a", "1")
        await xs.read("/tap/a")
        await xs.write("/tap/b", "1")
        self.assertEqual((counts.requests, counts.conflicts), (2, 0))
