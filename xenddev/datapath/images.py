# -*- test-case-name: tests.test_datapath -*-
"""
Image inspection with C{qemu-img info}, run as a child process of the
reactor (never blocking it).
"""

from __future__ import annotations

import json
from typing import Any

import attrs
from twisted.internet.utils import getProcessOutputAndValue

#: Formats whose images may have a backing file (a chain to record).
CHAINED_FORMATS = ("qcow", "qcow2", "vhd", "vpc", "qed")


class ImageError(Exception):
    """C{qemu-img} could not read the image (message from its stderr)."""


@attrs.frozen
class ImageInfo:
    """
    One image of a chain: its path, format, virtual size and backing file
    (None for the base).
    """

    filename: str
    format: str
    virtualSize: int
    backing: str | None


async def imageChain(
    reactor: Any, path: str, fmt: str | None = None, qemuImg: str = "qemu-img"
) -> list[ImageInfo]:
    """
    The image and its backing chain, top first, from C{qemu-img info
    --backing-chain --output=json -U} (C{-U}: shared, so an image a
    daemon holds open and locked can still be inspected).
    """
    args = ["info", "--backing-chain", "--output=json", "-U"]
    if fmt is not None:
        args += ["-f", fmt]
    out, err, code = await getProcessOutputAndValue(
        qemuImg, [*args, path], env={"LC_ALL": "C"}, reactor=reactor
    )
    if code != 0:
        raise ImageError(err.decode("utf-8", "replace").strip() or f"qemu-img exited {code}")
    data = json.loads(out)
    if isinstance(data, dict):
        data = [data]
    return [
        ImageInfo(
            str(d["filename"]),
            str(d["format"]),
            int(d.get("virtual-size", 0)),
            d.get("full-backing-filename") or d.get("backing-filename"),
        )
        for d in data
    ]
