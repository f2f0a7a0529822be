"""
The protocol-level XenStore suite against the embedded xenstored, in
process: the same tests the C xenstored passes.
"""

from twisted.trial.unittest import TestCase

from tests.support.fixtures import EmbeddedXenstoredFixture
from tests.support.xenstoresuite import XenStoreClientSuite, XenStoreFaultSuite


class EmbeddedXenstoredClientTests(XenStoreClientSuite, EmbeddedXenstoredFixture, TestCase):
    """Our client against the embedded xenstored."""


class EmbeddedXenstoredFaultTests(XenStoreFaultSuite, EmbeddedXenstoredFixture, TestCase):
    """Connection loss and restart of the embedded xenstored."""
