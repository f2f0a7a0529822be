"""
Whole-tree snapshots, for tests that check a failed operation left XenStore
exactly as it was.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, gatherResults

#: Nodes a store writes by itself and that change without any client action.
VOLATILE_PREFIXES = ("/tool/xenstored",)

#: A snapshot: path -> (value, permissions as strings).
Tree = dict[str, tuple[str, tuple[str, ...]]]


async def dumpTree(xs: Any, root: str = "/") -> Tree:
    """Every node under C{root}: path -> (value, permissions as strings)."""
    out: Tree = {}

    async def visit(path: str) -> None:
        if path.startswith(VOLATILE_PREFIXES):
            return
        value, perms, children = await gatherResults(
            [xs.readOrNone(path), xs.getPerms(path), xs.ls(path)]
        )
        out[path] = (value or "", tuple(str(p) for p in perms))
        base = "" if path == "/" else path
        await gatherResults([Deferred.fromCoroutine(visit(f"{base}/{c}")) for c in children])

    await visit(root)
    return out


def diffTrees(before: Tree, after: Tree) -> list[str]:
    """Human-readable differences (empty when the trees are equal)."""
    lines = []
    for path in sorted(set(before) | set(after)):
        if path not in after:
            lines.append(f"- {path} = {before[path]!r}")
        elif path not in before:
            lines.append(f"+ {path} = {after[path]!r}")
        elif before[path] != after[path]:
            lines.append(f"~ {path}: {before[path]!r} -> {after[path]!r}")
    return lines
