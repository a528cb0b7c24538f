"""The ttrpc server on the wire, driven with raw frames: what a Go ttrpc client (or a broken
one) sends and what comes back, per containerd/ttrpc's PROTOCOL.md and server.go."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from tests.unit.ttrpc_rig import SERVICE, connect, echo_server, frame, read_response, request, socket_dir
from vmsandbox.codes import Code
from vmsandbox.proto.containerd.task.v3 import shim_pb2 as t
from vmsandbox.proto.ttrpc import request_pb2 as pb
from vmsandbox.ttrpc import MAX_DATA_LENGTH, Server

REQ, RESP, DATA = 1, 2, 3


@pytest.fixture
def server() -> Iterator[Server]:
    with socket_dir() as d:
        s = echo_server(f"{d}/t.sock")
        yield s
        s.stop()


@pytest.fixture
def conn(server: Server) -> Iterator[socket.socket]:
    c = connect(server.path)
    yield c
    c.close()


def answer(c: socket.socket) -> tuple[int, Code, str, bytes]:
    sid, mtype, flags, resp = read_response(c)
    assert (mtype, flags) == (RESP, 0)  # responses are type 2 with no flags, always
    return sid, Code(resp.status.code), resp.status.message, resp.payload


def test_a_unary_request_is_answered_on_its_stream_with_an_ok_status(conn: socket.socket) -> None:
    conn.sendall(frame(1, REQ, request(id="abc")))
    sid, mtype, _, resp = read_response(conn)
    assert (sid, mtype) == (1, RESP)
    assert resp.HasField("status") and resp.status.code == 0  # as Go's server: status always set
    assert t.StateResponse.FromString(resp.payload).id == "abc"


@pytest.mark.parametrize("ids", [[7], [1, 3, 5], [1, 101, 0x7FFFFFFF, 0xFFFFFFFF]])
def test_any_increasing_odd_stream_ids_are_served_on_the_same_id(conn: socket.socket, ids: list[int]) -> None:
    for sid in ids:
        conn.sendall(frame(sid, REQ, request(id=str(sid))))
        got, code, _, payload = answer(conn)
        assert (got, code, t.StateResponse.FromString(payload).id) == (sid, Code.OK, str(sid))


@pytest.mark.parametrize("sid", [0, 2, 0xFFFFFFFE])
def test_an_even_stream_id_is_refused_on_that_id_and_the_connection_stays(conn: socket.socket, sid: int) -> None:
    conn.sendall(frame(sid, REQ, request()))
    assert answer(conn)[:3] == (sid, Code.INVALID_ARGUMENT, "StreamID must be odd for client initiated streams")
    conn.sendall(frame(1, REQ, request(id="after")))
    assert answer(conn)[:2] == (1, Code.OK)


@pytest.mark.parametrize("second", [5, 3])
def test_a_reused_or_decreasing_stream_id_is_refused(conn: socket.socket, second: int) -> None:
    conn.sendall(frame(5, REQ, request()))
    assert answer(conn)[:2] == (5, Code.OK)
    conn.sendall(frame(second, REQ, request()))
    assert answer(conn)[:3] == (second, Code.INVALID_ARGUMENT, "StreamID cannot be re-used and must increment")


def test_a_frame_of_unknown_type_is_ignored_as_ttrpc_does(conn: socket.socket) -> None:
    conn.sendall(frame(1, 0x09, b"future") + frame(3, RESP, b"") + frame(5, REQ, request(id="still here")))
    sid, code, _, payload = answer(conn)  # nothing came back for streams 1 and 3
    assert (sid, code, t.StateResponse.FromString(payload).id) == (5, Code.OK, "still here")


def test_data_for_a_stream_that_is_not_active_is_refused(conn: socket.socket) -> None:
    conn.sendall(frame(9, DATA, b"stray", flags=1))
    assert answer(conn)[:3] == (9, Code.INVALID_ARGUMENT, "StreamID is no longer active")


def test_an_oversized_frame_gets_resource_exhausted_and_the_connection_goes_on(conn: socket.socket) -> None:
    big = MAX_DATA_LENGTH + 1
    conn.sendall(frame(3, REQ, b"", length=big))
    conn.sendall(b"\0" * big)
    sid, code, message, _ = answer(conn)
    assert (sid, code) == (3, Code.RESOURCE_EXHAUSTED) and "exceeds the maximum message size" in message
    conn.sendall(frame(5, REQ, request(id="ok")))
    assert answer(conn)[:2] == (5, Code.OK)


def test_a_request_that_does_not_decode_is_invalid_argument(conn: socket.socket) -> None:
    conn.sendall(frame(1, REQ, b"\xff\xff\xff"))
    sid, code, message, _ = answer(conn)
    assert (sid, code) == (1, Code.INVALID_ARGUMENT) and message.startswith("unmarshal request error")
    conn.sendall(frame(3, REQ, request(id="x")))
    assert answer(conn)[:2] == (3, Code.OK)


def test_a_payload_that_does_not_decode_is_invalid_argument(conn: socket.socket) -> None:
    bad = pb.Request(service=SERVICE, method="Echo", payload=b"\x0a\x05ab").SerializeToString()
    conn.sendall(frame(1, REQ, bad))
    sid, code, message, _ = answer(conn)
    assert (sid, code) == (1, Code.INVALID_ARGUMENT) and "containerd.task.v3.StateRequest" in message


def test_unknown_service_and_method_are_unimplemented_with_ttrpcs_messages(conn: socket.socket) -> None:
    conn.sendall(frame(1, REQ, request(service="no.Such")) + frame(3, REQ, request(method="Nope")))
    assert {answer(conn)[:3], answer(conn)[:3]} == {(1, Code.UNIMPLEMENTED, "service no.Such"),
                                                   (3, Code.UNIMPLEMENTED, "method Nope")}


def test_a_streaming_request_is_unimplemented(conn: socket.socket) -> None:
    conn.sendall(frame(1, REQ, request(), flags=0x02))
    assert answer(conn)[:3] == (1, Code.UNIMPLEMENTED, "streaming requests are not supported")


def test_a_request_flagged_remote_closed_is_served_as_unary(conn: socket.socket) -> None:
    conn.sendall(frame(1, REQ, request(id="rc"), flags=0x01))
    assert answer(conn)[:2] == (1, Code.OK)


def test_an_idle_connection_is_not_closed(conn: socket.socket) -> None:
    conn.sendall(frame(1, REQ, request()))
    answer(conn)
    time.sleep(1.5)
    conn.settimeout(0.2)
    with pytest.raises(socket.timeout):  # no EOF, nothing sent
        conn.recv(1)
    conn.settimeout(5)
    conn.sendall(frame(3, REQ, request(id="later")))
    assert answer(conn)[:2] == (3, Code.OK)


def test_a_peer_that_hangs_up_mid_frame_leaves_the_server_serving(server: Server) -> None:
    c = connect(server.path)
    c.sendall(frame(1, REQ, request())[:6])
    c.close()
    with connect(server.path) as c2:
        c2.sendall(frame(1, REQ, request()))
        assert answer(c2)[:2] == (1, Code.OK)
