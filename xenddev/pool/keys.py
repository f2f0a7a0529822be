# -*- test-case-name: tests.test_pool_activation -*-
"""
The pool's keys in etcd, and the identity of a target.

  - C{/xenddev/pool/hosts/<host>}: a host's membership, under its session
    lease (JSON: pid, TTL, self-fence deadline, what the host says of
    itself). It exists exactly as long as the session's lease.
  - C{/xenddev/pool/active/<target>}: the read-write activation of a
    target, under the holder's session lease (JSON: host, mode, since).
    Its mod revision (the revision at which this holder got it: created,
    or moved to it by a migration's handover) is the fencing token.
  - C{/xenddev/pool/readers/<target>/<host>}: a read-only activation, one
    key per host, under that host's lease.
  - C{/xenddev/pool/migrations/<target>}: a migration's intent to move the
    target's activation to its destination, under the destination's
    lease (JSON: from, to, domain, since; L{xenddev.pool.migration}).

A target is named by what it I{is}, not by the path used to reach it: a
block device as C{dev:<major>:<minor>}, a file as C{file:<real path>}
(symbolic links resolved), so two hosts (or two spellings on one host)
reaching the same thing name it the same way. Its key segment is the
identity with C{%} and C{/} escaped (C{file:%2Fsrv%2Fa.img}), so one
target's readers prefix never covers another target's keys.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable
from urllib.parse import quote, unquote

from xenddev.pool.errors import InvalidTarget, PoolConfigError

__all__ = [
    "ACTIVE",
    "HOSTS",
    "MIGRATIONS",
    "READERS",
    "ROOT",
    "activeKey",
    "checkHostName",
    "checkTarget",
    "hostKey",
    "hostOf",
    "migrationKey",
    "normaliseTarget",
    "readerKey",
    "readersPrefix",
    "targetOf",
]

ROOT = b"/xenddev/pool/"
HOSTS = ROOT + b"hosts/"
ACTIVE = ROOT + b"active/"
READERS = ROOT + b"readers/"
MIGRATIONS = ROOT + b"migrations/"

#: A host name: what a DNS label allows, plus dots and underscores.
_HOST = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
_DEVICE = re.compile(r"dev:(\d+):(\d+)\Z")


def checkHostName(name: str) -> str:
    """C{name} if it can name a host in the pool; L{PoolConfigError} otherwise."""
    if not isinstance(name, str) or not _HOST.match(name):
        raise PoolConfigError(
            f"pool host name {name!r}: 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def checkTarget(target: str) -> str:
    """C{target} if it is a normalised identity; L{InvalidTarget} otherwise."""
    if isinstance(target, str):
        if _DEVICE.match(target):
            return target
        if target.startswith("file:/") and "\0" not in target:
            path = target[len("file:") :]
            if os.path.normpath(path) == path:
                return target
    raise InvalidTarget(
        f"target {target!r}: expected file:<absolute normalised path> or dev:<major>:<minor>"
    )


def normaliseTarget(
    spec: str,
    statPath: Callable[[str], os.stat_result] = os.stat,
    realpath: Callable[[str], str] = os.path.realpath,
) -> str:
    """
    The identity of what C{spec} names: a path (or C{file:PATH}) to a
    block device is C{dev:MAJOR:MINOR}, to a regular file
    C{file:REALPATH}; C{dev:MAJOR:MINOR} is taken as it is. The path must
    exist (a target that does not exist cannot be active anywhere).
    """
    if not isinstance(spec, str) or not spec:
        raise InvalidTarget(f"target {spec!r}: empty")
    if spec.startswith("dev:"):
        return checkTarget(spec)
    path = spec[len("file:") :] if spec.startswith("file:") else spec
    if not os.path.isabs(path):
        raise InvalidTarget(f"target {spec!r}: the path must be absolute")
    try:
        info = statPath(path)
    except OSError as e:
        raise InvalidTarget(f"target {spec!r}: {e.strerror or e}") from e
    if stat.S_ISBLK(info.st_mode):
        return f"dev:{os.major(info.st_rdev)}:{os.minor(info.st_rdev)}"
    if stat.S_ISREG(info.st_mode):
        return checkTarget("file:" + realpath(path))
    raise InvalidTarget(f"target {spec!r}: neither a regular file nor a block device")


def _segment(text: str) -> bytes:
    """C{text} as one key segment: C{%} and C{/} escaped, so it holds no separator."""
    return quote(text, safe="").encode("ascii")


def hostKey(host: str) -> bytes:
    """The membership key of C{host}."""
    return HOSTS + _segment(checkHostName(host))


def hostOf(key: bytes) -> str:
    """The host a membership key names (the inverse of L{hostKey})."""
    if not key.startswith(HOSTS):
        raise ValueError(f"not a host key: {key!r}")
    return unquote(key[len(HOSTS) :].decode("ascii"))


def activeKey(target: str) -> bytes:
    """The read-write activation key of C{target}."""
    return ACTIVE + _segment(checkTarget(target))


def readersPrefix(target: str) -> bytes:
    """The prefix of C{target}'s read-only activations (one key per host)."""
    return READERS + _segment(checkTarget(target)) + b"/"


def readerKey(target: str, host: str) -> bytes:
    """C{host}'s read-only activation key of C{target}."""
    return readersPrefix(target) + _segment(checkHostName(host))


def migrationKey(target: str) -> bytes:
    """The migration intent key of C{target}."""
    return MIGRATIONS + _segment(checkTarget(target))


def targetOf(key: bytes) -> str:
    """The target an activation or intent key names (C{active/<t>}, C{migrations/<t>})."""
    for prefix in (ACTIVE, MIGRATIONS):
        if key.startswith(prefix):
            return checkTarget(unquote(key[len(prefix) :].decode("ascii")))
    raise ValueError(f"not an activation or intent key: {key!r}")
