"""The RFC 6455 framing of the CRI tests' remotecommand client (tests/cri/remotecommand.py)."""

from __future__ import annotations

import struct

from tests.cri.remotecommand import OP_BINARY, OP_CLOSE, OP_CONT, Result, accept_key, decode_frame, encode_frame


def test_accept_key_is_rfc6455s_example() -> None:
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_client_frames_are_masked_and_decode_back() -> None:
    mask = b"\x37\xfa\x21\x3d"
    frame = encode_frame(0x1, b"Hello", mask)
    assert frame == bytes.fromhex("818537fa213d7f9f4d5158")  # RFC 6455 5.7, masked "Hello"
    assert decode_frame(frame) == (True, 0x1, b"Hello", len(frame))


def test_lengths_of_16_and_64_bits() -> None:
    for n, head in ((125, 2), (126, 4), (65535, 4), (65536, 10)):
        payload = bytes(range(256)) * (n // 256) + bytes(n % 256)
        frame = encode_frame(OP_BINARY, payload)
        assert len(frame) == head + 4 + n
        assert decode_frame(frame) == (True, OP_BINARY, payload, len(frame))


def test_unmasked_server_frames_partial_input_and_fragments() -> None:
    server = bytes([0x02, 0x03]) + b"\x01ab" + bytes([0x80 | OP_CONT, 0x01]) + b"c"
    assert decode_frame(server[:3]) is None  # not whole yet
    first = decode_frame(server)
    assert first == (False, OP_BINARY, b"\x01ab", 5)
    assert decode_frame(server[5:]) == (True, OP_CONT, b"c", 3)
    close = bytes([0x80 | OP_CLOSE, 2]) + struct.pack("!H", 1000)
    assert decode_frame(close) == (True, OP_CLOSE, b"\x03\xe8", 4)


def test_exit_code_of_v4_statuses() -> None:
    assert Result(status={"metadata": {}, "status": "Success"}).exit_code == 0
    failed = {"metadata": {}, "status": "Failure", "reason": "NonZeroExitCode",
              "message": "command terminated with non-zero exit code: error executing command [sh], exit code 3",
              "details": {"causes": [{"reason": "ExitCode", "message": "3"}]}}
    assert Result(status=failed).exit_code == 3
    assert Result(status={"status": "Failure", "reason": "InternalError"}).exit_code is None
    assert Result().exit_code is None
