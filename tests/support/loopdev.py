"""
Loop devices for integration tests of the C{block} hotplug script.

The script attaches file-backed disks with C{losetup}; tests need root, the
C{loop} driver and free C{/dev/loopN} nodes.  L{loopUnavailableReason}
checks all of that once by really attaching and detaching a scratch file.
"""

from __future__ import annotations

import fcntl
import functools
import os
import re
import shutil
import subprocess
import tempfile
import unittest

__all__ = [
    "LOCK_PATH",
    "acquireLoopTestLock",
    "attachLoop",
    "detachLoopsFor",
    "loopDevicesFor",
    "loopUnavailableReason",
    "makeImage",
    "requireLoopDevices",
]

_LOSETUP_LINE = re.compile(r"^(/dev/loop\d+):")

#: Serialises loop-device tests across processes (trial -j workers).
LOCK_PATH = os.path.join(tempfile.gettempdir(), "xenddev-loop-tests.lock")


def acquireLoopTestLock() -> int:
    """
    Take the cross-process lock that serialises tests using loop devices and
    return its file descriptor (close it to release).

    Xen 4.17's C{block} script picks a device with C{losetup -f} and binds
    it with a second C{losetup} call; its own lock only serialises C{block}
    scripts, so any other loop user in between (another test attaching a
    device, a device still being torn down after C{losetup -d}) makes it
    fail with "losetup /dev/loopN FILE failed".  Tests run one at a time
    under this lock; production hosts have the same race.
    """
    fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _losetup(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["losetup", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=check,
    )


@functools.cache
def loopUnavailableReason() -> str | None:
    """
    Why loop devices cannot be used here, or L{None} if they can.

    Cached: the probe attaches and detaches a 1 MiB scratch file once.
    """
    if shutil.which("losetup") is None:
        return "losetup not found (install the Debian package util-linux)"
    if os.geteuid() != 0:
        return f"loop devices need root (tests run as uid {os.geteuid()})"
    free = _losetup("-f", check=False)
    if free.returncode != 0 or not free.stdout.strip():
        return f"no free loop device (losetup -f: {free.stderr.strip() or free.returncode})"
    fd, image = tempfile.mkstemp(prefix="xenddev-loopprobe-")
    try:
        os.ftruncate(fd, 1 << 20)
        os.close(fd)
        attached = _losetup("-f", "--show", image, check=False)
        if attached.returncode != 0:
            return f"losetup cannot attach a file here: {attached.stderr.strip()}"
        _losetup("-d", attached.stdout.strip(), check=False)
    finally:
        detachLoopsFor(image)
        os.unlink(image)
    return None


def requireLoopDevices(testcase: unittest.TestCase) -> None:
    """Skip C{testcase} (with the precise reason) unless loop devices work."""
    reason = loopUnavailableReason()
    if reason is not None:
        raise unittest.SkipTest(reason)


def makeImage(path: str, size: int = 8 << 20) -> str:
    """Create a sparse file of C{size} bytes; return its absolute path."""
    path = os.path.abspath(path)
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def loopDevicesFor(path: str) -> list[str]:
    """The loop devices currently backed by the file C{path} (C{losetup -j})."""
    result = _losetup("-j", path, check=False)
    devices = []
    for line in result.stdout.splitlines():
        m = _LOSETUP_LINE.match(line)
        if m:
            devices.append(m.group(1))
    return devices


def detachLoopsFor(path: str) -> None:
    """Detach every loop device backed by C{path} (for cleanups)."""
    for device in loopDevicesFor(path):
        _losetup("-d", device, check=False)


def attachLoop(path: str) -> str:
    """Attach C{path} to a free loop device and return the device path."""
    return _losetup("-f", "--show", path).stdout.strip()
