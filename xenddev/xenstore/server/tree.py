# -*- test-case-name: tests.test_xenstored_units -*-
"""
The node tree of the embedded xenstored.

Memory matters (the target is within 3x of the C daemon with 100 000 nodes),
so a node is a four-slot object: its value (bytes), its permission set (a
shared, interned L{PermSet}), a dict of children (None for a leaf) and its
generation count (the shared L{UNSEEN} until someone needs a number). Names
and paths stay C{bytes}, as on the wire: nothing is decoded on the hot path.
Node names are the keys of the parent's dict, whose insertion order is the
child order xenstored reports.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

PERM_NONE = 0
PERM_READ = 1
PERM_WRITE = 2
PERM_OWNER = 8
#: Set by the C daemon on entries naming domains that do not exist.
PERM_IGNORE = 16
PERM_ALL = PERM_READ | PERM_WRITE | PERM_OWNER

_LETTER_BITS = {ord("n"): PERM_NONE, ord("r"): PERM_READ, ord("w"): PERM_WRITE, ord("b"): 3}
_BITS_LETTER = {PERM_NONE: "n", PERM_READ: "r", PERM_WRITE: "w", 3: "b"}

#: The generation of a node that does not exist (C NO_GENERATION, ~0).
NO_GENERATION = 0xFFFFFFFFFFFFFFFF

#: The generation of a global node that changed since anyone last looked at
#: its generation. A real number is handed out on demand (L{Tree.observe}):
#: only a transaction's read and DIRECTORY_PART need one, and most of the
#: 100 000 nodes of a big store never meet either, so they share this small
#: int instead of holding an int object of their own (32 bytes each).
UNSEEN = 0

#: C{sizeof(struct xs_tdb_record_hdr)} and C{sizeof(struct xs_permissions)}:
#: the node-size quota counts the record as the C daemon stores it.
RECORD_HEADER = 24
RECORD_PERM = 8


class PermSet:
    """
    An immutable permission list: owner entry first. Instances are interned
    by L{PermSet.make}, so the thousands of nodes sharing one list share one
    object (and its encoded form).

    @ivar entries: C{((domid, bits), ...)}; the first is the owner and the
        default access.
    @ivar wire: the GET_PERMS payload (C{"b5\\0r7\\0"}).
    """

    __slots__ = ("entries", "owner", "wire")

    _interned: dict[tuple[tuple[int, int], ...], PermSet] = {}

    entries: tuple[tuple[int, int], ...]
    owner: int
    wire: bytes

    @classmethod
    def make(cls, entries: tuple[tuple[int, int], ...]) -> PermSet:
        """Return the interned set for C{entries}."""
        p = cls._interned.get(entries)
        if p is None:
            p = object.__new__(cls)
            p.entries = entries
            p.owner = entries[0][0]
            p.wire = b"".join(_permToString(d, b).encode() + b"\0" for d, b in entries)
            cls._interned[entries] = p
        return p

    @classmethod
    def interned(cls) -> list[PermSet]:
        """Every permission set made so far (a superset of those in use)."""
        return list(cls._interned.values())

    def withOwner(self, domid: int) -> PermSet:
        """The same list with another owner (what an unprivileged creator gets)."""
        if domid == self.owner:
            return self
        return PermSet.make(((domid, self.entries[0][1]), *self.entries[1:]))

    def __repr__(self) -> str:
        return f"PermSet({self.wire!r})"

    def __reduce__(self) -> tuple[object, ...]:
        return (PermSet.make, (self.entries,))


def _permToString(domid: int, bits: int) -> str:
    # The C daemon prints the id with "%i" of an unsigned int.
    signed = domid - (1 << 32) if domid >= 1 << 31 else domid
    return f"{_BITS_LETTER[bits & 3]}{signed}"


DEFAULT_PERMS = PermSet.make(((0, PERM_NONE),))

_STRTOL = re.compile(rb"[ \t\n\v\f\r]*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)\Z")


def cStrtol(text: bytes) -> int | None:
    """
    C{strtol(text, &end, 0)} that must consume all of C{text}: decimal, octal
    (leading 0) or hex (0x); None if C{*end} would not be the NUL.
    """
    m = _STRTOL.match(text)
    if m is None:
        return None
    digits = m.group(2)
    if digits[:2] in (b"0x", b"0X"):
        v = int(digits[2:], 16)
    elif digits.startswith(b"0") and len(digits) > 1:
        v = int(digits[1:], 8)
    else:
        v = int(digits)
    if m.group(1) == b"-":
        v = -v
    # long is 64 bits; strtol saturates, the unsigned int field truncates.
    v = max(min(v, (1 << 63) - 1), -(1 << 63))
    return v & 0xFFFFFFFF


def parsePerms(strings: list[bytes]) -> PermSet | None:
    """Parse SET_PERMS entries as C{xs_strings_to_perms}; None means EINVAL."""
    entries = []
    for s in strings:
        if not s:
            return None
        bits = _LETTER_BITS.get(s[0])
        if bits is None:
            return None
        domid = cStrtol(s[1:]) if len(s) > 1 else None
        if domid is None:
            return None
        entries.append((domid, bits))
    return PermSet.make(tuple(entries))


def cAtoi(text: bytes) -> int:
    """C{atoi}: leading blanks, sign, digits; anything else ends it."""
    m = re.match(rb"[ \t\n\v\f\r]*([+-]?[0-9]*)", text)
    assert m is not None
    s = m.group(1)
    try:
        v = int(s)
    except ValueError:
        return 0
    return max(min(v, (1 << 31) - 1), -(1 << 31))


class Node:
    """One node of the global tree (see the module docstring for why slots)."""

    __slots__ = ("children", "generation", "perms", "value")

    def __init__(
        self,
        value: bytes,
        perms: PermSet,
        generation: int,
        children: dict[bytes, Node] | None = None,
    ) -> None:
        self.value = value
        self.perms = perms
        self.generation = generation
        self.children = children

    def childNames(self) -> list[bytes]:
        """The children's names, in xenstored's order."""
        return list(self.children) if self.children else []

    def childBytes(self) -> bytes:
        """The DIRECTORY payload: each name NUL-terminated."""
        ch = self.children
        if not ch:
            return b""
        return b"\0".join(ch) + b"\0"

    def recordSize(self) -> int:
        """Size of the C daemon's record for this node (node-size quota)."""
        ch = self.children
        childlen = sum(len(n) + 1 for n in ch) if ch else 0
        return RECORD_HEADER + RECORD_PERM * len(self.perms.entries) + len(self.value) + childlen


