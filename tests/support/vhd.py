"""
Differencing VHD images for the tests (no vhd-util here: blktap is not
packaged for Debian, and qemu-img cannot create differencing VHDs).

The layout follows the public VHD specification: a footer copy at offset 0,
the dynamic disk header at 512, the parent locators' data, an empty block
allocation table, and the footer at the end. Only the headers matter to
what is tested (L{xenddev.datapath.images.vhdChain}); no block is allocated.
Base images are made with the real C{qemu-img create -f vpc}.
"""

from __future__ import annotations

import os
import struct
import subprocess

SECTOR = 512
_BLOCK = 2 * 1024 * 1024


def _checksum(block: bytearray, at: int) -> None:
    block[at : at + 4] = b"\0\0\0\0"
    block[at : at + 4] = struct.pack(">I", ~sum(block) & 0xFFFFFFFF)


def makeBase(path: str, size: int = 16 << 20) -> str:
    """A dynamic VHD made by qemu-img."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "vpc", path, str(size)], check=True)
    return path


def _footer(path: str) -> bytes:
    with open(path, "rb") as f:
        f.seek(-SECTOR, os.SEEK_END)
        return f.read(SECTOR)


def makeChild(path: str, parent: str, locators: tuple[str, ...] = ("MacX",)) -> str:
    """
    A differencing VHD over C{parent}. C{locators}: C{MacX} (a relative
    C{file://./name} URL), C{W2ku} (the absolute path, UTF-16LE), C{W2ru}
    (the relative path); the header's parent name is always the base name.
    """
    parentFooter = _footer(parent)
    size = int(struct.unpack(">Q", parentFooter[48:56])[0])
    entries = (size + _BLOCK - 1) // _BLOCK
    rel = os.path.relpath(parent, os.path.dirname(os.path.abspath(path)))
    data = {
        "MacX": f"file://./{rel}".encode(),
        "W2ku": os.path.abspath(parent).encode("utf-16-le"),
        "W2ru": f".\\{rel}".replace("/", "\\").encode("utf-16-le"),
    }
    header = bytearray(1024)
    locatorAt = 1536
    blobs = []
    header[0:8] = b"cxsparse"
    header[8:16] = b"\xff" * 8
    header[24:28] = struct.pack(">I", 0x00010000)
    header[28:32] = struct.pack(">I", entries)
    header[32:36] = struct.pack(">I", _BLOCK)
    name = os.path.basename(parent).encode("utf-16-be")[:510]
    header[64 : 64 + len(name)] = name
    for i, code in enumerate(locators):
        blob = data[code]
        space = (len(blob) + SECTOR - 1) // SECTOR * SECTOR
        header[576 + 24 * i : 600 + 24 * i] = struct.pack(
            ">4sIIIQ", code.encode(), space, len(blob), 0, locatorAt
        )
        blobs.append((locatorAt, blob))
        locatorAt += space
    batAt = locatorAt
    header[16:24] = struct.pack(">Q", batAt)
    _checksum(header, 36)
    footer = bytearray(SECTOR)
    footer[0:8] = b"conectix"
    footer[8:12] = struct.pack(">I", 2)
    footer[12:16] = struct.pack(">I", 0x00010000)
    footer[16:24] = struct.pack(">Q", SECTOR)
    footer[40:60] = parentFooter[40:60]  # original and current size, geometry
    footer[60:64] = struct.pack(">I", 4)
    footer[68:84] = os.urandom(16)
    _checksum(footer, 64)
    bat = b"\xff" * ((entries * 4 + SECTOR - 1) // SECTOR * SECTOR)
    with open(path, "wb") as f:
        f.write(footer)
        f.write(header)
        for at, blob in blobs:
            f.seek(at)
            f.write(blob)
        f.seek(batAt)
        f.write(bat)
        f.write(footer)
    return path
