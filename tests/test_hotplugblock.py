"""
The built-in C{block} script (L{xenddev.driverdomain.hotplugblock}) and the loop devices
it makes (L{xenddev.driverdomain.loopctl}): the real script's own suite
(L{tests.test_hotplug.BlockScriptSuite}, real loop devices, the C and the
embedded xenstored) run against the built-in, plus what only the built-in
promises (read-only loop devices, concurrent adds, the script's lock shared
with the real script, a cancelled run releasing it).
"""

from __future__ import annotations

import fcntl
import os
import threading

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from tests.support.fixtures import EmbeddedXenstoredFixture
from tests.support.loopdev import loopDevicesFor
from tests.test_hotplug import (
    BLOCK_BACKEND,
    BLOCK_BACKEND_REL,
    BlockScriptSuite,
    RealXenstoredHotplugFixture,
    majorMinor,
)
from xenddev.driverdomain.hotplug import (
    HotplugRunner,
    HotplugScriptError,
    HotplugTimeout,
    blockEnvironment,
)
from xenddev.driverdomain.hotplugblock import BuiltinBlockScript, canonicalMode
from xenddev.interfaces import IBuiltinScript


class BuiltinBlockSuite(BlockScriptSuite):
    """The real script's tests, and the built-in's own, with C{block} built in."""

    async def setUpStore(self) -> None:
        """The store and a runner whose C{block} is the built-in (lock file per test)."""
        self.startServer()
        self.store = await self.connect()
        self.lockFile = os.path.join(os.path.abspath(self.mktemp()), "block")
        self.builtin = BuiltinBlockScript(self.store, 0, reactor, lockFile=self.lockFile)
        self.runner = HotplugRunner(
            reactor=reactor, xenstore=self.store, builtins={"block": self.builtin}
        )

    def test_interface(self) -> None:
        """BuiltinBlockScript provides IBuiltinScript."""
        self.assertTrue(verifyObject(IBuiltinScript, self.builtin))

    async def test_missingNode(self) -> None:
        """A backend without mode: error naming the missing node (the script's is generic)."""
        await self.writeBackend()
        await self.store.rm(f"{BLOCK_BACKEND}/mode")
        with self.assertRaises(HotplugScriptError) as cm:
            await self.runner.run("block", *blockEnvironment("add", BLOCK_BACKEND_REL))
        self.assertEqual(cm.exception.hotplugError, f"{BLOCK_BACKEND}/mode is missing")
        self.assertEqual(await self.node(f"{BLOCK_BACKEND}/hotplug-status"), "error")

    async def test_missingFile(self) -> None:
        """
        params naming nothing: an error saying so (the real script reports
        connected, then exits 1 for want of a helper).
        """
        missing = os.path.join(os.path.dirname(self.image), "missing.img")
        await self.writeBackend(params=missing)
        with self.assertRaises(HotplugScriptError) as cm:
            await self.runner.run("block", *blockEnvironment("add", BLOCK_BACKEND_REL))
        self.assertEqual(
            cm.exception.hotplugError, f"{missing} is neither a block device nor a file"
        )
        self.assertEqual(await self.node(f"{BLOCK_BACKEND}/hotplug-status"), "error")

    async def test_sharedWrite(self) -> None:
        """
        A file another VM's backend uses read-write (through its loop
        device), asked read-write, then read-only, for guest 6: busy each
        time, with the script's messages naming the loop device; no second
        loop device. (The real script misses this; see the base test.)
        """
        for mode, m1, m2 in (("w", "", ""), ("r", "read-write ", "read-only ")):
            loop, other = await self.shareWithSecondGuest(mode)
            with self.assertRaises(HotplugScriptError) as cm:
                await self.runner.run("block", *blockEnvironment("add", "backend/vbd/6/51712"))
            self.assertEqual(
                cm.exception.hotplugError,
                f"File {self.image} is loopback-mounted through {majorMinor(loop)},\n"
                f"which is mounted {m1}in a guest domain,\nand so cannot be mounted {m2}now.",
            )
            self.assertEqual(await self.node(f"{other}/hotplug-status"), "busy")
            self.assertEqual(loopDevicesFor(self.image), [loop])
            await self.runner.run("block", *blockEnvironment("remove", BLOCK_BACKEND_REL))
            await self.store.rm(other)
            await self.store.rm(f"{BLOCK_BACKEND}/physical-device")

    async def test_sameVmShares(self) -> None:
        """The same VM (same vm path) may use the file twice read-write."""
        _, other = await self.shareWithSecondGuest("w")
        await self.writeNodes("/local/domain/6", {"vm": "/vm/five"})
        await self.runner.run("block", *blockEnvironment("add", "backend/vbd/6/51712"))
        self.assertEqual(await self.node(f"{other}/hotplug-status"), "connected")

    async def test_readOnlyLoop(self) -> None:
        """Mode r: the loop device itself is read-only (the guest cannot write through it)."""
        await self.writeBackend(mode="r")
        await self.runner.run("block", *blockEnvironment("add", BLOCK_BACKEND_REL))
        (loop,) = loopDevicesFor(self.image)
        with open(f"/sys/block/{os.path.basename(loop)}/ro") as f:
            self.assertEqual(f.read().strip(), "1")
        await self.runner.run("block", *blockEnvironment("remove", BLOCK_BACKEND_REL))
        self.assertEqual(loopDevicesFor(self.image), [])

    async def test_concurrentAdds(self) -> None:
        """Four disks added at once (read-only, one file): four loop devices, all connected."""
        backends = [f"/local/domain/0/backend/vbd/5/{51712 + 16 * i}" for i in range(4)]
        for backend in backends:
            await self.writeNodes(
                backend, {"frontend-id": "5", "state": "2", "mode": "r", "params": self.image}
            )
        await gatherResults(
            [self.runner.run("block", *blockEnvironment("add", b)) for b in backends]
        )
        paths = [await self.node(f"{b}/physical-device-path") for b in backends]
        self.assertEqual(sorted(p or "" for p in paths), sorted(loopDevicesFor(self.image)))
        self.assertEqual(len(set(paths)), 4)
        await gatherResults(
            [self.runner.run("block", *blockEnvironment("remove", b)) for b in backends]
        )
        self.assertEqual(loopDevicesFor(self.image), [])

    async def test_waitsForTheScriptsLock(self) -> None:
        """
        While another holder (the real script, run by xl) has the lock, an
        add waits; it runs once the holder releases (unlinks) it, and
        leaves no lock file behind.
        """
        await self.writeBackend()
        os.makedirs(os.path.dirname(self.lockFile), exist_ok=True)
        fd = os.open(self.lockFile, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        d = self.runner.run("block", *blockEnvironment("add", BLOCK_BACKEND_REL))
        await deferLater(reactor, 0.3, lambda: None)
        self.assertFalse(d.called)
        self.assertEqual(loopDevicesFor(self.image), [])
        os.unlink(self.lockFile)
        os.close(fd)
        await d
        self.assertEqual(len(loopDevicesFor(self.image)), 1)
        self.assertFalse(os.path.exists(self.lockFile))

    async def test_timeoutWhileWaitingReleasesLock(self) -> None:
        """
        A run that times out waiting for the lock fails with HotplugTimeout;
        when the holder lets go, the abandoned waiter does not keep the
        lock: the next add gets it.
        """
        await self.writeBackend()
        os.makedirs(os.path.dirname(self.lockFile), exist_ok=True)
        fd = os.open(self.lockFile, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        with self.assertRaises(HotplugTimeout):
            await self.runner.run("block", *blockEnvironment("add", BLOCK_BACKEND_REL), timeout=0.2)
        os.unlink(self.lockFile)
        os.close(fd)
        await self.runner.run("block", *blockEnvironment("add", BLOCK_BACKEND_REL), timeout=10)
        self.assertEqual(len(loopDevicesFor(self.image)), 1)
        released = Deferred.fromCoroutine(self._lockFree())
        self.assertTrue(await released)

    async def _lockFree(self) -> bool:
        """Whether the lock can be taken now (from a thread, like the built-in)."""
        done = threading.Event()

        def take() -> None:
            fd = os.open(self.lockFile, os.O_RDWR | os.O_CREAT)
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.close(fd)
            done.set()

        threading.Thread(target=take, daemon=True).start()
        for _ in range(100):
            if done.is_set():
                return True
            await deferLater(reactor, 0.02, lambda: None)
        return False


class CanonicalModeTests(TestCase):
    """canonicalMode is the script's canonicalise_mode."""

    def test_modes(self) -> None:
        """r/ro → r; w/rw → w; w!/rw! → ! (no sharing checks)."""
        cases = {"r": "r", "ro": "r", "w": "w", "rw": "w", "w!": "!", "rw!": "!"}
        self.assertEqual({m: canonicalMode(m) for m in cases}, cases)


class BuiltinBlockRealTests(BuiltinBlockSuite, RealXenstoredHotplugFixture, TestCase):
    """The built-in block script over the C xenstored."""


class BuiltinBlockEmbeddedTests(BuiltinBlockSuite, EmbeddedXenstoredFixture, TestCase):
    """The built-in block script over the embedded xenstored."""
