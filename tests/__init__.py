"""
Tests for the project.

Importing the package loads the Hypothesis profile (L{tests.support.profiles}:
C{quick} unless C{XENDDEV_HYPOTHESIS_PROFILE} names another), before any test
module declares its properties' settings.
"""

from tests.support.profiles import loadProfile

loadProfile()
