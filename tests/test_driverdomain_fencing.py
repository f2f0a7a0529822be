"""
The agent's fencing tokens (L{xenddev.driverdomain.fencing}) on their
own: how a storage target is named in the driver domain, and that two
activates of one target are decided one after the other (the record only
grows). The protocol end to end is in test_driverdomain.
"""

from __future__ import annotations

import os
import stat
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase

from xenddev.backendctrl.protocol import VDI, ControlPaths
from xenddev.driverdomain.fencing import FencingTokens, storageIdentity
from xenddev.driverdomain.kinds.base import KindError

PATHS = ControlPaths(VDI, 3, "disk0")


class _Stat:
    """A stat result with only what storageIdentity reads."""

    def __init__(self, mode: int, rdev: int) -> None:
        self.st_mode = mode
        self.st_rdev = rdev


class StorageIdentityTests(SynchronousTestCase):
    """What a target is named by in the driver domain."""

    def test_file(self) -> None:
        """A file by its real path (links resolved)."""
        directory = os.path.realpath(self.mktemp())
        os.makedirs(directory)
        image = os.path.join(directory, "a.img")
        open(image, "wb").close()
        link = os.path.join(directory, "link.img")
        os.symlink(image, link)
        for params in (image, link, directory + "/./a.img"):
            self.assertEqual(storageIdentity({"params": params}), f"file:{image}", params)

    def test_blockDevice(self) -> None:
        """A block device by its numbers; a relative path is under /dev/."""
        seen: list[str] = []

        def fake(path: str) -> Any:
            seen.append(path)
            return _Stat(stat.S_IFBLK | 0o600, os.makedev(8, 17))

        self.assertEqual(storageIdentity({"type": "phy", "params": "sdb1"}, fake), "dev:8:17")
        self.assertEqual(seen, ["/dev/sdb1"])

    def test_missingOrOther(self) -> None:
        """A missing path, or one that is neither file nor device, as written (normalised)."""
        self.assertEqual(storageIdentity({"params": "/no/such/../x.img"}), "file:/no/x.img")
        self.assertEqual(
            storageIdentity({"params": "/run"}, lambda p: _Stat(stat.S_IFDIR, 0)), "file:/run"
        )

    def test_nothingToFence(self) -> None:
        """No params (a vif), or an empty drive: no storage target."""
        self.assertIsNone(storageIdentity({"mac": "00:16:3e:00:00:01"}))
        self.assertIsNone(storageIdentity({"type": "empty", "params": ""}))


class _GatedStore:
    """Reads and writes of a dict; reads wait on a gate while one is set."""

    def __init__(self) -> None:
        self.nodes: dict[str, str] = {}
        self.gate: Deferred[None] | None = None
        self.reads = 0

    def readOrNone(self, path: str) -> Deferred[str | None]:
        self.reads += 1
        value = self.nodes.get(path)
        if self.gate is None:
            return succeed(value)
        held: Deferred[str | None] = Deferred()
        self.gate.addCallback(lambda _: held.callback(self.nodes.get(path)))
        return held

    def write(self, path: str, value: str) -> Deferred[None]:
        self.nodes[path] = value
        return succeed(None)


class AdmitTests(SynchronousTestCase):
    """L{FencingTokens.admit} with a store whose reads can be held."""

    def setUp(self) -> None:
        self.xs = _GatedStore()
        self.fencing = FencingTokens(self.xs, 3, identify=lambda t: t.get("params"))

    def admit(self, token: str | None, target: str = "file:/a") -> Deferred[None]:
        return Deferred.fromCoroutine(self.fencing.admit(PATHS, {"params": target}, token))

    def test_oneAfterTheOther(self) -> None:
        """
        Two activates of one target at once, the higher token first: the
        lower one is decided after the higher was recorded, and refused;
        the record keeps the higher.
        """
        self.xs.gate = Deferred()
        higher, lower = self.admit("12"), self.admit("10")
        self.assertEqual(self.xs.reads, 1)  # the second waits for the first
        gate, self.xs.gate = self.xs.gate, None
        gate.callback(None)
        self.successResultOf(higher)
        e = self.failureResultOf(lower, KindError).value
        self.assertEqual(e.errname, "EACCES")
        self.assertEqual(self.xs.nodes[self.fencing.record("file:/a")], "12 file:/a")
        self.assertEqual(len(self.fencing._locks), 0)

    def test_otherTargetsNotHeld(self) -> None:
        """A check of one target does not wait for another's."""
        self.xs.gate = Deferred()
        self.admit("12", "file:/a")
        self.admit("10", "file:/b")
        self.assertEqual(self.xs.reads, 2)

    def test_noTokenReadsNothing(self) -> None:
        """Token absent or 0: nothing read, nothing recorded."""
        self.successResultOf(self.admit(None))
        self.successResultOf(self.admit("0"))
        self.assertEqual((self.xs.reads, self.xs.nodes), (0, {}))

    def test_malformed(self) -> None:
        """A malformed token is EINVAL, before anything is read."""
        for text in ("x", "-3", "1" * 20, " 5", "٣"):
            e = self.failureResultOf(self.admit(text), KindError).value
            self.assertEqual(e.errname, "EINVAL", text)
        self.assertEqual(self.xs.reads, 0)

    def test_recordOfAnotherTarget(self) -> None:
        """A record naming another target (a shared digest) counts as none."""
        self.xs.nodes[self.fencing.record("file:/a")] = "50 file:/elsewhere"
        self.successResultOf(self.admit("5"))
        self.assertEqual(self.xs.nodes[self.fencing.record("file:/a")], "5 file:/a")
