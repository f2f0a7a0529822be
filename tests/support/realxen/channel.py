"""
The command channel of the real-Xen lane: runs in dom0, started by
C{files/dom0-setup.sh} as C{python channel.py SHARE}; standard library only.

The test process and this program talk through files in the writable share
(C{/mnt/share} in dom0). Every file is written under a name starting with
C{.} and renamed into place, so the reader never sees half of one.

Requests: C{req/<id>.json}, a JSON object, one of:

  - C{{"argv": [...], "env": {...}, "cwd": "/", "timeout": 60, "stdin": "..."}}:
    run C{argv} (no shell) with C{env} added to the channel's environment,
    stdin from C{stdin} (default: none), in a session of its own; after
    C{timeout} seconds its process group is killed (SIGKILL).
    Output: C{res/<id>.out}, C{res/<id>.err}; then, last, C{res/<id>.rc}:
    C{{"rc": N, "timedout": bool, "seconds": S, "pid": P}} (C{rc} is
    negative for a signal, as in L{subprocess}; 127 and 126 when C{argv}
    cannot be started).
  - the same with C{"background": true}: C{res/<id>.pid} (C{{"pid": P}}) at
    once; C{res/<id>.rc} when the process ends (C{timeout} is ignored).
  - C{{"kill": PID, "signal": 15, "group": false}}: send a signal to a
    process (or its process group); C{res/<id>.rc} as above, with the error
    in C{res/<id>.err} and C{rc} 1 if it failed.
  - C{{"shutdown": true}}: C{res/<id>.rc}, then sync and C{busybox reboot -f}
    (Xen resets the machine; QEMU, run with C{-no-reboot}, exits).

Each request is served in a thread of its own, so requests run at once.
C{ready} (C{{"uptime": S, "pid": P, "setupFailures": [...]}}) is written when
the channel starts. A line per request goes to stderr (C{channel.log}).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from typing import Any

#: Directory names in the share, and how often C{req/} is looked at.
REQUESTS = "req"
RESULTS = "res"
READY = "ready"
POLL_SECONDS = 0.05


def publish(path: str, data: Any) -> None:
    """
    Write C{data} as JSON to C{path} atomically (a dot-name, then rename).
    """
    head, tail = os.path.split(path)
    partial = os.path.join(head, f".{tail}.partial")
    with open(partial, "w") as f:
        json.dump(data, f)
    os.rename(partial, path)


def log(message: str) -> None:
    """
    One line on stderr, with dom0's uptime.
    """
    with open("/proc/uptime") as f:
        uptime = f.read().split()[0]
    sys.stderr.write(f"[{uptime}] {message}\n")
    sys.stderr.flush()


class Channel:
    """
    Serves the requests dropped into C{<share>/req}.
    """

    def __init__(self, share: str) -> None:
        self.requests = os.path.join(share, REQUESTS)
        self.results = os.path.join(share, RESULTS)
        self.share = share
        self.environment = dict(os.environ)
        self.environment.pop("XENDDEV_SETUP_FAILURES", None)
        self.environment.pop("XENDDEV_PYTHON", None)
        os.makedirs(self.requests, exist_ok=True)
        os.makedirs(self.results, exist_ok=True)

    def result(self, rid: str, suffix: str) -> str:
        """
        The path of a result file of request C{rid}.
        """
        return os.path.join(self.results, rid + suffix)

    def serveForever(self) -> None:
        """
        Announce readiness, then poll for requests until a shutdown request.
        """
        failures = [f for f in os.environ.get("XENDDEV_SETUP_FAILURES", "").split(";") if f]
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        publish(
            os.path.join(self.share, READY),
            {"uptime": uptime, "pid": os.getpid(), "setupFailures": failures},
        )
        log(f"ready (set-up failures: {failures})")
        for names in self.arrivals():
            for name in names:
                if name.startswith(".") or not name.endswith(".json"):
                    continue
                rid = name[: -len(".json")]
                claimed = self.result(rid, ".request")
                try:
                    os.rename(os.path.join(self.requests, name), claimed)
                    with open(claimed) as f:
                        request = json.load(f)
                except (OSError, ValueError) as e:
                    log(f"{rid}: unreadable request: {e}")
                    continue
                if request.get("shutdown"):
                    self.shutdown(rid)
                    return
                threading.Thread(target=self.serve, args=(rid, request), daemon=True).start()

    def arrivals(self) -> Iterator[list[str]]:
        """
        The names in C{req/}, every L{POLL_SECONDS}, listed only when they
        may have changed: the directory's mtime changed since the last look,
        or changed before the last listing (a name renamed in later within
        the same timestamp tick leaves the mtime as it was), or a second
        has passed. A getattr costs an idle dom0 under TCG much less than a
        9p readdir.
        """
        seen: int | None = None
        recheck = False
        listedAt = 0.0
        while True:
            mtime = os.stat(self.requests).st_mtime_ns
            now = time.monotonic()
            changed = mtime != seen
            if changed or recheck or now - listedAt > 1.0:
                names = sorted(os.listdir(self.requests))
                yield names
                listedAt = now
                recheck = changed or bool(names)
                seen = mtime
            time.sleep(POLL_SECONDS)

    def serve(self, rid: str, request: dict[str, Any]) -> None:
        """
        Serve one request; whatever goes wrong is reported as its result.
        """
        try:
            if "kill" in request:
                self.kill(rid, request)
            else:
                self.run(rid, request)
        except BaseException:
            error = traceback.format_exc()
            log(f"{rid}: {error}")
            with open(self.result(rid, ".err"), "a") as f:
                f.write(error)
            publish(self.result(rid, ".rc"), {"rc": 125, "timedout": False, "seconds": 0.0})

    def run(self, rid: str, request: dict[str, Any]) -> None:
        """
        Run a command (in the foreground or in the background).
        """
        argv = [str(a) for a in request["argv"]]
        env = dict(self.environment)
        env.update({str(k): str(v) for k, v in (request.get("env") or {}).items()})
        stdinPath = None
        if request.get("stdin") is not None:
            stdinPath = self.result(rid, ".in")
            with open(stdinPath, "w") as f:
                f.write(request["stdin"])
        background = bool(request.get("background"))
        started = time.monotonic()
        with (
            open(self.result(rid, ".out"), "wb") as out,
            open(self.result(rid, ".err"), "wb") as err,
            open(stdinPath or os.devnull, "rb") as stdin,
        ):
            try:
                process = subprocess.Popen(
                    argv,
                    stdin=stdin,
                    stdout=out,
                    stderr=err,
                    cwd=request.get("cwd") or "/",
                    env=env,
                    start_new_session=True,
                )
            except OSError as e:
                err.write(f"{argv[0]}: {e}\n".encode())
                err.flush()
                rc = 127 if isinstance(e, FileNotFoundError) else 126
                log(f"{rid}: {argv} cannot start: {e}")
                publish(self.result(rid, ".rc"), {"rc": rc, "timedout": False, "seconds": 0.0})
                return
        log(f"{rid}: pid {process.pid}{' (background)' if background else ''}: {argv}")
        if background:
            publish(self.result(rid, ".pid"), {"pid": process.pid})
            timeout = None
        else:
            timeout = request.get("timeout")
        killed = threading.Event()

        def expire() -> None:
            try:
                os.killpg(process.pid, signal.SIGKILL)
                killed.set()
            except ProcessLookupError:
                pass

        timer = None
        if timeout is not None:
            timer = threading.Timer(float(timeout), expire)
            timer.start()
        rc = process.wait()
        if timer is not None:
            timer.cancel()
        seconds = time.monotonic() - started
        timedout = killed.is_set() and rc == -signal.SIGKILL
        log(f"{rid}: rc {rc}{' (timed out)' if timedout else ''} after {seconds:.2f}s")
        publish(
            self.result(rid, ".rc"),
            {"rc": rc, "timedout": timedout, "seconds": seconds, "pid": process.pid},
        )

    def kill(self, rid: str, request: dict[str, Any]) -> None:
        """
        Send a signal to a process or a process group.
        """
        pid, signum = int(request["kill"]), int(request.get("signal", signal.SIGTERM))
        rc = 0
        with open(self.result(rid, ".out"), "w"), open(self.result(rid, ".err"), "w") as err:
            try:
                if request.get("group"):
                    os.killpg(pid, signum)
                else:
                    os.kill(pid, signum)
            except OSError as e:
                err.write(f"kill {pid} {signum}: {e}\n")
                rc = 1
        log(f"{rid}: signal {signum} to {pid}: rc {rc}")
        publish(self.result(rid, ".rc"), {"rc": rc, "timedout": False, "seconds": 0.0})

    def shutdown(self, rid: str) -> None:
        """
        Acknowledge, then reset the machine.
        """
        for suffix in (".out", ".err"):
            open(self.result(rid, suffix), "w").close()
        publish(self.result(rid, ".rc"), {"rc": 0, "timedout": False, "seconds": 0.0})
        log("shutdown")
        os.sync()
        subprocess.call(["busybox", "reboot", "-f"])


def main(argv: list[str]) -> int:
    """
    C{channel.py SHARE}.
    """
    if len(argv) != 2:
        sys.stderr.write("usage: channel.py SHARE\n")
        return 2
    Channel(argv[1]).serveForever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
