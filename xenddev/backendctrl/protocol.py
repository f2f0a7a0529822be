# -*- test-case-name: tests.test_driverdomain -*-
"""
The vocabulary of the backendctrl protocol: object classes, paths, request
names, states, result codes (Xen errno values) and name validation. What
each request does is the table of L{xenddev.backendctrl.requests}.

Both the toolstack client and the driver-domain agent use this module, so
the two sides cannot disagree about a path or a spelling.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import attrs

from xenddev.backendctrl.errors import InvalidNameError
from xenddev.xenstore.paths import validateDomid
from xenddev.xenstore.wire import PAYLOAD_MAX

#: The Xen errno values (xen/include/public/errno.h) the protocol uses.
#: They equal Linux x86 numbers, but results are defined as *Xen* errnos.
XEN_ERRNO: Mapping[str, int] = {
    "EPERM": 1,
    "ENOENT": 2,
    "EIO": 5,
    "E2BIG": 7,
    "EAGAIN": 11,
    "ENOMEM": 12,
    "EACCES": 13,
    "EBUSY": 16,
    "EEXIST": 17,
    "ENODEV": 19,
    "EINVAL": 22,
    "ENOSPC": 28,
    "ENOSYS": 38,
    "EBADRQC": 56,
    "EOPNOTSUPP": 95,
    "EISCONN": 106,
    "ENOTCONN": 107,
    "ETIMEDOUT": 110,
}
XEN_ERRNO_NAME: Mapping[int, str] = {v: k for k, v in XEN_ERRNO.items()}

# Object states (the "state" node).
INACTIVE = "inactive"
ACTIVE = "active"
PLUGGED = "ok"  # vbd/<vbd>/state

# Requests.
PREPARE = "prepare"
ACTIVATE = "activate"
DEACTIVATE = "deactivate"
UNPREPARE = "unprepare"
PLUG = "plug"
UNPLUG = "unplug"
#: Our extension: replace the target of a prepared object (a cdrom's
#: medium) with C{n/*}; see docs/protocol.md.
CHANGE = "change"
#: Our extension: pause an active object's data path (seed 002, e.g. around
#: a coalesce of its image chain) and resume it, with C{reload} reopening
#: the image first; served by the driver domain's data-path pausers.
PAUSE = "pause"
RESUME = "resume"
RELOAD = "reload"

#: The object's directories the toolstack writes a target into: C{t/} (the
#: target, with C{prepare}) and C{n/} (its replacement, with C{change}).
TARGET_DIR = "t"
NEW_TARGET_DIR = "n"

#: Our extension: the node of the object's directory holding the fencing
#: token an C{activate} carries (decimal; written with the request, removed
#: with its answer). The driver domain refuses a token lower than one it
#: has served for the same storage target (docs/protocol.md, "Fencing
#: tokens"); absent or C{0}: no pool vouches, nothing is checked.
TOKEN = "token"
#: Tokens are etcd revisions: non-negative int64 values.
TOKEN_MAX = 2**63 - 1
#: The result of an C{activate} whose token is stale. Xen's errno table
#: has no C{ESTALE}; C{EACCES} ("permission denied") says what happened:
#: the token no longer entitles its holder to the target.
STALE_TOKEN = "EACCES"

#: The syntax of vdi, vif and plug names (L{validateName} also bounds the length).
NAME_SYNTAX = re.compile(r"[A-Za-z0-9_-]+\Z")
_TARGET_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")
#: Target values: printable text, no NUL, bounded so a whole prepare
#: transaction stays far below XenStore's limits.
TARGET_VALUE_MAX = 1024
TARGET_KEYS_MAX = 32
NAME_MAX = 64


@attrs.frozen
class ObjectClass:
    """
    A kind of object the protocol manages: C{vdi} (seed 000) or C{vif} (our
    extension for network interfaces, same shape).

    @ivar name: the directory under C{backendctrl/}.
    @ivar plugDir: the directory holding the object's plugs (C{vbd} for a
        vdi, C{plug} for a vif).
    @ivar deviceClass: the xenbus device class of the plugs.
    """

    name: str
    plugDir: str
    deviceClass: str


VDI = ObjectClass("vdi", "vbd", "vbd")
VIF = ObjectClass("vif", "plug", "vif")
OBJECT_CLASSES: Mapping[str, ObjectClass] = {c.name: c for c in (VDI, VIF)}


def validateName(value: object, what: str) -> str:
    """A vdi, vif or vbd name: C{[A-Za-z0-9_-]+}, at most 64 characters."""
    if not isinstance(value, str) or not NAME_SYNTAX.match(value) or len(value) > NAME_MAX:
        raise InvalidNameError(
            what, value, f"must match [A-Za-z0-9_-]+ and be at most {NAME_MAX} characters"
        )
    return value


def validateToken(value: object) -> int:
    """
    A fencing token the toolstack sends: an integer in 0..L{TOKEN_MAX}.

    @raise InvalidNameError: for anything else (nothing is written).
    """
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= TOKEN_MAX:
        raise InvalidNameError("fencing token", value, f"must be an integer in 0..{TOKEN_MAX}")
    return value


def parseToken(text: str | None) -> int:
    """
    The fencing token a C{token} node holds (absent: 0, no pool).

    @raise ValueError: for a value that is not a decimal in 0..L{TOKEN_MAX}.
    """
    if text is None:
        return 0
    if not text.isascii() or not text.isdigit() or len(text) > len(str(TOKEN_MAX)):
        raise ValueError(f"fencing token {text[:40]!r} is not a decimal integer")
    return validateToken(int(text))


def validateTarget(target: Mapping[str, object]) -> dict[str, str]:
    """
    A target: short node names mapped to short printable strings.

    @raise InvalidNameError: naming the bad key or value.
    """
    if not isinstance(target, Mapping) or not target:
        raise InvalidNameError("target", target, "must be a non-empty mapping of key to value")
    if len(target) > TARGET_KEYS_MAX:
        raise InvalidNameError("target", len(target), f"at most {TARGET_KEYS_MAX} keys")
    clean: dict[str, str] = {}
    for key, value in target.items():
        if not isinstance(key, str) or not _TARGET_KEY.match(key):
            raise InvalidNameError("target key", key, "must match [A-Za-z0-9_-]{1,64}")
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise InvalidNameError(f"target value t/{key}", value, "must be a string")
        text = str(value)
        if len(text.encode("utf-8")) > TARGET_VALUE_MAX:
            raise InvalidNameError(
                f"target value t/{key}", text[:40] + "...", f"longer than {TARGET_VALUE_MAX} bytes"
            )
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
            raise InvalidNameError(f"target value t/{key}", text, "contains control characters")
        clean[key] = text
    return clean


@attrs.frozen
class ControlPaths:
    """
    The XenStore paths of one object in one driver domain.

    C{ControlPaths(VDI, 3, "disk0").request} is
    C{/local/domain/3/backendctrl/vdi/disk0/request}.
    """

    objectClass: ObjectClass
    driverDomid: int = attrs.field(converter=validateDomid)
    name: str

    def __attrs_post_init__(self) -> None:
        validateName(self.name, self.objectClass.name)

    @property
    def home(self) -> str:
        """The driver domain's home directory."""
        return f"/local/domain/{self.driverDomid}"

    @property
    def classDir(self) -> str:
        """C{backendctrl/<class>} of the driver domain."""
        return f"{self.home}/backendctrl/{self.objectClass.name}"

    @property
    def base(self) -> str:
        """The object's directory."""
        return f"{self.classDir}/{self.name}"

    @property
    def state(self) -> str:
        return f"{self.base}/state"

    @property
    def request(self) -> str:
        return f"{self.base}/request"

    @property
    def result(self) -> str:
        return f"{self.base}/result"

    @property
    def resultMsg(self) -> str:
        return f"{self.base}/result_msg"

    def child(self, name: str) -> str:
        """A node of the object's directory, e.g. L{TARGET_DIR}."""
        return f"{self.base}/{name}"

    @property
    def targetDir(self) -> str:
        return self.child(TARGET_DIR)

    def target(self, key: str) -> str:
        """The path of target key C{key}."""
        return f"{self.targetDir}/{key}"

    @property
    def newTargetDir(self) -> str:
        """C{n/}: the replacement target of a C{change} request."""
        return self.child(NEW_TARGET_DIR)

    def newTarget(self, key: str) -> str:
        """The path of replacement target key C{key}."""
        return f"{self.newTargetDir}/{key}"

    @property
    def token(self) -> str:
        """C{token}: the fencing token an C{activate} carries (L{TOKEN})."""
        return self.child(TOKEN)

    @property
    def plugsDir(self) -> str:
        return f"{self.base}/{self.objectClass.plugDir}"

    def plug(self, plug: str) -> PlugPaths:
        """The paths of one plug (vbd) of this object."""
        validateName(plug, self.objectClass.plugDir)
        return PlugPaths(f"{self.plugsDir}/{plug}")

    def absolute(self, relative: str) -> str:
        """Make a path relative to the driver domain's home absolute."""
        return relative if relative.startswith("/") else f"{self.home}/{relative}"