_VALID = re.compile(rb"/[A-Za-z0-9\-/_@]*\Z")
_LOCAL = re.compile(rb"/local/domain/(-?[0-9]+)/")


def isValidNodename(path: bytes, maxPathLength: int) -> bool:
    """
    C{is_valid_nodename}: absolute, no trailing or double slash, only
    C{A-Za-z0-9-/_@}, and at most C{maxPathLength} bytes after a leading
    C{/local/domain/<id>/} (the whole path otherwise).
    """
    if _VALID.match(path) is None:
        return False
    if len(path) > 1 and path.endswith(b"/"):
        return False
    if b"//" in path:
        return False
    m = _LOCAL.match(path)
    # sscanf's %5u reads at most five characters of the id.
    off = m.end() if m is not None and len(m.group(1)) <= 5 else 0
    return len(path) <= off + maxPathLength


def parentOf(path: bytes) -> bytes:
    """C{get_parent}: the path without its last component (C{/} for C{/x})."""
    i = path.rfind(b"/")
    return path[:i] if i > 0 else b"/"


def childPath(parent: bytes, name: bytes) -> bytes:
    """Join a parent path and a child name."""
    return b"/" + name if parent == b"/" else parent + b"/" + name


class Tree:
    """
    The global tree: the root node, the global generation counter and the
    per-domain count of owned nodes (the node quota).
    """

    def __init__(self) -> None:
        self.generation = 0
        self.entries: dict[int, int] = {}
        self.root = Node(b"", DEFAULT_PERMS, UNSEEN)

    def nextGeneration(self) -> int:
        """C{++generation}: every write, delete, and transaction start."""
        self.generation += 1
        return self.generation

    def observe(self, node: Node) -> int:
        """
        The generation of a global C{node}, giving it a fresh one if it is
        L{UNSEEN}: two observations of a node are equal exactly when it has
        not changed in between (every change resets it to L{UNSEEN}).
        """
        gen = node.generation
        if gen == UNSEEN:
            self.generation += 1
            gen = node.generation = self.generation
        return gen

    def lookup(self, path: bytes) -> Node | None:
        """The node at an absolute, valid C{path}, or None."""
        node = self.root
        if path == b"/":
            return node
        for name in path[1:].split(b"/"):
            ch = node.children
            if ch is None:
                return None
            nxt = ch.get(name)
            if nxt is None:
                return None
            node = nxt
        return node

    def countEntry(self, domid: int, delta: int) -> None:
        """Adjust the number of nodes owned by C{domid}."""
        n = self.entries.get(domid, 0) + delta
        if n:
            self.entries[domid] = n
        else:
            self.entries.pop(domid, None)

    def walk(self, path: bytes = b"/", node: Node | None = None) -> Iterator[tuple[bytes, Node]]:
        """Every (path, node) below and including C{path}, parents first."""
        if node is None:
            node = self.lookup(path)
            if node is None:
                return
        stack = [(path, node)]
        while stack:
            p, n = stack.pop()
            yield p, n
            if n.children:
                stack.extend((childPath(p, name), c) for name, c in reversed(n.children.items()))

    def recount(self) -> None:
        """Recompute the per-domain node counts (after loading a tree)."""
        self.entries = {}
        for _, node in self.walk():
            self.countEntry(node.perms.owner, 1)
