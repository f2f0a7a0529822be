# -*- test-case-name: tests.test_xenstored_units -*-
"""
The node tree of the embedded xenstored.

Memory matters (the target is within 3x of the C daemon with 100 000 nodes),
so most nodes are no object of their own. A parent's C{children} dict maps
each name to either
 - a L{Node}: a four-slot object (value, shared interned L{PermSet}, dict of
   children or None, generation count), for directories and for leaves that
   need one; or
 - a I{plain leaf}: just its value, a C{bytes} object, for a leaf whose
   permissions are its parent's and whose generation is the shared
   L{UNSEEN}. That is how most leaves are born (a new node inherits its
   parent's permissions) and what every write brings them back to: it saves
   the 64-byte node object on most of the 100 000 nodes of a big store.

Code outside this module sees plain leaves as L{Node}s: L{Tree.lookup}
returns a L{LeafView}, a detached copy that knows where it lives, and
changes go through the tree (L{Tree.setValue}, L{Tree.setPerms},
L{Tree.observe}, ...), which turns a plain leaf into a L{Node} when it needs
one. The permissions of plain leaves follow their parent's, so a parent's
own permission change first gives its plain children nodes of their own
(L{Tree.setPerms}), while a change applied to every node alike (releasing a
domain) needs nothing more.

Names and paths stay C{bytes}, as on the wire: nothing is decoded on the
hot path. Node names are interned per tree (the same few names, C{state},
C{backend}, device numbers, appear under thousands of parents) and are the
keys of the parent's dict, whose insertion order is the child order
xenstored reports.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Iterator

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
    """One node of the global tree (see the module docstring for plain leaves)."""

    __slots__ = ("children", "generation", "perms", "value")

    def __init__(
        self,
        value: bytes,
        perms: PermSet,
        generation: int = UNSEEN,
        children: dict[bytes, Entry] | None = None,
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
        childlen = sum(map(len, ch)) + len(ch) if ch else 0
        return RECORD_HEADER + RECORD_PERM * len(self.perms.entries) + len(self.value) + childlen


#: What a parent's dict holds for a child: a L{Node}, or a plain leaf's value.
Entry = Node | bytes


class LeafView(Node):
    """
    A plain leaf seen as a L{Node} (what L{Tree.lookup} returns for one): a
    copy made for one request, with the parent whose dict holds the leaf
    and its name there, so that the tree can change the leaf in place.
    Setting its attributes changes nothing in the tree.
    """

    __slots__ = ("name", "parent")

    def __init__(self, value: bytes, parent: Node, name: bytes) -> None:
        self.value = value
        self.perms = parent.perms
        self.generation = UNSEEN
        self.children = None
        self.parent = parent
        self.name = name


#: The smallest table of names L{Names} prunes.
_NAMES_MIN = 4096


def _refcounts(table: dict[bytes, bytes]) -> list[int]:
    # One function for the names in use and for the calibration probe, so
    # that both are counted with the same temporary references.
    return [sys.getrefcount(name) for name in table]


def _unusedRefcount() -> int:
    """The reference count L{_refcounts} sees for a name only the table holds."""
    probe = bytes(bytearray(b"probe"))  # a fresh object, not a shared constant
    table = {probe: probe}
    del probe
    return _refcounts(table)[0]


class Names:
    """
    The node names of one tree, interned: every child called C{state} shares
    one C{bytes} object. Names nothing else uses any more are dropped when
    the table has doubled since the last such pruning, so names that come and
    go (unique ids) cost amortised constant time and no lasting memory.
    """

    def __init__(self) -> None:
        self._table: dict[bytes, bytes] = {}
        self._limit = _NAMES_MIN

    def __len__(self) -> int:
        return len(self._table)

    def intern(self, name: bytes) -> bytes:
        """The shared object equal to C{name}."""
        table = self._table
        shared = table.setdefault(name, name)
        if shared is name and len(table) > self._limit:
            self.prune()
        return shared

    def prune(self) -> None:
        """Forget the names nothing but this table refers to."""
        unused = _unusedRefcount()
        table = self._table
        self._table = {
            name: name for name, refs in zip(table, _refcounts(table), strict=True) if refs > unused
        }
        self._limit = max(_NAMES_MIN, 2 * len(self._table))


# One pass for the characters, the double and the trailing slash.
_VALID = re.compile(rb"/(?:[A-Za-z0-9\-_@]+(?:/[A-Za-z0-9\-_@]+)*)?\Z")
_LOCAL = re.compile(rb"/local/domain/(-?[0-9]+)/")


def isValidNodename(path: bytes, maxPathLength: int) -> bool:
    """
    C{is_valid_nodename}: absolute, no trailing or double slash, only
    C{A-Za-z0-9-/_@}, and at most C{maxPathLength} bytes after a leading
    C{/local/domain/<id>/} (the whole path otherwise).
    """
    if _VALID.match(path) is None:
        return False
    if len(path) <= maxPathLength:
        return True
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


def baseName(path: bytes) -> bytes:
    """The last component of C{path}."""
    return path[path.rfind(b"/") + 1 :]


class Tree:
    """
    The global tree: the root node, the global generation counter, the
    per-domain count of owned nodes (the node quota) and the interned names.
    """

    def __init__(self) -> None:
        self.generation = 0
        self.entries: dict[int, int] = {}
        self.root = Node(b"", DEFAULT_PERMS)
        self.names = Names()

    def nextGeneration(self) -> int:
        """C{++generation}: every write, delete, and transaction start."""
        self.generation += 1
        return self.generation

    # Reading

    def lookup(self, path: bytes) -> Node | None:
        """
        The node at an absolute C{path} (a L{LeafView} for a plain leaf), or
        None. Any C{path} is safe: one that is not a valid node name finds
        nothing, as no node has such a name.
        """
        node = self.root
        if path == b"/":
            return node
        names = path[1:].split(b"/")
        last = names.pop()
        for name in names:
            ch = node.children
            if ch is None:
                return None
            nxt = ch.get(name)
            if nxt is None or type(nxt) is bytes:
                return None
            node = nxt  # type: ignore[assignment]  # Node: not None, not bytes
        ch = node.children
        if ch is None:
            return None
        entry = ch.get(last)
        if type(entry) is bytes:
            return LeafView(entry, node, last)
        return entry  # type: ignore[return-value]  # Node or None

    def generationOf(self, path: bytes) -> int:
        """The generation of the node at C{path}, L{NO_GENERATION} if none."""
        node = self.lookup(path)
        return NO_GENERATION if node is None else node.generation

    def observe(self, node: Node) -> int:
        """
        The generation of a global C{node}, giving it a fresh one if it is
        L{UNSEEN}: two observations of a node are equal exactly when it has
        not changed in between (every change resets it to L{UNSEEN}). A
        plain leaf becomes a L{Node} to hold its number.
        """
        gen = node.generation
        if gen == UNSEEN:
            self.generation += 1
            gen = self.generation
            if type(node) is LeafView:
                node.parent.children[node.name] = Node(node.value, node.perms, gen)  # type: ignore[index]
            else:
                node.generation = gen
        return gen

    def walk(self, path: bytes = b"/", node: Node | None = None) -> Iterator[tuple[bytes, Node]]:
        """
        Every (path, node) below and including C{path}, parents first;
        plain leaves as L{LeafView}s.
        """
        if node is None:
            node = self.lookup(path)
            if node is None:
                return
        stack = [(path, node)]
        while stack:
            p, n = stack.pop()
            yield p, n
            if n.children:
                stack.extend(
                    (childPath(p, name), LeafView(c, n, name) if isinstance(c, bytes) else c)
                    for name, c in reversed(n.children.items())
                )

    def nodes(self) -> Iterator[Node]:
        """Every L{Node} object of the tree (not the plain leaves)."""
        stack = [self.root]
        while stack:
            n = stack.pop()
            yield n
            if n.children:
                stack.extend(c for c in n.children.values() if type(c) is not bytes)  # type: ignore[misc]

    def subtree(
        self, path: bytes, node: Node, parent: Node
    ) -> list[tuple[bytes, PermSet, PermSet]]:
        """
        C{(path, perms, parent's perms)} of C{node} (at C{path}, a child of
        C{parent}) and of everything below it: children before their parent,
        in child order (the order C removes them in).
        """
        out: list[tuple[bytes, PermSet, PermSet]] = []
        stack: list[tuple[bytes, Entry, PermSet, bool]] = [(path, node, parent.perms, False)]
        while stack:
            p, n, up, expanded = stack.pop()
            if type(n) is bytes:
                out.append((p, up, up))
                continue
            assert isinstance(n, Node)
            if expanded or not n.children:
                out.append((p, n.perms, up))
                continue
            stack.append((p, n, up, True))
            perms = n.perms
            stack.extend(
                (childPath(p, name), c, perms, False) for name, c in reversed(n.children.items())
            )
        return out

    # Changing

    def materialize(self, node: Node) -> Node:
        """The L{Node} in the tree for C{node}, making one for a plain leaf."""
        if type(node) is LeafView:
            real = Node(node.value, node.perms)
            node.parent.children[node.name] = real  # type: ignore[index]
            return real
        return node

    def nodeAt(self, path: bytes) -> Node | None:
        """The L{Node} at C{path} (made for a plain leaf), or None."""
        node = self.lookup(path)
        return None if node is None else self.materialize(node)

    def setValue(self, node: Node, value: bytes) -> None:
        """A write of the global C{node}'s value."""
        if type(node) is LeafView:
            node.parent.children[node.name] = value  # type: ignore[index]
        else:
            node.generation = UNSEEN
        node.value = value

    def setPerms(self, node: Node, perms: PermSet) -> None:
        """A change of the global C{node}'s permissions."""
        if type(node) is LeafView:
            if perms is not node.perms:
                node.parent.children[node.name] = Node(node.value, perms)  # type: ignore[index]
        else:
            if perms is not node.perms:
                self._pin(node)
            node.generation = UNSEEN
        node.perms = perms

    def _pin(self, node: Node) -> None:
        # C{node}'s permissions are about to change: its plain children keep
        # the current ones, so they need nodes of their own.
        ch = node.children
        if ch:
            perms = node.perms
            for name, c in list(ch.items()):
                if type(c) is bytes:
                    ch[name] = Node(c, perms)

    def create(self, parent: Node, paths: list[bytes], value: bytes, perms: PermSet) -> PermSet:
        """
        Create the missing C{paths} below C{parent} (top-down: C{paths[0]}
        is C{parent}'s new child, C{paths[-1]} gets C{value}, the others
        are empty), all with C{perms}. Return the permissions of the new
        leaf's parent.
        """
        up = self.materialize(parent)
        up.generation = UNSEEN
        intern = self.names.intern
        for path in paths[:-1]:
            node = Node(b"", perms)
            self._attach(up, intern(baseName(path)), node)
            up = node
        name = intern(baseName(paths[-1]))
        self._attach(up, name, value if perms is up.perms else Node(value, perms))
        self.countEntry(perms.owner, len(paths))
        return up.perms

    @staticmethod
    def _attach(parent: Node, name: bytes, entry: Entry) -> None:
        if parent.children is None:
            parent.children = {name: entry}
        else:
            parent.children[name] = entry

    def removeChild(self, parent: Node, name: bytes) -> None:
        """Take C{name} (and what is below it) out of C{parent}."""
        ch = parent.children
        assert ch is not None
        del ch[name]
        if not ch:
            parent.children = None
        parent.generation = UNSEEN

    def rewrite(
        self,
        path: bytes,
        value: bytes,
        perms: PermSet,
        childNames: list[bytes],
        dropped: Iterable[bytes] = (),
    ) -> bool:
        """
        Make the node at C{path} have this value, these permissions and
        these children, in this order (a transaction's commit, parents
        first): the children it already had stay as they are, a new one is
        an empty placeholder that the transaction's own entry for it fills
        in later. C{dropped} names children the transaction removed (a
        hint: see L{_updateChildren}). A L{Node} is updated in place (transactions read it, and
        will again); a new or plain leaf is stored plain if it can be.
        Return False if the parent is missing.
        """
        parent: Node | None = None
        name = b""
        if path == b"/":
            old: Entry | None = self.root
        else:
            parent = self.nodeAt(parentOf(path))
            if parent is None:
                return False
            name = baseName(path)
            old = parent.children.get(name) if parent.children else None
        children: dict[bytes, Entry] | None = None
        if childNames:
            oldChildren = old.children if isinstance(old, Node) else None
            if oldChildren:
                assert isinstance(old, Node)
                if perms is not old.perms:
                    self._pin(old)
                children = self._updateChildren(oldChildren, childNames, dropped)
            else:
                intern = self.names.intern
                children = {intern(n): b"" for n in childNames}
        if isinstance(old, Node):
            old.value, old.perms, old.generation, old.children = value, perms, UNSEEN, children
            return True
        assert parent is not None
        if old is None:
            name = self.names.intern(name)
        if children is None and perms is parent.perms:
            self._attach(parent, name, value)
        else:
            self._attach(parent, name, Node(value, perms, UNSEEN, children))
        return True

    def _updateChildren(
        self, old: dict[bytes, Entry], names: list[bytes], dropped: Iterable[bytes]
    ) -> dict[bytes, Entry]:
        """
        C{old} (a node's children) made to hold C{names}, in this order:
        each name keeps the entry it had, a new one gets an empty
        placeholder. A transaction's list is its copy of C{old}'s names
        with the C{dropped} ones taken out and new ones appended, so
        C{old} is changed in place, with one list comparison (over all the
        children, but at C speed, mostly identity checks) and a step per
        name dropped or added: a commit under a parent with 10 000
        children must not cost a Python step per child. Any other order
        is rebuilt.
        """
        intern = self.names.intern
        gone: dict[bytes, Entry] = {}
        for name in dropped:
            if name in old:
                gone[name] = old.pop(name)
        cut = len(old)
        if list(old) != names[:cut]:
            gone.update(old)
            return {intern(n): gone.get(n, b"") for n in names}
        for name in names[cut:]:
            old.setdefault(intern(name), gone.get(name, b""))
        return old

    def insert(self, path: bytes, value: bytes, perms: PermSet) -> bool:
        """Add a childless node below an existing parent (loading a tree)."""
        if path == b"/":
            self.root.value, self.root.perms = value, perms
            return True
        parent = self.nodeAt(parentOf(path))
        if parent is None:
            return False
        name = self.names.intern(baseName(path))
        self._attach(parent, name, value if perms is parent.perms else Node(value, perms))
        return True

    # The node quota

    def countEntry(self, domid: int, delta: int) -> None:
        """Adjust the number of nodes owned by C{domid}."""
        n = self.entries.get(domid, 0) + delta
        if n:
            self.entries[domid] = n
        else:
            self.entries.pop(domid, None)

    def recount(self) -> None:
        """Recompute the per-domain node counts (after loading a tree)."""
        self.entries = {}
        for node in self.nodes():
            ch = node.children
            plain = sum(1 for c in ch.values() if type(c) is bytes) if ch else 0
            self.countEntry(node.perms.owner, 1 + plain)
