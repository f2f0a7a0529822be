"""
Fencing tokens end to end (issue 14): a daemon as a host of a pool on
the real etcd cluster (its embedded store, SIMULATED backends and guest,
the real driver-domain agent), driven over XML-RPC.

C{vdi.activate} claims its target in the pool as an attach does and sends
the activation's fencing token to the driver domain, which records it;
once the driver domain has served a newer token for the target (planted
here in its records, as another holder's activation would leave it), an
activate — through C{vdi.*} or an attach — is refused with fault 12 and
nothing changes: the tree is as it was and the pool's key is given back.
"""

from __future__ import annotations

import os

from twisted.trial.unittest import TestCase

from tests.support.etcdcluster import SHARED
from tests.support.host import shortTempDir
from tests.support.treedump import diffTrees, dumpTree
from tests.test_pool_daemon import GUEST, PoolHostsMixin, _image
from xenddev.driverdomain.fencing import FencingTokens


class FencingDaemonTests(PoolHostsMixin, TestCase):
    """One host of a pool on the shared etcd cluster."""

    async def test_staleTokenRefused(self) -> None:
        """
        vdi.activate takes the target in the pool (token T > 0, recorded by
        the driver domain); with a newer token served there, vdi.activate
        and device.attach of the target are refused with fault 12 naming
        the stale token, the tree unchanged and the target free in the
        pool.
        """
        cluster = await SHARED.get(self)
        host = await self.startHost("fence-a", cluster.endpoints)
        await self.call(host, "device.attach", GUEST, "vif", {})
        image = _image(os.path.realpath(shortTempDir(self, "xpimg-")), "fence.img")
        identity = f"file:{image}"
        target = {"type": "file", "params": image, "mode": "w"}
        await self.call(host, "vdi.prepare", 0, "op1", target)
        self.assertEqual((await self.call(host, "vdi.activate", 0, "op1"))["state"], "active")
        where = await self.call(host, "pool.where", image)
        token = where["writer"]["token"]
        self.assertEqual(where["writer"]["host"], "fence-a")
        self.assertGreater(token, 0)
        self.assertEqual(
            [(d["domain"], d["device"], d["token"]) for d in where["devices"]],
            [(0, "vdi op1", token)],
        )
        fencing = FencingTokens(host.xs, 0)
        self.assertEqual(await fencing.served(identity), token)
        self.assertEqual((await self.call(host, "vdi.deactivate", 0, "op1"))["state"], "inactive")
        self.assertIsNone((await self.call(host, "pool.where", image))["writer"])
        # A newer holder of the target was served by this driver domain.
        await host.xs.write(fencing.record(identity), f"{token + 10**9} {identity}")
        before = await dumpTree(host.xs)
        f = await self.fault(host, "vdi.activate", 0, "op1")
        self.assertEqual(f.faultCode, 12, f.faultString)
        self.assertIn("stale fencing token", f.faultString)
        self.assertEqual(diffTrees(before, await dumpTree(host.xs)), [])
        self.assertIsNone((await self.call(host, "pool.where", image))["writer"])
        answer = await self.attach(host, image, "xvdb")
        self.assertEqual(answer.faultCode, 12, answer.faultString)
        self.assertIn("stale fencing token", answer.faultString)
        self.assertEqual(diffTrees(before, await dumpTree(host.xs)), [])
        where = await self.call(host, "pool.where", image)
        self.assertEqual((where["writer"], where["devices"]), (None, []))
