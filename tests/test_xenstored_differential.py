"""
Differential test: the embedded xenstored against the real C xenstored.

Hypothesis generates sequences of requests (read, write, mkdir, rm,
directory, directory-part, get/set perms, watch/unwatch, transaction
start/end with operations inside, domain queries, introduce/release of a
spare domain, release and re-introduction of a guest) over a
small path alphabet (C{/t} with children C{a}, C{b} to depth 3, relative
C{x...} paths, other domains' homes, a few invalid paths). Each request is
sent as the same bytes to both servers, from one of four clients:

  - C{A}, C{B}: dom0 over the privileged Unix socket (B makes transaction
    conflicts for A and vice versa);
  - C{g5}, C{g7}: the guests 5 and 7. The embedded server has a socket
    bound to each domid. The C daemon offers no such socket, so there the
    guest is played through the shared ring page that our LD_PRELOAD shim
    maps from C{<shimdir>/ring-<domid>} (the domain is introduced by dom0
    as the toolstack does; we write requests into the ring and kick the
    daemon through the shim's event-channel FIFO). The guest side is
    therefore compared against the genuine daemon, not against documented
    semantics.

Everything a client receives is compared, packet by packet and in order:
the reply (type, req_id, tx_id, payload, so values and errno names) and
every watch event that arrived before it. Because requests are issued one
at a time, the events queued on a connection by earlier requests of any
client precede its next reply on both servers, so the per-connection
streams are deterministic; each example ends by pinging every client (to
collect trailing events) and by comparing a dump of the test subtrees.

Normalisations, all explicit in the code:

  - C 4.17 starts with only C{/tool/xenstored}; the embedded server starts
    with C{/local/domain} too (the issue asks for it). The C side gets a
    C{MKDIR /local/domain} first; the test then checks that both initial
    trees are equal.
  - The harness's fake hypervisor knows domains 0-31
    (C{RealXenstored(domains=range(32))}); the embedded server is given
    the same C{domainExists}.
  - C{DIRECTORY_PART} returns the node's generation count, whose absolute
    value depends on each server's history (the C side's extra start-up
    requests, the examples before). Generations are replaced by labels in
    order of first appearance per server, so what is compared is whether
    two answers name the same generation.
  - Transaction ids are compared as returned, but each server is sent the
    ids it handed out (by slot), so a difference in id allocation would
    show as a difference in the replies, not as a cascade.
  - RELEASE: C frees the domain inside the request, so the removal of the
    domain's nodes and C{@releaseDomain} are queued before the ack, except
    when the releasing connection comes just before the domain's own
    connection in C's connection list: its main loop then holds a
    reference on the next connection, the domain is freed after the
    request, and the releaser gets the ack first (observed: B releasing
    a domain introduced after B connected). The embedded server always
    fires first. For RELEASE the test pings the releasing client at once
    and compares its events in order with the ack moved after them.
  - Watch events: C drops an event identical to one still queued for the
    connection, and its queue drains one message per main-loop iteration,
    so whether an event fired by one request is dropped as a duplicate of
    one fired by an earlier request depends on timing. After each request
    that can fire watches the test pings every client that has set a watch
    (draining its queue), so that only the deterministic case remains:
    duplicates within one request, which both servers drop.
  - Each example starts from the same state on both servers: fresh dom0
    connections, the guests released and introduced again (a fresh ring or
    socket connection each), the test subtrees (C{/t}, the homes of domains
    0, 5, 7, 8 and 9) removed and recreated with the permissions the example
    draws, special-watch permissions reset.

Differences found and fixed in the embedded server (each has a focused
test in L{tests.test_xenstored_regressions}):

  - An unprivileged SET_PERMS changing the owner answered EINVAL; C sends
    the errno name EPERM (it is in C{xsd_errors}).
  - A guest released and introduced again inherited the permission entries
    naming the old domain (C ignores them: XSA-322); the embedded server
    now marks them ignored at RELEASE, in the tree and in open
    transactions (GET_PERMS still lists them, as C does).
  - RM inside a transaction whose copy of a parent is stale (another
    connection added or removed a child after the transaction read the
    parent) answered OK; C's tree walk stops with EIO, keeping the
    deletions it made so far (the transaction then fails with EAGAIN).

Deliberate differences, kept out of the generated requests:

  - SET_PERMS on an @-name that is refused: C 4.17's C{do_set_perms} returns
    the global C{errno} instead of the EINVAL/EACCES that
    C{set_perms_special} computed, so the reply carries a stale errno from
    some earlier request, and when that errno is 0 no reply is sent at all
    and the daemon aborts (C{consider_message: Assertion `conn->in ==
    NULL'}). A guest can trigger this. The embedded server answers the
    computed EINVAL (unknown @-name) or EACCES. Here only dom0, which is
    never refused, sets permissions on C{@introduceDomain} and
    C{@releaseDomain}.
  - Giving C{/} to a domain and then releasing that domain: C removes the
    nodes a released domain owns (XSA-322) and, for the root, walks and
    deletes the whole store, root included, after which even dom0 gets
    EACCES everywhere. The embedded server never removes the root. SET_PERMS
    is not generated for C{/}.
  - A domain released and introduced again must not inherit the entries
    naming the old domain. C 4.17 ignores an entry when the domain's
    record is younger than the node's last write, comparing generation
    counts; but a domain record takes the current count without advancing
    it, so a node written just before (nothing else changed the count in
    between) keeps its entries for the new domain. The embedded server
    ignores all entries naming a domain from its release on (fixed here,
    it ignored none: see above). When the test introduces a guest again it
    first runs an empty transaction as dom0, which advances C's count.
    Likewise a transaction started before the guest is released and
    introduced again, committed after: C honours the entries naming the
    guest for it (the transaction's nodes keep their old generation), the
    embedded server does not; so no re-introduction is run once an example
    has started a transaction.

Not covered: quota limits (guests use the C defaults and rarely reach
them here; the unit tests cover them), SET_TARGET variations (5 has target
9 until it is re-introduced), pipelined requests (C's duplicate-event
dropping across requests is timing-dependent, see above), and guests'
unread-event flow control (C{-Q outstanding}).
"""

