# -*- test-case-name: tests.test_datapath -*-
"""
Coalesce: merge an image into its parent.

  - L{coalesceQemu}: a qcow2 chain served by a qemu-storage-daemon is
    merged live, the export staying up: QMP C{block-commit} of the top
    (the active layer) into its parent. An active commit is a mirror job:
    it reaches C{ready} (C{JOB_STATUS_CHANGE}), is completed with
    C{job-complete} (QEMU then replaces the top by the parent under the
    export), concludes, and — started with C{auto-dismiss: false}, so its
    outcome can be read with C{query-jobs} — is dismissed with
    C{job-dismiss}. The old top node is then deleted (releasing its file)
    and the registry record updated (image = the parent, chain shortened).
    Verified with Debian's QEMU 7.2.
  - L{coalesceQuiesced}: for data paths that cannot merge by themselves
    (tapdisks), quiesce every data path using the image, run the merge
    (injected: C{vhd-util coalesce} in production, a stand-in in tests),
    then resume them with reload, also when the merge fails;
  - L{mergeIntoParent}: the offline merge of one image of a chain into its
    parent, for data paths that are quiesced (qcow2 and the other
    qemu-img formats: C{qemu-img commit}, which leaves the image empty so
    its children read the merged parent through it; VHD: C{vhd-util
    coalesce}). A pool-wide coalesce (L{xenddev.storagectl}) runs it while
    every user of the image, on every host, is paused.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.utils import getProcessOutputAndValue

from xenddev.backendctrl.records import DataPath, updateRecord
from xenddev.datapath import qemu as graph
from xenddev.datapath.images import ImageError, imageChain, vhdParent
from xenddev.datapath.quiesce import DataPathControl
from xenddev.errors import FaultCode, XenddevError
from xenddev.qmp import QMPEvent, QMPTimeout, connectQMP


class CoalesceError(XenddevError):
    """The merge failed (the data path still serves the unmerged chain)."""

    faultCode = FaultCode.DATAPATH_FAILED


async def coalesceQemu(
    reactor: Any, xs: Any, dataPath: DataPath, timeout: float = 60.0
) -> DataPath:
    """
    Commit the top of C{dataPath}'s chain into its parent while the NBD
    export stays up; fire with the updated registry record.
    """
    if dataPath.qmp is None:
        raise CoalesceError(f"{dataPath.vdi}: not a qemu data path (no QMP socket)")
    if len(dataPath.chain) < 2:
        raise CoalesceError(f"{dataPath.vdi}: {dataPath.image} has no parent to merge into")
    jobId = f"xdd-coalesce-{dataPath.vdi}"
    qmp = await connectQMP(reactor, dataPath.qmp, timeout)
    states: DeferredQueue[str] = DeferredQueue()

    def onEvent(event: QMPEvent) -> None:
        if event.name == "JOB_STATUS_CHANGE" and event.data.get("id") == jobId:
            states.put(str(event.data.get("status")))

    unsubscribe = qmp.subscribe(onEvent)

    async def nextState() -> str:
        d = states.get()
        call = reactor.callLater(timeout, d.cancel)
        try:
            return await d
        except Exception:
            raise QMPTimeout(f"{jobId}: no job status change within {timeout} s") from None
        finally:
            if call.active():
                call.cancel()

    try:
        node = await graph.exportedNode(qmp)
        if node is None:
            raise CoalesceError(f"{dataPath.vdi}: not exported")
        await qmp.execute("block-commit", {"job-id": jobId, "device": node, "auto-dismiss": False})
        while True:
            state = await nextState()
            if state == "ready":
                await qmp.execute("job-complete", {"id": jobId})
            elif state in ("concluded", "null"):
                break
        error = None
        for job in await qmp.execute("query-jobs"):
            if job.get("id") == jobId:
                error = job.get("error")
        await qmp.execute("job-dismiss", {"id": jobId})
        if error:
            raise CoalesceError(f"{dataPath.vdi}: block-commit failed: {error}")
        # The export now serves the parent; our old top node only holds the
        # merged file open.
        if await graph.hasNode(qmp, graph.ROOT_NODE) and await graph.exportedNode(qmp) != (
            graph.ROOT_NODE
        ):
            await qmp.execute("blockdev-del", {"node-name": graph.ROOT_NODE})
        served = await graph.nodeImage(qmp, await graph.exportedNode(qmp) or "")
    finally:
        unsubscribe()
        await qmp.close()
    image, fmt = served if served is not None else (dataPath.chain[1], dataPath.format)
    updated = attrs.evolve(dataPath, image=image, format=fmt, chain=dataPath.chain[1:])
    await updateRecord(xs, dataPath, updated)
    return updated


async def coalesceQuiesced(
    control: DataPathControl,
    image: str,
    merge: Callable[[str], Awaitable[Any]],
) -> list[DataPath]:
    """
    Quiesce every data path using C{image}, C{await merge(image)}, resume
    them all with reload (whether the merge worked or not). Fires with the
    data paths that were paused; a merge failure is re-raised after resume.
    """
    handle = await control.quiesce(image)
    paused = list(handle.paused)
    try:
        await merge(image)
    finally:
        await control.resume(handle, reload=True)
    return paused


def coalesce(
    reactor: Any, xs: Any, dataPath: DataPath, timeout: float = 60.0
) -> Deferred[DataPath]:
    """L{coalesceQemu} as a Deferred."""
    return Deferred.fromCoroutine(coalesceQemu(reactor, xs, dataPath, timeout))


#: Formats C{qemu-img commit} merges (into the backing file).
COMMIT_FORMATS = ("qcow2", "qcow", "qed")


async def mergeIntoParent(
    reactor: Any,
    image: str,
    timeout: float = 600.0,
    qemuImg: str = "qemu-img",
    vhdUtil: str = "vhd-util",
) -> str:
    """
    Merge C{image} into its parent, offline (every data path reading it
    must be quiesced); fire with the parent's path. Its children keep
    pointing at it and read the merged data through it (emptied).

    @raise CoalesceError: no parent, a format that cannot be merged, or the
        tool failed (its message).
    """
    path = os.path.abspath(image)
    if path.endswith(".vhd"):
        try:
            parent = vhdParent(path)
        except ImageError as e:
            raise CoalesceError(str(e)) from None
        executable, args = vhdUtil, ["coalesce", "-n", path]
    else:
        try:
            chain = await imageChain(reactor, path, qemuImg=qemuImg)
        except ImageError as e:
            raise CoalesceError(f"{path}: {e}") from None
        top = chain[0]
        parent = chain[1].filename if len(chain) > 1 else None
        if parent is not None and top.format not in COMMIT_FORMATS:
            raise CoalesceError(f"{path}: cannot merge a {top.format} image into its parent")
        executable, args = qemuImg, ["commit", "-q", "-f", top.format, path]
    if parent is None:
        raise CoalesceError(f"{path} has no parent to merge into")
    d = getProcessOutputAndValue(executable, args, env={"LC_ALL": "C"}, reactor=reactor)
    d.addTimeout(timeout, reactor)
    try:
        out, err, code = await d
    except OSError as e:
        raise CoalesceError(f"{executable}: {e}") from None
    if code != 0:
        message = (err or out).decode("utf-8", "replace").strip() or f"exit {code}"
        raise CoalesceError(f"merging {path} into {parent}: {executable}: {message}")
    return parent
