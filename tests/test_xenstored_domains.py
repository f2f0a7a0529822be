"""
Per-domain sockets and robustness of the embedded xenstored: a guest's
socket gets a guest's rights, and malformed input on one connection never
disturbs another.
"""

from __future__ import annotations

import os
import socket
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.trial.unittest import TestCase

from tests.support.fixtures import EmbeddedXenstoredFixture
from xenddev.xenstore import AccessDeniedError, Perm
from xenddev.xenstore.connection import connectXenStore
from xenddev.xenstore.server.threaded import ThreadedXenstored
from xenddev.xenstore.wire import Op, PacketParser

HDR = struct.Struct("=IIII")


def rawExchange(path: str, data: bytes) -> tuple[list, bool]:
    """
    Send C{data} on a fresh connection, half-close, and read everything the
    server sends until it closes. Returns the packets and whether the
    stream parsed cleanly.
    """
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)  # a safety net only: the server closes on our EOF
    s.connect(path)
    try:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # the server may already have dropped us
    chunks = []
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    s.close()
    parser = PacketParser()
    packets = parser.feed(b"".join(chunks))
    return packets, parser.pending() == 0


class DomainSocketTests(TestCase):
    """A socket bound to domain 5 acts with domain 5's permissions."""

    def setUp(self) -> None:
        import shutil
        import tempfile

        workdir = tempfile.mkdtemp(prefix="xsd-")
        self.addCleanup(shutil.rmtree, workdir, True)
        self.socketPath = os.path.join(workdir, "socket")
        self.guestPath = os.path.join(workdir, "dom5")
        self.embedded = ThreadedXenstored(self.socketPath, domainSockets={5: self.guestPath})
        self.embedded.start()
        self.addCleanup(self.embedded.stop)

    def connectTo(self, path: str):  # type: ignore[no-untyped-def]
        d = connectXenStore(reactor, endpoint=UNIXClientEndpoint(reactor, path))

        def got(client):  # type: ignore[no-untyped-def]
            self.addCleanup(client.disconnect)
            return client

        return d.addCallback(got)

    async def test_guestCannotWriteBackend(self) -> None:
        """
        The toolstack's layout: the guest writes its own frontend directory
        but gets EACCES on the backend's and on another domain's.
        """
        dom0 = await self.connectTo(self.socketPath)
        guest = await self.connectTo(self.guestPath)
        for d in (5, 6):
            await dom0.write(f"/local/domain/{d}/device/vbd/51712/state", "1")
            await dom0.setPerms(f"/local/domain/{d}/device/vbd/51712", [f"n{d}", "r0"])
            await dom0.setPerms(f"/local/domain/{d}/device/vbd/51712/state", [f"n{d}", "r0"])
        await dom0.write("/local/domain/0/backend/vbd/5/51712/state", "1")
        await dom0.setPerms("/local/domain/0/backend/vbd/5/51712", ["n0", "r5"])
        await guest.write("device/vbd/51712/state", "3")
        self.assertEqual(await dom0.read("/local/domain/5/device/vbd/51712/state"), "3")
        self.assertEqual(await guest.read("/local/domain/0/backend/vbd/5/51712"), "")
        for path in (
            "/local/domain/0/backend/vbd/5/51712/state",
            "/local/domain/6/device/vbd/51712/state",
            "/tool/evil",
        ):
            try:
                await guest.write(path, "6")
            except AccessDeniedError:
                pass
            else:
                self.fail(f"guest wrote {path}")
        self.assertEqual(await dom0.read("/local/domain/0/backend/vbd/5/51712/state"), "1")
        self.assertEqual(
            await dom0.getPerms("/local/domain/5/device/vbd/51712/state"),
            [Perm("n", 5), Perm("r", 0)],
        )

    async def test_guestRelativePaths(self) -> None:
        """A guest's relative paths resolve under /local/domain/5."""
        dom0 = await self.connectTo(self.socketPath)
        await dom0.mkdir("/local/domain/5")
        await dom0.setPerms("/local/domain/5", ["n5"])
        guest = await self.connectTo(self.guestPath)
        await guest.write("name", "guest")
        self.assertEqual(await dom0.read("/local/domain/5/name"), "guest")
        self.assertEqual([str(p) for p in await dom0.getPerms("/local/domain/5/name")], ["n5"])


class RobustnessTests(EmbeddedXenstoredFixture, TestCase):
    """Malformed input is answered or dropped as C does; nothing else suffers."""

    def setUp(self) -> None:
        self.startServer()

    def assertServerWorks(self) -> None:
        packets, clean = rawExchange(self.socketPath, HDR.pack(Op.READ, 42, 0, 2) + b"/\0")
        self.assertTrue(clean)
        self.assertEqual([(p.op, p.reqId) for p in packets], [(Op.READ, 42)])

    def test_oversizedPacketDropsConnection(self) -> None:
        """A header announcing more than 4096 bytes: earlier requests answered, then closed."""
        data = HDR.pack(Op.READ, 1, 0, 2) + b"/\0" + HDR.pack(Op.READ, 2, 0, 4097) + b"x" * 10
        data += HDR.pack(Op.READ, 3, 0, 2) + b"/\0"
        packets, _clean = rawExchange(self.socketPath, data)
        self.assertEqual([p.reqId for p in packets], [1])
        self.assertServerWorks()

    def test_malformedRequestsAnswered(self) -> None:
        """Bad op, missing NUL, garbage payload: each gets an ERROR reply."""
        data = b"".join(
            HDR.pack(op, i, 0, len(payload)) + payload
            for i, (op, payload) in enumerate(
                [(99, b""), (Op.READ, b"/tool"), (Op.WRITE, b"\xff\xfe"), (Op.ERROR, b"x\0")], 1
            )
        )
        packets, clean = rawExchange(self.socketPath, data)
        self.assertTrue(clean)
        self.assertEqual(
            [(p.reqId, p.payload) for p in packets],
            [(1, b"ENOSYS\0"), (2, b"EINVAL\0"), (3, b"EINVAL\0"), (4, b"ENOSYS\0")],
        )

    @settings(
        max_examples=150,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(
        st.one_of(
            st.binary(max_size=300),
            st.lists(
                st.tuples(
                    st.integers(0, 30),
                    st.integers(0, 3),
                    st.binary(max_size=40).map(lambda b: b.replace(b"\0", b"/") + b"\0"),
                ),
                max_size=8,
            ).map(lambda reqs: b"".join(HDR.pack(op, 9, tx, len(p)) + p for op, tx, p in reqs)),
        )
    )
    def test_fuzz(self, data: bytes) -> None:
        """
        Random bytes (raw, or packet-shaped with random ops and payloads) on
        one connection: every reply is a well-formed packet, and a second
        connection keeps working afterwards.
        """
        packets, clean = rawExchange(self.socketPath, data)
        self.assertTrue(clean)
        for p in packets:
            self.assertLessEqual(len(p.payload), 4096)
        self.assertServerWorks()
