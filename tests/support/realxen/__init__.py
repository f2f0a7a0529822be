"""
The real-Xen lane: Xen 4.17 and a PV dom0 booted in QEMU on this machine,
commands run in dom0, PV guests made with C{xl}.

One machine per test process, shared by every test that asks for it::

    from tests.support.realxen import TEST_TIMEOUT, realXenHost

    class MyTests(TestCase):
        timeout = TEST_TIMEOUT

        @deferredTest
        async def test_something(self) -> None:
            host = await realXenHost()               # boots on first use
            r = await host.run(["xl", "list"])       # CommandResult
            await host.check(["xl", "info"])         # raises CommandFailed
            proc = await host.spawn(["twistd", "-n", ...])
            await proc.signal(15); await proc.wait()
            guest = await host.createGuest(
                "g1",
                disks=["format=raw,vdev=xvdb,access=rw,target=/var/lib/realxen/a.img"],
                vifs=["bridge=xenbr0,mac=00:16:3e:00:00:02"],
            )
            await guest.waitConsole(r"disk xvdb wrote\\+readback")
            await guest.destroy()

What is where:

  - The images (L{image}): Debian's C{xen-hypervisor-4.17-amd64} and the
    kernel C{linux-image-amd64} depends on, downloaded and unpacked into a
    cache (C{$XENDDEV_REALXEN_CACHE}, C{/var/cache/xenddev-realxen} as root,
    else C{~/.cache/xenddev-realxen}); two busybox initramfs images built
    from C{files/}.
  - The machine (L{vm}): QEMU (TCG; C{XENDDEV_REALXEN_ACCEL=kvm} for KVM),
    its run folder a fresh C{/tmp/xenddev-realxen-*} kept after the run
    (C{serial.log}: Xen's and dom0's console). dom0's root is this machine's
    C{/} (read-only, with a tmpfs over it), so dom0 runs this machine's
    C{xl}, C{xenstored}, hotplug scripts, and this checkout with this
    process's interpreter (C{sys.executable}). Disk images belong in
    C{/var/lib/realxen} (tmpfs in dom0). dom0's bridge C{xenbr0} has
    169.254.99.1/24; guests get 169.254.99.2, .3, ... (L{RealXenHost.createGuest}).
  - The channel (C{channel.py}, run in dom0): JSON requests and results as
    files in the run folder's C{share/} (dom0's C{/mnt/share}).
  - Guests (L{guest}): C{files/domu-init} reports disks, writes and
    readbacks, and the network on its console (C{GUEST: ...} lines), which
    xenconsoled logs into C{share/console/guest-NAME.log}.

Skips: the tests skip (L{realXenHost} raises C{SkipTest}) when this machine
is not x86_64, lacks QEMU or the other tools and is not root to install them,
or cannot download the packages; with C{XENDDEV_REQUIRE_REAL_XEN=1} they fail
instead. A machine that fails to boot is a failure either way, and the
failure is kept: later tests of the same process fail at once.

Measured under TCG on this two-core machine kind, quiet / busy (other test
runs, other QEMUs): the channel answers 20-25 s / 65-115 s after QEMU starts
(a first run also fetches and builds the images, ~10 s); a trivial command
takes 0.15-0.3 s / 0.3-2.6 s; C{xl create} of a guest with a disk and a vif
23 s / 50-93 s; the guest is ready and has pinged dom0 25 s / 30-60 s later.
libxl gives each hotplug script 40 s, and C{block add} took 27 s with three
QEMUs on the machine: do not run several machines at once (each trial
process boots its own: no C{trial -j} for this lane), keep guests and dom0
quiet around attaches, and on a machine busy with other work consider
C{XENDDEV_REALXEN_NICE=-5} (as root) to put QEMU ahead of it.
"""

from __future__ import annotations

import atexit
import functools
import os
import platform
import shutil
import subprocess
import sys
import unittest
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from tests.support.realxen.guest import GUEST_PREFIX, Guest
from tests.support.realxen.image import BootImages, ImageError, Unavailable, prepareImages
from tests.support.realxen.vm import (
    BRIDGE,
    DOM0_IP,
    DOM0_SHARE,
    BackgroundProcess,
    CommandFailed,
    CommandResult,
    RealXenError,
    RealXenHost,
)

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred
    from twisted.internet.interfaces import IReactorTime

__all__ = [
    "BRIDGE",
    "DOM0_IP",
    "DOM0_SHARE",
    "GUEST_PREFIX",
    "IMAGE_DIR",
    "REQUIRE_ENV",
    "TEST_TIMEOUT",
    "BackgroundProcess",
    "BootImages",
    "CommandFailed",
    "CommandResult",
    "Guest",
    "RealXenError",
    "RealXenHost",
    "concurrently",
    "realXenHost",
    "unavailableReason",
]

#: Set to C{"1"} to turn "real Xen unavailable" skips into failures.
REQUIRE_ENV = "XENDDEV_REQUIRE_REAL_XEN"

#: A trial C{timeout} for test cases using the machine (the first test
#: boots it; trial's default is 120 s).
TEST_TIMEOUT = 900

#: Where disk images go in dom0 (tmpfs).
IMAGE_DIR = "/var/lib/realxen"

#: The tools the lane runs on this machine (for QEMU, for the images, and,
#: through the shared root, in dom0), and the Debian packages with them.
_TOOLS = {
    "qemu-system-x86_64": "qemu-system-x86",
    "busybox": "busybox-static",
    "depmod": "kmod",
    "dpkg": "dpkg",
    "apt-get": "apt",
    "xl": "xen-utils-common",
    "/usr/lib/xen-4.17/bin/xenstored": "xen-utils-4.17",
    "ip": "iproute2",
    "losetup": "mount",
    # The device model libxl starts for a domain with PV 9pfs shares (the
    # driver domains' root and images).
    "/usr/libexec/xen-qemu-system-i386": "qemu-system-xen",
}


