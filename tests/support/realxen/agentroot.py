"""
The files a driver domain of the lane needs to run the xenddev agent and
the hotplug scripts, taken from this machine and packed into its initramfs.

Why not dom0's root over Xen's PV 9pfs (it works: C{p9 = [...]}, QEMU's xen
9pfs backend as the domain's device model): under TCG every 9p request
crosses the driver domain, dom0's QEMU and dom0's own virtio-9p mount of
this machine's C{/}; measured, each program started in the driver domain
took ~16 s (the set-up's ten programs 160 s) and the agent's Python had not
finished importing after four minutes. Here the same files come in the
initramfs, which the domain builder loads once.

What is packed (L{agentFiles}), at the paths this machine has them, with
this machine's symbolic links (C{/bin -> usr/bin}...), modes and times
(so the C{.pyc} files stay valid):

  - the interpreter of this process's virtualenv, its C{pyvenv.cfg}, and
    every module (source and C{.pyc}, or extension) that importing the
    agent, its kinds, the hotplug runner and Twisted's reactor loads
    (L{AGENT_MODULES}), found by importing them in a child process; the
    whole C{xenddev} package of the checkout;
  - the hotplug scripts (C{/etc/xen/scripts}) and the programs they and
    the runner start (L{TOOLS}), with the shared libraries C{ldd} names;
    busybox (static) fills in any other command.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = ["AGENT_MODULES", "TOOLS", "agentFiles", "hostEntries"]

#: What the agent imports at start and later (the reactor, processes).
AGENT_MODULES = (
    "xenddev.driverdomain.run",
    "xenddev.driverdomain.agent",
    "xenddev.driverdomain.kinds.blkback",
    "xenddev.driverdomain.kinds.netback",
    "xenddev.driverdomain.hotplug",
    "xenddev.datapath",
    "xenddev.xenstore.connection",
    "xenddev.xenstore.endpoints",
    "twisted.internet.reactor",
    "twisted.internet.default",
    "twisted.internet.epollreactor",
    "twisted.internet.pollreactor",
    "twisted.internet.process",
    "twisted.internet.unix",
    "twisted.internet.threads",
    "twisted.internet.task",
    "twisted.internet.endpoints",
    "twisted.internet._posixstdio",
    "twisted.logger",
    "encodings.idna",
    "encodings.ascii",
    "encodings.latin_1",
    "subprocess",
    "json",
)

#: Programs the hotplug scripts (block, vif-bridge) and the runner start.
TOOLS = (
    "bash",
    "setsid",
    "losetup",
    "stat",
    "ip",
    "xenstore-read",
    "xenstore-write",
    "xenstore-exists",
    "xenstore-list",
    "xenstore-rm",
    "logger",
    "flock",
    "readlink",
    "sed",
    "grep",
    "awk",
    "cut",
    "dirname",
    "basename",
    "cat",
    "mkdir",
    "rm",
    "mount",
    "sleep",
    "busybox",
)

_IMPORTER = """\
import importlib, importlib.util, json, sys
files = []
for name in sys.argv[1:]:
    # twisted.internet.reactor replaces its module by the reactor: keep its file.
    spec = importlib.util.find_spec(name)
    if spec is not None and spec.origin:
        files.append(spec.origin)
    importlib.import_module(name)
for module in list(sys.modules.values()):
    path = getattr(module, "__file__", None)
    if not path:
        continue
    files.append(path)
    if path.endswith(".py"):
        try:
            files.append(importlib.util.cache_from_source(path))
        except (NotImplementedError, ValueError):
            pass
print(json.dumps({"files": files, "executable": sys.executable, "prefix": sys.prefix}))
"""

_LDD = re.compile(r"(?:=>\s*)?(/\S+)\s+\(0x[0-9a-f]+\)")


def _which(name: str) -> str:
    path = os.pathsep.join(["/usr/sbin", "/usr/bin", "/sbin", "/bin"])
    found = shutil.which(name, path=path)
    if found is None:
        raise FileNotFoundError(f"{name} not found on this machine")
    return found


def _libraries(paths: Iterable[str]) -> set[str]:
    """The shared libraries (and the loader) C{ldd} names for ELF C{paths}."""
    found: set[str] = set()
    for path in paths:
        with open(path, "rb") as f:
            if f.read(4) != b"\x7fELF":
                continue
        done = subprocess.run(["ldd", path], capture_output=True, text=True, check=False)
        found.update(m.group(1) for m in _LDD.finditer(done.stdout))
    return found


def agentFiles(checkout: Path, python: str) -> set[str]:
    """
    Every path (file or link) of this machine the driver domain needs.

    @param checkout: the checkout (its C{xenddev} package is packed whole).
    @param python: the virtualenv's interpreter.
    """
    done = subprocess.run(
        [python, "-c", _IMPORTER, *AGENT_MODULES],
        cwd=checkout,
        capture_output=True,
        text=True,
        check=True,
    )
    found = json.loads(done.stdout)
    files = {f for f in found["files"] if os.path.exists(f)}
    files.add(python)
    files.add(os.path.realpath(python))
    files.add(os.path.join(found["prefix"], "pyvenv.cfg"))
    for root, _dirs, names in os.walk(checkout / "xenddev"):
        files.update(os.path.join(root, n) for n in names if n.endswith((".py", ".pyc")))
    files.add("/sbin")  # busybox installs its applets there too
    for name in os.listdir("/etc/xen/scripts"):
        files.add(os.path.join("/etc/xen/scripts", name))
    tools = [_which(t) for t in TOOLS]
    files.update(tools)
    elves = [os.path.realpath(f) for f in files if f.endswith(".so") or f in tools]
    elves.append(os.path.realpath(python))
    files.update(_libraries(elves))
    return files


def hostEntries(paths: Iterable[str]) -> Iterator[tuple[str, str, os.stat_result, str | None]]:
    """
    The archive members for C{paths}: every directory and symbolic link on
    the way (as this machine has them) and the files, once each, parents
    first. Yields C{(kind, name, stat, linkTarget)}, C{kind} one of
    C{dir}, C{link}, C{file}; names are relative to C{/}.
    """
    seen: set[str] = set()

    def walk(path: str, depth: int = 0) -> Iterator[tuple[str, str, os.stat_result, str | None]]:
        if depth > 40:
            raise OSError(f"too many symbolic links resolving {path}")
        parts = Path(path).parts[1:]
        current = "/"
        for i, part in enumerate(parts):
            current = os.path.join(current, part)
            name = current.lstrip("/")
            st = os.lstat(current)
            last = i == len(parts) - 1
            if os.path.islink(current):
                target = os.readlink(current)
                if name not in seen:
                    seen.add(name)
                    yield "link", name, st, target
                rest = os.path.join(*parts[i + 1 :]) if not last else ""
                resolved = os.path.normpath(os.path.join(os.path.dirname(current), target))
                yield from walk(os.path.join(resolved, rest) if rest else resolved, depth + 1)
                return
            if name in seen:
                continue
            seen.add(name)
            if last and not os.path.isdir(current):
                yield "file", name, st, None
            else:
                yield "dir", name, st, None

    for path in sorted(paths):
        yield from walk(os.path.abspath(path))
