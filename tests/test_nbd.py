"""
L{xenddev.driverdomain.nbd}: the kernel NBD client driven through
C{nbd-client}. This host has no C{nbd} driver, so a stand-in C{nbd-client}
program plays the kernel's part on a sysfs-like directory (the real one
runs in the real-Xen lane, tests/test_realxen.py's qcow2 test); the driver
list of kinds (C{auto}) is checked with it too.
"""

from __future__ import annotations

import sys
from pathlib import Path

from twisted.internet import reactor
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from tests.support.xenstoresuite import deferredTest
from xenddev.driverdomain.kinds import availableKinds
from xenddev.driverdomain.nbd import KernelNbd, NbdError, moduleAvailable
from xenddev.interfaces import INbdAttacher

#: The stand-in: "connects" by creating <sys>/<nbdN>/pid, refuses (exit 1)
#: when <sys>/<nbdN>/taken exists (someone else connects it meanwhile),
#: fails when <sys>/fail exists; logs its arguments.
FAKE_CLIENT = """\
import os, sys
sysblock = SYSBLOCK
with open(os.path.join(sysblock, "calls"), "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\\n")
if os.path.exists(os.path.join(sysblock, "fail")):
    sys.stderr.write("Negotiation failed\\n")
    sys.exit(1)
if sys.argv[1] == "-d":
    os.unlink(os.path.join(sysblock, os.path.basename(sys.argv[2]), "pid"))
    sys.exit(0)
name = os.path.basename(sys.argv[3])
if os.path.exists(os.path.join(sysblock, name, "taken")):
    open(os.path.join(sysblock, name, "pid"), "w").write("1")
    sys.stderr.write("Error: Device busy\\n")
    sys.exit(1)
open(os.path.join(sysblock, name, "pid"), "w").write(str(os.getpid()))
"""


class KernelNbdTests(TestCase):
    """KernelNbd with a stand-in nbd-client."""

    def setUp(self) -> None:
        self.sys = Path(self.mktemp())
        for name in ("nbd0", "nbd1", "nbd2", "nbd10", "loop0"):
            (self.sys / name).mkdir(parents=True)
        client = self.sys.parent / "nbd-client"
        # nbd-client gets a minimal environment: the directory is in its text.
        client.write_text(f"#!{sys.executable}\nSYSBLOCK = {str(self.sys)!r}\n{FAKE_CLIENT}")
        client.chmod(0o755)
        self.nbd = KernelNbd(
            reactor,
            client=str(client),
            modprobe="/bin/true",
            sysBlock=str(self.sys),
            devDir="/dev",
            moduleLoaded=lambda: True,
        )

    def calls(self) -> list[str]:
        """What the stand-in was asked, one line per run."""
        path = self.sys / "calls"
        return path.read_text().splitlines() if path.exists() else []

    def test_interface(self) -> None:
        """KernelNbd provides INbdAttacher."""
        self.assertTrue(verifyObject(INbdAttacher, self.nbd))

    @deferredTest
    async def test_attachFirstFree(self) -> None:
        """
        The first device without a C{pid} is connected with the socket,
        the export's name, 512-byte blocks (and -readonly when asked);
        C{attached} then says so, and C{detach} disconnects it.
        """
        (self.sys / "nbd0" / "pid").write_text("99")
        device = await self.nbd.attach("/run/x/nbd", "vdi1", True)
        self.assertEqual(device, "/dev/nbd1")
        self.assertEqual(
            self.calls(), ["-unix /run/x/nbd /dev/nbd1 -name vdi1 -block-size 512 -readonly"]
        )
        self.assertTrue(self.nbd.attached(device))
        self.assertEqual(await self.nbd.attach("/run/x/nbd", "vdi2", False), "/dev/nbd2")
        await self.nbd.detach(device)
        self.assertFalse(self.nbd.attached(device))
        self.assertEqual(self.calls()[-1], "-d /dev/nbd1")

    @deferredTest
    async def test_takenMeanwhileTriesNext(self) -> None:
        """A device the kernel refuses because another client took it: the next is tried."""
        (self.sys / "nbd0" / "taken").write_text("")
        self.assertEqual(await self.nbd.attach("/s", "e", False), "/dev/nbd1")

    @deferredTest
    async def test_noFreeDevice(self) -> None:
        """Every device connected: NbdError saying so, and how many there are."""
        for name in ("nbd0", "nbd1", "nbd2", "nbd10"):
            (self.sys / name / "pid").write_text("1")
        with self.assertRaises(NbdError) as cm:
            await self.nbd.attach("/s", "e", False)
        self.assertIn("no free nbd device among 4", str(cm.exception))
        self.assertEqual(self.calls(), [])

    @deferredTest
    async def test_failureNamesDeviceAndExport(self) -> None:
        """A negotiation failure: NbdError with the client's message; no device left claimed."""
        (self.sys / "fail").write_text("")
        with self.assertRaises(NbdError) as cm:
            await self.nbd.attach("/s", "vdi9", False)
        self.assertIn("/dev/nbd0", str(cm.exception))
        self.assertIn("vdi9", str(cm.exception))
        self.assertIn("Negotiation failed", str(cm.exception))
        self.assertFalse(self.nbd.attached("/dev/nbd0"))

    @deferredTest
    async def test_detachOfUnconnectedDoesNothing(self) -> None:
        """Detaching a device that is not connected runs nothing."""
        await self.nbd.detach("/dev/nbd2")
        self.assertEqual(self.calls(), [])

    @deferredTest
    async def test_moduleLoadedFirst(self) -> None:
        """Without the module, modprobe runs first; its failure is an NbdError."""
        nbd = KernelNbd(
            reactor,
            client="/bin/false",
            modprobe="/bin/false",
            sysBlock=str(self.sys),
            moduleLoaded=lambda: False,
        )
        with self.assertRaises(NbdError) as cm:
            await nbd.attach("/s", "e", False)
        self.assertIn("cannot load the kernel's nbd module", str(cm.exception))