def _missingPackages() -> list[str]:
    """
    The packages of the tools not found here.
    """
    from tests.support.realxen.image import isStaticExecutable

    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    missing = []
    for tool, package in _TOOLS.items():
        found = shutil.which(tool, path=path)
        if tool == "busybox" and found is not None and not isStaticExecutable(found):
            found = None
        if found is None and package not in missing:
            missing.append(package)
    return missing


@functools.cache
def unavailableReason() -> str | None:
    """
    Why this machine cannot run the lane, or L{None}. As root, missing tools
    are installed with C{apt-get} first. Cached for the process.
    """
    if platform.machine() not in ("x86_64", "amd64"):
        return f"real Xen needs an x86_64 machine, not {platform.machine()}"
    missing = _missingPackages()
    if not missing:
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return f"missing Debian packages (install them as root): {' '.join(missing)}"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
    ):
        done = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, timeout=900
        )
        if done.returncode != 0:
            return f"{' '.join(argv)} failed: {done.stderr.strip()[-500:]}"
    still = _missingPackages()
    return f"still missing after apt-get install: {' '.join(still)}" if still else None


def _prepare() -> BootImages:
    """
    Check the tools and build the images (blocking: run in a thread).
    """
    reason = unavailableReason()
    if reason is not None:
        raise Unavailable(reason)
    return prepareImages()


def _unavailable(reason: str) -> BaseException:
    """
    C{SkipTest(reason)}, or a test failure with C{XENDDEV_REQUIRE_REAL_XEN=1}.
    """
    if os.environ.get(REQUIRE_ENV) == "1":
        from twisted.trial.unittest import FailTest

        return FailTest(f"real Xen required ({REQUIRE_ENV}=1): {reason}")
    return unittest.SkipTest(reason)


class _Machine:
    """
    The process's machine: booted once, then shared (or the reason it is not).
    """

    host: RealXenHost | None = None
    started: RealXenHost | None = None
    error: BaseException | None = None
    waiters: list[Deferred[RealXenHost]] | None = None


def _stopAtExit() -> None:
    """
    Shut the machine down when the test process exits; say where its run
    folder is.
    """
    host = _Machine.started
    if host is None:
        return
    status = host.stop(graceful=True)
    sys.stderr.write(f"real-Xen run folder: {host.runDir} (QEMU exit status {status})\n")


async def realXenHost(reactor: IReactorTime | None = None, bootTimeout: float = 300) -> RealXenHost:
    """
    The test process's real-Xen machine, booted by the first call (images
    fetched and built if needed, then up to C{bootTimeout} seconds of boot)
    and shut down when the process exits.

    @raise unittest.SkipTest: this machine cannot run the lane (or, with
        C{XENDDEV_REQUIRE_REAL_XEN=1}, C{FailTest}).
    @raise RealXenError: the machine did not boot, or has died since.
    """
    if _Machine.host is not None:
        if not _Machine.host.alive:
            raise RealXenError(
                f"the real-Xen machine has stopped (run folder {_Machine.host.runDir})"
            )
        return _Machine.host
    if _Machine.error is not None:
        error = _Machine.error
        from twisted.trial.unittest import FailTest

        if isinstance(error, (unittest.SkipTest, FailTest)):
            raise type(error)(*error.args)
        raise RealXenError(f"the real-Xen machine failed to boot earlier: {error}")
    if _Machine.waiters is not None:
        from twisted.internet.defer import Deferred

        waiter: Deferred[RealXenHost] = Deferred()
        _Machine.waiters.append(waiter)
        return await waiter
    _Machine.waiters = []
    try:
        host = await _boot(reactor, bootTimeout)
    except BaseException as e:
        _Machine.error = e
        waiters, _Machine.waiters = _Machine.waiters, None
        for waiter in waiters:
            waiter.errback(e)
        raise
    _Machine.host = host
    waiters, _Machine.waiters = _Machine.waiters, None
    for waiter in waiters:
        waiter.callback(host)
    return host


async def _boot(reactor: IReactorTime | None, bootTimeout: float) -> RealXenHost:
    """
    Prepare the images (in a thread), boot, and register the shutdown.
    """
    from twisted.internet.threads import deferToThread
    from twisted.python import log

    try:
        images = await deferToThread(_prepare)
    except Unavailable as e:
        raise _unavailable(str(e)) from e
    except ImageError as e:
        raise RealXenError(f"cannot build the real-Xen images: {e}") from e
    host = RealXenHost(images, reactor=reactor)
    log.msg(f"real-Xen: booting, run folder {host.runDir}")
    _Machine.started = host
    atexit.register(_stopAtExit)
    try:
        await host.boot(bootTimeout)
    except BaseException:
        host.stop(graceful=False)
        raise
    log.msg(f"real-Xen: channel ready after {host.bootSeconds:.1f}s")
    return host


async def concurrently(*steps: Coroutine[Any, Any, Any]) -> list[Any]:
    """
    Run C{steps} at once on the reactor (a guest booting while another does,
    or while the daemon starts: under TCG each takes 20-70 s, most of it on
    one virtual CPU of two); their results in order. When one fails, the
    others are still waited for (nothing of the test runs on behind its
    clean-up), then the first failure is raised as itself.
    """
    from twisted.internet.defer import Deferred, DeferredList

    outcomes = await DeferredList([Deferred.fromCoroutine(s) for s in steps], consumeErrors=True)
    for ok, value in outcomes:
        if not ok:
            value.raiseException()
    return [value for _, value in outcomes]
