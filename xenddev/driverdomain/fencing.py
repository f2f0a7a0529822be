# -*- test-case-name: tests.test_driverdomain_fencing,tests.test_driverdomain -*-
"""
Fencing tokens below the toolstack: the agent refuses an C{activate}
whose token is lower than one it has already served for the same storage
target (docs/protocol.md, "Fencing tokens").

A pool grants each new holder of a target a larger token (an etcd
revision). The toolstack sends it with the C{activate} request
(C{backendctrl/<class>/<name>/token}); L{FencingTokens.admit} compares it
with the highest token this driver domain has accepted for the target,
kept in the agent's own area,
C{/local/domain/<self>/private/xenddev/fencing/<key>} = C{"<token>
<target>"} (C{<key>}: a digest of the target, as XenStore node names
cannot hold a path), so it survives an agent restart. A lower token is
refused (C{EACCES}) before the kind touches the data path; a higher one
is recorded first, so no later activate can undercut it, even if the
kind then fails or the agent dies (the pool had granted it: every lower
token was superseded then). An equal token is accepted (the same holder,
another object or a request executed again). Token 0, or none, means no
pool vouches (one host, or C{w!}, which takes no key): accepted and not
recorded — a fenced host still has its old, non-zero token, so refusing
0 would guard against nothing the pool's fencing is about, and would
refuse C{w!} for ever once the target was used read-write here.

The target is named as the driver domain sees it, from the object's
C{params}: a block device by its numbers (C{dev:M:m}), a file by its real
path (C{file:PATH}), a path that is neither as written; the pool's naming
when the driver domain is dom0. An object without C{params} (a vif, an
empty drive) has nothing to fence.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable, Mapping

from twisted.logger import Logger

from xenddev.backendctrl.protocol import STALE_TOKEN, ControlPaths, parseToken, privateDir
from xenddev.driverdomain.kinds.base import KindError
from xenddev.interfaces import IXenStoreOps
from xenddev.keyedlocks import KeyedLocks

__all__ = ["FencingTokens", "storageIdentity"]


def storageIdentity(
    target: Mapping[str, str],
    statPath: Callable[[str], os.stat_result] = os.stat,
    realpath: Callable[[str], str] = os.path.realpath,
) -> str | None:
    """
    The storage target an object's C{t/*} names, as this domain sees it
    (see the module docstring); None if it names none.
    """
    params = target.get("params", "")
    if not params or target.get("type") == "empty":
        return None
    # A relative path names a device under /dev/, as in xl's disk specs.
    path = os.path.normpath(params if os.path.isabs(params) else "/dev/" + params)
    try:
        info = statPath(path)
    except (OSError, ValueError):
        return f"file:{path}"
    if stat.S_ISBLK(info.st_mode):
        return f"dev:{os.major(info.st_rdev)}:{os.minor(info.st_rdev)}"
    if stat.S_ISREG(info.st_mode):
        return f"file:{realpath(path)}"
    return f"file:{path}"


class FencingTokens:
    """
    The highest fencing token accepted per storage target, for the agent
    of driver domain C{domid}.

    @param xs: the agent's connection.
    @param identify: names an object's storage target (L{storageIdentity};
        tests inject one).
    """

    log = Logger()

    def __init__(
        self,
        xs: IXenStoreOps,
        domid: int,
        identify: Callable[[Mapping[str, str]], str | None] = storageIdentity,
    ) -> None:
        self.xs = xs
        self.directory = f"{privateDir(domid)}/fencing"
        self._identify = identify
        #: target -> the lock serialising its check and record: two
        #: activates of one target (two objects) are decided one by one.
        self._locks: KeyedLocks[str] = KeyedLocks()

    def record(self, identity: str) -> str:
        """The node keeping the highest token accepted for C{identity}."""
        digest = hashlib.sha256(identity.encode("utf-8", "surrogateescape")).hexdigest()
        return f"{self.directory}/{digest[:40]}"

    async def served(self, identity: str) -> int:
        """The highest token accepted here for C{identity} (0: none)."""
        value = await self.xs.readOrNone(self.record(identity))
        if value is None:
            return 0
        token, _, named = value.partition(" ")
        try:
            # A digest shared with another target (or a damaged record)
            # is not this target's.
            return parseToken(token) if named == identity else 0
        except ValueError:
            return 0

    async def admit(self, paths: ControlPaths, target: Mapping[str, str], text: str | None) -> None:
        """
        Accept the token C{text} (the C{token} node) for the object's
        target, recording it if it is the highest yet; raise L{KindError}
        (C{EINVAL} malformed, C{EACCES} stale) otherwise. Nothing of the
        data path has been touched when it raises.
        """
        try:
            token = parseToken(text)
        except ValueError as e:
            raise KindError("EINVAL", str(e)) from None
        identity = self._identify(target) if token else None
        if identity is None:
            return
        key: str = identity

        async def check() -> None:
            recorded = await self.served(key)
            if token < recorded:
                self.log.warn(
                    "Refused activate of {path} with stale fencing token {token}: "
                    "{recorded} was served here for {target}",
                    path=paths.base,
                    token=token,
                    recorded=recorded,
                    target=key,
                )
                raise KindError(
                    STALE_TOKEN,
                    f"stale fencing token {token} for {key}: token {recorded} was "
                    "served here (a newer holder activated it); refused before the data "
                    "path was touched",
                )
            if token > recorded:
                await self.xs.write(self.record(key), f"{token} {key}")

        # Two activates of one target are decided one after the other.
        await self._locks.run(key, check)