class ModuleAvailableTests(TestCase):
    """moduleAvailable reads sysfs and the module lists."""

    def test_loaded(self) -> None:
        """A loaded module (C{/sys/module/nbd}) is available."""
        sysModule = Path(self.mktemp())
        (sysModule / "nbd").mkdir(parents=True)
        self.assertTrue(moduleAvailable("6.1.0", str(sysModule), "/nonexistent"))

    def test_listed(self) -> None:
        """Named in modules.dep (loadable) or modules.builtin: available; else not."""
        lib = Path(self.mktemp())
        (lib / "6.1.0").mkdir(parents=True)
        dep = lib / "6.1.0" / "modules.dep"
        dep.write_text("kernel/drivers/block/loop.ko: \nkernel/drivers/block/nbdx.ko:\n")
        self.assertFalse(moduleAvailable("6.1.0", "/nonexistent", str(lib)))
        dep.write_text("kernel/drivers/block/nbd.ko.xz: \n")
        self.assertTrue(moduleAvailable("6.1.0", "/nonexistent", str(lib)))
        dep.unlink()
        (lib / "6.1.0" / "modules.builtin").write_text("kernel/drivers/block/nbd.ko\n")
        self.assertTrue(moduleAvailable("6.1.0", "/nonexistent", str(lib)))


class KernelKindsTests(TestCase):
    """C{auto} kinds when the kernel's backends serve."""

    def test_qemuNeedsNbd(self) -> None:
        """
        With the kernel's backends, qemu needs nbd-client and the nbd driver
        too, and the reason names what is missing; simulated, neither.
        """
        tools = {"qemu-storage-daemon", "qemu-img"}

        def which(name: str) -> str | None:
            return f"/usr/bin/{name}" if name in tools else None

        present, missing = availableKinds(which, kernel=True, kernelHasNbd=lambda: True)
        self.assertNotIn("qemu", present)
        self.assertEqual(missing["qemu"], "no nbd-client")
        tools.add("nbd-client")
        present, missing = availableKinds(which, kernel=True, kernelHasNbd=lambda: False)
        self.assertEqual(missing["qemu"], "no nbd driver in this kernel")
        present, _ = availableKinds(which, kernel=True, kernelHasNbd=lambda: True)
        self.assertIn("qemu", present)
        tools.discard("nbd-client")
        present, _ = availableKinds(which, kernel=False)
        self.assertIn("qemu", present)
