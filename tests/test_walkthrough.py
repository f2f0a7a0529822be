"""
The README's five-minute walkthrough, run verbatim, so it cannot rot.

It starts the real daemon (embedded xenstored, simulated backends), so it
needs nothing from the machine but the project's virtualenv and
C{xenstore-ls}. Without them it skips, unless
C{XENDDEV_REQUIRE_REAL_XENSTORED=1} (set by C{.ci/run}, whose machine has
everything) makes the skip a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from tests.support.realxenstored import REQUIRE_ENV

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def walkthrough() -> str:
    """The shell lines of the README's "Five minutes" section."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        text = f.read()
    section = text.split("## Five minutes", 1)[1]
    match = re.search(r"```sh\n(.*?)```", section, re.S)
    assert match is not None, "README has no sh block under Five minutes"
    return match.group(1)


class WalkthroughTests(TestCase):
    """The README's commands, exactly as written."""

    timeout = 180

    def unavailable(self, reason: str) -> None:
        """
        Skip the test for C{reason}, or fail it when the environment
        requires everything to run (C{REQUIRE_ENV=1}, CI).
        """
        if os.environ.get(REQUIRE_ENV) == "1":
            self.fail(f"walkthrough required ({REQUIRE_ENV}=1): {reason}")
        raise SkipTest(reason)

    async def test_walkthroughRuns(self) -> None:
        """
        Every line succeeds: the daemon starts, the disk is attached, listed
        (by the CLI and by xenstore-ls), detached, and the daemon stops
        cleanly, removing its sockets.
        """
        if not os.path.exists(os.path.join(REPO, ".venv", "bin", "twistd")):
            self.unavailable("no project virtualenv (.venv); run make venv")
        if shutil.which("xenstore-ls") is None:
            self.unavailable("xenstore-ls is not installed (Debian xenstore-utils)")
        rundir = os.path.join(REPO, "run")
        if os.path.exists(os.path.join(rundir, "xenddev.sock")):
            self.unavailable(f"a daemon seems to be running on {rundir}")
        script = "set -e\n" + walkthrough()

        def run() -> subprocess.CompletedProcess[str]:
            env = {k: v for k, v in os.environ.items() if k != "XENDDEV_SOCKET"}
            return subprocess.run(
                ["bash", "-c", script],
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=150,
            )

        result = await deferToThread(run)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("xvda", result.stdout)  # block-list's Vdev column
        self.assertRegex(result.stdout, r"(?m)^5 = \"\"")  # xenstore-ls: the guest
        self.assertFalse(os.path.exists(os.path.join(rundir, "xenddev.sock")))
        self.assertFalse(os.path.exists(os.path.join(rundir, "xenstored", "socket")))


class UnavailableTests(SynchronousTestCase):
    """What the walkthrough does when it cannot run here."""

    def unavailable(self, environ: dict[str, str]) -> None:
        """Call L{WalkthroughTests.unavailable} with C{environ} as the environment."""
        self.patch(os, "environ", environ)
        WalkthroughTests("test_walkthroughRuns").unavailable("no xenstore-ls")

    def test_skipsByDefault(self) -> None:
        """Without the requirement the test skips, giving the reason."""
        e = self.assertRaises(SkipTest, self.unavailable, {})
        self.assertEqual(str(e), "no xenstore-ls")

    def test_failsWhenRequired(self) -> None:
        """With C{XENDDEV_REQUIRE_REAL_XENSTORED=1} (CI) the skip is a failure."""
        e = self.assertRaises(self.failureException, self.unavailable, {REQUIRE_ENV: "1"})
        self.assertIn("no xenstore-ls", str(e))
        self.assertIn(REQUIRE_ENV, str(e))