@attrs.frozen
class PlugPaths:
    """The nodes of C{vbd/<vbd>/} (or C{plug/<p>/} for a vif)."""

    base: str

    @property
    def state(self) -> str:
        return f"{self.base}/state"

    @property
    def frontend(self) -> str:
        return f"{self.base}/frontend"

    @property
    def backend(self) -> str:
        return f"{self.base}/backend"

    @property
    def bcopy(self) -> str:
        return f"{self.base}/b-copy"

    @property
    def takeover(self) -> str:
        return f"{self.base}/takeover"


def privateDir(driverDomid: int) -> str:
    """Where the agent keeps its own records (never in backendctrl/)."""
    return f"/local/domain/{validateDomid(driverDomid)}/private/xenddev"


def kindsPath(driverDomid: int) -> str:
    """C{/local/domain/<dd>/backendctrl/kinds}: the kinds the agent serves."""
    return f"/local/domain/{validateDomid(driverDomid)}/backendctrl/kinds"


def checkTransactionSize(nodes: Mapping[str, str]) -> None:
    """Refuse a request whose single writes would not fit a XenStore packet."""
    for path, value in nodes.items():
        if len(path) + len(value.encode("utf-8")) + 2 > PAYLOAD_MAX:
            raise InvalidNameError("node", path, "path and value exceed a XenStore packet")