from __future__ import annotations

import mmap
import os
import shutil
import socket
import struct
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any

import attrs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import TestCase

from tests.support.profiles import examples
from tests.support.realxenstored import RealXenstored, requireRealXenstored
from xenddev.xenstore.server.core import XenStoreServer
from xenddev.xenstore.server.threaded import ThreadedXenstored
from xenddev.xenstore.wire import Op

HEADER = struct.Struct("=IIII")
TIMEOUT = 10.0

#: (type, req_id, tx_id, payload) as received.
Packet = tuple[int, int, int, bytes]

GUESTS = (5, 7)
#: Domain 5 is given SET_TARGET rights over domain 9 at set-up.
TARGET = 9
#: The domain examples introduce and release.
SPARE = 8
#: Outside the fake hypervisor's domains (0-31): an unknown domain.
UNKNOWN = 40


# -- synchronous clients ---------------------------------------------------


class Channel:
    """A synchronous XenStore client: one request at a time."""

    name = "?"

    def _send(self, data: bytes) -> None:
        raise NotImplementedError()

    def _recv(self, deadline: float) -> bytes:
        raise NotImplementedError()

    def __init__(self) -> None:
        self._buf = b""
        self._reqId = 0

    def _packet(self, deadline: float) -> Packet:
        while True:
            if len(self._buf) >= HEADER.size:
                op, reqId, txId, length = HEADER.unpack_from(self._buf)
                end = HEADER.size + length
                if len(self._buf) >= end:
                    payload = self._buf[HEADER.size : end]
                    self._buf = self._buf[end:]
                    return op, reqId, txId, payload
            self._buf += self._recv(deadline)

    def request(self, op: int, payload: bytes, txId: int = 0) -> list[Packet]:
        """
        Send one request; return the packets received up to and including
        its reply (the watch events that preceded it, then the reply).
        """
        self._reqId += 1
        self._send(HEADER.pack(op, self._reqId, txId, len(payload)) + payload)
        deadline = time.monotonic() + TIMEOUT
        out: list[Packet] = []
        while True:
            p = self._packet(deadline)
            out.append(p)
            if p[0] != Op.WATCH_EVENT:
                return out

    def close(self) -> None:
        """Disconnect (sockets only)."""


