"""libvirt's saved-domain image (``virsh save``): its header and domain XML, read and rewritten.

Pure code, no libvirt import. The image is a 92-byte header (magic, version 2, the length of
the data that follows, whether the domain ran, the compression, the offset of the save
cookie), then the domain XML and the cookie NUL-terminated, then QEMU's migration stream.
libvirt checks a restore's replacement XML against the one in the header and refuses a new
name or UUID, but trusts the header itself: a copy with a rewritten header restores as
another domain. The format is libvirt's (stable since version 2), not a public API, so the
template key carries libvirt's version and :func:`read_save_image` refuses anything else.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SaveImage", "read_save_image", "save_header", "SAVE_MAGIC"]

SAVE_MAGIC = b"LibvirtQemudSave"
_PARTIAL_MAGIC = b"LibvirtQemudPart"  # a save that did not finish
_HEADER = struct.Struct("<16s5I56s")  # magic, version, data_len, was_running, compressed, cookieOffset, unused
_RAW = 0
_MAX_DATA = 16 << 20


@dataclass(frozen=True)
class SaveImage:
    """What the header of a save image says; ``stream_offset`` is where QEMU's stream starts."""

    path: Path
    xml: str
    cookie: bytes
    was_running: bool
    stream_offset: int
    size: int


def read_save_image(path: Path) -> SaveImage:
    """The header of the save image at ``path``. ValueError when it is not a complete,
    uncompressed version-2 image (a partial save, another format, a truncated file)."""
    with open(path, "rb") as f:
        head = f.read(_HEADER.size)
        if len(head) != _HEADER.size:
            raise ValueError(f"{path}: too short for a libvirt save image")
        magic, version, data_len, was_running, compressed, cookie_at, _ = _HEADER.unpack(head)
        if magic == _PARTIAL_MAGIC:
            raise ValueError(f"{path}: an unfinished save")
        if magic != SAVE_MAGIC or version != 2:
            raise ValueError(f"{path}: not a libvirt version-2 save image")
        if compressed != _RAW or not 0 < data_len <= _MAX_DATA or cookie_at >= data_len:
            raise ValueError(f"{path}: compressed or malformed save image header")
        data = f.read(data_len)
        size = f.seek(0, 2)
    if len(data) != data_len or size <= _HEADER.size + data_len:
        raise ValueError(f"{path}: truncated save image")
    end = data.find(b"\0")
    if end <= 0:
        raise ValueError(f"{path}: save image without a domain XML")
    cookie = data[cookie_at:].split(b"\0", 1)[0] if cookie_at else b""
    return SaveImage(path, data[:end].decode(), cookie, bool(was_running), _HEADER.size + data_len, size)


def save_header(image: SaveImage, xml: str) -> bytes:
    """The header and data of ``image`` with ``xml`` as its domain XML: followed by the bytes
    of ``image`` from ``stream_offset`` on, it is an image libvirt restores as that domain."""
    data = xml.encode() + b"\0"
    cookie_at = len(data) if image.cookie else 0
    if image.cookie:
        data += image.cookie + b"\0"
    return _HEADER.pack(SAVE_MAGIC, 2, len(data), int(image.was_running), _RAW, cookie_at, bytes(56)) + data
