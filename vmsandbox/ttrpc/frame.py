"""ttrpc framing: the 10-byte header, message types and flags, reading frames off a socket.

A frame is ``uint32 BE data length | uint32 BE stream id | uint8 type | uint8 flags`` and then
the data (containerd/ttrpc PROTOCOL.md, channel.go). Data longer than 4 MiB is refused: the
reader skips it and reports the header, so the caller can answer RESOURCE_EXHAUSTED on that
stream and carry on, as ttrpc does.
"""

from __future__ import annotations

import enum
import socket
import struct
from dataclasses import dataclass

from ..errors import InvalidArgument, Unavailable

__all__ = [
    "HEADER_LENGTH",
    "MAX_DATA_LENGTH",
    "MessageType",
    "FLAG_REMOTE_CLOSED",
    "FLAG_REMOTE_OPEN",
    "FLAG_NO_DATA",
    "Header",
    "Frame",
    "FrameTooLarge",
    "TruncatedFrame",
    "encode_header",
    "decode_header",
    "encode_frame",
    "FrameReader",
]

HEADER_LENGTH = 10
#: ttrpc's messageLengthMax; a larger frame is rejected by either side.
MAX_DATA_LENGTH = 4 << 20

_HEADER = struct.Struct(">IIBB")
_DISCARD_CHUNK = 64 << 10


class MessageType(enum.IntEnum):
    """The frame types of ttrpc 1.2 (Data is for streams, which this package does not serve)."""

    REQUEST = 0x01
    RESPONSE = 0x02
    DATA = 0x03


#: Request: non-unary, the client sends no more data. Data: the last data of the stream.
FLAG_REMOTE_CLOSED = 0x01
#: Request: non-unary, the client will send data frames.
FLAG_REMOTE_OPEN = 0x02
#: Data: the frame carries no data.
FLAG_NO_DATA = 0x04


@dataclass(frozen=True)
class Header:
    length: int
    stream_id: int
    #: The raw type byte: a value outside :class:`MessageType` is kept so the caller can ignore it.
    type: int
    flags: int


@dataclass(frozen=True)
class Frame:
    header: Header
    data: bytes

    @property
    def stream_id(self) -> int:
        return self.header.stream_id

    @property
    def type(self) -> int:
        return self.header.type


class FrameTooLarge(InvalidArgument):
    """A frame announced more than :data:`MAX_DATA_LENGTH` bytes of data (already skipped)."""

    def __init__(self, header: Header) -> None:
        super().__init__(f"message length {header.length} exceeds the maximum message size of {MAX_DATA_LENGTH}")
        self.header = header


class TruncatedFrame(Unavailable):
    """The connection ended inside a frame (a short header or short data)."""


def encode_header(header: Header) -> bytes:
    return _HEADER.pack(header.length, header.stream_id, header.type, header.flags)


def decode_header(raw: bytes) -> Header:
    """The header in the 10 bytes ``raw``; InvalidArgument for any other length."""
    if len(raw) != HEADER_LENGTH:
        raise InvalidArgument(f"a ttrpc header is {HEADER_LENGTH} bytes, not {len(raw)}")
    length, stream_id, mtype, flags = _HEADER.unpack(raw)
    return Header(length=length, stream_id=stream_id, type=mtype, flags=flags)


def encode_frame(stream_id: int, mtype: int, flags: int, data: bytes) -> bytes:
    """Header and data as one buffer (one ``sendall`` keeps concurrent writers' frames whole)."""
    if len(data) > MAX_DATA_LENGTH:
        raise InvalidArgument(f"message of {len(data)} bytes exceeds the maximum message size of {MAX_DATA_LENGTH}")
    if not 0 <= stream_id <= 0xFFFFFFFF:
        raise InvalidArgument(f"stream id {stream_id} does not fit in 32 bits")
    return encode_header(Header(len(data), stream_id, mtype, flags)) + data


class FrameReader:
    """Reads whole frames from a connected stream socket; one reader per socket."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buf = bytearray()

    def read(self) -> Frame | None:
        """The next frame; None at a clean end of the connection (between frames).

        Raises :class:`TruncatedFrame` if the peer went away inside a frame and
        :class:`FrameTooLarge` (after skipping the data) for an oversized one; the connection
        stays usable after the latter. OSError from the socket propagates.
        """
        raw = self._read_exact(HEADER_LENGTH, at_boundary=True)
        if raw is None:
            return None
        header = decode_header(raw)
        if header.length > MAX_DATA_LENGTH:
            self._discard(header.length)
            raise FrameTooLarge(header)
        data = self._read_exact(header.length, at_boundary=False) if header.length else b""
        assert data is not None
        return Frame(header, data)

    def _fill(self) -> bool:
        chunk = self._sock.recv(_DISCARD_CHUNK)
        if not chunk:
            return False
        self._buf += chunk
        return True

    def _read_exact(self, n: int, *, at_boundary: bool) -> bytes | None:
        while len(self._buf) < n:
            if not self._fill():
                if at_boundary and not self._buf:
                    return None
                raise TruncatedFrame(f"connection closed after {len(self._buf)} of {n} bytes of a frame")
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def _discard(self, n: int) -> None:
        while n > 0:
            if not self._buf and not self._fill():
                raise TruncatedFrame("connection closed inside an oversized frame")
            k = min(n, len(self._buf))
            del self._buf[:k]
            n -= k
