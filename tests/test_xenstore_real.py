"""
The protocol-level XenStore suite against the real C xenstored (Xen 4.17
from Debian, under the test shim that stands in for the hypervisor
libraries).
"""

from twisted.trial.unittest import TestCase

from tests.support.fixtures import RealXenstoredFixture
from tests.support.xenstoresuite import XenStoreClientSuite, XenStoreFaultSuite


class RealXenstoredClientTests(XenStoreClientSuite, RealXenstoredFixture, TestCase):
    """Our client against the C xenstored."""


class RealXenstoredFaultTests(XenStoreFaultSuite, RealXenstoredFixture, TestCase):
    """Connection loss and restart of the C xenstored."""
