# -*- test-case-name: tests.test_xenstored_units -*-
"""
Saving and loading the tree (C{--state FILE}).

The format is a small line-oriented text file, one node per line, parents
first: C{<path> <perms> <value>} with each field percent-free hex where
needed. It is written to a temporary file in the same directory, fsynced and
renamed over the old one, so a crash leaves either the old or the new state,
never half of one.
"""

from __future__ import annotations

import os
import tempfile

from xenddev.xenstore.server.tree import PermSet, Tree

MAGIC = b"xenddev-xenstored-state 1\n"


def _perms(p: PermSet) -> bytes:
    return b",".join(b"%d:%d" % (d, b) for d, b in p.entries)


def dumpTree(tree: Tree) -> bytes:
    """Serialise every node of C{tree}, parents before children."""
    lines = [MAGIC]
    for path, node in tree.walk():
        lines.append(
            b"%s %s %s\n" % (path.hex().encode(), _perms(node.perms), node.value.hex().encode())
        )
    return b"".join(lines)


def loadTree(data: bytes) -> Tree:
    """Rebuild a tree from L{dumpTree}'s output."""
    if not data.startswith(MAGIC):
        raise ValueError("not a xenddev xenstored state file")
    tree = Tree()
    for line in data[len(MAGIC) :].splitlines():
        if not line:
            continue
        hpath, hperms, hvalue = line.split(b" ")
        path = bytes.fromhex(hpath.decode())
        entries = tuple((int(d), int(b)) for d, b in (e.split(b":") for e in hperms.split(b",")))
        perms = PermSet.make(entries)
        value = bytes.fromhex(hvalue.decode())
        if not tree.insert(path, value, perms):
            raise ValueError(f"state file lists {path!r} before its parent")
    tree.recount()
    return tree


def saveTree(tree: Tree, filename: str) -> None:
    """Write C{tree} to C{filename} atomically (temporary file + rename)."""
    directory = os.path.dirname(os.path.abspath(filename))
    fd, tmp = tempfile.mkstemp(prefix=".xenstored-state-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(dumpTree(tree))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, filename)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def readTree(filename: str) -> Tree | None:
    """The tree saved in C{filename}, or None if there is no such file."""
    try:
        with open(filename, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    return loadTree(data)
