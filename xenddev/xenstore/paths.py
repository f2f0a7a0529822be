# -*- test-case-name: tests.test_xenstore_paths -*-
"""
XenStore path, node-name and permission syntax, checked before anything is
sent.

The rules are xenstored's (Xen 4.17 C{is_valid_nodename}): characters
C{A-Za-z0-9-/_@}; an absolute path starts with C{/}, has no trailing C{/}
(except the root) and no C{//}; at most L{ABS_PATH_MAX} bytes absolute,
L{REL_PATH_MAX} relative. pyxs's C{check_path} gets the relative limit wrong
(C{posixpath.abspath} is always truthy, so every path may be 3072 bytes);
this module replaces it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import attrs

from xenddev.xenstore.errors import (
    InvalidArgumentError,
    InvalidPathError,
    InvalidPermissionError,
)
from xenddev.xenstore.wire import ABS_PATH_MAX, REL_PATH_MAX

_VALID_CHARS = re.compile(r"[A-Za-z0-9\-/_@]*\Z")
_NODE_NAME = re.compile(r"[A-Za-z0-9\-_@]+\Z")
_DOMID_TEXT = re.compile(r"[0-9]{1,10}\Z")

#: The special watch paths xenstored fires on domain introduction/release.
SPECIAL_WATCH_PATHS = frozenset({"@introduceDomain", "@releaseDomain"})

#: Domain ids are 16 bits; DOMID_FIRST_RESERVED (0x7FF0) and above are
#: special ids (DOMID_SELF, DOMID_IDLE, ...) that never own nodes.
DOMID_FIRST_RESERVED = 0x7FF0
DOMID_MAX = 0xFFFF


def _ascii(path: object, what: str = "path") -> str:
    if isinstance(path, bytes):
        try:
            path = path.decode("ascii")
        except UnicodeDecodeError:
            raise InvalidPathError(path, f"{what} is not ASCII") from None
    if not isinstance(path, str):
        raise InvalidPathError(path, f"{what} must be a string, not {type(path).__name__}")
    return path


#: Paths already found valid, each with its request argument (ASCII then a
#: NUL). A toolstack uses the same few thousand paths over and over;
#: checking and encoding them was a measurable share of a request's cost.
#: Read by the client's hot path; only this module writes it.
VALID_PATHS: dict[str, bytes] = {}
_VALID_PATHS_MAX = 8192


def validatePath(path: object) -> str:
    """
    Check an absolute or relative XenStore path and return it as C{str}.

    @raise InvalidPathError: naming the broken rule.
    """
    if type(path) is str and path in VALID_PATHS:
        return path
    return pathArgument(path)[0]


def pathArgument(path: object) -> tuple[str, bytes]:
    """
    Check a path (as L{validatePath}) and return it both as C{str} and as a
    request argument: its ASCII bytes followed by a NUL. Both are cached in
    L{VALID_PATHS}.

    @raise InvalidPathError: naming the broken rule.
    """
    if type(path) is str:
        known = VALID_PATHS.get(path)
        if known is not None:
            return path, known
    p = _checkPath(path)
    encoded = p.encode("ascii") + b"\0"
    if len(VALID_PATHS) >= _VALID_PATHS_MAX:
        VALID_PATHS.clear()
    # Only exact str keys: a str subclass may hash or compare differently.
    if type(p) is str:
        VALID_PATHS[p] = encoded
    return p, encoded


def _checkPath(path: object) -> str:
    p = _ascii(path)
    if not p:
        raise InvalidPathError(path, "empty path")
    bad = _VALID_CHARS.match(p)
    if bad is None:
        badChar = next(c for c in p if not _VALID_CHARS.match(c))
        raise InvalidPathError(
            path, f"character {badChar!r} not allowed (only A-Z a-z 0-9 - / _ @)"
        )
    if "//" in p:
        raise InvalidPathError(path, "contains '//'")
    if p.startswith("/"):
        if len(p) > 1 and p.endswith("/"):
            raise InvalidPathError(path, "trailing '/'")
        if len(p) > ABS_PATH_MAX:
            raise InvalidPathError(
                path, f"{len(p)} bytes long, absolute paths are limited to {ABS_PATH_MAX}"
            )
    else:
        if p.endswith("/"):
            raise InvalidPathError(path, "trailing '/'")
        if len(p) > REL_PATH_MAX:
            raise InvalidPathError(
                path, f"{len(p)} bytes long, relative paths are limited to {REL_PATH_MAX}"
            )
    return p


def validateWatchPath(path: object) -> str:
    """Check a watch path: a valid path or one of L{SPECIAL_WATCH_PATHS}."""
    p = _ascii(path)
    if p.startswith("@"):
        if p not in SPECIAL_WATCH_PATHS:
            raise InvalidPathError(
                path, "special watch paths are " + " and ".join(sorted(SPECIAL_WATCH_PATHS))
            )
        return p
    return validatePath(p)


def validateNodeName(name: object) -> str:
    """Check a single path component (no C{/}), e.g. a key under a device."""
    n = _ascii(name, "node name")
    if not _NODE_NAME.match(n):
        raise InvalidPathError(name, "a node name is one or more of A-Z a-z 0-9 - _ @")
    return n


def joinPath(base: str, *names: object) -> str:
    """
    Append validated node names to C{base}: C{joinPath("/a", "b", 3)} is
    C{"/a/b/3"}. Each name must be a single component, so a caller cannot be
    tricked into escaping C{base} with a crafted name.
    """
    parts = [base.rstrip("/") if base != "/" else ""]
    for name in names:
        parts.append(validateNodeName(str(name) if isinstance(name, int) else name))
    return validatePath("/".join(parts) or "/")


def validateDomid(domid: object) -> int:
    """Check a domain id (0 .. 65535) and return it as C{int}."""
    if isinstance(domid, bool) or not isinstance(domid, int):
        if isinstance(domid, str) and _DOMID_TEXT.match(domid):
            domid = int(domid)
        else:
            raise InvalidArgumentError(f"domain id must be an integer, not {domid!r}")
    assert isinstance(domid, int)
    if not 0 <= domid <= DOMID_MAX:
        raise InvalidArgumentError(f"domain id {domid} out of range 0..{DOMID_MAX}")
    return domid


def validateToken(token: object) -> str:
    """A watch token: non-empty text without NUL (it travels as a C string)."""
    if not isinstance(token, str) or not token or "\0" in token:
        raise InvalidArgumentError(f"watch token must be non-empty text without NUL: {token!r}")
    return token


_PERM = re.compile(r"([nrwb])([0-9]{1,10})\Z")


@attrs.frozen
class Perm:
    """
    One XenStore permission entry.

    The first entry of a node's list names its owner (who may do anything) and
    the access everyone else gets by default; each further entry grants a
    domain C{n}one, C{r}ead, C{w}rite or C{b}oth.
    """

    access: str = attrs.field(validator=attrs.validators.in_(("n", "r", "w", "b")))
    domid: int = attrs.field(converter=validateDomid)

    @classmethod
    def parse(cls, text: object) -> Perm:
        """Parse C{"r5"} into C{Perm("r", 5)}."""
        if isinstance(text, bytes):
            text = text.decode("ascii", "replace")
        if not isinstance(text, str):
            raise InvalidPermissionError(f"permission must be text like 'r5', not {text!r}")
        m = _PERM.match(text)
        if m is None:
            raise InvalidPermissionError(
                f"invalid permission {text!r}: expected n, r, w or b followed by a domid"
            )
        try:
            return cls(m.group(1), int(m.group(2)))
        except InvalidArgumentError as e:
            raise InvalidPermissionError(f"invalid permission {text!r}: {e}") from None

    def __str__(self) -> str:
        return f"{self.access}{self.domid}"

    @property
    def canRead(self) -> bool:
        """Whether this entry grants read access."""
        return self.access in ("r", "b")

    @property
    def canWrite(self) -> bool:
        """Whether this entry grants write access."""
        return self.access in ("w", "b")


def parsePerms(perms: Iterable[Perm | str]) -> list[Perm]:
    """
    Normalise a permission list given as L{Perm}s or strings.

    @raise InvalidPermissionError: if the list is empty or an entry is bad.
    """
    result = [p if isinstance(p, Perm) else Perm.parse(p) for p in perms]
    if not result:
        raise InvalidPermissionError("a permission list needs at least the owner entry")
    return result
