"""
Real Xen: xenddev's attach and detach against xl's, on one real Xen 4.17
host (booted in QEMU by the real-Xen lane's harness, tests/support/realxen),
the same PV guest and the same kind of disk (raw files through blkback and
the block script).

Measured in dom0 by a driver script (no command channel in the timings),
interleaved round by round so that a machine getting busier or quieter
affects every column alike. Before each timed operation the driver waits
until the guest has finished reacting to the previous one (its console log
quiet for 1.5 s): a PV guest probing and reading a disk under TCG slows
dom0 down, and a fast toolstack would otherwise pile the guest's work onto
whoever comes next (xl's block script then hit libxl's 40 s timeout). The
serial xl runs are the sums of their operations, each after the guest
settled:

  - one disk: C{xl block-attach}/C{block-detach} vs the C{xenddev} client
    (a process per operation, as an operator types it) and vs one XML-RPC
    call from a long-lived client (what a toolstack embedding xenddev
    pays); each returns once the backend is connected (hotplug script
    done) or the device is gone; median of C{--rounds};
  - eight disks: attached at once through xenddev (eight concurrent
    XML-RPC calls) vs eight C{xl block-attach} one after another (xl has no
    concurrent form); then detached the same ways.

Targets (issue 11): each xenddev operation at most 1.0x xl's; the eight
concurrent at least 2x faster than xl's serial run.

With C{--hotplug both} (the default) the whole measurement runs twice on
the same machine and guest: the daemon running the real C{block} script,
then the daemon with it built in (C{driver_domain.builtin_scripts:
[block]}, L{xenddev.driverdomain.hotplugblock}); xl always runs the real script.

Usage: python bench/realxen.py [--rounds 5] [--disks 8] [--hotplug script|builtin|both]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Any

from tests.support.realxen import IMAGE_DIR, realXenHost
from tests.support.realxen.daemon import ROOT, SOCKET, VENV_BIN, startXenddev

#: The driver script, run in dom0 with the checkout's interpreter: prints
#: one JSON object with every timing (seconds).
DOM0_DRIVER = r"""
import json, statistics, subprocess, sys, time
from concurrent.futures import ThreadPoolExecutor
from xenddev.cli import serverProxy

guest, images, rounds, disks, venv, socket, console = sys.argv[1:8]
images, rounds, disks = images.split(","), int(rounds), int(disks)

def settle(quiet=1.5, limit=90):
    # Wait until the guest has finished reacting to the last operation (its
    # console log stops growing): a guest still probing, writing and reading
    # back a disk slows dom0 down (TCG), whoever made the next operation.
    import os
    last, since, start = -1, time.monotonic(), time.monotonic()
    while time.monotonic() - start < limit:
        size = os.path.getsize(console) if os.path.exists(console) else 0
        if size != last:
            last, since = size, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
        time.sleep(0.2)
