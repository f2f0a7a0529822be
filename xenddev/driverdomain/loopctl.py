# -*- test-case-name: tests.test_hotplugblock -*-
"""
Loop devices through the kernel's own interface (C{/dev/loop-control} and
the loop ioctls), without C{losetup}: what the built-in C{block} script
(L{xenddev.driverdomain.hotplugblock}) attaches image files with.

Every function blocks for a system call or a few; callers on the reactor run
them in a thread.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from xenddev.errors import XenddevError

#: ioctl numbers from linux/loop.h.
LOOP_SET_FD = 0x4C00
LOOP_CLR_FD = 0x4C01
LOOP_SET_STATUS64 = 0x4C04
LOOP_CTL_GET_FREE = 0x4C82

#: struct loop_info64: five u64, four u32, file name[64], crypt name[64],
#: key[32], two u64.
_INFO64 = struct.Struct("=5Q4I64s64s32s2Q")
_NAME_LEN = 64
#: How often a free device taken by someone else meanwhile is retried.
_ATTEMPTS = 32


class LoopError(XenddevError, OSError):
    """A loop device could not be attached or detached."""


def majorMinor(path: str) -> str:
    """A block device's numbers as the hotplug scripts write them: C{%x:%x}."""
    rdev = os.stat(path).st_rdev
    return f"{os.major(rdev):x}:{os.minor(rdev):x}"


def attachLoop(
    image: str, readOnly: bool, control: str = "/dev/loop-control", devDir: str = "/dev"
) -> str:
    """
    Attach C{image} to a free loop device (read-only if asked: the device
    then refuses writes); return its path.

    @raise LoopError: no free device, or the kernel refused.
    """
    imageFd = os.open(image, (os.O_RDONLY if readOnly else os.O_RDWR) | os.O_CLOEXEC)
    try:
        ctl = os.open(control, os.O_RDWR | os.O_CLOEXEC)
        try:
            for _ in range(_ATTEMPTS):
                number = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
                device = os.path.join(devDir, f"loop{number}")
                loopFd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
                try:
                    fcntl.ioctl(loopFd, LOOP_SET_FD, imageFd)
                except OSError as e:
                    if e.errno == errno.EBUSY:
                        continue  # taken between GET_FREE and SET_FD
                    message = f"cannot attach {image} to {device}: {e.strerror}"
                    raise LoopError(e.errno, message) from None
                else:
                    _setName(loopFd, image)
                    return device
                finally:
                    os.close(loopFd)
        finally:
            os.close(ctl)
    finally:
        os.close(imageFd)
    raise LoopError(errno.EBUSY, f"no free loop device for {image} after {_ATTEMPTS} attempts")


def _setName(loopFd: int, image: str) -> None:
    """Name the backing file in the device's status, as losetup does (losetup -a shows it)."""
    name = os.fsencode(image)[: _NAME_LEN - 1]
    info = _INFO64.pack(0, 0, 0, 0, 0, 0, 0, 0, 0, name, b"", b"", 0, 0)
    try:
        fcntl.ioctl(loopFd, LOOP_SET_STATUS64, info)
    except OSError:
        pass  # cosmetic: sysfs' backing_file names the file anyway


def detachLoop(device: str) -> None:
    """
    Detach a loop device from its file; nothing if it has none.

    @raise LoopError: the device is busy (still open) or cannot be opened.
    """
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise LoopError(e.errno, f"cannot open {device}: {e.strerror}") from None
    try:
        fcntl.ioctl(fd, LOOP_CLR_FD)
    except OSError as e:
        if e.errno != errno.ENXIO:  # no file attached
            raise LoopError(e.errno, f"cannot detach {device}: {e.strerror}") from None
    finally:
        os.close(fd)


def loopsBacking(image: str, sysBlock: str = "/sys/block", devDir: str = "/dev") -> list[str]:
    """The loop devices whose backing file is C{image} (same device and inode)."""
    st = os.stat(image)
    found = []
    try:
        names = os.listdir(sysBlock)
    except OSError:
        return []
    for name in sorted(names):
        if not name.startswith("loop"):
            continue
        try:
            with open(os.path.join(sysBlock, name, "loop", "backing_file")) as f:
                backing = f.read().rstrip("\n")
            other = os.stat(backing)
        except OSError:
            continue
        if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
            found.append(os.path.join(devDir, name))
    return found
