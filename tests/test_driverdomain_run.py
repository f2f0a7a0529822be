"""
Tests for the options of L{xenddev.driverdomain.run} (the agent as a
process of its own).
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
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


class FrontendVisibleTests(TestCase):
    """What a driver domain's agent takes for an existing frontend."""

    def visible(self, outcome: object) -> bool:
        """L{_frontendVisible} over a store whose read gives C{outcome}."""
        from twisted.internet.defer import fail, succeed

        from xenddev.driverdomain.executor import _frontendVisible
        from xenddev.xenstore.errors import AccessDeniedError

        class Store:
            def readOrNone(self, path: str) -> object:
                if outcome == "EACCES":
                    return fail(AccessDeniedError("EACCES", "READ", path))
                return succeed(outcome)

        return self.successResultOf(Deferred.fromCoroutine(_frontendVisible(Store(), "/f")))

    def test_readable(self) -> None:
        """A frontend it may read exists."""
        self.assertTrue(self.visible(""))

    def test_missing(self) -> None:
        """ENOENT: absent."""
        self.assertFalse(self.visible(None))

    def test_unreadable(self) -> None:
        """
        EACCES, which real xenstored answers for a missing node under a
        guest's home read from a driver domain: absent for this driver
        domain (one made for it is readable by it).
        """
        self.assertFalse(self.visible("EACCES"))
