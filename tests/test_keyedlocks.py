"""
L{xenddev.keyedlocks.KeyedLocks}: operations on one key run one after
another, on different keys at once, whatever they return or raise, and the
table forgets a key once nothing holds or awaits it.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from xenddev.keyedlocks import KeyedLocks


class KeyedLocksTests(SynchronousTestCase):
    """The lock table on Deferreds the test fires."""

    def test_oneKeyInTurn(self) -> None:
        """A second operation on a key starts when the first has ended."""
        locks: KeyedLocks[str] = KeyedLocks()
        first: Deferred[int] = Deferred()
        started: list[str] = []

        def second() -> Deferred[int]:
            started.append("second")
            return Deferred.fromCoroutine(_value(2))

        d1 = locks.run("a", lambda: first)
        d2 = locks.run("a", second)
        self.assertEqual(started, [])
        self.assertTrue(locks.locked("a"))
        first.callback(1)
        self.assertEqual((self.successResultOf(d1), self.successResultOf(d2)), (1, 2))
        self.assertEqual(len(locks), 0)
        self.assertFalse(locks.locked("a"))

    def test_keysIndependent(self) -> None:
        """An operation on another key does not wait."""
        locks: KeyedLocks[str] = KeyedLocks()
        held: Deferred[None] = Deferred()
        locks.run("a", lambda: held)
        self.assertEqual(self.successResultOf(locks.run("b", lambda: _value(3))), 3)
        self.assertEqual(len(locks), 1)
        held.callback(None)
        self.assertEqual(len(locks), 0)

    def test_failureReleases(self) -> None:
        """A failing operation gives its failure and lets the next one run."""
        locks: KeyedLocks[int] = KeyedLocks()

        async def boom() -> None:
            raise ValueError("boom")

        self.failureResultOf(locks.run(1, boom), ValueError)
        self.assertEqual(self.successResultOf(locks.run(1, lambda: _value("next"))), "next")
        self.assertEqual(len(locks), 0)


async def _value(value: object) -> object:
    """A coroutine that answers C{value}."""
    return value
