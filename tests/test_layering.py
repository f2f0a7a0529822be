"""
The import rules of the tree, checked on the source with C{ast}.

Every import counts: at module level, inside functions, and under
C{if TYPE_CHECKING:}. L{RULES} is the table of allowed arrows: each layer
(a package prefix) lists the layers of C{xenddev} it may import; a layer
missing from the table is not checked yet. Cycles are looked for among the
modules of each layer in L{ACYCLIC}.
"""

from __future__ import annotations

import ast
import os
from collections.abc import Iterator

from twisted.trial.unittest import SynchronousTestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: layer -> the layers under C{xenddev} its modules may import (itself
#: always). Imports from outside C{xenddev} (the standard library, Twisted,
#: zope, attrs, pyxs) are not limited here.
_FOUNDATION = ("xenddev.errors", "xenddev.interfaces", "xenddev.xenstore", "xenddev.keyedlocks")
#: Facts of Xen that either wing may use: xenbus states and paths, disk
#: specs, the tools' interfaces (tap-ctl, QMP, libxenctrl).
_XEN = ("xenddev.xenbus", "xenddev.diskspec", "xenddev.tapctl", "xenddev.qmp", "xenddev.xenctrl")
#: What both wings stand on: seed 000's vocabulary and seed 002's data paths.
_SHARED = (*_FOUNDATION, *_XEN, "xenddev.backendctrl", "xenddev.datapath")

RULES: dict[str, tuple[str, ...]] = {
    # The bottom: bytes, paths and the error root.
    "xenddev.errors": (),
    "xenddev.xenstore": (),
    "xenddev.interfaces": ("xenddev.xenstore",),
    "xenddev.rpcclient": (),
    "xenddev.keyedlocks": (),
    # Facts of Xen and of its tools.
    "xenddev.xenbus": _FOUNDATION,
    "xenddev.diskspec": ("xenddev.errors",),
    "xenddev.tapctl": _FOUNDATION,
    "xenddev.qmp": ("xenddev.errors",),
    "xenddev.xenctrl": ("xenddev.errors",),
    "xenddev.sxp": ("xenddev.errors",),
    # Pools over etcd (issue 14): the error root only, nothing of the wings.
    "xenddev.pool": ("xenddev.errors",),
    # Seed 000's vocabulary, then seed 002's data paths on it.
    "xenddev.backendctrl": (*_FOUNDATION, "xenddev.xenbus"),
    "xenddev.datapath": (*_FOUNDATION, "xenddev.backendctrl", "xenddev.qmp", "xenddev.tapctl"),
    # The stand-ins for kernel ends: xenbus facts only.
    "xenddev.simulator": (*_FOUNDATION, "xenddev.xenbus"),
    # The two wings: neither imports the other.
    "xenddev.toolstack": _SHARED,
    "xenddev.driverdomain": (*_SHARED, "xenddev.simulator"),
    # Device classes, on the toolstack wing only.
    "xenddev.controllers": (*_SHARED, "xenddev.toolstack"),
    # The daemon: config, storage control, the RPC face, the wiring.
    "xenddev.config": (
        "xenddev.errors",
        "xenddev.driverdomain.kinds",
        "xenddev.pool",
        "xenddev.poolpeers",
    ),
    "xenddev.storagectl": (*_SHARED,),
    "xenddev.metrics": ("xenddev.xenstore",),
    # The activation guards (the toolstack knows only their interface):
    # one host's from the toolstack's records, a pool's over etcd; the
    # pool host's session and its self-fence on the data paths.
    "xenddev.localguard": (*_SHARED, "xenddev.toolstack", "xenddev.pool"),
    "xenddev.poolguard": (*_FOUNDATION, "xenddev.toolstack", "xenddev.pool", "xenddev.localguard"),
    "xenddev.poolfence": _SHARED,
    # The lease a daemon leaves for the next one (its run directory's record).
    "xenddev.poolleasefile": ("xenddev.errors",),
    "xenddev.poolmember": (
        "xenddev.errors",
        "xenddev.pool",
        "xenddev.poolfence",
        "xenddev.poolleasefile",
    ),
    # The fence watchdog (a process of its own) and the daemon's link to it.
    "xenddev.fencewatchdog": _SHARED,
    "xenddev.poolwatchdog": (*_SHARED, "xenddev.pool", "xenddev.fencewatchdog"),
    # The other hosts' daemons, asked over XML-RPC.
    "xenddev.poolpeers": ("xenddev.errors", "xenddev.interfaces", "xenddev.pool"),
    # The storage side of migration across hosts: the coordinator.
    "xenddev.poolmigration": (
        *_FOUNDATION,
        "xenddev.toolstack",
        "xenddev.pool",
        "xenddev.poolguard",
        "xenddev.poolpeers",
    ),
    # Its XML-RPC face (migrate.*), added by the wiring beside xmlrpc's namespaces.
    "xenddev.migraterpc": (
        *_FOUNDATION,
        "xenddev.pool",
        "xenddev.poolmigration",
        "xenddev.xmlrpc",
    ),
    # The pool-wide data-path registry: publishing, finding, pool-wide quiesce.
    "xenddev.pooldatapaths": (*_SHARED, "xenddev.pool", "xenddev.storagectl"),
    # Limits on the HTTP face; parts as child services; the fail-fast store.
    "xenddev.httplimits": (),
    "xenddev.lifecycle": (),
    "xenddev.xsguard": ("xenddev.errors", "xenddev.xenstore"),
    "xenddev.xmlrpc": (
        *_SHARED,
        "xenddev.toolstack",
        "xenddev.storagectl",
        "xenddev.sxp",
        "xenddev.httplimits",
        "xenddev.__version__",
    ),
    "xenddev.service": (
        *_SHARED,
        "xenddev.toolstack",
        "xenddev.driverdomain",
        "xenddev.controllers",
        "xenddev.simulator",
        "xenddev.config",
        "xenddev.storagectl",
        "xenddev.metrics",
        "xenddev.localguard",
        "xenddev.pool",
        "xenddev.poolfence",
        "xenddev.poolguard",
        "xenddev.poolmember",
        "xenddev.poolpeers",
        "xenddev.pooldatapaths",
        "xenddev.poolmigration",
        "xenddev.migraterpc",
        "xenddev.poolwatchdog",
        "xenddev.xmlrpc",
        "xenddev.httplimits",
        "xenddev.lifecycle",
        "xenddev.xsguard",
    ),
    "xenddev.daemon": ("xenddev.config", "xenddev.service", "xenddev.errors"),
    "xenddev.embed": ("xenddev.config", "xenddev.service", "xenddev.errors"),
    # The command-line client starts light: the RPC client and disk specs.
    "xenddev.cli": ("xenddev.__version__", "xenddev.rpcclient", "xenddev.diskspec"),
}

#: Layers whose modules must not import each other in a cycle.
ACYCLIC: tuple[str, ...] = tuple(RULES)


def moduleName(path: str) -> str:
    """C{xenddev/xenstore/client.py} -> C{xenddev.xenstore.client}; a package: its name."""
    relative = os.path.relpath(path, ROOT)[: -len(".py")]
    parts = relative.split(os.sep)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modulesOf(layer: str) -> dict[str, str]:
    """The modules of a layer (a package, followed through links, or one module): name -> path."""
    top = os.path.join(ROOT, *layer.split("."))
    if os.path.isfile(top + ".py"):
        return {layer: top + ".py"}
    found = {}
    for directory, _, files in os.walk(top, followlinks=True):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                found[moduleName(path)] = path
    return found


def importsOf(module: str, path: str) -> Iterator[tuple[str, int]]:
    """
    Every module C{module} imports, as C{(dotted name, line)}, anywhere in
    its source. C{from package import name} yields C{package.name} (which
    may be a module or a name in the package) and relative imports are
    resolved.
    """
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    isPackage = path.endswith("__init__.py")
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")
                keep = len(parts) - node.level + (1 if isPackage else 0)
                base = ".".join(parts[:keep] + ([base] if base else []))
            for alias in node.names:
                yield f"{base}.{alias.name}", node.lineno


def within(name: str, layer: str) -> bool:
    """Whether the dotted C{name} is C{layer} or inside it."""
    return name == layer or name.startswith(layer + ".")


def forbiddenArrows(layer: str, allowed: tuple[str, ...]) -> list[str]:
    """The imports of C{layer}'s modules into C{xenddev} outside C{layer} and C{allowed}."""
    found = []
    for module, path in sorted(modulesOf(layer).items()):
        for name, line in importsOf(module, path):
            if not within(name, "xenddev") or within(name, layer):
                continue
            if not any(within(name, a) for a in allowed):
                found.append(f"{module} (line {line}) imports {name}")
    return found


def importGraph(layer: str) -> dict[str, set[str]]:
    """Module -> the modules of the same layer it imports."""
    modules = modulesOf(layer)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for name, _ in importsOf(module, path):
            # "from a.b import c" names module a.b.c or a name in a.b.
            target = name if name in modules else name.rpartition(".")[0]
            if target in modules and target != module:
                graph[module].add(target)
    return graph


def findCycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of C{graph} as a path C{[a, b, ..., a]}, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle is not None:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle is not None:
                return cycle
    return None


class RuleTests(SynchronousTestCase):
    """The tree follows the table of allowed arrows."""

    def test_allowedArrowsOnly(self) -> None:
        """No module of a layer in L{RULES} imports a part of xenddev it is not allowed to."""
        problems = []
        for layer, allowed in RULES.items():
            problems += forbiddenArrows(layer, allowed)
        self.assertEqual(problems, [])

    def test_noCycles(self) -> None:
        """The modules of each layer in L{ACYCLIC} import each other without a cycle."""
        cycles = {}
        for layer in ACYCLIC:
            cycle = findCycle(importGraph(layer))
            if cycle is not None:
                cycles[layer] = " -> ".join(cycle)
        self.assertEqual(cycles, {})

    def test_layersAcyclic(self) -> None:
        """The table has no cycle: no layer reaches itself through what it may import."""
        graph: dict[str, set[str]] = {}
        for layer, allowed in RULES.items():
            graph[layer] = {
                other
                for other in RULES
                if other != layer and any(within(other, a) for a in allowed)
            }
        self.assertIsNone(findCycle(graph))

    def test_everyModuleInALayer(self) -> None:
        """Every module under C{xenddev} but its C{__init__} has a row in L{RULES}."""
        layered = set()
        for layer in RULES:
            layered |= set(modulesOf(layer))
        unlayered = set(modulesOf("xenddev")) - layered - {"xenddev"}
        self.assertEqual(sorted(unlayered), [])

    def test_layersExist(self) -> None:
        """Every layer named in the tables has modules (a renamed package fails here)."""
        for layer in [*RULES, *ACYCLIC]:
            self.assertTrue(modulesOf(layer), layer)


class CheckerTests(SynchronousTestCase):
    """The checker itself: what it counts as an import, and what as a cycle."""

    def write(self, relative: str, source: str) -> str:
        """Write C{source} to C{relative} under a fresh directory; its path."""
        path = os.path.join(self.mktemp(), relative)
        os.makedirs(os.path.dirname(path))
        with open(path, "w") as f:
            f.write(source)
        return path

    def test_everyImportCounts(self) -> None:
        """Imports inside functions, under TYPE_CHECKING and relative ones are all found."""
        source = (
            "from typing import TYPE_CHECKING\n"
            "import xenddev.config\n"
            "if TYPE_CHECKING:\n"
            "    from xenddev.interfaces import IXenStore\n"
            "def f():\n"
            "    from ..toolstack import DeviceManager\n"
            "    from . import wire\n"
        )
        path = self.write("m.py", source)
        found = {name for name, _ in importsOf("xenddev.xenstore.m", path)}
        self.assertEqual(
            found,
            {
                "typing.TYPE_CHECKING",
                "xenddev.config",
                "xenddev.interfaces.IXenStore",
                "xenddev.toolstack.DeviceManager",
                "xenddev.xenstore.wire",
            },
        )

    def test_relativeInPackage(self) -> None:
        """A relative import in a package's __init__ resolves against the package itself."""
        path = self.write("__init__.py", "from .core import X\n")
        found = [name for name, _ in importsOf("xenddev.xenstore.server", path)]
        self.assertEqual(found, ["xenddev.xenstore.server.core.X"])

    def test_cycleFound(self) -> None:
        """A cycle is reported as the path around it; a DAG has none."""
        self.assertEqual(findCycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}), ["a", "b", "c", "a"])
        self.assertIsNone(findCycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}))

    def test_upwardArrowFound(self) -> None:
        """The rule table catches an import above the layer (the one this test was written for)."""
        self.assertIn("xenddev.xenstore.client", modulesOf("xenddev.xenstore"))
        self.assertFalse(within("xenddev.interfaces", "xenddev.xenstore"))
        self.assertTrue(within("xenddev.xenstore.wire", "xenddev.xenstore"))
        self.assertFalse(within("xenddev.xenstoreish", "xenddev.xenstore"))
