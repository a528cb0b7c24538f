"""ttrpc framing: header layout, round trips, and what malformed input does to the reader."""

from __future__ import annotations

import socket
import threading

import pytest

from vmsandbox import errors
from vmsandbox.ttrpc.frame import (
    HEADER_LENGTH,
    MAX_DATA_LENGTH,
    Frame,
    FrameReader,
    FrameTooLarge,
    Header,
    MessageType,
    TruncatedFrame,
    decode_header,
    encode_frame,
    encode_header,
)


def pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    return a, b


def test_the_header_is_ttrpcs_ten_big_endian_bytes() -> None:
    raw = encode_header(Header(length=0x0102, stream_id=0x0A0B0C0D, type=MessageType.RESPONSE, flags=0x04))
    assert raw == bytes([0, 0, 1, 2, 0x0A, 0x0B, 0x0C, 0x0D, 2, 4])
    assert HEADER_LENGTH == len(raw) == 10
    assert decode_header(raw) == Header(0x0102, 0x0A0B0C0D, 2, 4)


@pytest.mark.parametrize("n", [0, 9, 11])
def test_a_header_of_another_length_is_refused(n: int) -> None:
    with pytest.raises(errors.InvalidArgument, match="10 bytes"):
        decode_header(b"\0" * n)


@pytest.mark.parametrize("data", [b"", b"x", bytes(range(256)) * 10, b"y" * MAX_DATA_LENGTH])
def test_frames_round_trip_through_a_socket(data: bytes) -> None:
    a, b = pair()
    with a, b:
        out = encode_frame(0xFFFFFFFF, MessageType.REQUEST, 0, data)
        t = threading.Thread(target=a.sendall, args=(out + encode_frame(3, MessageType.DATA, 1, b"z"),))
        t.start()
        r = FrameReader(b)
        assert r.read() == Frame(Header(len(data), 0xFFFFFFFF, 1, 0), data)
        assert r.read() == Frame(Header(1, 3, 3, 1), b"z")
        t.join()
        a.close()
        assert r.read() is None  # a clean end between frames


def test_frames_split_into_single_bytes_are_reassembled() -> None:
    a, b = pair()
    with a, b:
        for byte in encode_frame(5, MessageType.REQUEST, 0, b"hello"):
            a.send(bytes([byte]))
        assert FrameReader(b).read() == Frame(Header(5, 5, 1, 0), b"hello")


def test_a_short_header_is_a_truncated_frame() -> None:
    a, b = pair()
    with a, b:
        a.sendall(encode_frame(1, MessageType.REQUEST, 0, b"abc")[:7])
        a.close()
        with pytest.raises(TruncatedFrame, match="7 of 10"):
            FrameReader(b).read()


def test_short_data_is_a_truncated_frame() -> None:
    a, b = pair()
    with a, b:
        a.sendall(encode_frame(1, MessageType.REQUEST, 0, b"abcdef")[:-2])
        a.close()
        with pytest.raises(TruncatedFrame, match="4 of 6"):
            FrameReader(b).read()


def test_an_oversized_frame_is_skipped_and_the_next_one_read() -> None:
    a, b = pair()
    with a, b:
        big = MAX_DATA_LENGTH + 1
        header = encode_header(Header(big, 7, MessageType.REQUEST, 0))
        t = threading.Thread(target=a.sendall, args=(header + b"\0" * big + encode_frame(9, 1, 0, b"next"),))
        t.start()
        r = FrameReader(b)
        with pytest.raises(FrameTooLarge) as info:
            r.read()
        assert info.value.header.stream_id == 7 and info.value.header.length == big
        assert r.read() == Frame(Header(4, 9, 1, 0), b"next")
        t.join()


def test_an_unknown_type_byte_is_passed_on_for_the_caller_to_ignore() -> None:
    a, b = pair()
    with a, b:
        a.sendall(encode_frame(1, 0x7F, 0xFF, b"?"))
        f = FrameReader(b).read()
        assert f is not None and f.type == 0x7F and f.header.flags == 0xFF and f.data == b"?"


def test_encoding_refuses_what_the_peer_would_refuse() -> None:
    with pytest.raises(errors.InvalidArgument, match="maximum message size"):
        encode_frame(1, MessageType.REQUEST, 0, b"x" * (MAX_DATA_LENGTH + 1))
    with pytest.raises(errors.InvalidArgument, match="32 bits"):
        encode_frame(1 << 32, MessageType.REQUEST, 0, b"")
