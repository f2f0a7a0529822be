"""
Tests for the project.

Importing the package loads the Hypothesis profile (L{tests.support.profiles}:
C{quick} unless C{XENDDEV_HYPOTHESIS_PROFILE} names another), before any test
module declares its properties' settings, and has coverage trace only the
first examples of each property (L{tests.support.hypothesiscoverage}).
"""

from tests.support.hypothesiscoverage import install
from tests.support.profiles import loadProfile

loadProfile()
install()
