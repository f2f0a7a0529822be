"""
The blocking embedding API (L{xenddev.embed}).

The 20-thread test runs as a subprocess: there the reactor is the ordinary
global one, started in a background thread by the facade exactly as in a
legacy threaded toolstack, and the process exits through C{atexit} — neither
can be done inside trial, whose own reactor runs in the main thread. The
smaller tests of L{ReactorThread} run in-process on a private
C{SelectReactor} instance in a thread of its own.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.selectreactor import SelectReactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from tests.support.host import pythonEnv, shortTempDir
from tests.support.loopdev import (
    acquireLoopTestLock,
    detachLoopsFor,
    makeImage,
    requireLoopDevices,
)
from xenddev.embed import EmbedError, OperationTimeout, ReactorThread

SCRIPT = r"""
import json, os, sys, threading, time
from xenddev.config import Config, TimeoutsConfig
from xenddev.toolstack.controller import DeviceExistsError
from xenddev.embed import EmbeddedToolstack

rundir, image = sys.argv[1], sys.argv[2]
xd = EmbeddedToolstack.start(
    Config(rundir=rundir, xenstore="embedded", timeouts=TimeoutsConfig(create=30, destroy=30)),
    timeout=60,
)
errors, attached = [], []
lock = threading.Lock()
barrier = threading.Barrier(20)

