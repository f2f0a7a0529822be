"""
The boot images of the real-Xen lane, fetched and built once and cached.

Debian's Xen hypervisor and kernel packages are downloaded (never
installed: that would touch this machine's boot) with C{apt-get download}
and unpacked with C{dpkg -x} into C{<cache>/root}; the kernel package ships
no C{modules.dep}, so C{depmod -b} makes one. Xen's multiboot image
(C{boot/xen-4.17-amd64.gz}) is gunzipped to an ELF file QEMU's C{-kernel}
loads.

Two busybox initramfs images are built here in Python (module closure from
C{modules.dep}, cpio "newc" archive, gzip), each named by a hash of
everything that goes into it, so they are rebuilt only when an input
changed:

  - dom0's: C{files/dom0-init} as C{/init} (virtio 9p and overlay modules),
    with C{files/dom0-setup.sh} and C{channel.py} for the new root;
  - the PV guests': C{files/domu-init} as C{/init} (blkfront, netfront);
  - the driver domains': C{files/dd-init} as C{/init}, the back-end
    modules, and the files of this machine the xenddev agent and the
    hotplug scripts need (L{tests.support.realxen.agentroot}).

Cache layout (L{cacheDirectory})::

    debs/                         the downloaded .deb files
    root/                         dpkg -x of both packages, plus modules.dep
    xen-4.17-amd64                the gunzipped hypervisor (ELF32 multiboot)
    initrd/dom0-<hash>.cpio.gz    the dom0 initramfs
    initrd/domu-<hash>.cpio.gz    the guests' initramfs
    initrd/dd-<hash>.cpio.gz      the driver domains' initramfs
    lock                          flock()ed while the cache is being filled
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import attrs

__all__ = [
    "CACHE_ENV",
    "DD_MODULES",
    "DOM0_MODULES",
    "DOMU_MODULES",
    "XEN_PACKAGE",
    "BootImages",
    "ImageError",
    "Unavailable",
    "cacheDirectory",
    "isStaticExecutable",
    "moduleClosure",
    "prepareImages",
    "writeCpio",
]

#: Overrides the cache directory.
CACHE_ENV = "XENDDEV_REALXEN_CACHE"

#: The hypervisor package, and the meta package naming the kernel package.
XEN_PACKAGE = "xen-hypervisor-4.17-amd64"
KERNEL_META_PACKAGE = "linux-image-amd64"

#: Kernel modules (and their dependencies) each initramfs loads, in order.
DOM0_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")
DOMU_MODULES = ("xen-blkfront", "xen-netfront")
#: The driver domains' modules: Xen's PV 9pfs (the images share) and the
#: back ends with what their hotplug scripts use.
DD_MODULES = ("9pnet_xen", "9p", "xen-blkback", "xen-netback", "loop", "bridge")

#: Bump to rebuild every cached initramfs (the archive's layout changed).
INITRD_FORMAT = 1

FILES = Path(__file__).resolve().parent / "files"
CHANNEL = Path(__file__).resolve().parent / "channel.py"

_KERNEL_PACKAGE = re.compile(r"^\s*Depends:\s*(linux-image-[0-9]\S*)\s*$", re.MULTILINE)


class ImageError(RuntimeError):
    """
    The boot images could not be fetched or built (a real failure).
    """


class Unavailable(ImageError):
    """
    This machine cannot run the lane (missing tools that cannot be
    installed, packages that cannot be downloaded): tests skip.
    """


@attrs.frozen
class BootImages:
    """
    Everything QEMU and C{xl} need to boot the lane's Xen, dom0 and guests.

    @ivar cache: the cache directory.
    @ivar root: where both packages are unpacked (dom0 binds its
        C{lib/modules/<kver>} at C{/usr/lib/modules/<kver>}).
    @ivar kver: the kernel version (C{uname -r} in dom0 and the guests).
    @ivar xen: the hypervisor, an ELF file for QEMU's C{-kernel}.
    @ivar kernel: the kernel (dom0's and the guests').
    @ivar dom0Initrd: dom0's initramfs.
    @ivar domuInitrd: the PV guests' initramfs.
    @ivar ddInitrd: the driver domains' initramfs (C{files/dd-init}).
    """

    cache: Path
    root: Path
    kver: str
    xen: Path
    kernel: Path
    dom0Initrd: Path
    domuInitrd: Path
    ddInitrd: Path


def cacheDirectory() -> Path:
    """
    The cache directory: C{$XENDDEV_REALXEN_CACHE}, else
    C{/var/cache/xenddev-realxen} as root, else
    C{~/.cache/xenddev-realxen}.
    """
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override)
    if os.geteuid() == 0:
        return Path("/var/cache/xenddev-realxen")
    return Path.home() / ".cache" / "xenddev-realxen"


def _run(argv: Sequence[str], cwd: Path | None = None, timeout: float = 600) -> str:
    """
    Run C{argv}; its stdout. Raises L{ImageError} with its output if it fails.
    """
    try:
        done = subprocess.run(
            list(argv),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"},
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ImageError(f"{' '.join(argv)}: {e}") from e
    if done.returncode != 0:
        raise ImageError(
            f"{' '.join(argv)} exited with {done.returncode}:\n{done.stdout}{done.stderr}"
        )
    return done.stdout


@contextmanager
def _locked(cache: Path) -> Iterator[None]:
    """
    Hold C{<cache>/lock}: test processes started at once fill the cache in turn.
    """
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def kernelPackage() -> str | None:
    """
    The kernel package C{linux-image-amd64} depends on (from C{apt-cache
    depends}, offline), or L{None} if apt does not know it.
    """
    try:
        out = _run(["apt-cache", "depends", KERNEL_META_PACKAGE], timeout=120)
    except ImageError:
        return None
    match = _KERNEL_PACKAGE.search(out)
    return match.group(1) if match else None


def _cachedDeb(debs: Path, package: str) -> Path | None:
    """
    The newest cached C{.deb} of C{package}, or L{None}.
    """
    found = sorted(debs.glob(f"{package}_*.deb"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def _fetchDebs(cache: Path) -> tuple[Path, Path]:
    """
    The hypervisor's and the kernel's C{.deb}, downloaded into
    C{<cache>/debs} unless already there.

    @return: (hypervisor, kernel).
    """
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    kpkg = kernelPackage()
    if kpkg is None:
        # No apt here, or no index: whatever was downloaded before will do.
        cached = sorted(debs.glob("linux-image-[0-9]*.deb"))
        if not cached:
            raise Unavailable(
                f"apt-cache does not name the kernel package of {KERNEL_META_PACKAGE}"
                " (no apt, or no package index: apt-get update)"
            )
        kpkg = cached[-1].name.split("_")[0]
    wanted = [XEN_PACKAGE, kpkg]
    missing = [p for p in wanted if _cachedDeb(debs, p) is None]
    if missing:
        try:
            _run(["apt-get", "download", *missing], cwd=debs)
        except ImageError as first:
            if os.geteuid() != 0:
                raise Unavailable(f"cannot download {' '.join(missing)}: {first}") from first
            # A stale package index names files the mirror no longer has.
            try:
                _run(["apt-get", "update", "-qq"])
                _run(["apt-get", "download", *missing], cwd=debs)
            except ImageError as e:
                raise Unavailable(f"cannot download {' '.join(missing)}: {e}") from e
    xen, kernel = (_cachedDeb(debs, p) for p in wanted)
    assert xen is not None and kernel is not None
    return xen, kernel


def _kernelVersion(kernelDeb: Path) -> str:
    """
    The kernel version a C{linux-image-<kver>} package installs.
    """
    package = kernelDeb.name.split("_")[0]
    return package.removeprefix("linux-image-")


def _unpack(cache: Path, debs: Iterable[Path], kver: str) -> Path:
    """
    C{dpkg -x} each of C{debs} into C{<cache>/root} (once: a stamp file
    lists what was unpacked), and C{depmod} the kernel's modules.
    """
    root = cache / "root"
    root.mkdir(parents=True, exist_ok=True)
    stamp = root / ".xenddev-unpacked"
    done: list[str] = json.loads(stamp.read_text()) if stamp.exists() else []
    for deb in debs:
        if deb.name not in done:
            _run(["dpkg", "-x", str(deb), str(root)])
            done.append(deb.name)
            stamp.write_text(json.dumps(done))
    moddir = root / "lib" / "modules" / kver
    if not (moddir / "modules.dep").exists():
        _run([_tool("depmod"), "-b", str(root), kver])
    return root


def _gunzipXen(cache: Path, root: Path) -> Path:
    """
    The hypervisor, gunzipped from C{root/boot/xen-4.17-amd64.gz}.
    """
    source = root / "boot" / "xen-4.17-amd64.gz"
    target = cache / "xen-4.17-amd64"
    if not source.exists():
        raise ImageError(f"{source} missing: is {XEN_PACKAGE} unpacked?")
    if target.exists() and target.stat().st_mtime >= source.stat().st_mtime:
        return target
    partial = target.with_name(target.name + ".partial")
    with gzip.open(source, "rb") as src, open(partial, "wb") as dst:
        shutil.copyfileobj(src, dst)
    partial.replace(target)
    return target


def _tool(name: str) -> str:
    """
    The path of tool C{name}, looked up in C{PATH} and the sbin directories.
    """
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    found = shutil.which(name, path=path)
    if found is None:
        raise ImageError(f"{name} not found")
    return found


def moduleClosure(moddir: Path, names: Iterable[str]) -> list[str]:
    """
    The modules to load for module C{names}, dependencies first.

    @param moddir: C{lib/modules/<kver>} with its C{modules.dep}.
    @param names: module names; C{-} and C{_} are the same. Names of
        modules built into the kernel (C{modules.builtin}) are left out.
    @return: paths relative to C{moddir}, in a valid load order.
    """
    deps: dict[str, list[str]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        module, _, rest = line.partition(":")
        deps[module] = rest.split()

    def key(path: str) -> str:
        return os.path.basename(path).split(".ko")[0].replace("-", "_")

    byName = {key(m): m for m in deps}
    builtinFile = moddir / "modules.builtin"
    builtin = {key(m) for m in builtinFile.read_text().split()} if builtinFile.exists() else set()
    order: list[str] = []
    seen: set[str] = set()

    def visit(module: str) -> None:
        if module in seen:
            return
        seen.add(module)
        for dep in deps.get(module, []):
            visit(dep)
        order.append(module)

    for name in names:
        k = name.replace("-", "_")
        if k in byName:
            visit(byName[k])
        elif k not in builtin:
            raise ImageError(f"kernel module {name} not found in {moddir}")
    return order


def _moduleBytes(path: Path) -> tuple[str, bytes]:
    """
    A module file's name and contents, decompressed (busybox insmod loads
    plain C{.ko} files only).
    """
    data = path.read_bytes()
    name = path.name
    if name.endswith(".ko.xz"):
        return name[: -len(".xz")], lzma.decompress(data)
    if name.endswith(".ko.gz"):
        return name[: -len(".gz")], gzip.decompress(data)
    if not name.endswith(".ko"):
        raise ImageError(f"cannot load a module compressed like {name}")
    return name, data


#: File types for cpio modes.
_DIR = 0o040000
_FILE = 0o100000
_CHAR = 0o020000
_LINK = 0o120000


@attrs.frozen
class _Entry:
    """One member of a cpio archive."""

    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)
    mtime: int = 0


def writeCpio(entries: Iterable[_Entry], out: io.BufferedIOBase) -> None:
    """
    Write C{entries} as a cpio "newc" archive (the format the kernel
    unpacks as an initramfs), owned by root, dated 0, with the trailer.
    """

    def member(ino: int, entry: _Entry) -> None:
        name = entry.name.encode() + b"\0"
        fields = (
            ino,
            entry.mode,
            0,  # uid
            0,  # gid
            2 if entry.mode & _DIR else 1,  # nlink
            entry.mtime,
            len(entry.data),
            0,  # devmajor
            0,  # devminor
            entry.rdev[0],
            entry.rdev[1],
            len(name),
            0,  # check
        )
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        out.write(header + name + b"\0" * (-(len(header) + len(name)) % 4))
        out.write(entry.data + b"\0" * (-len(entry.data) % 4))

    count = 0
    for entry in entries:
        count += 1
        member(count, entry)
    member(count + 1, _Entry("TRAILER!!!", 0))


def isStaticExecutable(path: str) -> bool:
    """
    Whether C{path} is an ELF executable without a program interpreter
    (statically linked: it runs in an initramfs with no libraries).
    """
    try:
        with open(path, "rb") as f:
            ident = f.read(64)
            if ident[:4] != b"\x7fELF" or ident[4] != 2:  # 64-bit only
                return False
            endian = "<" if ident[5] == 1 else ">"
            (phoff,) = struct.unpack_from(endian + "Q", ident, 32)
            phentsize, phnum = struct.unpack_from(endian + "HH", ident, 54)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except OSError:
        return False
    PT_INTERP = 3
    return all(
        struct.unpack_from(endian + "I", table, i * phentsize)[0] != PT_INTERP for i in range(phnum)
    )


def _initrdEntries(
    busybox: bytes, init: bytes, modules: list[tuple[str, bytes]], extra: dict[str, bytes]
) -> list[_Entry]:
    """
    The members of an initramfs: busybox, C{/init}, the modules in
    C{/mods} listed in load order in C{/etc/xenddev/modules}, and C{extra}
    files (name relative to C{/etc/xenddev} -> contents).
    """
    entries = [
        _Entry(d, _DIR | 0o755)
        for d in ("bin", "dev", "etc", "etc/xenddev", "mods", "proc", "sys", "tmp")
    ]
    entries.append(_Entry("dev/console", _CHAR | 0o600, rdev=(5, 1)))
    entries.append(_Entry("bin/busybox", _FILE | 0o755, busybox))
    entries.append(_Entry("init", _FILE | 0o755, init))
    for name, data in modules:
        entries.append(_Entry(f"mods/{name}", _FILE | 0o644, data))
    listing = "".join(f"{name}\n" for name, _ in modules).encode()
    entries.append(_Entry("etc/xenddev/modules", _FILE | 0o644, listing))
    for name, data in sorted(extra.items()):
        entries.append(_Entry(f"etc/xenddev/{name}", _FILE | 0o755, data))
    return entries


def _buildInitrd(
    cache: Path,
    kind: str,
    moddir: Path,
    modules: Sequence[str],
    init: Path,
    extra: Sequence[Path] = (),
) -> Path:
    """
    The initramfs C{<cache>/initrd/<kind>-<hash>.cpio.gz}, built unless a
    file of that name exists; the hash covers the kernel version, the module
    list, busybox, C{init} and the C{extra} files.
    """
    busyboxPath = _busybox()
    busybox = Path(busyboxPath).read_bytes()
    closure = moduleClosure(moddir, modules)
    initBytes = init.read_bytes()
    extras = {p.name: p.read_bytes() for p in extra}
    digest = hashlib.sha256()
    for part in (
        str(INITRD_FORMAT).encode(),
        moddir.name.encode(),
        "\n".join(closure).encode(),
        hashlib.sha256(busybox).digest(),
        initBytes,
        *(name.encode() + b"\0" + data for name, data in sorted(extras.items())),
    ):
        digest.update(len(part).to_bytes(8, "big") + part)
    target = cache / "initrd" / f"{kind}-{digest.hexdigest()[:16]}.cpio.gz"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    modBytes = [_moduleBytes(moddir / m) for m in closure]
    raw = io.BytesIO()
    writeCpio(_initrdEntries(busybox, initBytes, modBytes, extras), raw)
    partial = target.with_name(target.name + ".partial")
    with open(partial, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0) as z:
        z.write(raw.getvalue())
    partial.replace(target)
    return target


def _buildDriverDomainInitrd(cache: Path, moddir: Path) -> Path:
    """
    The driver domains' initramfs C{<cache>/initrd/dd-<hash>.cpio.gz}:
    C{files/dd-init} as C{/init}, the back-end modules, and this machine's
    files the agent and the hotplug scripts need (L{agentroot}), built
    unless a file of that name exists; the hash covers the kernel version,
    the modules, C{/init}, and each packed file's name, size and time.
    """
    import sys

    from tests.support.realxen import agentroot

    checkout = Path(__file__).resolve().parents[3]
    closure = moduleClosure(moddir, DD_MODULES)
    init = (FILES / "dd-init").read_bytes()
    members = list(agentroot.hostEntries(agentroot.agentFiles(checkout, sys.executable)))
    digest = hashlib.sha256()
    for part in (
        str(INITRD_FORMAT).encode(),
        moddir.name.encode(),
        "\n".join(closure).encode(),
        init,
        *(f"{k} {n} {st.st_size} {st.st_mtime_ns} {t}".encode() for k, n, st, t in members),
    ):
        digest.update(len(part).to_bytes(8, "big") + part)
    target = cache / "initrd" / f"dd-{digest.hexdigest()[:16]}.cpio.gz"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    entries: list[_Entry] = []
    for kind, name, st, link in members:
        mtime = int(st.st_mtime)
        if kind == "dir":
            entries.append(_Entry(name, _DIR | (st.st_mode & 0o7777), mtime=mtime))
        elif kind == "link":
            assert link is not None
            entries.append(_Entry(name, _LINK | 0o777, link.encode(), mtime=mtime))
        else:
            data = Path("/" + name).read_bytes()
            entries.append(_Entry(name, _FILE | (st.st_mode & 0o7777), data, mtime=mtime))
    # After the host's directories (their parents, e.g. etc, come first).
    hostNames = {name for _, name, _, _ in members}
    for d in ("dev", "etc", "etc/xenddev", "mods", "proc", "run", "sys", "tmp", "var"):
        if d not in hostNames:
            entries.append(_Entry(d, _DIR | 0o755))
    entries.append(_Entry("dev/console", _CHAR | 0o600, rdev=(5, 1)))
    entries.append(_Entry("init", _FILE | 0o755, init))
    modules = [_moduleBytes(moddir / m) for m in closure]
    for name, data in modules:
        entries.append(_Entry(f"mods/{name}", _FILE | 0o644, data))
    listing = "".join(f"{name}\n" for name, _ in modules).encode()
    entries.append(_Entry("etc/xenddev/modules", _FILE | 0o644, listing))
    raw = io.BytesIO()
    writeCpio(entries, raw)
    partial = target.with_name(target.name + ".partial")
    with (
        open(partial, "wb") as f,
        gzip.GzipFile(fileobj=f, mode="wb", mtime=0, compresslevel=6) as z,
    ):
        z.write(raw.getvalue())
    partial.replace(target)
    return target


def _busybox() -> str:
    """
    A statically linked busybox (Debian's busybox-static).
    """
    found = shutil.which("busybox") or "/bin/busybox"
    if not isStaticExecutable(found):
        raise Unavailable(f"{found} is not a static busybox (install busybox-static)")
    return found


def prepareImages(cache: Path | None = None) -> BootImages:
    """
    Fetch, unpack and build whatever is not in the cache yet (blocking: a
    first run downloads ~73 MB and unpacks ~500 MB; later runs take well
    under a second).

    @param cache: the cache directory (default L{cacheDirectory}).
    @raise Unavailable: the packages cannot be downloaded, or busybox is
        not static.
    @raise ImageError: anything else went wrong.
    """
    cache = cacheDirectory() if cache is None else cache
    with _locked(cache):
        xenDeb, kernelDeb = _fetchDebs(cache)
        kver = _kernelVersion(kernelDeb)
        root = _unpack(cache, (xenDeb, kernelDeb), kver)
        xen = _gunzipXen(cache, root)
        kernel = root / "boot" / f"vmlinuz-{kver}"
        moddir = root / "lib" / "modules" / kver
        if not kernel.exists() or not moddir.is_dir():
            raise ImageError(f"{kernelDeb.name} did not unpack {kernel} and {moddir}")
        dom0 = _buildInitrd(
            cache,
            "dom0",
            moddir,
            DOM0_MODULES,
            FILES / "dom0-init",
            (FILES / "dom0-setup.sh", CHANNEL),
        )
        domu = _buildInitrd(cache, "domu", moddir, DOMU_MODULES, FILES / "domu-init")
        dd = _buildDriverDomainInitrd(cache, moddir)
    return BootImages(cache, root, kver, xen, kernel, dom0, domu, dd)
