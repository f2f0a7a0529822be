"""
The command-line client: C{main([...])} runs in a thread against
C{rpcSite(manager)} served by the test reactor on a UNIX socket (over the C
xenstored and the embedded one); C{--dry-run}, C{--help} and the daemon-less
errors need no server; one subprocess checks the console entry point and
that no Twisted is imported.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.support.fixtures import EmbeddedXenstoredFixture, RealXenstoredFixture
from tests.support.xenstoresuite import deferredTest
from tests.test_xmlrpc import GUEST, DeviceServiceFixture
from xenddev.cli import (
    EXIT_BAD_CONFIG,
    EXIT_EXISTS,
    EXIT_NO_DEVICE,
    EXIT_NO_DOMAIN,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    blockTable,
    defaultSocket,
    isXmForm,
    main,
    networkTable,
)

COMMANDS = (
    "block-attach",
    "block-detach",
    "block-list",
    "cd-insert",
    "cd-eject",
    "network-attach",
    "network-detach",
    "network-list",
    "status",
)


def run(argv: list[str], env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """main(argv) → (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code = main(argv, stdout=out, stderr=err, env=env or {})
    return code, out.getvalue(), err.getvalue()


class OfflineTests(SynchronousTestCase):
    """What works without a daemon."""

    def dryRun(self, *args: str) -> dict[str, Any]:
        """block-attach --dry-run; the JSON it printed."""
        code, out, err = run(["block-attach", "5", *args, "--dry-run"])
        self.assertEqual((code, err), (0, ""))
        result: dict[str, Any] = json.loads(out)
        return result

    def test_dryRunComponents(self) -> None:
        """The spec in several components is joined as xl joins it."""
        disk = self.dryRun("format=raw", "vdev=xvda", "access=rw", "target=/tmp/d.img")
        self.assertEqual(
            disk,
            {
                "target": "/tmp/d.img",
                "format": "raw",
                "vdev": "xvda",
                "access": "w",
                "devtype": "disk",
                "discard": True,
                "trusted": True,
                "direct-io-safe": False,
                "virtual-device": 51712,
            },
        )
        self.assertEqual(disk, self.dryRun("format=raw, vdev=xvda, access=rw, target=/tmp/d.img"))

    def test_dryRunAllKeys(self) -> None:
        """Every key the spec sets appears; an empty cdrom has no target."""
        disk = self.dryRun(
            "vdev=xvdb,access=ro,backend=3,backendtype=phy,script=block-iscsi,"
            "no-discard,untrusted,direct-io-safe,target=iqn.x"
        )
        self.assertEqual(
            (disk["backend"], disk["backendtype"], disk["script"], disk["access"]),
            ("3", "phy", "block-iscsi", "r"),
        )
        self.assertEqual(
            (disk["discard"], disk["trusted"], disk["direct-io-safe"]), (False, False, True)
        )
        cdrom = self.dryRun(",hdc:cdrom,r")
        self.assertNotIn("target", cdrom)
        self.assertEqual((cdrom["devtype"], cdrom["virtual-device"]), ("cdrom", 5632))

    def test_dryRunXmForm(self) -> None:
        """xm's <uname> <dev> <mode> [backdom] is recognised."""
        disk = self.dryRun("phy:/dev/sda", "xvdc", "w", "2")
        self.assertEqual(
            (disk["target"], disk["vdev"], disk["access"], disk["backend"]),
            ("/dev/sda", "xvdc", "w", "2"),
        )
        self.assertTrue(isXmForm(["file:/a.img", "hda", "r"]))
        self.assertFalse(isXmForm(["/a.img", "raw", "xvda", "w"]))
        self.assertFalse(isXmForm(["target=/a:b", "xvda", "w"]))

    def test_dryRunBadSpec(self) -> None:
        """A bad spec: exit 4, xl's parser message on one stderr line, nothing on stdout."""
        code, out, err = run(["block-attach", "5", "/x,raw,nonsense,w", "-N"])
        self.assertEqual((code, out), (EXIT_BAD_CONFIG, ""))
        self.assertTrue(err.startswith("xenddev block-attach: config parsing error"))
        self.assertEqual(err.count("\n"), 1)
        code, _, err = run(["block-attach", "5", "phy:/dev/sda", "bogus", "w", "-N"])
        self.assertEqual(code, EXIT_BAD_CONFIG)
        self.assertIn("vdev", err)

    def test_helpEverywhere(self) -> None:
        """--help works for the program and every command, exit 0."""
        code, out, _ = run(["--help"])
        self.assertEqual(code, 0)
        for command in COMMANDS:
            self.assertIn(command, out)
            code, out2, err = run([command, "--help"])
            self.assertEqual((code, err), (0, ""), command)
            self.assertTrue(out2.startswith(f"usage: xenddev {command}"), out2)

    def test_usageErrors(self) -> None:
        """Unknown commands, missing arguments and bad key=value: exit 2."""
        self.assertEqual(run(["bogus"])[0], EXIT_USAGE)
        self.assertEqual(run(["block-detach", "5"])[0], EXIT_USAGE)
        code, _, err = run(["network-attach", "5", "bridge"], {"XENDDEV_SOCKET": "/nonexistent"})
        self.assertEqual(code, EXIT_USAGE)
        self.assertIn("expected key=value", err)

    def test_unreachable(self) -> None:
        """No daemon on the socket: exit 10 and a hint, from --socket or XENDDEV_SOCKET."""
        code, _, err = run(["status", "--socket", "/nonexistent/x.sock"])
        self.assertEqual(code, EXIT_UNREACHABLE)
        self.assertIn("cannot reach the xenddev daemon at /nonexistent/x.sock", err)
        code, _, err = run(["block-list", "5"], {"XENDDEV_SOCKET": "/nonexistent/y.sock"})
        self.assertEqual(code, EXIT_UNREACHABLE)
        self.assertIn("/nonexistent/y.sock", err)

    def test_defaultSocket(self) -> None:
        """The socket default depends on the user; XENDDEV_SOCKET wins."""
        self.assertEqual(defaultSocket({"XENDDEV_SOCKET": "/s"}), "/s")
        expected = "/var/run/xenddev/xenddev.sock" if os.geteuid() == 0 else "./run/xenddev.sock"
        self.assertEqual(defaultSocket({}), expected)

    def test_tables(self) -> None:
        """xl's column headers; unknown values as -1."""
        self.assertEqual(
            blockTable([{"devid": 51712, "backend-id": 0, "handle": 51712}]).splitlines(),
            [
                "Vdev  BE  handle state evt-ch ring-ref BE-path",
                "51712 0   51712  -1    -1     -1       -",
            ],
        )
        header = networkTable([]).splitlines()[0]
        self.assertEqual(
            header, "Idx BE Mac Addr.         handle state evt-ch   tx-/rx-ring-ref BE-path"
        )

    def test_subprocessWithoutTwisted(self) -> None:
        """The console entry point runs a dry run in a process that never imports Twisted."""
        script = (
            "import sys\n"
            "from xenddev.cli import main\n"
            "code = main(['block-attach', '5', 'vhd:/srv/a.vhd,xvdb,w', '--dry-run'])\n"
            "assert not [m for m in sys.modules if m.startswith('twisted')], 'twisted imported'\n"
            "sys.exit(code)\n"
        )
        proc = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
        )
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(json.loads(proc.stdout)["format"], "vhd")


