"""
L{xenddev.tapctl}: C{tap-ctl list} parsing, L{TapCtl} against the test
suite's stand-in C{tap-ctl} (tests/support/fake-tap-ctl: real idle
processes, real signals; blktap itself is not packaged for Debian), and
L{BlktapSysfs} on a temporary directory tree.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from tests.support.faketapctl import killAll as _killAll
from xenddev.interfaces import ITapCtl
from xenddev.tapctl import (
    BlktapSysfs,
    TapCtl,
    TapCtlError,
    TapdiskInfo,
    minorOfDevice,
    parseList,
    parseListLine,
    pidAlive,
)

FAKE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "support", "fake-tap-ctl")


def procState(pid: int) -> str | None:
    """The state letter in /proc/<pid>/stat, or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def fakeTapCtl(test: TestCase | SynchronousTestCase, direct: bool = False) -> tuple[TapCtl, str]:
    """
    A L{TapCtl} running the stand-in with a fresh state directory; every
    tapdisk left at the end of the test is killed.
    """
    state = tempfile.mkdtemp(prefix="ftc-")
    env = {"XENDDEV_FAKE_TAPCTL_STATE": state}
    binary: str | list[str] = FAKE if direct else [sys.executable, FAKE]
    test.addCleanup(_killAll, state)
    return TapCtl(binary, env=env), state


def events(state: str) -> list[dict[str, object]]:
    """The stand-in's event log."""
    try:
        with open(os.path.join(state, "events.log")) as f:
            return [json.loads(line) for line in f]
    except FileNotFoundError:
        return []


def inject(
    state: str, command: str, code: int = 5, message: str = "injected\n", pid: int | None = None
) -> str:
    """
    Make the stand-in's C{command} fail (for the tapdisk C{pid} only, if
    given) until the returned file is removed.
    """
    os.makedirs(os.path.join(state, "fail"), exist_ok=True)
    path = os.path.join(state, "fail", command if pid is None else f"{command}-{pid}")
    with open(path, "w") as f:
        f.write(f"{code}\n{message}")
    return path


class ListParsingTests(SynchronousTestCase):
    """C{tap-ctl list} output, as blktap's tap-ctl.c prints it when piped."""

    def test_fullRow(self) -> None:
        """All four fields."""
        self.assertEqual(
            parseListLine("pid=123 minor=4 state=0x20 args=vhd:/srv/a.vhd"),
            TapdiskInfo(123, 4, 0x20, "vhd", "/srv/a.vhd"),
        )

    def test_pathWithSpaces(self) -> None:
        """args= takes the rest of the line: spaces, colons and '=' survive."""
        row = parseListLine("pid=9 minor=0 state=0 args=aio:/srv/my disks/a b:c=d.img")
        self.assertEqual((row.type, row.path), ("aio", "/srv/my disks/a b:c=d.img"))
        self.assertEqual(row.args, "aio:/srv/my disks/a b:c=d.img")
        row = parseListLine("pid=9 minor=0 state=0 args=aio:/x/ args=y  ")
        self.assertEqual(row.path, "/x/ args=y  ")

    def test_partialRows(self) -> None:
        """Fields are printed only when known: a bare minor, a spawned tapdisk."""
        self.assertEqual(parseListLine("minor=3"), TapdiskInfo(minor=3))
        self.assertEqual(parseListLine("pid=77 state=0"), TapdiskInfo(pid=77, state=0))
        self.assertFalse(TapdiskInfo(state=0x2).paused)
        self.assertTrue(TapdiskInfo(state=0x22).paused)

    def test_wholeOutput(self) -> None:
        """Several lines, blank lines skipped."""
        rows = parseList("pid=1 minor=0 state=0 args=aio:/a\n\nminor=1\n")
        self.assertEqual([r.minor for r in rows], [0, 1])
        self.assertEqual(parseList(""), [])

    def test_garbage(self) -> None:
        """Anything else is refused."""
        for bad in ("hello", "pid=x", "pid=1 pid=2", "pid=1 args=nocolon", "pid=1args=a:b"):
            self.assertRaises(ValueError, parseListLine, bad)

    def test_minorOfDevice(self) -> None:
        """Minors come from .../tapdev<N>."""
        self.assertEqual(minorOfDevice("/dev/xen/blktap-2/tapdev12\n"), 12)
        self.assertRaises(ValueError, minorOfDevice, "/dev/sda")