def worker(n):
    domid = 5 + n % 2
    vdev = "xvd" + "abcdefghij"[n // 2]
    try:
        barrier.wait()
        for _ in range(3):
            devid = xd.createDevice(
                domid, "vbd", {"spec": f"format=raw, vdev={vdev}, access=r, target={image}"}
            )
            assert xd.getBlockDeviceClass(domid, vdev) == "vbd"
            assert devid in [r.devid for r in xd.listDevices(domid, "vbd")]
            with lock:
                attached.append(devid)
            xd.destroyDevice(domid, "vbd", vdev)
    except Exception as e:
        errors.append(f"{n}: {type(e).__name__}: {e}")

threads = [threading.Thread(target=worker, args=(n,)) for n in range(20)]
for t in threads:
    t.start()
for t in threads:
    t.join()
dup = None
devid = xd.createDevice(5, "vbd", {"spec": f"vdev=xvdz, access=r, target={image}"})
try:
    xd.createDevice(5, "vbd", {"spec": f"vdev=xvdz, access=r, target={image}"})
except DeviceExistsError as e:
    dup = type(e).__name__
xd.releaseDevices(5)
left = {d: len(xd.listDevices(d, "vbd")) for d in (5, 6)}
print(json.dumps({"errors": errors, "attached": len(attached), "left": left, "dup": dup}))
sys.stdout.flush()
# No close(): atexit must stop the service and remove the sockets.
"""


class ScriptRunner(TestCase):
    """Runs a script of a test as a process of its own: a toolstack embedding xenddev."""

    async def runScript(self, rundir: str, name: str, source: str, *args: str) -> Any:
        """
        Write C{source} as C{name} in C{rundir} and run it there with this
        interpreter (the checkout on C{PYTHONPATH}); it must exit 0. Its last
        line of output, parsed as JSON.
        """
        script = os.path.join(rundir, name)
        with open(script, "w") as f:
            f.write(source)
        out, err, code = await getProcessOutputAndValue(
            sys.executable, [script, *args], env=pythonEnv(), path=rundir
        )
        self.assertEqual(code, 0, err.decode(errors="replace")[-3000:])
        return json.loads(out.decode().strip().splitlines()[-1])


class TwentyThreadsTests(ScriptRunner):
    """20 threads attaching and detaching at once through the blocking API."""

    async def test_twentyThreads(self) -> None:
        """Every attach and detach succeeds; nothing is left; atexit cleans up."""
        rundir = shortTempDir(self, "xe-")
        image = os.path.join(rundir, "disk.img")
        with open(image, "wb") as f:
            f.truncate(1 << 20)
        run = os.path.join(rundir, "run")
        result = await self.runScript(rundir, "embed20.py", SCRIPT, run, image)
        self.assertEqual(result["errors"], [])
        self.assertEqual(result["attached"], 60)
        self.assertEqual(result["left"], {"5": 0, "6": 0})
        self.assertEqual(result["dup"], "DeviceExistsError")
        self.assertFalse(os.path.lexists(os.path.join(run, "xenstored", "socket")))


HOTPLUG_SCRIPT = r"""
import json, os, subprocess, sys, time
from twisted.logger import globalLogPublisher
from xenddev.config import Config, DriverDomainConfig, TimeoutsConfig
from xenddev.embed import EmbeddedToolstack

rundir, scripts, image, quiet = sys.argv[1:5]
events = []
globalLogPublisher.addObserver(events.append)
xd = EmbeddedToolstack.start(
    Config(
        rundir=rundir,
        xenstore="embedded",
        driver_domain=DriverDomainConfig(hotplug="on", hotplug_timeout=30, script_dir=scripts),
        timeouts=TimeoutsConfig(create=30, destroy=30),
    ),
    timeout=60,
)

def loops(path):
    out = subprocess.run(["losetup", "-j", path], capture_output=True, text=True).stdout
    return [line.split(":")[0] for line in out.splitlines()]

def children():
    # (pid, state) of this process's children, in every thread.
    found = []
    for task in os.listdir(f"/proc/{os.getpid()}/task"):
        with open(f"/proc/{os.getpid()}/task/{task}/children") as f:
            for pid in f.read().split():
                try:
                    with open(f"/proc/{pid}/stat") as st:
                        found.append((int(pid), st.read().rsplit(")", 1)[1].split()[0]))
                except OSError:
                    pass
    return found

began = time.monotonic()
devids = [
    xd.createDevice(5, "vbd", {"spec": f"format=raw, vdev=xvdb, access=rw, target={image}"}),
    xd.createDevice(
        5, "vbd", {"spec": f"format=raw, vdev=xvdc, access=rw, script=block-quiet, target={quiet}"}
    ),
]
attachSeconds = time.monotonic() - began
statuses = [
    xd.reactorThread.call(
        xd.service.manager.xs.read, f"/local/domain/0/backend/vbd/5/{devid}/hotplug-status"
    )
    for devid in devids
]
attachedLoops = [loops(image), loops(quiet)]
for devid in devids:
    xd.destroyDevice(5, "vbd", devid)
for _ in range(200):
    if not loops(image) and not loops(quiet):
        break
    time.sleep(0.05)
runs = [
    (e["script"], e["action"], e["exitCode"], e["outcome"])
    for e in events
    if str(e.get("log_format", "")).startswith("hotplug {script}")
]
time.sleep(0.2)
print(json.dumps({
    "devids": devids,
    "statuses": statuses,
    "attachedLoops": attachedLoops,
    "loopsAfter": loops(image) + loops(quiet),
    "runs": runs,
    "children": children(),
    "attachSeconds": attachSeconds,
}))
sys.stdout.flush()
xd.close()
"""


class HotplugInEmbeddingTests(ScriptRunner):
    """
    Hotplug scripts inside an embedding process, where the reactor runs in
    a background thread and no SIGCHLD handler exists.
    """

    async def test_realBlockScript(self) -> None:
        """
        The embedding API attaches two file vbds with hotplug on: the real
        C{block} script runs for each, sets up a loop device and reports
        connected; each process exits, is reaped and its exit status 0 is
        seen (the runner's log lines); detach runs the scripts' remove,
        which frees the loop devices; no zombie child is left.

        The second vbd's script, C{block-quiet}, sends its output to
        /dev/null before it execs the real C{block}: its pipes close long
        before it exits, so nothing but the reaper tells the reactor that
        it did (Twisted's own check when the pipes close comes too early).
        """
        requireLoopDevices(self)
        if not os.path.exists("/etc/xen/scripts/block"):
            self.skipTest("the Xen hotplug scripts are not installed (xen-utils-common)")
        os.makedirs("/var/log/xen", exist_ok=True)
        lock = acquireLoopTestLock()
        self.addCleanup(os.close, lock)
        rundir = shortTempDir(self, "xh-")
        image = makeImage(os.path.join(rundir, "disk.img"))
        quiet = makeImage(os.path.join(rundir, "quiet.img"))
        for path in (image, quiet):
            self.addCleanup(detachLoopsFor, path)
        scripts = os.path.join(rundir, "scripts")
        os.makedirs(scripts)
        for name in os.listdir("/etc/xen/scripts"):
            os.symlink(os.path.join("/etc/xen/scripts", name), os.path.join(scripts, name))
        with open(os.path.join(scripts, "block-quiet"), "w") as f:
            f.write(
                '#!/bin/sh\nexec >/dev/null 2>&1\nsleep 0.2\nexec "$(dirname "$0")/block" "$@"\n'
            )
        os.chmod(os.path.join(scripts, "block-quiet"), 0o755)
        result = await self.runScript(
            rundir,
            "embedhotplug.py",
            HOTPLUG_SCRIPT,
            os.path.join(rundir, "run"),
            scripts,
            image,
            quiet,
        )
        self.assertEqual(result["devids"], [51728, 51744])
        self.assertEqual(result["statuses"], ["connected", "connected"])
        self.assertEqual([len(found) for found in result["attachedLoops"]], [1, 1])
        self.assertEqual(result["loopsAfter"], [])
        self.assertEqual(
            sorted(tuple(r) for r in result["runs"]),
            [
                ("block", "add", 0, "exit 0"),
                ("block", "remove", 0, "exit 0"),
                ("block-quiet", "add", 0, "exit 0"),
                ("block-quiet", "remove", 0, "exit 0"),
            ],
        )
        self.assertEqual([c for c in result["children"] if c[1] == "Z"], [])
        self.assertLess(result["attachSeconds"], 20)


class ReactorThreadTests(TestCase):
    """L{ReactorThread} on a private reactor instance."""

    def setUp(self) -> None:
        """A fresh SelectReactor running in its own thread."""
        self.thread = ReactorThread(SelectReactor())
        self.thread.start()
        self.addCleanup(self.thread.stop)

    def test_result(self) -> None:
        """A Deferred's result comes back to the calling thread."""
        self.assertEqual(self.thread.call(lambda: succeed(42)), 42)

    def test_exception(self) -> None:
        """The callee's exception is raised in the caller."""

        def boom() -> None:
            raise KeyError("x")

        self.assertRaises(KeyError, self.thread.call, boom)

    def test_timeoutCancels(self) -> None:
        """On timeout the Deferred is cancelled and L{OperationTimeout} raised."""
        cancelled = threading.Event()

        def never() -> Deferred[None]:
            return Deferred(lambda d: cancelled.set())

        self.assertRaises(OperationTimeout, self.thread.call, never, timeout=0.2)
        self.assertTrue(cancelled.wait(5))

    def test_manyThreads(self) -> None:
        """Many threads may call at once."""
        results: list[int] = []

        def caller(n: int) -> None:
            results.append(self.thread.call(lambda: n * 2))

        threads = [threading.Thread(target=caller, args=(n,)) for n in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(sorted(results), [n * 2 for n in range(20)])

    def test_afterStop(self) -> None:
        """After stop, calls are refused and the reactor cannot restart."""
        self.thread.stop()
        self.assertRaises(EmbedError, self.thread.call, lambda: 1)
        self.assertRaises(EmbedError, self.thread.start)
