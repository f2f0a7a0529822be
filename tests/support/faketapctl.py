"""
STAND-IN for blktap's C{tap-ctl}, for the test suite only.

blktap (tapdisk, tap-ctl, the blktap kernel driver) is not packaged for
Debian, so the tests cannot run the real thing. This module, run by
C{tests/support/fake-tap-ctl}, follows tap-ctl's documented command
semantics (options, outputs, C{create} = allocate + spawn + attach + open
undone on failure, C{destroy} = close + detach + free) closely enough for
the toolstack to be exercised end to end. It serves no I/O.

What is real: every tapdisk is a real idle child process (C{sleep}) in a
session of its own, so pids are real; C{pause} sends it SIGSTOP and
C{unpause} SIGCONT (visible as state C{T} in C{/proc/<pid>/stat}); C{destroy}
terminates it and waits until it has exited. Minors are allocated; each has
a stand-in device node (a regular file, sized like the open image) at
C{<root>/dev/xen/blktap-2/tapdev<N>} and a control directory
C{<root>/sys/class/blktap2/blktap<N>} - never under the real C{/dev}.

Environment:

  - C{XENDDEV_FAKE_TAPCTL_STATE} (required): the state directory
    (C{tapdisks.json}, C{lock}, C{events.log}, C{fail/}).
  - C{XENDDEV_FAKE_TAPCTL_ROOT}: the root for device nodes (default
    C{<state>/root}).

Failure injection: if C{<state>/fail/<command>} exists, that command (also
as a step of C{create}) fails: the file's first line is the exit code
(default 5, EIO), the rest is written to stderr. C{<state>/fail/<command>-<pid>}
does the same for the tapdisk with that pid only (commands taking C{-p}).

Every command appends a JSON line to C{<state>/events.log}:
C{{"t": <time.monotonic()>, "cmd": ..., "argv": [...], "rc": <exit>}} (the
monotonic clock is system-wide, so tests compare it with their own).
"""

from __future__ import annotations

import errno
import fcntl
import getopt
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

CLOSED = 0x2
PAUSED = 0x20
TYPES = ("aio", "vhd", "ram", "qcow", "remus")
STATE_ENV = "XENDDEV_FAKE_TAPCTL_STATE"
ROOT_ENV = "XENDDEV_FAKE_TAPCTL_ROOT"