class TapCtlTests(TestCase):
    """L{TapCtl} running the stand-in tap-ctl."""

    def test_interface(self) -> None:
        """TapCtl provides ITapCtl completely."""
        self.assertTrue(verifyObject(ITapCtl, TapCtl("tap-ctl")))

    def image(self, name: str = "disk image.raw") -> str:
        """A small image file, with a space in its path."""
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        path = os.path.join(d, name)
        with open(path, "wb") as f:
            f.truncate(1 << 20)
        return path

    async def test_createListPauseDestroy(self) -> None:
        """
        create → a real process and a node sized like the image; list shows
        the path with its space; pause stops the process (SIGSTOP), unpause
        -a reopens on new params; destroy makes it exit and frees the minor.
        """
        tap, _state = fakeTapCtl(self)
        img = self.image()
        node = await tap.create(f"aio:{img}")
        self.assertEqual(minorOfDevice(node), 0)
        self.assertEqual(os.path.getsize(node), 1 << 20)
        (row,) = await tap.list()
        assert row.pid is not None
        self.assertEqual((row.minor, row.type, row.path, row.state), (0, "aio", img, 0))
        self.assertTrue(pidAlive(row.pid))
        await tap.pause(row.pid, 0)
        self.assertEqual(procState(row.pid), "T")
        (paused,) = await tap.list(pid=row.pid)
        self.assertTrue(paused.paused)
        other = self.image("other one.raw")
        await tap.unpause(row.pid, 0, f"aio:{other}")
        (resumed,) = await tap.list(minor=0)
        self.assertEqual((resumed.path, resumed.paused), (other, False))
        self.assertNotEqual(procState(row.pid), "T")
        self.assertIn('"minor": 0', await tap.stats(row.pid, 0))
        await tap.destroy(row.pid, 0)
        self.assertFalse(pidAlive(row.pid))
        self.assertEqual(await tap.list(), [])
        self.assertFalse(os.path.exists(node))

    async def test_stepByStep(self) -> None:
        """spawn, allocate, attach, open, close, detach, free - as create/destroy do."""
        tap, state = fakeTapCtl(self)
        img = self.image()
        pid = await tap.spawn()
        self.assertTrue(pidAlive(pid))
        node = await tap.allocate()
        minor = minorOfDevice(node)
        rows = await tap.list()
        self.assertEqual({(r.pid, r.minor) for r in rows}, {(pid, None), (None, minor)})
        await tap.attach(pid, minor)
        await tap.open(pid, minor, f"vhd:{img}", readonly=True)
        await tap.close(pid, minor)
        (row,) = await tap.list(pid=pid)
        self.assertEqual((row.args, row.state), (None, 0x2))
        await tap.detach(pid, minor)
        self.assertFalse(pidAlive(pid))
        await tap.free(minor)
        self.assertEqual(await tap.list(), [])
        self.assertEqual(
            [e["cmd"] for e in events(state)],
            [
                "spawn",
                "allocate",
                "list",
                "attach",
                "open",
                "close",
                "list",
                "detach",
                "free",
                "list",
            ],
        )

    async def test_typedError(self) -> None:
        """A non-zero exit is a TapCtlError with the command, exit code and stderr."""
        tap, _state = fakeTapCtl(self)
        try:
            await tap.open(99999, 0, "aio:/x")
        except TapCtlError as e:
            self.assertEqual(e.command[-7:], ["open", "-p", "99999", "-m", "0", "-a", "aio:/x"])
            self.assertEqual(e.exitCode, 3)  # ESRCH
            self.assertIn("no tapdisk", e.stderr)
            self.assertIn("exit 3", str(e))
        else:
            self.fail("no TapCtlError")

    async def test_createUndoneOnFailure(self) -> None:
        """create failing at open leaves no process, no minor, no node."""
        tap, state = fakeTapCtl(self)
        inject(state, "open", 28, "no space\n")
        img = self.image()
        try:
            await tap.create(f"aio:{img}")
        except TapCtlError as e:
            self.assertEqual((e.exitCode, e.stderr), (28, "no space\n"))
        else:
            self.fail("no TapCtlError")
        self.assertEqual(await tap.list(), [])
        spawned = [e for e in events(state) if e["cmd"] == "create"]
        self.assertEqual(len(spawned), 1)
        self.assertEqual(os.listdir(os.path.join(state, "root", "dev", "xen", "blktap-2")), [])

    async def test_failureForOneTapdisk(self) -> None:
        """
        A failure injected for one pid fails that tapdisk's pause only, with
        the injected code and message; the other pauses, and the first once
        the injection is removed.
        """
        tap, state = fakeTapCtl(self)
        img = self.image()
        for _ in range(2):
            await tap.create(f"aio:{img}")
        first, second = await tap.list()
        assert first.pid is not None and second.pid is not None
        assert first.minor is not None and second.minor is not None
        path = inject(state, "pause", 16, "busy\n", pid=first.pid)
        try:
            await tap.pause(first.pid, first.minor)
        except TapCtlError as e:
            self.assertEqual((e.exitCode, e.stderr), (16, "busy\n"))
        else:
            self.fail("no TapCtlError")
        await tap.pause(second.pid, second.minor)
        self.assertEqual([r.paused for r in await tap.list()], [False, True])
        self.assertEqual((procState(first.pid), procState(second.pid)), ("S", "T"))
        os.unlink(path)
        await tap.pause(first.pid, first.minor)
        self.assertEqual(procState(first.pid), "T")

    async def test_missingBinary(self) -> None:
        """A binary that cannot be run is a TapCtlError too."""
        tap = TapCtl("/nonexistent/tap-ctl")
        try:
            await tap.list()
        except TapCtlError as e:
            self.assertEqual(e.command, ["/nonexistent/tap-ctl", "list"])
        else:
            self.fail("no TapCtlError")

    async def test_runThroughShebang(self) -> None:
        """The stand-in is an executable on its own (#!/usr/bin/env python3)."""
        tap, _state = fakeTapCtl(self, direct=True)
        pid = await tap.spawn()
        (row,) = await tap.list()
        self.assertEqual(row.pid, pid)