class SocketChannel(Channel):
    """A client on a Unix socket."""

    def __init__(self, path: str, name: str) -> None:
        super().__init__()
        self.name = name
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(path)

    def _send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _recv(self, deadline: float) -> bytes:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError(f"{self.name}: server closed the connection")
        return data

    def close(self) -> None:
        self.sock.close()


#: Offsets in C{struct xenstore_domain_interface} (xs_wire.h): two 1024-byte
#: rings, then req_cons, req_prod, rsp_cons, rsp_prod (uint32 each).
_RING = 1024
_REQ, _RSP = 0, 1024
_REQ_CONS, _REQ_PROD, _RSP_CONS, _RSP_PROD = 2048, 2052, 2056, 2060
_U32 = struct.Struct("=I")


class RingChannel(Channel):
    """
    A guest of the C daemon: the domain's ring page is the shim's file
    C{ring-<domid>}, mapped shared by the daemon; writing the daemon's local
    port for the domain into the shim's C{evtchn} FIFO is the event-channel
    kick.
    """

    def __init__(self, shimDir: str, domid: int, name: str) -> None:
        super().__init__()
        self.name = name
        with open(os.path.join(shimDir, f"port-{domid}")) as f:
            self._kick = _U32.pack(int(f.read()))
        fd = os.open(os.path.join(shimDir, f"ring-{domid}"), os.O_RDWR)
        try:
            self._ring = mmap.mmap(fd, 4096)
        finally:
            os.close(fd)
        self._fifo = os.open(os.path.join(shimDir, "evtchn"), os.O_WRONLY | os.O_NONBLOCK)

    def _u32(self, offset: int) -> int:
        return int(_U32.unpack_from(self._ring, offset)[0])

    def _notify(self) -> None:
        os.write(self._fifo, self._kick)

    def _send(self, data: bytes) -> None:
        deadline = time.monotonic() + TIMEOUT
        while data:
            cons, prod = self._u32(_REQ_CONS), self._u32(_REQ_PROD)
            space = _RING - ((prod - cons) & 0xFFFFFFFF)
            if not space:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.name}: request ring full")
                time.sleep(0.0001)
                continue
            chunk, data = data[:space], data[space:]
            for b in chunk:
                self._ring[_REQ + (prod % _RING)] = b
                prod = (prod + 1) & 0xFFFFFFFF
            _U32.pack_into(self._ring, _REQ_PROD, prod)
            self._notify()

    def _recv(self, deadline: float) -> bytes:
        spins = 0
        while True:
            cons, prod = self._u32(_RSP_CONS), self._u32(_RSP_PROD)
            if cons != prod:
                out = bytearray()
                while cons != prod:
                    out.append(self._ring[_RSP + (cons % _RING)])
                    cons = (cons + 1) & 0xFFFFFFFF
                _U32.pack_into(self._ring, _RSP_CONS, cons)
                self._notify()  # the daemon may have more to write
                return bytes(out)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: no reply from the C daemon")
            spins += 1
            time.sleep(0 if spins < 50 else 0.00005)

    def close(self) -> None:
        os.close(self._fifo)
        self._ring.close()


# -- the two servers ---------------------------------------------------------


def _args(*parts: bytes) -> bytes:
    return b"".join(p + b"\0" for p in parts)


@attrs.define
class Side:
    """One server and this example's clients of it."""

    name: str
    admin: Channel
    clients: dict[str, Channel] = attrs.Factory(dict)
    txIds: dict[str, list[int]] = attrs.Factory(dict)
    generations: dict[bytes, int] = attrs.Factory(dict)

    def label(self, generation: bytes) -> bytes:
        """A generation count, renamed in order of first appearance."""
        return b"gen%d" % self.generations.setdefault(generation, len(self.generations))


