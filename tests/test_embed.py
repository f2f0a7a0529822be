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
import shutil
import sys
import tempfile
import threading

from twisted.internet.defer import Deferred, succeed
from twisted.internet.selectreactor import SelectReactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from tests.support.xenstoresuite import deferredTest
from xenddev.embed import EmbedError, OperationTimeout, ReactorThread

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import json, os, sys, threading, time
from xenddev.config import Config, TimeoutsConfig
from xenddev.controller import DeviceExistsError
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


class TwentyThreadsTests(TestCase):
    """20 threads attaching and detaching at once through the blocking API."""

    @deferredTest
    async def test_twentyThreads(self) -> None:
        """Every attach and detach succeeds; nothing is left; atexit cleans up."""
        rundir = tempfile.mkdtemp(prefix="xe-")
        self.addCleanup(shutil.rmtree, rundir, True)
        image = os.path.join(rundir, "disk.img")
        with open(image, "wb") as f:
            f.truncate(1 << 20)
        script = os.path.join(rundir, "embed20.py")
        with open(script, "w") as f:
            f.write(SCRIPT)
        run = os.path.join(rundir, "run")
        out, err, code = await getProcessOutputAndValue(
            sys.executable,
            [script, run, image],
            env=dict(os.environ, PYTHONPATH=ROOT),
            path=rundir,
        )
        self.assertEqual(code, 0, err.decode(errors="replace")[-3000:])
        result = json.loads(out.decode().strip().splitlines()[-1])
        self.assertEqual(result["errors"], [])
        self.assertEqual(result["attached"], 60)
        self.assertEqual(result["left"], {"5": 0, "6": 0})
        self.assertEqual(result["dup"], "DeviceExistsError")
        self.assertFalse(os.path.lexists(os.path.join(run, "xenstored", "socket")))


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
