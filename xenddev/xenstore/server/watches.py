# -*- test-case-name: tests.test_xenstored_units -*-
"""
Watch registrations, the C xenstored matching rules, and the index that
finds the watches a change fires without looking at the others.

A change of node C{name} fires every watch on C{name} or an ancestor of it
(C{exact=False}: writes, and the top of a removed subtree), or only the
watches on exactly C{name} (C{exact=True}: each removed descendant, so a
watch below a removed node fires with its own path). The event path is the
node's path, made relative again for a watch registered relative.

A store has a watch per device end (each guest's kernel watches its
devices' other ends), so a change must not cost time per registered watch:
L{WatchIndex} keeps them by path, and a change looks up only the paths that
can match it, C{name} and its ancestors.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

#: Whoever registered a watch (the server's connection).
OwnerT = TypeVar("OwnerT")


class Watch:
    """
    One registration: C{path} is absolute (or C{@...}), C{prefix} is the
    connection's home path when the watch was given relative, else None.

    @ivar serial: when it was registered, relative to the other watches of
        the index it is in (L{WatchIndex.add} sets it): a connection's
        events for one change come in this order.
    """

    __slots__ = ("path", "prefix", "serial", "token")

    def __init__(self, path: bytes, token: bytes, prefix: bytes | None) -> None:
        self.path = path
        self.token = token
        self.prefix = prefix
        self.serial = 0

    def eventPath(self, name: bytes) -> bytes:
        """The path reported for a change of C{name} (C{get_watch_path})."""
        if self.prefix is None:
            return name
        rest = name[len(self.prefix) :]
        return rest[1:] if rest.startswith(b"/") else rest

    def matches(self, name: bytes, exact: bool) -> bool:
        """Whether a change of C{name} fires this watch."""
        w = self.path
        if exact:
            return name == w
        if w == b"/":
            return True
        if not name.startswith(w):
            return False
        return len(name) == len(w) or name[len(w)] == 0x2F  # "/"


def watchedPaths(name: bytes, exact: bool) -> Iterator[bytes]:
    """
    The paths whose watches a change of C{name} fires (L{Watch.matches}):
    C{name} alone if C{exact}, else C{name}, each ancestor, and C{/}.
    """
    yield name
    if exact:
        return
    cut = name.rfind(b"/")
    while cut > 0:
        name = name[:cut]
        yield name
        cut = name.rfind(b"/")
    if name != b"/":
        yield b"/"


class WatchIndex(Generic[OwnerT]):
    """
    Every registered watch, by path, with its owner: finding the watches a
    change fires costs a lookup per path in L{watchedPaths} plus the
    watches found, however many others are registered.

    Owners are ranked (L{add}'s C{rank}: the server gives each connection
    a rank that grows with the order of connection), so that L{matching}
    gives the order in which the server scanning every connection's list
    in order would find them: by owner, then by registration.
    """

    def __init__(self) -> None:
        self._byPath: dict[bytes, dict[Watch, tuple[int, OwnerT]]] = {}
        self._serial = 0
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, watch: Watch, owner: OwnerT, rank: int) -> None:
        """Register C{watch} of C{owner}, ranked C{rank} among the owners."""
        self._serial += 1
        watch.serial = self._serial
        self._byPath.setdefault(watch.path, {})[watch] = (rank, owner)
        self._count += 1

    def remove(self, watch: Watch) -> None:
        """Forget C{watch} (it must be registered)."""
        watches = self._byPath[watch.path]
        del watches[watch]
        if not watches:
            del self._byPath[watch.path]
        self._count -= 1

    def matching(self, name: bytes, exact: bool) -> list[tuple[OwnerT, Watch]]:
        """
        The watches a change of C{name} fires (see the module docstring),
        each with its owner, ordered by owner rank, then registration.
        """
        byPath = self._byPath
        found: list[tuple[int, int, OwnerT, Watch]] = []
        for path in watchedPaths(name, exact):
            watches = byPath.get(path)
            if watches:
                found.extend((rank, w.serial, owner, w) for w, (rank, owner) in watches.items())
        if len(found) > 1:
            found.sort(key=_order)
        return [(owner, w) for _, _, owner, w in found]


def _order(entry: tuple[int, int, object, Watch]) -> tuple[int, int]:
    return entry[0], entry[1]


def encodeEvent(path: bytes, token: bytes) -> bytes | None:
    """The WATCH_EVENT payload, or None if too long to send (C drops it)."""
    from xenddev.xenstore.wire import PAYLOAD_MAX

    payload = path + b"\0" + token + b"\0"
    if len(payload) > PAYLOAD_MAX:
        return None
    return payload