class Servers:
    """The C daemon and the embedded server, with the same set-up."""

    def __init__(self, testcase: TestCase) -> None:
        self.workdir = tempfile.mkdtemp(prefix="xsdiff-")
        testcase.addCleanup(shutil.rmtree, self.workdir, True)
        self.real = RealXenstored(os.path.join(self.workdir, "c"), domains=range(32))
        self.real.start()
        testcase.addCleanup(self.real.stop)
        sockets = {d: os.path.join(self.workdir, f"dom{d}") for d in GUESTS}
        self.embeddedSockets = sockets
        self.embedded = ThreadedXenstored(
            os.path.join(self.workdir, "socket"),
            makeServer=lambda r: XenStoreServer(reactor=r, domainExists=lambda d: d < 32),
            domainSockets=sockets,
        )
        self.embedded.start()
        testcase.addCleanup(self.embedded.stop)
        self.c = Side("C", SocketChannel(self.real.socketPath, "C/admin"))
        self.e = Side("embedded", SocketChannel(self.embedded.socketPath, "embedded/admin"))
        testcase.addCleanup(self._closeAll)
        # Normalisation: the C daemon starts without /local/domain.
        self.c.admin.request(Op.MKDIR, _args(b"/local/domain"))
        self.setupDump = (self.dump(self.c, b"/"), self.dump(self.e, b"/"))
        for side in self.sides:
            self._admin(side, Op.INTRODUCE, _args(b"%d" % TARGET, b"4096", b"3"))
        self._introduceGuests()

    @property
    def sides(self) -> tuple[Side, Side]:
        return (self.c, self.e)

    def _closeAll(self) -> None:
        for side in self.sides:
            for ch in side.clients.values():
                ch.close()
            side.clients.clear()
            side.admin.close()

    def _admin(self, side: Side, op: int, payload: bytes) -> bytes:
        """An admin request whose reply must be the same on both sides."""
        reply = side.admin.request(op, payload)[-1]
        return reply[3] if reply[0] != Op.ERROR else b"ERR " + reply[3]

    def adminBoth(self, op: int, payload: bytes) -> None:
        """The same admin request on both sides; the replies must agree."""
        replies = [self._admin(side, op, payload) for side in self.sides]
        if replies[0] != replies[1]:
            raise AssertionError(
                f"set-up {Op(op).name} {payload!r}: C {replies[0]!r}, embedded {replies[1]!r}"
            )

    def _ringFile(self, domid: int) -> str:
        return os.path.join(self.real.shimDir, f"ring-{domid}")

    def _introduceGuests(self) -> None:
        for domid in GUESTS:
            self._introduce(domid)
        self.adminBoth(Op.SET_TARGET, _args(b"5", b"%d" % TARGET))

    def _introduce(self, domid: int) -> None:
        with open(self._ringFile(domid), "wb") as f:
            f.write(bytes(4096))  # a fresh, empty ring
        self.adminBoth(Op.INTRODUCE, _args(b"%d" % domid, b"4096", b"3"))
        name = f"g{domid}"
        self.c.clients[name] = RingChannel(self.real.shimDir, domid, f"C/{name}")
        self.e.clients[name] = SocketChannel(self.embeddedSockets[domid], f"embedded/{name}")
        for side in self.sides:
            side.txIds[name] = []

    def reintroduce(self, domid: int) -> None:
        """Release guest C{domid} and introduce it again: a new domain, same id."""
        name = f"g{domid}"
        for side in self.sides:
            side.clients.pop(name).close()
        self.adminBoth(Op.RELEASE, _args(b"%d" % domid))
        # Advance C's generation count (an empty transaction) so that the
        # new domain is younger than every node: see the module docstring.
        for side in self.sides:
            txId = int(side.admin.request(Op.TRANSACTION_START, b"\0")[-1][3].rstrip(b"\0"))
            side.admin.request(Op.TRANSACTION_END, b"F\0", txId)
        self._introduce(domid)

    def reset(self, topPerms: Sequence[bytes]) -> None:
        """Bring both servers to this example's starting state."""
        for side in self.sides:
            for ch in side.clients.values():
                ch.close()
            side.clients.clear()
            side.txIds.clear()
        for domid in (*GUESTS, SPARE):
            for side in self.sides:
                self._admin(side, Op.RELEASE, _args(b"%d" % domid))
        self._introduceGuests()
        self.adminBoth(Op.RM, _args(b"/t"))
        for domid in (0, *GUESTS, SPARE, TARGET):
            self.adminBoth(Op.RM, _args(b"/local/domain/%d" % domid))
        for domid in GUESTS:
            self.adminBoth(Op.MKDIR, _args(b"/local/domain/%d" % domid))
            self.adminBoth(Op.SET_PERMS, _args(b"/local/domain/%d" % domid, b"n%d" % domid))
        self.adminBoth(Op.WRITE, b"/t\0top")
        self.adminBoth(Op.SET_PERMS, _args(b"/t", *topPerms))
        self.adminBoth(Op.WRITE, b"/t/a\0one")
        self.adminBoth(Op.WRITE, b"/t/b/a\0two")
        for special in (b"@introduceDomain", b"@releaseDomain"):
            self.adminBoth(Op.SET_PERMS, _args(special, b"n0"))
        for side in self.sides:
            path = self.real.socketPath if side is self.c else self.embedded.socketPath
            for name in ("A", "B"):
                side.clients[name] = SocketChannel(path, f"{side.name}/{name}")
                side.txIds[name] = []

    def dump(self, side: Side, path: bytes) -> list[tuple[bytes, bytes, bytes]]:
        """(path, value, perms) of every node below C{path}, by DIRECTORY."""
        out: list[tuple[bytes, bytes, bytes]] = []
        stack = [path]
        while stack:
            p = stack.pop()
            value = self._admin(side, Op.READ, _args(p))
            if value.startswith(b"ERR "):
                out.append((p, value, b""))
                continue
            out.append((p, value, self._admin(side, Op.GET_PERMS, _args(p))))
            children = self._admin(side, Op.DIRECTORY, _args(p))
            names = children.split(b"\0")[:-1]
            base = b"" if p == b"/" else p
            stack.extend(base + b"/" + n for n in reversed(names))
        return out


