"""
The C{qemu} driver-domain kind end to end: the agent, the real
C{qemu-storage-daemon} (QMP, NBD export), C{qemu-img}/C{qemu-io} writing
and reading through the export, live coalesce, daemon death, agent
restart. The kernel backend and guest frontend are simulated
(L{xenddev.simulator}); every test compares the whole tree with its start.
Run over the C xenstored and the embedded one.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from typing import Any, cast

from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tests.support.fixtures import EmbeddedXenstoredFixture, RealXenstoredFixture
from tests.support.host import (
    DEFAULT_BACKEND_CLASSES,
    HostSuite,
    attachByProtocol,
    closeBackend,
    detachByProtocol,
    shortTempDir,
    startDriverDomain,
    startFrontend,
)
from tests.support.treedump import dumpTree
from tests.support.xenstoresuite import deferredTest
from xenddev.backendctrl.errors import DriverDomainError
from xenddev.backendctrl.protocol import ObjectClass
from xenddev.backendctrl.records import readRecord, registryDir, scanRegistry
from xenddev.datapath.coalesce import coalesceQemu
from xenddev.driverdomain.agent import BackendCtrlAgent
from xenddev.driverdomain.hotplug import blockEnvironment
from xenddev.driverdomain.kinds.base import PlugSpec
from xenddev.driverdomain.kinds.qemu import QemuKind, nbdURI
from xenddev.interfaces import INbdAttacher
from xenddev.toolstack.client import DriverDomainClient, PlugResult
from xenddev.xenbus import HotplugStatus, waitForHotplugStatus, waitForState

GUEST = 5
VBD_FRONT = f"/local/domain/{GUEST}/device/vbd/51728"
VDI = ObjectClass("vdi", "vbd", "vbd")
TIMEOUT = 20.0
QSD = shutil.which("qemu-storage-daemon")
QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")
MISSING = (
    "needs qemu-storage-daemon (Debian qemu-system-common) and qemu-img, qemu-io "
    "(Debian qemu-utils)"
)


def qemuImg(*args: str) -> None:
    """Run qemu-img (test set-up only, off the code under test)."""
    subprocess.run([QEMU_IMG or "qemu-img", *args], check=True, capture_output=True)


def qemuIO(target: str, command: str, fmt: str = "raw") -> str:
    """Run one qemu-io command (reads of files shared: a daemon may hold them); fail on error."""
    args = [QEMU_IO or "qemu-io", "-f", fmt]
    if not target.startswith("nbd") and command.startswith("read"):
        args += ["-r", "-U"]
    out = subprocess.run([*args, "-c", command, target], capture_output=True, text=True)
    if out.returncode != 0 or "Pattern verification failed" in out.stdout + out.stderr:
        raise AssertionError(f"qemu-io {command!r} on {target}: {out.stdout}{out.stderr}")
    return out.stdout


def pidAlive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except OSError:
        return False


class QemuFixtureMixin(HostSuite):
    """Set-up and helpers (no tests): a store, a guest, a runtime directory."""

    async def _setUp(self) -> None:
        if QSD is None or QEMU_IMG is None or QEMU_IO is None:
            self.skipTest(MISSING)
        self.startServer()
        self.xs = await self.connect()
        await self.xs.mkdir(f"/local/domain/{GUEST}/device/vbd")
        self.frontend = await startFrontend(self, GUEST)
        # Short: UNIX socket paths must fit in 107 bytes.
        self.workdir = shortTempDir(self, "xq-")
        self.runtime = os.path.join(self.workdir, "run")

    def setUp(self) -> Any:
        return Deferred.fromCoroutine(self._setUp())

    def kind(self) -> QemuKind:
        """A qemu kind with a test runtime directory; kills its daemons at cleanup."""
        kind = QemuKind(reactor, runtimeDir=self.runtime, host="testhost", timeout=TIMEOUT)

        def killLeftovers() -> None:
            for daemon in list(kind._daemons.values()):
                if daemon.pid and pidAlive(daemon.pid):
                    os.kill(daemon.pid, signal.SIGKILL)

        self.addCleanup(killLeftovers)
        return kind

    async def startDriverDomain(
        self, domid: int = 0, kind: QemuKind | None = None, simulated: bool = True
    ) -> tuple[BackendCtrlAgent, QemuKind]:
        """An agent serving with the qemu kind, and (C{simulated}) the simulated kernel end."""
        kind = kind or self.kind()
        dd = await startDriverDomain(
            self,
            self.xs,
            domid,
            [kind],
            mkdirs=[registryDir(domid)],
            backendClasses=DEFAULT_BACKEND_CLASSES if simulated else None,
        )
        return dd.agent, kind

    def chain(self, name: str = "leaf", base: str | None = None) -> tuple[str, str]:
        """A qcow2 base with a 1 MiB 0x11 pattern, and a qcow2 overlay on it."""
        if base is None:
            base = os.path.join(self.workdir, "base.qcow2")
            qemuImg("create", "-f", "qcow2", base, "16M")
            qemuIO(base, "write -P 0x11 0 1M", "qcow2")
        leaf = os.path.join(self.workdir, f"{name}.qcow2")
        qemuImg("create", "-f", "qcow2", "-b", base, "-F", "qcow2", leaf)
        return base, leaf

    async def attach(self, client: DriverDomainClient, name: str, image: str) -> PlugResult:
        """prepare, plug, frontend, activate, and wait until connected."""
        target = {"type": "file", "format": "qcow2", "params": image}
        plug = await attachByProtocol(self.xs, client, name, target, VBD_FRONT, VDI, GUEST)
        status = await waitForHotplugStatus(self.xs, plug.backendPath, TIMEOUT)
        self.assertEqual(status.status, HotplugStatus.Connected)
        await waitForState(self.xs, plug.backendPath, 4, TIMEOUT)
        return plug

    async def detach(self, client: DriverDomainClient, name: str, plug: PlugResult) -> None:
        """Close, wait for Closed, drop the frontend, unplug, deactivate, unprepare."""
        await detachByProtocol(self.xs, client, name, plug, VDI, TIMEOUT)


class QemuKindSuite(QemuFixtureMixin):
    """The kind's tests; mixed with a server fixture and TestCase."""

    @deferredTest
    async def test_lifecycle(self) -> None:
        """
        A qcow2 overlay attached through the agent: a daemon runs, the
        backend names the NBD export, the data path is registered with its
        chain; data written with qemu-io through the export reads back (and
        the parent's data shows through); detach stops the export, quits
        and reaps the daemon, removes its runtime directory, and leaves the
        tree as it was.
        """
        base, leaf = self.chain()
        agent, kind = await self.startDriverDomain()
        client = DriverDomainClient(self.xs, 0, TIMEOUT)
        before = await dumpTree(self.xs)
        plug = await self.attach(client, "d1", leaf)
        daemon = kind.daemonFor(0, "d1")
        assert daemon is not None
        self.assertTrue(pidAlive(daemon.pid))
        uri = nbdURI("d1", daemon.nbdPath)
        self.assertEqual(await self.xs.read(f"{plug.backendPath}/params"), uri)
        self.assertEqual(await self.xs.read(f"{plug.backendPath}/type"), "qdisk")
        for sock in (daemon.qmpPath, daemon.ctlPath, daemon.nbdPath):
            self.assertEqual(os.stat(sock).st_mode & 0o777, 0o600)
        self.assertEqual(os.stat(daemon.rundir).st_mode & 0o777, 0o700)
        record = await readRecord(self.xs, 0, "d1")
        assert record is not None
        self.assertEqual(
            (record.kind, record.host, record.pid, record.image, record.chain),
            ("qemu", "testhost", daemon.pid, leaf, (leaf, base)),
        )
        self.assertEqual(record.qmp, daemon.ctlPath)
        qemuIO(uri, "write -P 0x5a 4M 1M")
        qemuIO(uri, "read -P 0x5a 4M 1M")
        qemuIO(uri, "read -P 0x11 0 1M")
        pid = daemon.pid
        await self.detach(client, "d1", plug)
        self.assertFalse(pidAlive(pid))
        self.assertFalse(os.path.exists(daemon.rundir))
        # The data went to the overlay, not to the parent.
        qemuIO(leaf, "read -P 0x5a 4M 1M", "qcow2")
        qemuIO(base, "read -P 0 4M 1M", "qcow2")
        await self.assertTreeIs(before, agent)

    @deferredTest
    async def test_wrongFormatRefused(self) -> None:
        """
        A raw file declared qcow2: prepare fails with EINVAL naming the real
        format, no daemon is left, the tree is unchanged.
        """
        img = os.path.join(self.workdir, "raw.img")
        with open(img, "wb") as f:
            f.truncate(1 << 20)
        agent, kind = await self.startDriverDomain()
        client = DriverDomainClient(self.xs, 0, TIMEOUT)
        before = await dumpTree(self.xs)
        with self.assertRaises(DriverDomainError) as cm:
            await client.prepare("bad", {"type": "file", "format": "qcow2", "params": img}, VDI)
        self.assertEqual(cm.exception.errname, "EINVAL")
        self.assertIn("raw", cm.exception.message)
        self.assertEqual(kind._daemons, {})
        await self.assertTreeIs(before, agent)

    @deferredTest
    async def test_liveCoalesce(self) -> None:
        """
        Data written through the export into the overlay; the overlay is
        committed into its parent while the export stays up (a qemu-io
        client connected during the job is not needed: the export is never
        removed); the data reads back through the same URI, is now in the
        parent, and the registry shows the shortened chain. Detach still
        works afterwards, leaving the tree as before.
        """
        base, leaf = self.chain()
        agent, kind = await self.startDriverDomain()
        client = DriverDomainClient(self.xs, 0, TIMEOUT)
        before = await dumpTree(self.xs)
        plug = await self.attach(client, "c1", leaf)
        daemon = kind.daemonFor(0, "c1")
        assert daemon is not None
        uri = nbdURI("c1", daemon.nbdPath)
        qemuIO(uri, "write -P 0x77 2M 2M")
        record = await readRecord(self.xs, 0, "c1")
        assert record is not None
        updated = await coalesceQemu(reactor, self.xs, record, TIMEOUT)
        self.assertEqual((updated.image, updated.chain), (base, (base,)))
        self.assertEqual(await readRecord(self.xs, 0, "c1"), updated)
        qemuIO(uri, "read -P 0x77 2M 2M")
        qemuIO(uri, "read -P 0x11 0 1M")
        qemuIO(base, "read -P 0x77 2M 2M", "qcow2")
        await self.detach(client, "c1", plug)
        await self.assertTreeIs(before, agent)

    @deferredTest
    async def test_daemonDeathReported(self) -> None:
        """
        The daemon is killed: the kind reports hotplug-status=error with a
        hotplug-error naming the daemon on the backend; a new activate
        fails with EIO; the VDI can still be detached, tree as before.
        """
        _, leaf = self.chain()
        agent, kind = await self.startDriverDomain()
        client = DriverDomainClient(self.xs, 0, TIMEOUT)
        before = await dumpTree(self.xs)
        plug = await self.attach(client, "k1", leaf)
        daemon = kind.daemonFor(0, "k1")
        assert daemon is not None
        os.kill(daemon.pid, signal.SIGKILL)
        await self.xs.waitFor(f"{plug.backendPath}/hotplug-status", lambda v: v == "error", TIMEOUT)
        error = await self.xs.read(f"{plug.backendPath}/hotplug-error")
        self.assertIn("qemu-storage-daemon", error)
        self.assertIn(str(daemon.pid), error)
        await client.deactivate("k1", VDI)
        with self.assertRaises(DriverDomainError) as cm:
            await client.activate("k1", VDI)
        self.assertEqual(cm.exception.errname, "EIO")
        self.assertIn("died", cm.exception.message)
        await closeBackend(self.xs, plug, TIMEOUT)
        await self.xs.rm(plug.frontendPath)
        await client.unplug("k1", "p0", VDI)
        await client.unprepare("k1", VDI)
        await self.assertTreeIs(before, agent)

    @deferredTest
    async def test_agentRestart(self) -> None:
        """
        The agent crashes (its QMP connections drop; the daemon lives on):
        the registry read back from XenStore still lists the data path; a
        new agent with a new kind instance reconnects to the recorded
        daemon (same pid) and detaches cleanly, quitting it.
        """
        _, leaf = self.chain()
        agent, kind = await self.startDriverDomain()
        client = DriverDomainClient(self.xs, 0, TIMEOUT)
        before = await dumpTree(self.xs)
        plug = await self.attach(client, "r1", leaf)
        daemon = kind.daemonFor(0, "r1")
        assert daemon is not None
        pid = daemon.pid
        await agent.stop()
        await kind.disconnectAll()
        (record,) = await scanRegistry(self.xs)
        self.assertEqual((record.vdi, record.pid, record.kind), ("r1", pid, "qemu"))
        newKind = self.kind()
        newKind._daemons  # noqa: B018 (the cleanup kills what this one knows)
        agent2, _ = await self.startDriverDomain(kind=newKind)
        qemuIO(nbdURI("r1", daemon.nbdPath), "read -P 0x11 0 1M")
        await self.detach(client, "r1", plug)
        self.assertFalse(pidAlive(pid))
        await self.assertTreeIs(before, agent2)

    @deferredTest
    async def test_servedThroughKernel(self) -> None:
        """
        With a kernel NBD attacher (a Linux driver domain): prepare exports
        the image and has a device connected to the export (the export
        answers at that moment), recorded as C{nbd-device}; plug makes a
        blkback backend on that device run by the C{block} script; activate
        registers the device with the data path; deactivate leaves the
        export up (the kernel holds it); unprepare disconnects the device
        while the daemon still runs, then quits it. Tree as before.
        """
        _, leaf = self.chain()
        attacher = _ExportCheckingAttacher()
        verifyObject(INbdAttacher, attacher)
        kind = self.kind()
        kind.nbd = attacher
        agent, _ = await self.startDriverDomain(kind=kind, simulated=False)
        client = DriverDomainClient(self.xs, 0, TIMEOUT)
        before = await dumpTree(self.xs)
        target = {"type": "file", "format": "qcow2", "params": leaf, "mode": "w"}
        await client.prepare("n1", target, VDI)
        daemon = kind.daemonFor(0, "n1")
        assert daemon is not None
        uri = nbdURI("n1", daemon.nbdPath)
        self.assertEqual(attacher.calls, [("attach", daemon.nbdPath, "n1", False, True)])
        plug = await client.plug("n1", "p0", VBD_FRONT, VDI)
        backend = plug.backendPath
        values = {k: await self.xs.read(f"{backend}/{k}") for k in ("type", "params", "mode")}
        self.assertEqual(values, {"type": "phy", "params": "/dev/nbd7", "mode": "w"})
        self.assertEqual(await self.xs.read(f"{backend}/script"), "block")
        # Only the backend path matters to the command in this mode.
        spec = PlugSpec("p0", VBD_FRONT, cast(Any, None), backend=backend)
        command = kind.hotplugCommand(cast(Any, None), spec, "add")
        self.assertEqual(command, ("block", *blockEnvironment("add", backend)))
        await client.activate("n1", VDI)
        record = await readRecord(self.xs, 0, "n1")
        assert record is not None
        self.assertEqual(record.extra.get("nbd-device"), "/dev/nbd7")
        await client.deactivate("n1", VDI)
        qemuIO(uri, "read -P 0x11 0 1M")
        await client.unplug("n1", "p0", VDI)
        await client.unprepare("n1", VDI)
        self.assertEqual(attacher.calls[-1], ("detach", "/dev/nbd7", True))
        self.assertFalse(pidAlive(daemon.pid))
        await self.assertTreeIs(before, agent)


@implementer(INbdAttacher)
class _ExportCheckingAttacher:
    """
    Stands for the kernel's NBD client, which this host does not have (the
    real one runs in the real-Xen lane): records its calls, with whether
    the export answered (attach) or the daemon still ran (detach).
    """

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.connected: dict[str, str] = {}

    def attach(self, socketPath: str, export: str, readOnly: bool) -> Deferred[str]:
        answered = True
        try:
            qemuIO(nbdURI(export, socketPath), "read 0 512")
        except AssertionError:
            answered = False
        self.calls.append(("attach", socketPath, export, readOnly, answered))
        self.connected["/dev/nbd7"] = socketPath
        return succeed("/dev/nbd7")

    def detach(self, device: str) -> Deferred[None]:
        socketPath = self.connected.pop(device)
        self.calls.append(("detach", device, os.path.exists(socketPath)))
        return succeed(None)

    def attached(self, device: str) -> bool:
        return device in self.connected


class RealXenstoredQemuKindTests(QemuKindSuite, RealXenstoredFixture, TestCase):
    """The qemu kind over the C xenstored."""


class EmbeddedXenstoredQemuKindTests(QemuKindSuite, EmbeddedXenstoredFixture, TestCase):
    """The qemu kind over the embedded xenstored."""
