"""
The Hypothesis profiles of L{tests.support.profiles}: quick by default,
thorough when the environment asks for it.
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis.errors import InvalidArgument
from twisted.trial.unittest import SynchronousTestCase

from tests.support.profiles import (
    PROFILE_ENV,
    QUICK_EXAMPLES,
    activeProfile,
    examples,
    loadProfile,
)


class ProfileTests(SynchronousTestCase):
    """Choosing the profile and the number of examples."""

    def test_quickByDefault(self) -> None:
        """Without the variable (or with it empty) the quick profile is chosen."""
        self.assertEqual(activeProfile({}), "quick")
        self.assertEqual(activeProfile({PROFILE_ENV: ""}), "quick")

    def test_quickCapsExamples(self) -> None:
        """A quick run caps a property's examples, and never raises a small count."""
        self.assertEqual(examples(2000, {}), QUICK_EXAMPLES)
        self.assertEqual(examples(10, {}), 10)

    def test_thoroughKeepsExamples(self) -> None:
        """A thorough run gives each property the number it states."""
        self.assertEqual(activeProfile({PROFILE_ENV: "thorough"}), "thorough")
        self.assertEqual(examples(2000, {PROFILE_ENV: "thorough"}), 2000)

    def test_loadedProfileMatchesEnvironment(self) -> None:
        """
        The profile loaded when the C{tests} package was imported is the one
        the environment names (in a quick run, properties without a count of
        their own get L{QUICK_EXAMPLES}).
        """
        loaded = settings.get_profile(activeProfile())
        self.assertEqual(settings.default.max_examples, loaded.max_examples)
        if activeProfile() == "quick":
            self.assertEqual(settings.default.max_examples, QUICK_EXAMPLES)

    def test_unknownProfileRefused(self) -> None:
        """A misspelt profile name fails loudly instead of running the quick one."""
        self.addCleanup(loadProfile)
        self.assertRaises(InvalidArgument, loadProfile, {PROFILE_ENV: "thourough"})