# -- operations --------------------------------------------------------------


@attrs.frozen
class Request:
    """One generated request: who sends it, what, in which transaction slot."""

    client: str
    op: int
    payload: bytes
    txSlot: int | None = None

    def describe(self) -> str:
        if self.op == REINTRODUCE:
            return f"admin: RELEASE and INTRODUCE {self.client} (a new domain, same id)"
        tx = "" if self.txSlot is None else f" [tx#{self.txSlot}]"
        return f"{self.client}: {Op(self.op).name} {self.payload!r}{tx}"


#: Not a wire operation: dom0 releases the requesting guest and introduces
#: it again (new ring or socket connection).
REINTRODUCE = -1


NAMES = (b"a", b"b")


def _tree(prefix: bytes, depth: int) -> Iterator[bytes]:
    yield prefix
    if depth:
        for n in NAMES:
            yield from _tree(prefix + b"/" + n, depth - 1)


ABSOLUTE = tuple(_tree(b"/t", 3))
RELATIVE = (b"x", b"x/a", b"x/a/b", b"x/b")
OTHER = (
    b"/",
    b"/local/domain/5/x",
    b"/local/domain/7/x/a",
    b"/local/domain/9/x",
    b"/local/domain/0/x",
    b"/t/c/d/e",
    b"/t/",
    b"/t//a",
    b"/t/a b",
    b"",
)
SPECIAL = (b"@introduceDomain", b"@releaseDomain", b"@other")

#: Mostly the seven nodes of /t to depth 2, so that requests meet.
PATHS = st.sampled_from(
    [p for p in ABSOLUTE if p.count(b"/") <= 3] * 9
    + [p for p in ABSOLUTE if p.count(b"/") > 3]
    + list(RELATIVE) * 3
    + list(OTHER)
)
#: Giving / to a guest is not tried: when that guest is released C 4.17
#: deletes its whole tree, root included (see the module docstring).
NOT_ROOT = PATHS.filter(lambda p: p != b"/")
WATCH_PATHS = st.one_of(PATHS, st.just(b"/t"), st.sampled_from(SPECIAL))
VALUES = st.sampled_from((b"", b"v", b"value-2", b"\xffbin\0ary"))
TOKENS = st.sampled_from((b"t1", b"t2", b""))
DOMIDS = st.sampled_from((0, *GUESTS, SPARE, TARGET, UNKNOWN))
PERM_ENTRY = st.builds(
    lambda letter, d: letter + b"%d" % d, st.sampled_from((b"n", b"r", b"w", b"b")), DOMIDS
)
PERM_LISTS = st.one_of(
    st.lists(PERM_ENTRY, min_size=1, max_size=3),
    st.lists(PERM_ENTRY, min_size=4, max_size=7),
    st.just([b"x5"]),
    st.just([b"b"]),
    st.just([]),
)
#: Which transaction a request uses: None (none), -1 (the client's latest),
#: or the n-th this client started (ended ones too: stale ids).
TX_SLOTS = st.sampled_from((None, None, None, -1, -1, 0, 1))
END_SLOTS = st.sampled_from((-1, -1, -1, 0, 1))


