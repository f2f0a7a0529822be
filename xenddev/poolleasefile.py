# -*- test-case-name: tests.test_pool_restart -*-
"""
What a pool host's daemon leaves in its run directory for the next daemon
of the same host: its lease (L{LeaseRecord}: the host name, the lease id,
the etcd cluster's id), so a restarted daemon can adopt that lease while
it is alive instead of waiting for it to expire
(L{xenddev.poolmember}, L{xenddev.pool.session}).

C{<rundir>/pool-lease.json}: written atomically (a temporary file, fsync,
rename), mode 0600, at every join and at stop. It is no secret (the
lease id is in etcd for anyone who may read the pool) but it decides which
lease a daemon renews, so a record is trusted only when it is a regular
file (not a link) of this process's user that nobody else may write
(L{UntrustedLeaseRecord} otherwise).

C{<rundir>/pool-lease.lock}: held (C{flock}) by the daemon that runs with
the lease, from before it reads the record until after its last write.
A daemon that cannot take it at once has a predecessor still running
(or still stopping) and must not adopt that one's lease: it joins as if
there were no record, and is refused while that lease lives.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat

import attrs

from xenddev.errors import XenddevError

__all__ = [
    "LEASE_FILE",
    "LEASE_LOCK",
    "LeaseRecord",
    "LeaseRecordLock",
    "UntrustedLeaseRecord",
    "readLeaseRecord",
    "removeLeaseRecord",
    "writeLeaseRecord",
]

#: The record's name in the daemon's run directory.
LEASE_FILE = "pool-lease.json"
#: The lock's name in the daemon's run directory.
LEASE_LOCK = "pool-lease.lock"
#: The largest lease id etcd hands out (an int64).
_MAX_LEASE = (1 << 63) - 1


class UntrustedLeaseRecord(XenddevError):
    """A lease record that cannot be trusted (who may write it, or what it holds)."""


@attrs.frozen
class LeaseRecord:
    """
    A daemon's lease, as it left it.

    @ivar host: the host's name in the pool.
    @ivar lease: the session's lease id.
    @ivar cluster: the etcd cluster's id (0: not known).
    @ivar pid: the daemon that wrote it.
    """

    host: str
    lease: int
    cluster: int
    pid: int = 0

    def toJSON(self) -> dict[str, object]:
        """The record as plain data (leases in hex, as etcdctl and the logs show them)."""
        return {
            "host": self.host,
            "lease": f"{self.lease:x}",
            "cluster": f"{self.cluster:x}",
            "pid": self.pid,
        }

    @classmethod
    def fromJSON(cls, data: object) -> LeaseRecord:
        """
        The record C{data} holds.

        @raise UntrustedLeaseRecord: it is not a record.
        """
        bad = UntrustedLeaseRecord(f"not a pool lease record: {data!r:.200}")
        if not isinstance(data, dict):
            raise bad
        host, pid = data.get("host"), data.get("pid", 0)
        if not isinstance(host, str) or not isinstance(pid, int) or isinstance(pid, bool):
            raise bad
        try:
            lease, cluster = int(data["lease"], 16), int(data["cluster"], 16)
        except (KeyError, TypeError, ValueError):
            raise bad from None
        if not (0 < lease <= _MAX_LEASE and 0 <= cluster < (1 << 64)):
            raise bad
        return cls(host, lease, cluster, pid)


def writeLeaseRecord(path: str, record: LeaseRecord) -> None:
    """Write C{record} to C{path} atomically, mode 0600."""
    tmp = f"{path}.tmp"
    try:
        os.unlink(tmp)  # someone else's leftover would keep its owner and mode
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(record.toJSON(), f)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)


def readLeaseRecord(path: str) -> LeaseRecord | None:
    """
    The record at C{path}, or None when there is none.

    @raise UntrustedLeaseRecord: a link, not a regular file, another
        user's, writable by others, or not a record.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UntrustedLeaseRecord(f"{path}: a symbolic link") from None
        raise
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise UntrustedLeaseRecord(f"{path}: not a regular file")
        if info.st_uid != os.geteuid():
            raise UntrustedLeaseRecord(f"{path}: owned by uid {info.st_uid}, not this daemon's")
        if info.st_mode & 0o022:
            raise UntrustedLeaseRecord(f"{path}: others may write it (mode {info.st_mode:o})")
        raw = f.read(4096)
    try:
        data = json.loads(raw)
    except ValueError:
        raise UntrustedLeaseRecord(f"{path}: not JSON") from None
    return LeaseRecord.fromJSON(data)


def removeLeaseRecord(path: str) -> None:
    """Remove the record at C{path} (there may be none)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class LeaseRecordLock:
    """
    The lock a running daemon holds on its run directory's lease record
    (see the module's doc).

    @param path: the lock file.
    @ivar held: whether this process holds it.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this process holds the lock."""
        return self._fd is not None

    def acquire(self) -> bool:
        """Take the lock if it is free (never waits); whether it is held now."""
        if self._fd is not None:
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
        self._fd = fd
        return True

    def release(self) -> None:
        """Let the lock go (closing the file does)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
