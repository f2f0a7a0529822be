"""
Independent clients against the embedded xenstored: Debian's test-xenstore,
the xenstore-* command-line tools, and pyxs's Client and Monitor.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase

from tests.support.fixtures import EmbeddedXenstoredFixture

TEST_XENSTORE = "/usr/lib/xen-4.17/bin/test-xenstore"


class ToolTests(EmbeddedXenstoredFixture, TestCase):
    """Real clients, unchanged, against the embedded server."""

    def setUp(self) -> None:
        self.startServer()

    def run_(self, *argv: str) -> Deferred[tuple[bytes, bytes, int]]:
        """Run a tool against the server without blocking the reactor."""
        if shutil.which(argv[0]) is None and not os.path.exists(argv[0]):
            raise SkipTest(f"{argv[0]} is not installed")
        exe = shutil.which(argv[0]) or argv[0]
        return getProcessOutputAndValue(exe, argv[1:], env=self.cliEnv())

    async def test_testXenstore(self) -> None:
        """Every test of Debian's test-xenstore passes."""
        out, err, code = await self.run_(TEST_XENSTORE, "-i", "3")
        self.assertEqual(code, 0, (out, err))
        self.assertNotIn(b"failed", out + err)
        self.assertIn(b"ta err", out)

    async def test_cliTools(self) -> None:
        """write, read, ls, list, chmod, exists and rm behave as with C."""
        out, err, code = await self.run_("xenstore-write", "/cli/a/b", "hello", "/cli/c", "x")
        self.assertEqual(code, 0, err)
        out, _, _ = await self.run_("xenstore-read", "/cli/a/b")
        self.assertEqual(out, b"hello\n")
        out, _, _ = await self.run_("xenstore-list", "/cli")
        self.assertEqual(out.split(), [b"a", b"c"])
        await self.run_("xenstore-chmod", "/cli/a/b", "b3", "r4")
        out, _, _ = await self.run_("xenstore-ls", "-p", "/cli")
        self.assertIn(b'b = "hello"', out)
        self.assertIn(b"(b3,r4)", out)
        _, _, code = await self.run_("xenstore-exists", "/cli/a")
        self.assertEqual(code, 0)
        await self.run_("xenstore-rm", "/cli/a")
        _, _, code = await self.run_("xenstore-exists", "/cli/a")
        self.assertNotEqual(code, 0)
        _, err, code = await self.run_("xenstore-read", "/cli/a/b")
        self.assertNotEqual(code, 0)

    async def test_cliWatch(self) -> None:
        """xenstore-watch -n 2 sees its registration event and a write."""
        if shutil.which("xenstore-watch") is None:
            raise SkipTest("xenstore-watch is not installed")
        done = self.run_("xenstore-watch", "-n", "2", "/watched")
        finished: list[Any] = []
        done.addBoth(finished.append)
        i = 0
        # The tool registers asynchronously: keep writing until it has seen
        # two events and exited.
        while not finished:
            i += 1
            await self.run_("xenstore-write", f"/watched/k{i}", "v")
            await deferLater(reactor, 0.01, lambda: None)
        out, err, code = finished[0]
        self.assertEqual(code, 0, err)
        lines = out.decode().split()
        self.assertEqual(lines[0], "/watched")
        self.assertTrue(lines[1].startswith("/watched/k"))

    async def test_pyxsClientAndMonitor(self) -> None:
        """pyxs's Client reads and writes; its Monitor receives watch events."""
        from pyxs import Client

        path = self.socketPath

        def pyxsSide() -> list[bytes]:
            with Client(unix_socket_path=path) as c:
                c.write(b"/pyxs/a", b"1")
                assert c.read(b"/pyxs/a") == b"1"
                assert c.list(b"/pyxs") == [b"a"]
                m = c.monitor()
                m.watch(b"/pyxs", b"tok")
                seen = [next(m.wait())[0]]
                with Client(unix_socket_path=path) as other:
                    other.write(b"/pyxs/b", b"2")
                seen.append(next(m.wait())[0])
                m.unwatch(b"/pyxs", b"tok")
                c.delete(b"/pyxs")
                assert not c.exists(b"/pyxs")
                return seen

        self.assertEqual(await deferToThread(pyxsSide), [b"/pyxs", b"/pyxs/b"])
