"""
A driver-domain kind for crash tests: its prepare logs each call (with the
recovering flag) to a file, and blocks for a long time unless it is
recovering, so a test can kill the agent in the middle of a request.

Used through C{python -m xenddev.driverdomain.run --kind-factory
tests.support.slowkind:SlowKind}; C{XENDDEV_SLOWKIND_LOG} names the log.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import deferLater
from zope.interface import implementer

from xenddev.driverdomain.kinds.base import KindContext, Outcome, done
from xenddev.interfaces import IDriverDomainKind


@implementer(IDriverDomainKind)
class SlowKind:
    """
    Accepts C{type=slow} targets; prepare takes an hour unless recovering
    or the target has C{params}.
    """

    name = "slow"
    objectClasses = ("vdi",)

    def accepts(self, objectClass: str, target: Any) -> bool:
        return target.get("type") == "slow"

    def prepare(self, ctx: KindContext) -> Any:
        with open(os.environ["XENDDEV_SLOWKIND_LOG"], "a") as f:
            f.write(f"prepare {ctx.paths.name} recovering={ctx.recovering}\n")
        # A target naming an image (the fencing test's) is prepared at once.
        if ctx.recovering or "params" in ctx.target:
            return done()
        return deferLater(reactor, 3600, lambda: Outcome())

    def activate(self, ctx: KindContext) -> Any:
        return done()

    def deactivate(self, ctx: KindContext) -> Any:
        return done()

    def unprepare(self, ctx: KindContext) -> Any:
        return done()

    def plug(self, ctx: KindContext, plug: Any) -> Any:
        return done()

    def unplug(self, ctx: KindContext, plug: Any) -> Any:
        return done()

    def hotplugCommand(self, ctx: KindContext, plug: Any, action: str) -> None:
        return None