class CLIClientMixin:
    """Runs the command-line client against the XML-RPC socket C{self.rpcPath}."""

    rpcPath: str
    assertEqual: Any

    def cli(self, *argv: str) -> Deferred[tuple[int, str, str]]:
        """Run main() in a thread against the test's socket: (exit code, stdout, stderr)."""
        return deferToThread(run, [*argv, "--socket", self.rpcPath])

    async def ok(self, *argv: str) -> str:
        """Run a command that must succeed; its stdout."""
        code, out, err = await self.cli(*argv)
        self.assertEqual((code, err), (0, ""), argv)
        return out


class CLISuite(CLIClientMixin, DeviceServiceFixture):
    """The CLI against the served XML-RPC resource; mixed with a fixture and TestCase."""

    @deferredTest
    async def test_blockWalkthrough(self) -> None:
        """block-attach (xl components), block-list (table and JSON), block-detach."""
        img = self.image()
        before = await self.tree()
        out = await self.ok(
            "block-attach", str(GUEST), "format=raw", "vdev=xvda", "access=ro", f"target={img}"
        )
        self.assertEqual(out, "")
        await self.connected("vbd", 51712)
        table = (await self.ok("block-list", str(GUEST))).splitlines()
        self.assertEqual(table[0], "Vdev  BE  handle state evt-ch ring-ref BE-path")
        self.assertEqual(table[1].split()[:4], ["51712", "0", str(GUEST), "4"])
        self.assertTrue(table[1].endswith(f"/local/domain/0/backend/vbd/{GUEST}/51712"))
        (row,) = json.loads(await self.ok("block-list", "guest", "--json"))
        self.assertEqual((row["vdev"], row["state"]), ("xvda", 4))
        self.assertEqual(await self.ok("block-detach", str(GUEST), "xvda"), "")
        self.assertEqual(len((await self.ok("block-list", str(GUEST))).splitlines()), 1)
        await self.assertTreeIs(before)

    @deferredTest
    async def test_cdInsertAndEject(self) -> None:
        """
        cd-insert changes a cdrom drive's medium and cd-eject empties it (the
        backend's params follow); on a disk that is not a cdrom cd-insert
        fails with the refusal; a bad target is refused locally.
        """
        first, second = self.image(), self.image()
        before = await self.tree()
        await self.ok("block-attach", str(GUEST), f"{first},raw,hdc,devtype=cdrom")
        await self.ok("block-attach", str(GUEST), f"{first},raw,xvdb,r")
        backend = f"/local/domain/0/backend/vbd/{GUEST}/5632"
        self.assertEqual(await self.ok("cd-insert", str(GUEST), "hdc", f"raw:{second}"), "")
        self.assertEqual(await self.xs.read(f"{backend}/params"), second)
        self.assertEqual(await self.ok("cd-eject", str(GUEST), "/dev/hdc"), "")
        self.assertEqual(await self.xs.read(f"{backend}/params"), "")
        code, _, err = await self.cli("cd-insert", str(GUEST), "xvdb", second)
        self.assertEqual(code, EXIT_BAD_CONFIG)
        self.assertIn("Refusing to reconfigure device vbd:51728", err)
        code, _, err = await self.cli("cd-insert", str(GUEST), "hdc", "bogus:/x")
        self.assertEqual(code, EXIT_BAD_CONFIG)
        self.assertIn("config parsing error in disk specification", err)
        await self.ok("block-detach", str(GUEST), "hdc")
        await self.ok("block-detach", str(GUEST), "xvdb")
        await self.assertTreeIs(before)

    @deferredTest
    async def test_xmBlockAttachJson(self) -> None:
        """xm's form attaches; --json prints the new device; -f detaches forcibly."""
        img = self.image()
        before = await self.tree()
        out = await self.ok("--json", "block-attach", str(GUEST), f"file:{img}", "xvdb", "r")
        self.assertEqual(json.loads(out), {"domain": GUEST, "class": "vbd", "devid": 51728})
        await self.ok("block-detach", str(GUEST), "51728", "-f")
        await self.assertTreeIs(before)

    @deferredTest
    async def test_network(self) -> None:
        """network-attach with settings, network-list's table, network-detach by MAC."""
        before = await self.tree()
        mac = "00:16:3e:0a:0b:0c"
        await self.ok("network-attach", str(GUEST), f"mac={mac}", "bridge=xenbr0")
        await self.connected("vif", 0)
        table = (await self.ok("network-list", str(GUEST))).splitlines()
        self.assertTrue(table[0].startswith("Idx BE Mac Addr."))
        self.assertEqual(table[1].split()[:5], ["0", "0", mac, "0", "4"])
        await self.ok("network-detach", str(GUEST), mac)
        await self.assertTreeIs(before)

    @deferredTest
    async def test_status(self) -> None:
        """status says the daemon runs, its classes, and where; --json too."""
        out = await self.ok("status")
        self.assertIn("running", out)
        self.assertIn("device classes: tap tap2 vbd vif", out)
        info = json.loads(await self.ok("status", "--json"))
        self.assertEqual(
            (info["classes"], info["socket"]), (["tap", "tap2", "vbd", "vif"], self.rpcPath)
        )

    @deferredTest
    async def test_errorExitCodes(self) -> None:
        """Each fault class has its exit code and a one-line message; failures leave no trace."""
        img = self.image()
        await self.ok("block-attach", str(GUEST), f"{img},raw,xvdb,r")
        await self.connected("vbd", 51728)
        before = await self.tree()
        for argv, exitCode, words in (
            (["block-attach", str(GUEST), f"{img},raw,xvdb,r"], EXIT_EXISTS, "already connected"),
            (["block-detach", str(GUEST), "xvdc"], EXIT_NO_DEVICE, "not connected"),
            (["block-list", "77"], EXIT_NO_DOMAIN, "Domain 77 does not exist"),
            (["block-list", "nosuch"], EXIT_NO_DOMAIN, "no domain named"),
            (["network-attach", str(GUEST), "colour=red"], EXIT_BAD_CONFIG, "colour"),
            (["network-detach", str(GUEST), "00:16:3e:00:00:09"], EXIT_NO_DEVICE, "no vif"),
            (["block-attach", str(GUEST), "/x,raw,nonsense,w"], EXIT_BAD_CONFIG, "vdev"),
        ):
            code, out, err = await self.cli(*argv)
            self.assertEqual(code, exitCode, (argv, err))
            self.assertEqual(out, "")
            self.assertEqual(err.count("\n"), 1, err)
            self.assertTrue(err.startswith(f"xenddev {argv[0]}: "), err)
            self.assertIn(words, err)
            self.assertNotIn("Traceback", err)
        await self.assertTreeIs(before)
        await self.ok("block-detach", str(GUEST), "xvdb")


class RealXenstoredCLITests(CLISuite, RealXenstoredFixture, TestCase):  # type: ignore[misc]
    """The CLI over the C xenstored."""


class EmbeddedXenstoredCLITests(CLISuite, EmbeddedXenstoredFixture, TestCase):  # type: ignore[misc]
    """The CLI over the embedded xenstored."""