class BlktapSysfsTests(SynchronousTestCase):
    """The Xen 4.0 kernel interface, under a temporary root."""

    def setUp(self) -> None:
        self.root = self.mktemp()
        for minor in (0, 3):
            os.makedirs(os.path.join(self.root, f"sys/class/blktap2/blktap{minor}"))
        os.makedirs(os.path.join(self.root, "proc"))
        with open(os.path.join(self.root, "proc/devices"), "w") as f:
            f.write("Block devices:\n254 blktap2\n")

    def test_writes(self) -> None:
        """pause/resume/remove write their word to the node of the same name."""
        sysfs = BlktapSysfs(self.root)
        self.assertTrue(sysfs.installed())
        self.assertEqual(sysfs.minors(), [0, 3])
        sysfs.pause(3)
        sysfs.resume(3)
        sysfs.remove(3)
        for node in ("pause", "resume", "remove"):
            with open(os.path.join(sysfs.controlDir(3), node)) as f:
                self.assertEqual(f.read(), node)
        self.assertEqual(sysfs.devicePath(3), os.path.join(self.root, "dev/xen/blktap-2/tapdev3"))

    def test_notInstalled(self) -> None:
        """Without blktap2 in /proc/devices it is not installed."""
        self.assertFalse(BlktapSysfs(self.mktemp()).installed())
