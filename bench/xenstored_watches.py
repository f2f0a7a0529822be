"""
Benchmark: the cost of a write while many watches are registered, on the
embedded xenstored and on the C xenstored in the same run (issue 13 item 2).

A guest's kernel registers a watch per device end, so a host with thousands
of devices has thousands of watches, nearly all on paths that a given write
does not touch. A store that scans every watch on every change pays for all
of them on every write; one that indexes watches by path pays only for the
changed path's ancestors and the watches that fire.

For each server (C: Debian's xenstored 4.17 under the test shim; embedded:
C{python -m twisted xenstored}, both as processes of their own, as
L{bench.xenstored} starts them) and each watch count (default 0, 2 000,
10 000 and 20 000), one connection registers that many watches on
C{/local/domain/<d>/device/vbd/<v>/state} (nodes that do not exist: only
the initial event fires, and the benchmark drains it), then another
connection measures, one request at a time, on C{/bench}:

  - C{write}: a WRITE of an existing node;
  - C{tx commit}: TRANSACTION_START, a WRITE in it, TRANSACTION_END;

each the best of C{--repeat} runs of C{--ops} operations: the mean wall
time per operation (a client round trip over the Unix socket) and the
server's own CPU time per operation. Nothing fires for these writes: what
is measured is what the registered watches cost a write that none of them
watches. The watch counts are added to the same servers in turn, so the
C{N} row has exactly C{N} watches.

It prints a table with the ratio embedded/C per cell and the issue's
target: the embedded write with 20 000 watches costs no more than C's and
at most twice its own cost with none.

Run: C{.venv/bin/python bench/xenstored_watches.py [--watches 0,2000,...]
[--ops N] [--repeat N]}
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

import attrs

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import RealStore
from bench.xenstored import Server, startEmbedded
from tests.support.realxenstored import unavailableReason
from xenddev.xenstore.wire import HEADER, HEADER_SIZE, Op

#: The kinds of operation measured, in the order of the table.
KINDS = ("write", "tx commit")


class RawConnection:
    """
    A blocking XenStore connection speaking the wire protocol directly, so
    that the client's own cost is as small as it can be in Python; watch
    events are counted and skipped.
    """

    def __init__(self, socketPath: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(socketPath)
        self._buffer = b""
        self._reqId = 0
        self.events = 0

    def close(self) -> None:
        """Hang up."""
        self.sock.close()

    def send(self, op: int, payload: bytes, txId: int = 0) -> None:
        """Send one request without waiting for its reply."""
        self._reqId += 1
        self.sock.sendall(HEADER.pack(op, self._reqId, txId, len(payload)) + payload)

    def _message(self) -> tuple[int, bytes]:
        while True:
            if len(self._buffer) >= HEADER_SIZE:
                op, _, _, length = HEADER.unpack_from(self._buffer)
                end = HEADER_SIZE + length
                if len(self._buffer) >= end:
                    payload = self._buffer[HEADER_SIZE:end]
                    self._buffer = self._buffer[end:]
                    return op, payload
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionResetError("xenstored hung up")
            self._buffer += chunk

    def reply(self) -> bytes:
        """The next reply (events before it are counted); raise on an error reply."""
        while True:
            op, payload = self._message()
            if op == Op.WATCH_EVENT:
                self.events += 1
                continue
            if op == Op.ERROR:
                raise RuntimeError(payload.rstrip(b"\0").decode())
            return payload

    def request(self, op: int, payload: bytes, txId: int = 0) -> bytes:
        """Send one request and wait for its reply."""
        self.send(op, payload, txId)
        return self.reply()

    def drainEvents(self, count: int) -> None:
        """Read until C{count} events in all have arrived."""
        while self.events < count:
            op, _ = self._message()
            if op == Op.WATCH_EVENT:
                self.events += 1


def watchPath(i: int) -> bytes:
    """The i-th watched path: 16 devices per domain, as a guest's frontends."""
    return b"/local/domain/%d/device/vbd/%d/state" % (1 + i // 16, 51712 + 16 * (i % 16))


def addWatches(conn: RawConnection, start: int, stop: int, batch: int = 256) -> None:
    """Register watches C{start} to C{stop}, C{batch} requests in flight."""
    for first in range(start, stop, batch):
        last = min(stop, first + batch)
        for i in range(first, last):
            conn.send(Op.WATCH, watchPath(i) + b"\0" + b"w%d\0" % i)
        for _ in range(first, last):
            conn.reply()
    conn.drainEvents(stop)  # one initial event per watch


@attrs.frozen
class Cell:
    """One measurement: wall and server CPU time per operation, in seconds."""

    wall: float
    cpu: float


def measure(server: Server, run: Callable[[int], None], ops: int, repeat: int) -> Cell:
    """The best of C{repeat} runs of C{ops} operations C{run(i)}."""
    best: Cell | None = None
    for r in range(repeat):
        cpu0 = server.cpuSeconds()
        t0 = time.perf_counter()
        for i in range(ops):
            run(r * ops + i)
        wall = (time.perf_counter() - t0) / ops
        cpu = (server.cpuSeconds() - cpu0) / ops
        if best is None or wall < best.wall:
            best = Cell(wall, cpu)
    assert best is not None
    return best


def benchServer(
    server: Server, counts: Sequence[int], ops: int, repeat: int
) -> dict[int, dict[str, Cell]]:
    """Every watch count on one server, from the smallest."""
    watcher = RawConnection(server.socketPath)
    client = RawConnection(server.socketPath)
    cells: dict[int, dict[str, Cell]] = {}
    try:
        client.request(Op.WRITE, b"/bench\0x")

        def write(i: int) -> None:
            client.request(Op.WRITE, b"/bench\0%d" % i)

        def commit(i: int) -> None:
            txId = client.request(Op.TRANSACTION_START, b"\0").rstrip(b"\0")
            tx = int(txId)
            client.request(Op.WRITE, b"/bench\0%d" % i, tx)
            client.request(Op.TRANSACTION_END, b"T\0", tx)

        registered = 0
        for count in sorted(counts):
            addWatches(watcher, registered, count)
            registered = count
            write(0)  # warm up
            cells[count] = {
                "write": measure(server, write, ops, repeat),
                "tx commit": measure(server, commit, max(1, ops // 2), repeat),
            }
        if watcher.events != registered:
            raise RuntimeError(f"{watcher.events} events for {registered} watches")
    finally:
        watcher.close()
        client.close()
    return cells


def report(
    counts: Sequence[int], results: dict[str, dict[int, dict[str, Cell]]]
) -> tuple[list[str], list[str]]:
    """The table's lines and the targets missed."""
    c, e = results["C"], results["embedded"]
    lines = [
        f"{'watches':>8} {'op':<10} {'C wall':>9} {'emb wall':>9} {'ratio':>6}"
        f" {'C cpu':>9} {'emb cpu':>9} {'ratio':>6}   (us per operation)"
    ]
    for count in sorted(counts):
        for kind in KINDS:
            cc, ec = c[count][kind], e[count][kind]
            lines.append(
                f"{count:>8} {kind:<10} {cc.wall * 1e6:>9.1f} {ec.wall * 1e6:>9.1f}"
                f" {ec.wall / cc.wall:>6.2f} {cc.cpu * 1e6:>9.1f} {ec.cpu * 1e6:>9.1f}"
                f" {ec.cpu / cc.cpu if cc.cpu else 0:>6.2f}"
            )
    misses: list[str] = []
    low, high = min(counts), max(counts)
    for kind in KINDS:
        mine, theirs, own = e[high][kind].wall, c[high][kind].wall, e[low][kind].wall
        if mine > theirs:
            misses.append(f"{kind} at {high} watches: embedded {mine * 1e6:.0f} us > C")
        if mine > 2 * own:
            misses.append(f"{kind} at {high} watches: {mine / own:.1f}x its cost at {low}")
    return lines, misses


def main(argv: list[str] | None = None) -> int:
    """Start both servers, measure each, print the table."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").strip().splitlines()[0])
    parser.add_argument(
        "--watches",
        default="0,2000,10000,20000",
        help="comma-separated watch counts (default %(default)s)",
    )
    parser.add_argument("--ops", type=int, default=2000, help="writes per run (commits: half)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per cell (the best counts)")
    parser.add_argument(
        "--no-bytecode-cache",
        dest="bytecode_cache",
        action="store_false",
        help="the embedded server compiles its modules at start",
    )
    args = parser.parse_args(argv)
    counts = sorted({int(n) for n in args.watches.split(",")})

    reason = unavailableReason()
    if reason is not None:
        print(f"cannot run the C xenstored here: {reason}", file=sys.stderr)
        return 2

    workdir = tempfile.mkdtemp(prefix="xsd-watch-bench-")
    servers: list[Server] = []
    results: dict[str, dict[int, dict[str, Cell]]] = {}
    try:
        servers = [
            Server("C", RealStore(workdir, domains=(0,))),
            Server("embedded", startEmbedded(workdir, args.bytecode_cache)),
        ]
        for server in servers:
            results[server.name] = benchServer(server, counts, args.ops, args.repeat)
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    lines, misses = report(counts, results)
    print("\n".join(lines))
    print("targets: " + ("all met" if not misses else "MISSED: " + "; ".join(misses)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
