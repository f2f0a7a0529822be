"""
Tests for the options of L{xenddev.driverdomain.run} (the agent as a
process of its own).
"""

from __future__ import annotations

from twisted.python import usage
from twisted.trial.unittest import TestCase

from xenddev.driverdomain.run import Options


class OptionsTests(TestCase):
    """L{Options}."""

    def parse(self, *argv: str) -> Options:
        """Parse C{argv}."""
        options = Options()
        options.parseOptions(list(argv))
        return options

    def test_domidNumber(self) -> None:
        """C{--domid N} is the number."""
        self.assertEqual(self.parse("--domid", "3")["domid"], 3)

    def test_domidAuto(self) -> None:
        """
        C{--domid auto} stays C{"auto"}: the agent reads its own domain's
        C{domid} node once connected (in a driver domain, over xenbus).
        """
        self.assertEqual(self.parse("--domid", "auto")["domid"], "auto")

    def test_domidBad(self) -> None:
        """Anything else is a usage error naming the option."""
        error = self.assertRaises(usage.UsageError, self.parse, "--domid", "dd1")
        self.assertIn("--domid", str(error))
