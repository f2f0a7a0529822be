# -*- test-case-name: tests.test_pooldatapaths -*-
"""
The pool-wide data-path registry's keys and records in etcd (seed 002).

Each host publishes the data paths it serves (the processes behind its
active VDIs: tapdisks, qemu-storage-daemons) so that a coalescer anywhere
in the pool can find every user of an image's chain, with its host and
pid, and reach its pauser (that host's daemon):

  - C{/xenddev/pool/datapaths/<host>/<driver domain>/<vdi>}: one data path,
    under the publishing host's session lease, so a dead host's entries
    vanish with its lease. The value is JSON (L{PublishedDataPath}).

The host segment is escaped as the membership key's is, so one host's
prefix never covers another's; the driver domain is a decimal domid and
the VDI name a protocol name (no C{/}), escaped all the same.

Nothing here does I/O; L{xenddev.pooldatapaths} publishes and reads.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, unquote

import attrs

from xenddev.errors import FaultCode, XenddevError
from xenddev.pool.keys import ROOT, checkHostName

__all__ = [
    "DATAPATHS",
    "PublishedDataPath",
    "RecordError",
    "datapathKey",
    "domainPrefix",
    "hostPrefix",
    "parseDatapathKey",
]

DATAPATHS = ROOT + b"datapaths/"


class RecordError(XenddevError, ValueError):
    """A published record or key that cannot be read (skipped by readers)."""

    faultCode = FaultCode.DATAPATH_FAILED


def _segment(text: str) -> bytes:
    return quote(text, safe="").encode("ascii")


def hostPrefix(host: str) -> bytes:
    """The prefix of every data path C{host} publishes (ends with C{/})."""
    return DATAPATHS + _segment(checkHostName(host)) + b"/"


def domainPrefix(host: str, driverDomid: int) -> bytes:
    """The prefix of the data paths C{host} publishes for one driver domain (ends with C{/})."""
    return hostPrefix(host) + str(int(driverDomid)).encode() + b"/"


def datapathKey(host: str, driverDomid: int, vdi: str) -> bytes:
    """The key of one data path: C{datapaths/<host>/<dd>/<vdi>}."""
    if isinstance(driverDomid, bool) or not isinstance(driverDomid, int) or driverDomid < 0:
        raise RecordError(f"driver domain {driverDomid!r}: a domain id")
    if not isinstance(vdi, str) or not vdi:
        raise RecordError(f"vdi {vdi!r}: a name")
    return domainPrefix(host, driverDomid) + _segment(vdi)


def parseDatapathKey(key: bytes) -> tuple[str, int, str]:
    """(host, driver domain, vdi) of a data-path key (the inverse of L{datapathKey})."""
    if not key.startswith(DATAPATHS):
        raise RecordError(f"not a data-path key: {key!r}")
    parts = key[len(DATAPATHS) :].split(b"/")
    if len(parts) != 3 or not parts[1].isdigit():
        raise RecordError(f"not a data-path key: {key!r}")
    host = unquote(parts[0].decode("ascii"))
    return host, int(parts[1]), unquote(parts[2].decode("ascii"))


@attrs.frozen
class PublishedDataPath:
    """
    One data path as a host publishes it.

    @ivar host: the pool host serving it.
    @ivar pauser: how to reach its pauser: C{{"via": "daemon", "host":
        <host>, "rpc": <its daemon's advertised URL or None>}} — the host's
        daemon, asked over the peer channel (C{datapath.quiesceLocal}).
    @ivar chain: the image and its backing chain, top first.
    """

    host: str
    driverDomid: int
    vdi: str
    kind: str
    image: str
    format: str = ""
    chain: tuple[str, ...] = ()
    pid: int | None = None
    minor: int | None = None
    qmp: str | None = None
    extra: Mapping[str, str] = attrs.field(factory=dict)
    pauser: Mapping[str, Any] = attrs.field(factory=dict)

    @property
    def key(self) -> bytes:
        """Its etcd key."""
        return datapathKey(self.host, self.driverDomid, self.vdi)

    def encode(self) -> bytes:
        """The value stored at L{key} (JSON, keys sorted: equal records, equal bytes)."""
        record = {
            "host": self.host,
            "domain": self.driverDomid,
            "vdi": self.vdi,
            "kind": self.kind,
            "image": self.image,
            "format": self.format,
            "chain": list(self.chain),
            "pid": self.pid,
            "minor": self.minor,
            "qmp": self.qmp,
            "extra": dict(self.extra),
            "pauser": dict(self.pauser),
        }
        return json.dumps(record, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, key: bytes, value: bytes) -> PublishedDataPath:
        """A record read back; its key names host, domain and vdi. L{RecordError} if unreadable."""
        host, domid, vdi = parseDatapathKey(key)
        try:
            record = json.loads(value)
            if not isinstance(record, dict):
                raise TypeError("not an object")

            def optionalInt(name: str) -> int | None:
                v = record.get(name)
                return None if v is None else int(v)

            return cls(
                host=host,
                driverDomid=domid,
                vdi=vdi,
                kind=str(record["kind"]),
                image=str(record["image"]),
                format=str(record.get("format", "")),
                chain=tuple(str(i) for i in record.get("chain", ())),
                pid=optionalInt("pid"),
                minor=optionalInt("minor"),
                qmp=None if record.get("qmp") is None else str(record["qmp"]),
                extra={str(k): str(v) for k, v in dict(record.get("extra", {})).items()},
                pauser=dict(record.get("pauser", {})),
            )
        except (ValueError, TypeError, KeyError) as e:
            raise RecordError(f"unreadable data-path record at {key!r}: {e}") from None