def _safeForC(r: Request) -> bool:
    """
    Refused SET_PERMS on @-names can crash C 4.17 (see the module
    docstring): only dom0, which is never refused, sends them.
    """
    return r.client in ("A", "B")


def _requests(clients: Sequence[str]) -> st.SearchStrategy[Request]:
    who = st.sampled_from(clients)

    def req(op: int, payload: st.SearchStrategy[bytes], tx: Any = TX_SLOTS) -> Any:
        return st.builds(Request, who, st.just(op), payload, tx)

    one = PATHS.map(lambda p: p + b"\0")
    noTx = st.none()
    weighted: list[tuple[int, st.SearchStrategy[Request]]] = [
        (4, req(Op.READ, one)),
        (7, req(Op.WRITE, st.builds(lambda p, v: p + b"\0" + v, PATHS, VALUES))),
        (2, req(Op.MKDIR, one)),
        (3, req(Op.RM, one)),
        (2, req(Op.DIRECTORY, one)),
        (
            1,
            req(
                Op.DIRECTORY_PART,
                st.builds(_args, PATHS, st.sampled_from((b"0", b"2", b"99"))),
            ),
        ),
        (1, req(Op.GET_PERMS, one)),
        (3, req(Op.SET_PERMS, st.builds(lambda p, ps: _args(p, *ps), NOT_ROOT, PERM_LISTS))),
        (
            1,
            req(
                Op.SET_PERMS,
                st.builds(lambda p, ps: _args(p, *ps), st.sampled_from(SPECIAL[:2]), PERM_LISTS),
                noTx,
            ).filter(_safeForC),
        ),
        (6, req(Op.WATCH, st.builds(_args, WATCH_PATHS, TOKENS), noTx)),
        (1, req(Op.UNWATCH, st.builds(_args, WATCH_PATHS, TOKENS), noTx)),
        (3, req(Op.TRANSACTION_START, st.just(b"\0"), noTx)),
        (3, req(Op.TRANSACTION_END, st.sampled_from((b"T\0", b"T\0", b"F\0", b"X\0")), END_SLOTS)),
        (1, req(Op.GET_DOMAIN_PATH, DOMIDS.map(lambda d: b"%d\0" % d), noTx)),
        (
            1,
            req(
                Op.IS_DOMAIN_INTRODUCED,
                st.sampled_from((*GUESTS, SPARE, TARGET)).map(lambda d: b"%d\0" % d),
                noTx,
            ),
        ),
        (
            1,
            req(
                Op.INTRODUCE,
                st.sampled_from((_args(b"%d" % SPARE, b"4096", b"3"), _args(b"%d" % SPARE))),
                noTx,
            ),
        ),
        (1, req(Op.RELEASE, st.just(b"%d\0" % SPARE), noTx)),
    ]
    weighted.append((1, req(Op.RESET_WATCHES, st.just(b""), noTx)))
    guests = [c for c in clients if c.startswith("g")]
    if guests:
        weighted.append(
            (1, st.builds(Request, st.sampled_from(guests), st.just(REINTRODUCE), st.just(b"")))
        )
    # one_of() ignores repeated strategies, so weigh by index.
    kinds = st.sampled_from([i for i, (weight, _) in enumerate(weighted) for _ in range(weight)])
    return kinds.flatmap(lambda i: weighted[i][1])


TOP_PERMS = st.sampled_from(
    ([b"n0"], [b"b5"], [b"r0", b"w5"], [b"n0", b"b5", b"r7"], [b"b9"], [b"n7", b"r5"])
)


