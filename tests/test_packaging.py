"""
Packaging: build the wheel from a copy of the source tree, install it into a
fresh virtualenv (no system site-packages; dependencies come from the
configured package index as pip normally gets them), and check that
C{twistd --help} lists the C{xenddev} and C{xenstored} plugins and that the
console script (once setup.py declares it) runs; and the same for editable
installs (C{pip install -e}) in setuptools' default, strict and compat modes.

SLOW: about 20-60 s each (a wheel build and a virtualenv install; three
editable installs). Set C{XENDDEV_SKIP_PACKAGING=1} to skip them.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import zipfile

from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IGNORE = shutil.ignore_patterns(
    ".venv",
    ".git",
    "_trial_temp*",
    ".mypy_cache",
    ".ruff_cache",
    ".hypothesis",
    "__pycache__",
    "*.egg-info",
    "build",
    "dist",
    "run",
    "dropin.cache",
    ".coverage*",
)


class PackagingTestCase(TestCase):
    """Runs the commands of an installation (slow: a long timeout)."""

    timeout = 600

    async def runCommand(self, exe: str, *args: str, cwd: str) -> str:
        """Run a command; fail with its output if it exits non-zero."""
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        out, err, code = await getProcessOutputAndValue(exe, list(args), env=env, path=cwd)
        text = (out + err).decode(errors="replace")
        if code != 0:
            self.fail(f"{exe} {' '.join(args)} exited {code}:\n{text[-4000:]}")
        return text


class WheelTests(PackagingTestCase):
    """The wheel installs into a fresh virtualenv with working plugins."""

    async def test_wheelInFreshVenv(self) -> None:
        """Build, install, regenerate dropin.cache, list the plugins, run the CLI."""
        if os.environ.get("XENDDEV_SKIP_PACKAGING"):
            raise SkipTest("XENDDEV_SKIP_PACKAGING is set")
        work = tempfile.mkdtemp(prefix="xenddev-pkg-")
        self.addCleanup(shutil.rmtree, work, True)
        src = os.path.join(work, "src")
        shutil.copytree(ROOT, src, ignore=IGNORE)
        wheels = os.path.join(work, "wheels")
        await self.runCommand(
            sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", wheels, src, cwd=work
        )
        [wheel] = [os.path.join(wheels, n) for n in os.listdir(wheels) if n.endswith(".whl")]
        with zipfile.ZipFile(wheel) as z:
            names = set(z.namelist())
            entryPoints = next(
                (z.read(n).decode() for n in names if n.endswith("entry_points.txt")), ""
            )
        self.assertIn("twisted/plugins/xenddev_daemon.py", names)
        self.assertIn("twisted/plugins/xenddev_xenstored.py", names)
        self.assertNotIn("twisted/__init__.py", names)
        self.assertNotIn("twisted/plugins/__init__.py", names)
        self.assertIn("xenddev/service.py", names)
        # The controllers/ folder is installed as xenddev.controllers only.
        self.assertIn("xenddev/controllers/blkif.py", names)
        self.assertEqual([n for n in names if n.startswith("controllers/")], [])

        venv = os.path.join(work, "venv")
        await self.runCommand(sys.executable, "-m", "venv", venv, cwd=work)
        py = os.path.join(venv, "bin", "python")
        await self.runCommand(py, "-m", "pip", "install", "-q", wheel, cwd=work)
        await self.runCommand(
            py,
            "-c",
            "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin));"
            "import xenddev.controllers.blktap",
            cwd=work,
        )
        helpText = await self.runCommand(os.path.join(venv, "bin", "twistd"), "--help", cwd=work)
        self.assertIn("xenddev", helpText)
        self.assertIn("xenstored", helpText)
        daemonHelp = await self.runCommand(
            os.path.join(venv, "bin", "twistd"), "xenddev", "--help", cwd=work
        )
        self.assertIn("--rundir", daemonHelp)
        self.assertIn("--xenstore", daemonHelp)
        if "xenddev" in entryPoints.split("[console_scripts]", 1)[-1]:
            await self.runCommand(os.path.join(venv, "bin", "xenddev"), "--help", cwd=work)


class EditableTests(PackagingTestCase):
    """
    An editable install (C{pip install -e}) in each of setuptools' modes
    lets C{twistd} find the plugins in the checkout's C{twisted/plugins/}.
    """

    async def test_pluginsListedInEveryMode(self) -> None:
        """
        The default mode (what C{make venv} uses), strict and compat: after
        each install C{twistd --help} lists C{xenddev} and C{xenstored}.
        """
        if os.environ.get("XENDDEV_SKIP_PACKAGING"):
            raise SkipTest("XENDDEV_SKIP_PACKAGING is set")
        work = tempfile.mkdtemp(prefix="xenddev-editable-")
        self.addCleanup(shutil.rmtree, work, True)
        src = os.path.join(work, "src")
        # As in a checkout: xenddev/controllers is a link to controllers/.
        shutil.copytree(ROOT, src, ignore=IGNORE, symlinks=True)
        venv = os.path.join(work, "venv")
        await self.runCommand(sys.executable, "-m", "venv", venv, cwd=work)
        py = os.path.join(venv, "bin", "python")
        for mode in (None, "strict", "compat"):
            settings = [] if mode is None else ["--config-settings", f"editable_mode={mode}"]
            await self.runCommand(py, "-m", "pip", "install", "-q", "-e", src, *settings, cwd=work)
            helpText = await self.runCommand(
                os.path.join(venv, "bin", "twistd"), "--help", cwd=work
            )
            self.assertIn(" xenddev ", helpText, mode)
            self.assertIn(" xenstored ", helpText, mode)
            where = await self.runCommand(
                py, "-c", "import xenddev.controllers.blkif as m; print(m.__file__)", cwd=work
            )
            self.assertIn("controllers", where, mode)
