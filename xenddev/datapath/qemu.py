# -*- test-case-name: tests.test_datapath -*-
"""
The QMP operations on a C{qemu-storage-daemon}'s block graph shared by the
C{qemu} driver-domain kind (export at activate, unexport at deactivate) and
the data-path control (quiesce, resume, coalesce).

The graph the kind builds: a format node named L{ROOT_NODE} over a
C{file} node L{FILE_NODE}; the format driver opens the backing chain
itself, from the image headers. One NBD export, id L{EXPORT_ID}, named
after the VDI, on the node that is currently the top of the chain (after
an active commit that is the former parent, an implicitly named node).

How a qemu data path is quiesced (QEMU has no "pause" for an export, and
qemu-storage-daemon has no C{stop}): the export is deleted
(C{block-export-del}; QEMU drains the node's in-flight requests before it
reports C{BLOCK_EXPORT_DELETED}) and the image graph is closed
(C{blockdev-del}), so no I/O can reach the images and their locks and
cached metadata are dropped — the equivalent of C{tap-ctl pause}. The NBD
server keeps listening on the same socket: clients see a disconnection and
may reconnect (QEMU's NBD client does, with C{reconnect-delay}). Resume
opens the graph again from the image headers (re-reading the chain, which
is the reload of C{tap-ctl unpause -a}) and re-adds the export under the
same name.
"""

from __future__ import annotations

from typing import Any

from xenddev.qmp import QMPClient, QMPError

ROOT_NODE = "xdd-root"
FILE_NODE = "xdd-file"
EXPORT_ID = "xdd-export"


def blockdevSpec(image: str, fmt: str, readOnly: bool) -> dict[str, Any]:
    """The C{blockdev-add} arguments of the graph: format node over file node."""
    return {
        "driver": fmt,
        "node-name": ROOT_NODE,
        "read-only": readOnly,
        "file": {
            "driver": "file",
            "node-name": FILE_NODE,
            "filename": image,
            "read-only": readOnly,
        },
    }


async def namedNodes(qmp: QMPClient) -> list[dict[str, Any]]:
    """C{query-named-block-nodes} (flat)."""
    return list(await qmp.execute("query-named-block-nodes", {"flat": True}))


async def exportedNode(qmp: QMPClient, exportId: str = EXPORT_ID) -> str | None:
    """The node an export serves, or None if there is no such export."""
    for export in await qmp.execute("query-block-exports"):
        if export.get("id") == exportId:
            return str(export["node-name"])
    return None


async def nodeImage(qmp: QMPClient, node: str) -> tuple[str, str] | None:
    """(filename, format driver) of a node, or None if it does not exist."""
    for n in await namedNodes(qmp):
        if n.get("node-name") == node:
            return str(n["image"]["filename"]), str(n["drv"])
    return None


async def hasNode(qmp: QMPClient, node: str) -> bool:
    """Whether a node of that name exists."""
    return any(n.get("node-name") == node for n in await namedNodes(qmp))


async def openGraph(qmp: QMPClient, image: str, fmt: str, readOnly: bool) -> None:
    """Open the image (and, through its headers, its chain) as L{ROOT_NODE}."""
    await qmp.execute("blockdev-add", blockdevSpec(image, fmt, readOnly))


async def ensureNbdServer(qmp: QMPClient, socketPath: str) -> None:
    """Start the daemon's NBD server on C{socketPath} unless it runs already."""
    try:
        await qmp.execute(
            "nbd-server-start", {"addr": {"type": "unix", "data": {"path": socketPath}}}
        )
    except QMPError as e:
        if "already running" not in e.desc:
            raise


async def addExport(qmp: QMPClient, node: str, name: str, writable: bool) -> None:
    """Export C{node} over the daemon's NBD server as C{name}."""
    await qmp.execute(
        "block-export-add",
        {"type": "nbd", "id": EXPORT_ID, "node-name": node, "name": name, "writable": writable},
    )


async def deleteExport(qmp: QMPClient, timeout: float) -> str | None:
    """
    Delete the export (disconnecting its clients once their requests are
    drained) and wait until QEMU reports it gone. Returns the node it
    served, or None if there was no export.
    """
    node = await exportedNode(qmp)
    if node is None:
        return None
    gone = qmp.waitForEvent(
        "BLOCK_EXPORT_DELETED", lambda e: e.data.get("id") == EXPORT_ID, timeout
    )
    try:
        await qmp.execute("block-export-del", {"id": EXPORT_ID, "mode": "hard"})
    except BaseException:
        gone.cancel()
        gone.addErrback(lambda _: None)
        raise
    await gone
    return node


async def closeGraph(qmp: QMPClient, timeout: float) -> tuple[str, str] | None:
    """
    Stop all I/O on the daemon's images: delete the export, then the graph.
    Returns (image, format) of the node that was exported (what resume must
    reopen), or None if nothing was exported.
    """
    node = await exportedNode(qmp)
    served = await nodeImage(qmp, node) if node is not None else None
    await deleteExport(qmp, timeout)
    # An implicitly created node (the parent that took over after an active
    # commit) closed with the export; ours must be deleted.
    if await hasNode(qmp, ROOT_NODE):
        await qmp.execute("blockdev-del", {"node-name": ROOT_NODE})
    return served
