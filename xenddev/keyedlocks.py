# -*- test-case-name: tests.test_keyedlocks -*-
"""
One lock per key, kept only while in use.

Operations on one object (a device, a vdi, a storage target, a migrating
guest) run one after another; operations on different objects do not wait
for each other. The table holds a lock only while an operation holds or
waits for it, so a daemon that has seen a million devices keeps no lock
for the ones gone.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Generic, TypeVar

from twisted.internet.defer import Deferred, DeferredLock

__all__ = ["KeyedLocks"]

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


class KeyedLocks(Generic[K]):
    """A table of L{DeferredLock}s by key, each dropped once nobody holds or awaits it."""

    def __init__(self) -> None:
        self._locks: dict[K, DeferredLock] = {}

    def __len__(self) -> int:
        """How many keys have an operation running or waiting."""
        return len(self._locks)

    def locked(self, key: K) -> bool:
        """Whether an operation on C{key} runs now."""
        lock = self._locks.get(key)
        return lock is not None and lock.locked

    def run(self, key: K, fn: Callable[[], Awaitable[T]]) -> Deferred[T]:
        """
        Run C{fn} (a function returning a Deferred, a coroutine or a value)
        once the operations on C{key} before it are done; fires with its
        result.
        """
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = DeferredLock()

        def release(result: object) -> object:
            if not lock.locked and not lock.waiting:
                self._locks.pop(key, None)
            return result

        d: Deferred[Any] = lock.run(fn)
        return d.addBoth(release)