env = {"XENDDEV_SOCKET": socket, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
VDEVS = ["xvd" + chr(ord("b") + i) for i in range(disks)]

def spec(vdev, image):
    return f"format=raw,vdev={vdev},access=rw,target={image}"

def timed(argv):
    settle()
    t = time.monotonic()
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{argv}: {done.returncode} {done.stderr}")
    return time.monotonic() - t

def rpcCall(fn, *args):
    settle()
    t = time.monotonic()
    fn(*args)
    return time.monotonic() - t

rpc = serverProxy(socket, timeout=600)
out = {k: [] for k in ("xl attach", "xl detach", "cli attach", "cli detach",
                       "rpc attach", "rpc detach")}
for r in range(rounds):
    vdev, image = VDEVS[0], images[0]
    out["xl attach"].append(timed(["xl", "block-attach", guest, spec(vdev, image)]))
    out["xl detach"].append(timed(["xl", "block-detach", guest, vdev]))
    out["cli attach"].append(timed([venv + "/xenddev", "block-attach", guest, spec(vdev, image)]))
    out["cli detach"].append(timed([venv + "/xenddev", "block-detach", guest, vdev]))
    cfg = {"spec": spec(vdev, image)}
    out["rpc attach"].append(rpcCall(rpc.device.attach, guest, "vbd", cfg))
    out["rpc detach"].append(rpcCall(rpc.device.detach, guest, "vbd", vdev))

def together(fn, items):
    settle()
    t = time.monotonic()
    with ThreadPoolExecutor(len(items)) as pool:
        list(pool.map(fn, items))
    return time.monotonic() - t

pairs = list(zip(VDEVS, images))
def attachOne(p):
    serverProxy(socket, timeout=600).device.attach(guest, "vbd", {"spec": spec(*p)})
def detachOne(p):
    serverProxy(socket, timeout=600).device.detach(guest, "vbd", p[0])
out["parallel attach"] = together(attachOne, pairs)
out["parallel detach"] = together(detachOne, pairs)
out["serial xl attach"] = sum(timed(["xl", "block-attach", guest, spec(*p)]) for p in pairs)
out["serial xl detach"] = sum(timed(["xl", "block-detach", guest, p[0]]) for p in pairs)
print(json.dumps(out))
"""


def _median(samples: list[float]) -> float:
    return statistics.median(samples)


def table(t: dict[str, Any], rounds: int, disks: int) -> str:
    """The comparison table (and whether each target is met)."""
    lines = [
        f"one disk (median of {rounds}, seconds)     xl   xenddev CLI  ratio   "
        "xenddev RPC  ratio  target",
        "-" * 94,
    ]
    for op in ("attach", "detach"):
        xl = _median(t[f"xl {op}"])
        cli = _median(t[f"cli {op}"])
        rpc = _median(t[f"rpc {op}"])
        met = "met" if rpc <= xl else "MISSED"
        lines.append(
            f"{op:<36} {xl:6.2f} {cli:12.2f} {cli / xl:6.2f}x {rpc:12.2f} {rpc / xl:6.2f}x  "
            f"<=1.0x (RPC): {met}"
        )
    lines += [
        "",
        f"{disks} disks (seconds)              xl serial   xenddev concurrent  speedup  target",
        "-" * 86,
    ]
    for op in ("attach", "detach"):
        serial = t[f"serial xl {op}"]
        together = t[f"parallel {op}"]
        met = "met" if serial / together >= 2 else "MISSED"
        lines.append(
            f"{op:<30} {serial:10.2f} {together:19.2f} {serial / together:7.2f}x  >=2x: {met}"
        )
    lines.append("")
    lines.append("samples: " + json.dumps({k: v for k, v in t.items() if isinstance(v, list)}))
    return "\n".join(lines)


async def bench(reactor: Any, args: argparse.Namespace) -> None:
    """Boot, start a guest; per hotplug mode start the daemon, run the driver, print the table."""
    host = await realXenHost(reactor)
    guest = await host.createGuest("bench")
    await guest.waitConsole(r"GUEST: ready", timeout=300)
    images = [f"{IMAGE_DIR}/bench{i}.img" for i in range(args.disks)]
    await host.check(["truncate", "-s", "16M", *images])
    driver = host.sharePath / "bench-driver.py"
    driver.write_text(DOM0_DRIVER)
    argv = [sys.executable, host.inDom0(driver), guest.name, ",".join(images)]
    argv += [str(args.rounds), str(args.disks), VENV_BIN, SOCKET]
    argv.append(f"{host.shareInDom0}/console/guest-{guest.name}.log")
    print(f"real Xen 4.17 under QEMU ({host.accel}), run folder {host.runDir}")
    modes = ("script", "builtin") if args.hotplug == "both" else (args.hotplug,)
    for mode in modes:
        builtin = ("block",) if mode == "builtin" else ()
        xd = await startXenddev(host, level="info", builtinScripts=builtin)
        result = await host.run(argv, cwd=ROOT, timeout=3600)
        if result.rc != 0:
            raise SystemExit(f"driver failed: {result}\n{xd.log()}")
        timings = json.loads(result.stdout.strip().splitlines()[-1])
        what = "built in" if builtin else "the real script"
        print(f"\n== xenddev with the block hotplug script {what} (xl: the real script)")
        print(table(timings, args.rounds, args.disks))
        await xd.process.signal()
        await xd.process.wait(60)


def main(argv: list[str] | None = None) -> int:
    """Parse the options and run the benchmark under the global reactor."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").strip().splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="single-disk rounds (median)")
    parser.add_argument("--disks", type=int, default=8, help="disks attached at once")
    parser.add_argument(
        "--hotplug",
        choices=("script", "builtin", "both"),
        default="both",
        help="xenddev's block hotplug: the real script, built in, or both in turn",
    )
    args = parser.parse_args(argv)
    from twisted.internet.defer import Deferred
    from twisted.internet.task import react

    react(lambda reactor: Deferred.fromCoroutine(bench(reactor, args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
