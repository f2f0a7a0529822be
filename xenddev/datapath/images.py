# -*- test-case-name: tests.test_datapath -*-
"""
Image inspection: C{qemu-img info}, run as a child process of the reactor
(never blocking it), and the parent of a differencing VHD read from its
headers (L{vhdChain}).
"""

from __future__ import annotations

import json
import os
from typing import Any
from urllib.parse import unquote

import attrs
from twisted.internet.utils import getProcessOutputAndValue

from xenddev.errors import FaultCode, XenddevError

#: Formats whose images may have a backing file (a chain to record).
CHAINED_FORMATS = ("qcow", "qcow2", "vhd", "vpc", "qed")


class ImageError(XenddevError):
    """C{qemu-img} could not read the image (message from its stderr)."""

    faultCode = FaultCode.DATAPATH_FAILED


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


# VHD (the format tapdisk serves as "vhd"): the parent of a differencing
# disk, read from its headers as the public Virtual Hard Disk Image Format
# Specification describes them. qemu-img cannot help here: its vpc driver
# does not open differencing disks.

VHD_FOOTER_COOKIE = b"conectix"
VHD_HEADER_COOKIE = b"cxsparse"
VHD_DIFFERENCING = 4
#: Parent locator platform codes we can read, in order of preference: a
#: file URL (UTF-8, what Linux tools write), then Windows absolute and
#: relative paths (UTF-16LE).
_LOCATORS = ((b"MacX", "utf-8"), (b"W2ku", "utf-16-le"), (b"W2ru", "utf-16-le"))
#: The longest chain followed (a loop in the headers must end somewhere).
MAX_VHD_CHAIN = 64


def _vhdChecksumOk(block: bytes, at: int) -> bool:
    """One's complement of the byte sum, the checksum field counted as zero."""
    total = sum(block[:at]) + sum(block[at + 4 :])
    return (~total & 0xFFFFFFFF) == int.from_bytes(block[at : at + 4], "big")


def _vhdFooter(f: Any, size: int) -> bytes:
    # Dynamic and differencing disks keep a copy of the footer at the start;
    # fixed disks have it only at the end (511 bytes in old files).
    for offset, length in ((0, 512), (size - 512, 512), (size - 511, 511)):
        if offset < 0:
            continue
        f.seek(offset)
        block = f.read(length).ljust(512, b"\0")
        if block[:8] == VHD_FOOTER_COOKIE and _vhdChecksumOk(block, 64):
            return block
    raise ImageError("not a VHD image (no valid footer)")


def _locatorCandidates(header: bytes, f: Any, size: int) -> list[str]:
    found: dict[bytes, str] = {}
    for i in range(8):
        entry = header[576 + 24 * i : 600 + 24 * i]
        code = entry[:4]
        length = int.from_bytes(entry[8:12], "big")
        offset = int.from_bytes(entry[16:24], "big")
        encoding = dict(_LOCATORS).get(code)
        if encoding is None or not 0 < length <= 4096 or offset + length > size:
            continue
        f.seek(offset)
        text = f.read(length).decode(encoding, "replace").rstrip("\0")
        if code == b"MacX":
            text = unquote(text.removeprefix("file://"))
        else:
            text = text.replace("\\", "/")
        found.setdefault(code, text)
    return [found[code] for code, _ in _LOCATORS if code in found]


def vhdParent(path: str) -> str | None:
    """
    The parent image of a differencing VHD, or None for a fixed or dynamic
    one. Relative locators are taken relative to the child's directory; the
    first candidate (locators in order of preference, then the parent's
    name in the header) that exists is the parent.

    @raise ImageError: not a VHD, or a parent that cannot be found.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            footer = _vhdFooter(f, size)
            if int.from_bytes(footer[60:64], "big") != VHD_DIFFERENCING:
                return None
            at = int.from_bytes(footer[16:24], "big")
            f.seek(at)
            header = f.read(1024)
            if len(header) < 1024 or header[:8] != VHD_HEADER_COOKIE:
                raise ImageError(f"{path}: no dynamic disk header at {at}")
            if not _vhdChecksumOk(header, 36):
                raise ImageError(f"{path}: bad dynamic disk header checksum")
            candidates = _locatorCandidates(header, f, size)
    except OSError as e:
        raise ImageError(f"{path}: {e.strerror}") from None
    name = header[64:576].decode("utf-16-be", "replace").split("\0", 1)[0]
    if name:
        candidates.append(name)
    here = os.path.dirname(os.path.abspath(path))
    for candidate in candidates:
        resolved = os.path.normpath(os.path.join(here, candidate))
        if os.path.isfile(resolved):
            return resolved
    raise ImageError(f"{path}: parent not found (tried {', '.join(candidates) or 'nothing'})")


def vhdChain(path: str) -> list[str]:
    """
    A VHD and its ancestors, top first (absolute paths). Reads a few
    kilobytes of headers per image, synchronously.

    @raise ImageError: an image of the chain is not a readable VHD, a
        parent is missing, or the chain loops or exceeds L{MAX_VHD_CHAIN}.
    """
    chain = [os.path.abspath(path)]
    while True:
        parent = vhdParent(chain[-1])
        if parent is None:
            return chain
        if parent in chain or len(chain) >= MAX_VHD_CHAIN:
            raise ImageError(f"{path}: the VHD chain loops or is too long at {parent}")
        chain.append(parent)
