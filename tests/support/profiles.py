"""
Hypothesis profiles: C{quick} by default, C{thorough} in CI.

The profile is chosen by the environment variable L{PROFILE_ENV}
(C{.ci/run} sets it to C{thorough}) and loaded when the C{tests} package is
imported, before any test module builds its C{@settings}. A property test
states the number of examples it wants in a thorough run with
L{examples}; a quick run caps it at L{QUICK_EXAMPLES}::

    @settings(max_examples=examples(2000), deadline=None)
    @given(st.text())
    def test_anyText(self, text: str) -> None:
        ...

Tests that give no C{max_examples} get the profile's own: L{QUICK_EXAMPLES}
in a quick run, Hypothesis' default (100) in a thorough one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from hypothesis import settings

#: The environment variable naming the profile to load.
PROFILE_ENV = "XENDDEV_HYPOTHESIS_PROFILE"

#: The profile used when L{PROFILE_ENV} is unset or empty.
DEFAULT_PROFILE = "quick"

#: The most examples a property runs in the C{quick} profile.
QUICK_EXAMPLES = 50

settings.register_profile("quick", max_examples=QUICK_EXAMPLES)
settings.register_profile("thorough", max_examples=settings.get_profile("default").max_examples)


def activeProfile(environ: Mapping[str, str] | None = None) -> str:
    """
    The profile L{PROFILE_ENV} asks for (L{DEFAULT_PROFILE} if none).

    @param environ: the environment to read; L{os.environ} by default.
    """
    return (os.environ if environ is None else environ).get(PROFILE_ENV) or DEFAULT_PROFILE


def loadProfile(environ: Mapping[str, str] | None = None) -> str:
    """
    Load the profile L{activeProfile} names; return its name.

    @param environ: the environment to read; L{os.environ} by default.
    @raise hypothesis.errors.InvalidArgument: the name is not a registered
        profile (a typo in CI must not silently run the quick one).
    """
    name = activeProfile(environ)
    settings.load_profile(name)
    return name


def examples(thorough: int, environ: Mapping[str, str] | None = None) -> int:
    """
    The C{max_examples} of a property that runs C{thorough} examples in the
    C{thorough} profile: that number there, at most L{QUICK_EXAMPLES}
    otherwise.

    @param environ: the environment to read; L{os.environ} by default.
    """
    if activeProfile(environ) == "thorough":
        return thorough
    return min(thorough, QUICK_EXAMPLES)