class Failed(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def procState(pid: int) -> str | None:
    """The state letter of a process, or None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()[0]


def alive(pid: int) -> bool:
    """Exists and is not a zombie (PID 1 here may not reap orphans)."""
    return procState(pid) not in (None, "Z", "X")


class FakeTapCtl:
    def __init__(self, state: str, root: str) -> None:
        self.state = state
        self.root = root
        self.db: dict[str, Any] = {"tapdisks": {}, "minors": []}

    # Storage

    def load(self) -> None:
        try:
            with open(os.path.join(self.state, "tapdisks.json")) as f:
                self.db = json.load(f)
        except FileNotFoundError:
            pass
        # A tapdisk whose process died (killed from outside) is gone.
        for pid in list(self.db["tapdisks"]):
            if not alive(int(pid)):
                del self.db["tapdisks"][pid]

    def save(self) -> None:
        tmp = os.path.join(self.state, "tapdisks.json.tmp")
        with open(tmp, "w") as f:
            json.dump(self.db, f)
        os.replace(tmp, os.path.join(self.state, "tapdisks.json"))

    def node(self, minor: int) -> str:
        return os.path.join(self.root, f"dev/xen/blktap-2/tapdev{minor}")

    def sysdir(self, minor: int) -> str:
        return os.path.join(self.root, f"sys/class/blktap2/blktap{minor}")

    def checkFail(self, command: str, pid: int | None = None) -> None:
        names = [command] if pid is None else [f"{command}-{pid}", command]
        for name in names:
            try:
                with open(os.path.join(self.state, "fail", name)) as f:
                    text = f.read()
                break
            except FileNotFoundError:
                continue
        else:
            return
        first, _, rest = text.partition("\n")
        code = int(first) if first.strip().isdigit() else errno.EIO
        raise Failed(code, rest or f"{command} failed (injected)\n")

    def tapdisk(self, pid: int) -> dict[str, Any]:
        entry = self.db["tapdisks"].get(str(pid))
        if entry is None:
            raise Failed(errno.ESRCH, f"no tapdisk with pid {pid}\n")
        return dict(entry)

    def owned(self, pid: int, minor: int) -> dict[str, Any]:
        entry = self.tapdisk(pid)
        if entry["minor"] != minor:
            raise Failed(errno.ENOENT, f"tapdisk {pid} is not attached to minor {minor}\n")
        return entry

    def put(self, pid: int, entry: dict[str, Any]) -> None:
        self.db["tapdisks"][str(pid)] = entry

    # Steps

    def allocate(self) -> int:
        self.checkFail("allocate")
        used = set(self.db["minors"])
        minor = next(n for n in range(len(used) + 1) if n not in used)
        os.makedirs(os.path.dirname(self.node(minor)), exist_ok=True)
        open(self.node(minor), "w").close()
        os.makedirs(self.sysdir(minor), exist_ok=True)
        for name in ("pause", "resume", "remove"):
            open(os.path.join(self.sysdir(minor), name), "w").close()
        self.db["minors"].append(minor)
        return minor

    def free(self, minor: int) -> None:
        self.checkFail("free")
        if minor not in self.db["minors"]:
            raise Failed(errno.ENOENT, f"minor {minor} is not allocated\n")
        for entry in self.db["tapdisks"].values():
            if entry["minor"] == minor:
                raise Failed(errno.EBUSY, f"minor {minor} is attached to a tapdisk\n")
        self.db["minors"].remove(minor)
        for path in (self.node(minor),):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        sysdir = self.sysdir(minor)
        if os.path.isdir(sysdir):
            for name in os.listdir(sysdir):
                os.unlink(os.path.join(sysdir, name))
            os.rmdir(sysdir)

    def spawn(self) -> int:
        self.checkFail("spawn")
        child = subprocess.Popen(
            ["sleep", "infinity"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )
        child.returncode = 0  # not ours to wait for: no ResourceWarning
        self.put(child.pid, {"minor": None, "state": 0, "type": None, "path": None})
        return child.pid

    def kill(self, pid: int) -> None:
        for sig in (signal.SIGCONT, signal.SIGTERM):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                break
        deadline = time.monotonic() + 5
        while alive(pid):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + 5
            time.sleep(0.005)
        self.db["tapdisks"].pop(str(pid), None)

    def attach(self, pid: int, minor: int) -> None:
        self.checkFail("attach", pid)
        entry = self.tapdisk(pid)
        if minor not in self.db["minors"]:
            raise Failed(errno.ENOENT, f"minor {minor} is not allocated\n")
        if entry["minor"] is not None:
            raise Failed(errno.EBUSY, f"tapdisk {pid} is attached already\n")
        for other in self.db["tapdisks"].values():
            if other["minor"] == minor:
                raise Failed(errno.EBUSY, f"minor {minor} is attached to a tapdisk\n")
        entry.update(minor=minor, state=CLOSED)
        self.put(pid, entry)

    def detach(self, pid: int, minor: int) -> None:
        """A tapdisk here serves one VBD: it exits once detached."""
        self.checkFail("detach", pid)
        entry = self.owned(pid, minor)
        if entry["type"] is not None:
            raise Failed(errno.EBUSY, f"tapdisk {pid} is still open\n")
        self.kill(pid)

    def open(self, pid: int, minor: int, args: str, readonly: bool) -> None:
        self.checkFail("open", pid)
        entry = self.owned(pid, minor)
        if entry["type"] is not None:
            raise Failed(errno.EBUSY, f"tapdisk {pid} is open already\n")
        typ, colon, path = args.partition(":")
        if not colon or typ not in TYPES:
            raise Failed(errno.EINVAL, f"unsupported image {args!r}\n")
        if typ != "ram" and not os.path.isfile(path):
            raise Failed(errno.ENOENT, f"open {path}: No such file or directory\n")
        if typ != "ram":
            os.truncate(self.node(minor), os.path.getsize(path))
        entry.update(type=typ, path=path, state=0, readonly=readonly)
        self.put(pid, entry)

    def close(self, pid: int, minor: int) -> None:
        self.checkFail("close", pid)
        entry = self.owned(pid, minor)
        if entry["state"] & PAUSED:
            os.kill(pid, signal.SIGCONT)
        entry.update(type=None, path=None, state=CLOSED)
        self.put(pid, entry)

    def pause(self, pid: int, minor: int) -> None:
        self.checkFail("pause", pid)
        entry = self.owned(pid, minor)
        if entry["type"] is None:
            raise Failed(errno.EINVAL, f"tapdisk {pid} is not open\n")
        os.kill(pid, signal.SIGSTOP)
        entry["state"] |= PAUSED
        self.put(pid, entry)

    def unpause(self, pid: int, minor: int, args: str | None) -> None:
        self.checkFail("unpause", pid)
        entry = self.owned(pid, minor)
        if not entry["state"] & PAUSED:
            raise Failed(errno.EINVAL, f"tapdisk {pid} is not paused\n")
        if args is not None:
            typ, colon, path = args.partition(":")
            if not colon or typ not in TYPES:
                raise Failed(errno.EINVAL, f"unsupported image {args!r}\n")
            entry.update(type=typ, path=path)
        entry["state"] &= ~PAUSED
        os.kill(pid, signal.SIGCONT)
        self.put(pid, entry)

    def destroy(self, pid: int, minor: int) -> None:
        self.checkFail("destroy", pid)
        self.owned(pid, minor)
        self.close(pid, minor)
        self.detach(pid, minor)
        self.free(minor)

    def create(self, args: str, readonly: bool) -> str:
        self.checkFail("create")
        minor = self.allocate()
        pid: int | None = None
        attached = False
        try:
            pid = self.spawn()
            self.attach(pid, minor)
            attached = True
            self.open(pid, minor, args, readonly)
        except Failed:
            if pid is not None:
                if attached:
                    self.db["tapdisks"][str(pid)]["type"] = None
                self.kill(pid)
            self.free(minor)
            raise
        return self.node(minor)

    def listing(self, pid: int, minor: int, typ: str | None, path: str | None) -> str:
        lines = []
        attached = set()
        for key in sorted(self.db["tapdisks"], key=int):
            entry = self.db["tapdisks"][key]
            attached.add(entry["minor"])
            if pid >= 0 and int(key) != pid:
                continue
            if minor >= 0 and entry["minor"] != minor:
                continue
            if typ is not None and entry["type"] is not None and entry["type"] != typ:
                continue
            if path is not None and entry["path"] is not None and entry["path"] != path:
                continue
            fields = [f"pid={key}"]
            if entry["minor"] is not None:
                fields.append(f"minor={entry['minor']}")
            fields.append(f"state={entry['state']:#x}" if entry["state"] else "state=0")
            if entry["type"] is not None:
                fields.append(f"args={entry['type']}:{entry['path']}")
            lines.append(" ".join(fields))
        if pid < 0:
            for m in sorted(self.db["minors"]):
                if m not in attached and (minor < 0 or m == minor):
                    lines.append(f"minor={m}")
        return "".join(line + "\n" for line in lines)


def killAll(state: str) -> None:
    """
    Kill every tapdisk recorded in a state directory (SIGCONT first: a
    paused one must see the SIGKILL) and remove the directory; for cleanups.
    """
    try:
        with open(os.path.join(state, "tapdisks.json")) as f:
            pids = [int(p) for p in json.load(f)["tapdisks"]]
    except FileNotFoundError:
        pids = []
    for pid in pids:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
    shutil.rmtree(state, True)


def _pm(opts: dict[str, str], usage: str) -> tuple[int, int]:
    try:
        return int(opts["-p"]), int(opts["-m"])
    except (KeyError, ValueError):
        raise Failed(errno.EINVAL, f"usage: {usage}\n") from None


def run(argv: list[str], out: Any) -> int:
    if not argv:
        raise Failed(errno.EINVAL, "usage: tap-ctl <command> [options]\n")
    cmd, rest = argv[0], argv[1:]
    specs = {
        "list": "m:p:t:f:h",
        "allocate": "d:h",
        "free": "m:h",
        "create": "a:c:RDd:e:r2:st:C:h",
        "destroy": "p:m:t:h",
        "spawn": "c:h",
        "attach": "p:m:h",
        "detach": "p:m:h",
        "open": "a:RDm:p:e:r2:st:C:Eh",
        "close": "p:m:ft:h",
        "pause": "p:m:t:h",
        "unpause": "p:m:a:2:c:h",
        "stats": "p:m:h",
    }
    if cmd not in specs:
        raise Failed(errno.EINVAL, f"unknown command {cmd!r}\n")
    try:
        pairs, extra = getopt.getopt(rest, specs[cmd])
    except getopt.GetoptError as e:
        raise Failed(errno.EINVAL, f"{cmd}: {e}\n") from None
    if extra:
        raise Failed(errno.EINVAL, f"{cmd}: unexpected arguments {extra}\n")
    opts = dict(pairs)
    state = os.environ.get(STATE_ENV)
    if not state:
        raise Failed(errno.EINVAL, f"{STATE_ENV} is not set (this is the test stand-in)\n")
    os.makedirs(state, exist_ok=True)
    tap = FakeTapCtl(state, os.environ.get(ROOT_ENV) or os.path.join(state, "root"))
    with open(os.path.join(state, "lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        tap.load()
        try:
            if cmd == "list":
                text = tap.listing(
                    int(opts.get("-p", -1)), int(opts.get("-m", -1)), opts.get("-t"), opts.get("-f")
                )
                out.write(text)
            elif cmd == "allocate":
                out.write(tap.node(tap.allocate()) + "\n")
            elif cmd == "free":
                if "-m" not in opts:
                    raise Failed(errno.EINVAL, "usage: free <-m minor>\n")
                tap.free(int(opts["-m"]))
            elif cmd == "create":
                if "-a" not in opts:
                    raise Failed(errno.EINVAL, "usage: create <-a type:/path/to/file>\n")
                out.write(tap.create(opts["-a"], "-R" in opts) + "\n")
            elif cmd == "spawn":
                out.write(f"{tap.spawn()}\n")
            elif cmd == "open":
                pid, minor = _pm(opts, "open <-p pid> <-m minor> <-a type:/path/to/file>")
                if "-a" not in opts:
                    raise Failed(errno.EINVAL, "usage: open <-p pid> <-m minor> <-a args>\n")
                tap.open(pid, minor, opts["-a"], "-R" in opts)
            elif cmd == "unpause":
                pid, minor = _pm(opts, "unpause <-p pid> <-m minor> [-a type:/path/to/file]")
                tap.unpause(pid, minor, opts.get("-a"))
            elif cmd == "stats":
                pid, minor = _pm(opts, "stats <-p pid> <-m minor>")
                entry = tap.owned(pid, minor)
                name = f"{entry['type']}:{entry['path']}" if entry["type"] else None
                out.write(json.dumps({"name": name, "minor": minor, "reqs_outstanding": 0}) + "\n")
            else:
                pid, minor = _pm(opts, f"{cmd} <-p pid> <-m minor>")
                getattr(tap, cmd)(pid, minor)
        finally:
            tap.save()
    return 0


def main() -> int:
    argv = sys.argv[1:]
    state = os.environ.get(STATE_ENV)
    rc = 0
    try:
        rc = run(argv, sys.stdout)
    except Failed as e:
        sys.stderr.write(e.message)
        rc = e.code
    if state and os.path.isdir(state):
        entry = {"t": time.monotonic(), "cmd": argv[0] if argv else "", "argv": argv, "rc": rc}
        with open(os.path.join(state, "events.log"), "a") as f:
            f.write(json.dumps(entry) + "\n")
    return rc


if __name__ == "__main__":
    sys.exit(main())
