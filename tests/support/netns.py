"""
Network namespaces for integration tests of the C{vif-*} hotplug scripts.

A test creates a private namespace, puts a bridge and a tap device named
like netback's C{vif<domid>.<devid>} in it, and runs the real script inside
it through the hotplug runner's argv wrapper C{ip netns exec NAME}; the
host's network is never touched.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import shutil
import subprocess
import unittest
from collections.abc import Sequence
from typing import Any

__all__ = [
    "NetNamespace",
    "netnsUnavailableReason",
    "requireNetns",
]

_counter = itertools.count()


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=check,
    )


@functools.cache
def netnsUnavailableReason() -> str | None:
    """
    Why network namespaces with bridges and taps cannot be used here, or
    L{None}.  Cached: probes once by creating and deleting a namespace.
    """
    if shutil.which("ip") is None:
        return "ip not found (install the Debian package iproute2)"
    if os.geteuid() != 0:
        return f"network namespaces need root (tests run as uid {os.geteuid()})"
    name = f"xdprobe-{os.getpid()}"
    try:
        added = _ip("netns", "add", name, check=False)
        if added.returncode != 0:
            return f"ip netns add failed: {added.stderr.strip()}"
        for what, args in (
            ("a bridge", ("link", "add", "br-probe", "type", "bridge")),
            ("a tap device", ("tuntap", "add", "dev", "tap-probe", "mode", "tap")),
        ):
            r = _ip("-n", name, *args, check=False)
            if r.returncode != 0:
                return f"cannot create {what} in a network namespace: {r.stderr.strip()}"
        r = _ip("netns", "exec", name, "true", check=False)
        if r.returncode != 0:
            return f"ip netns exec failed: {r.stderr.strip()}"
    finally:
        _ip("netns", "del", name, check=False)
    return None


def requireNetns(testcase: unittest.TestCase) -> None:
    """Skip C{testcase} (with the precise reason) unless namespaces work."""
    reason = netnsUnavailableReason()
    if reason is not None:
        raise unittest.SkipTest(reason)


class NetNamespace:
    """
    A named network namespace (C{xdtest-<pid>-<n>} by default).

    Deleting the namespace destroys the virtual links created in it.
    """

    def __init__(self, name: str | None = None) -> None:
        self.name = name or f"xdtest-{os.getpid()}-{next(_counter)}"
        self.created = False

    def create(self) -> None:
        """Create the namespace (C{ip netns add})."""
        _ip("netns", "add", self.name)
        self.created = True

    def delete(self) -> None:
        """Delete the namespace; idempotent."""
        if self.created:
            _ip("netns", "del", self.name, check=False)
            self.created = False

    @property
    def wrapper(self) -> list[str]:
        """The argv prefix that runs a command inside the namespace."""
        return ["ip", "netns", "exec", self.name]

    def ip(self, *args: str) -> str:
        """Run C{ip -n NAME ARGS}; return stdout (raises on failure)."""
        return _ip("-n", self.name, *args).stdout

    def addBridge(self, name: str) -> None:
        """Create a bridge device."""
        self.ip("link", "add", name, "type", "bridge")

    def addTap(self, name: str) -> None:
        """Create a (persistent) tap device, standing in for netback's vif."""
        self.ip("tuntap", "add", "dev", name, "mode", "tap")

    def link(self, name: str) -> dict[str, Any] | None:
        """The C{ip -j link show} record of a device, or L{None} if absent."""
        r = _ip("-n", self.name, "-j", "link", "show", "dev", name, check=False)
        if r.returncode != 0:
            return None
        records: Sequence[dict[str, Any]] = json.loads(r.stdout or "[]")
        return records[0] if records else None