def _normalise(side: Side, op: int, packets: list[Packet]) -> list[Packet]:
    out = []
    for p in packets:
        kind, reqId, txId, payload = p
        if op == Op.DIRECTORY_PART and kind == Op.DIRECTORY_PART:
            gen, _, rest = payload.partition(b"\0")
            payload = side.label(gen) + b"\0" + rest
        out.append((kind, reqId, txId, payload))
    return out


def _show(packets: list[Packet]) -> str:
    def one(p: Packet) -> str:
        kind = Op(p[0]).name if p[0] in Op._value2member_map_ else str(p[0])
        return f"{kind}(req={p[1]}, tx={p[2]}, {p[3]!r})"

    return "[" + ", ".join(one(p) for p in packets) + "]"


#: Requests that can queue watch events (WATCH: its first one, after the reply).
FIRING = frozenset(
    {
        Op.WATCH,
        Op.WRITE,
        Op.MKDIR,
        Op.RM,
        Op.SET_PERMS,
        Op.TRANSACTION_END,
        Op.INTRODUCE,
        Op.RELEASE,
    }
)


class Differential:
    """Run one example's requests on both servers and compare."""

    def __init__(self, servers: Servers) -> None:
        self.servers = servers
        self.log: list[str] = []

    def fail(self, what: str, c: object, e: object) -> None:
        history = "\n  ".join(self.log) or "(none)"
        raise AssertionError(
            f"{what} differs:\n  C:        {c}\n  embedded: {e}\nrequests so far:\n  {history}"
        )

    def _send(self, side: Side, r: Request) -> list[Packet]:
        tx = 0
        ids = side.txIds[r.client]
        if r.txSlot is not None and ids:
            tx = ids[r.txSlot] if r.txSlot < len(ids) else ids[-1]
        packets = side.clients[r.client].request(r.op, r.payload, tx)
        reply = packets[-1]
        if r.op == Op.TRANSACTION_START and reply[0] == Op.TRANSACTION_START:
            ids.append(int(reply[3].rstrip(b"\0")))
        return _normalise(side, r.op, packets)

    def _settle(self, side: Side, client: str, packets: list[Packet]) -> list[Packet]:
        """
        A RELEASE's events may follow its reply on C (see the module
        docstring): collect them with a ping and put the reply after them.
        """
        ping = side.clients[client].request(Op.GET_DOMAIN_PATH, b"1\0")
        return [*packets[:-1], *ping[:-1], packets[-1], ping[-1]]

    def run(self, requests: Sequence[Request]) -> None:
        c, e = self.servers.sides
        watchers: set[str] = set()
        for r in requests:
            self.log.append(r.describe())
            if r.op == REINTRODUCE:
                if any(c.txIds.values()):
                    continue  # a known difference (module docstring): not generated
                self.servers.reintroduce(int(r.client[1:]))
                watchers.discard(r.client)
                self.ping(sorted(watchers))
                continue
            got = [self._send(side, r) for side in (c, e)]
            if r.op == Op.RELEASE:
                got = [self._settle(side, r.client, g) for side, g in zip((c, e), got, strict=True)]
            if got[0] != got[1]:
                self.fail(f"reply to {r.describe()}", _show(got[0]), _show(got[1]))
            if r.op == Op.WATCH:
                watchers.add(r.client)
            if r.op in FIRING:
                # Drain every watcher's queue (see the module docstring).
                self.ping(sorted(watchers))
        self.ping(list(c.clients))  # trailing events

    def ping(self, clients: Sequence[str]) -> None:
        """A harmless request on each client: compare the events before its reply."""
        c, e = self.servers.sides
        for name in clients:
            ping = Request(name, Op.GET_DOMAIN_PATH, b"1\0")
            self.log.append(ping.describe())
            got = [self._send(side, ping) for side in (c, e)]
            if got[0] != got[1]:
                self.fail(f"events pending on {name}", _show(got[0]), _show(got[1]))

    def compareTrees(self) -> None:
        """The test subtrees must be equal."""
        c, e = self.servers.sides
        for top in (b"/t", b"/local/domain"):
            dumps = [self.servers.dump(side, top) for side in (c, e)]
            if dumps[0] != dumps[1]:
                self.fail(f"tree below {top!r}", dumps[0], dumps[1])


