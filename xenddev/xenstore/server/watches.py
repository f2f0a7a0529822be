# -*- test-case-name: tests.test_xenstored_units -*-
"""
Watch registrations and the C xenstored matching rules.

A change of node C{name} fires every watch on C{name} or an ancestor of it
(C{exact=False}: writes, and the top of a removed subtree), or only the
watches on exactly C{name} (C{exact=True}: each removed descendant, so a
watch below a removed node fires with its own path). The event path is the
node's path, made relative again for a watch registered relative.
"""

from __future__ import annotations


class Watch:
    """
    One registration: C{path} is absolute (or C{@...}), C{prefix} is the
    connection's home path when the watch was given relative, else None.
    """

    __slots__ = ("path", "prefix", "token")

    def __init__(self, path: bytes, token: bytes, prefix: bytes | None) -> None:
        self.path = path
        self.token = token
        self.prefix = prefix

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


def encodeEvent(path: bytes, token: bytes) -> bytes | None:
    """The WATCH_EVENT payload, or None if too long to send (C drops it)."""
    from xenddev.xenstore.wire import PAYLOAD_MAX

    payload = path + b"\0" + token + b"\0"
    if len(payload) > PAYLOAD_MAX:
        return None
    return payload