HEALTH = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
#: Examples per property (400 in the thorough Hypothesis profile, CI's; see
#: tests.support.profiles); XENDDEV_DIFF_EXAMPLES overrides it for a soak run (e.g. 5000).
EXAMPLES = int(os.environ.get("XENDDEV_DIFF_EXAMPLES") or examples(400))


class DifferentialTests(TestCase):
    """The embedded server answers as the C xenstored does."""

    def setUp(self) -> None:
        requireRealXenstored(self)
        self.servers = Servers(self)

    def test_initialTrees(self) -> None:
        """After the normalisation, both servers start with the same tree."""
        c, e = self.servers.setupDump
        self.assertEqual(c, e)

    def _check(self, perms: Sequence[bytes], requests: Sequence[Request]) -> None:
        diff = Differential(self.servers)
        try:
            self.servers.reset(perms)
            diff.run(requests)
            diff.compareTrees()
        except OSError as e:
            history = "\n  ".join(diff.log) or "(none)"
            alive = "running" if self.servers.real.isRunning() else "DEAD"
            raise AssertionError(
                f"{e!r}\nrequests:\n  {history}\nC xenstored {alive}; its log:\n"
                f"{self.servers.real.logTail()}"
            ) from e

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=HEALTH)
    @given(TOP_PERMS, st.lists(_requests(("A", "B")), min_size=20, max_size=60))
    def test_dom0(self, perms: list[bytes], requests: list[Request]) -> None:
        """Two dom0 connections: values, errnos, watch events, conflicts."""
        self._check(perms, requests)

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=HEALTH)
    @given(TOP_PERMS, st.lists(_requests(("A", "B", "g5", "g7")), min_size=20, max_size=60))
    def test_guests(self, perms: list[bytes], requests: list[Request]) -> None:
        """dom0 and two guests (5 has target 9): permissions seen from both sides."""
        self._check(perms, requests)

    def test_reintroducedDomain(self) -> None:
        """
        A domain released and introduced again (a new domain, same id) does
        not inherit the permission entries naming the old one: both servers
        ignore them (GET_PERMS still lists them) until a new SET_PERMS.
        """
        w = Request
        self.servers.reset([b"n0", b"r7"])
        diff = Differential(self.servers)
        diff.run(
            [
                w("A", Op.WRITE, b"/t/p\0v"),
                w("A", Op.SET_PERMS, _args(b"/t/p", b"n0", b"b7")),
                w("g7", Op.READ, b"/t/p\0"),
                w("g7", Op.WATCH, _args(b"/t/p", b"old")),
            ]
        )
        self.servers.reintroduce(7)
        diff.run(
            [
                w("g7", Op.WATCH, _args(b"/t/p", b"new")),
                w("A", Op.WRITE, b"/t/p\0w"),
                w("g7", Op.READ, b"/t/p\0"),
                w("g7", Op.READ, b"/t\0"),
                w("g7", Op.WRITE, b"/t/p\0x"),
                w("A", Op.GET_PERMS, b"/t/p\0"),
                w("A", Op.SET_PERMS, _args(b"/t/p", b"n0", b"b7")),
                w("g7", Op.READ, b"/t/p\0"),
                w("A", Op.WRITE, b"/t/p\0y"),
            ]
        )
        diff.compareTrees()

    def test_transactionConflict(self) -> None:
        """A fixed sequence: B's write makes A's commit fail with EAGAIN on both."""
        w = Request
        self._check(
            [b"n0"],
            [
                w("A", Op.WATCH, _args(b"/t", b"t1")),
                w("A", Op.TRANSACTION_START, b"\0"),
                w("A", Op.READ, b"/t/a\0", 0),
                w("A", Op.WRITE, b"/t/a\0one", 0),
                w("B", Op.WRITE, b"/t/a\0two"),
                w("A", Op.TRANSACTION_END, b"T\0", 0),
                w("A", Op.READ, b"/t/a\0"),
                w("g5", Op.READ, b"/t/a\0"),
            ],
        )
