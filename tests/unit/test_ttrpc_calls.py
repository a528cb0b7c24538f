"""ttrpc calls through our client and server: errors, deadlines, metadata, concurrency."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from google.protobuf import empty_pb2

from tests.unit.ttrpc_rig import (
    ME,
    SERVICE,
    connect,
    echo_server,
    frame,
    read_response,
    request,
    socket_dir,
    until_done,
)
from vmsandbox import errors
from vmsandbox.codes import ERROR_CODES, INTERNAL_MESSAGE, Code
from vmsandbox.proto.containerd.task.v3 import shim_pb2 as t
from vmsandbox.ttrpc import Client, RequestContext, Server


@pytest.fixture
def server() -> Iterator[Server]:
    with socket_dir() as d:
        s = echo_server(f"{d}/t.sock", stop_grace=0.2)
        yield s
        s.stop()


@pytest.fixture
def client(server: Server) -> Iterator[Client]:
    with Client(server.path) as c:
        yield c


def test_a_call_returns_the_handlers_answer(client: Client) -> None:
    assert client.call(SERVICE, "Echo", t.StateRequest(id="a"), t.StateResponse).id == "a"


def test_addresses_take_containerds_forms(server: Server) -> None:
    for address in (server.path, f"unix://{server.path}", f"ttrpc+unix://{server.path}"):
        with Client(address) as c:
            assert c.call(SERVICE, "Echo", t.StateRequest(id="x"), t.StateResponse).id == "x"


@pytest.mark.parametrize("cls", sorted(set(ERROR_CODES) - {errors.Internal}, key=lambda c: c.__name__))
def test_our_errors_cross_the_wire_as_their_codes(server: Server, client: Client,
                                                  cls: type[errors.VmSandboxError]) -> None:
    def fail(req: t.StateRequest, ctx: RequestContext) -> t.StateResponse:
        raise cls(f"{req.id} went wrong")

    server.register(SERVICE, "Fail", t.StateRequest, t.StateResponse, fail)
    with pytest.raises(cls, match="^c1 went wrong$"):
        client.call(SERVICE, "Fail", t.StateRequest(id="c1"), t.StateResponse)
    with connect(server.path) as raw:  # and the number on the wire is the table's
        raw.sendall(frame(1, 1, request(method="Fail", id="c1")))
        assert read_response(raw)[3].status.code == ERROR_CODES[cls]


@pytest.mark.parametrize("exc", [KeyError("secret-key"), errors.Internal("secret detail")])
def test_unexpected_errors_are_internal_with_the_traceback_logged_not_sent(
        server: Server, client: Client, caplog: pytest.LogCaptureFixture, exc: Exception) -> None:
    def boom(req: t.StateRequest, ctx: RequestContext) -> t.StateResponse:
        raise exc

    server.register(SERVICE, "Boom", t.StateRequest, t.StateResponse, boom)
    with caplog.at_level(logging.ERROR, logger="vmsandbox.ttrpc"):
        with pytest.raises(errors.Internal) as info:
            client.call(SERVICE, "Boom", t.StateRequest(), t.StateResponse)
    assert str(info.value) == INTERNAL_MESSAGE and "secret" not in str(info.value)
    logged = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert logged and logged[0].exc_info is not None and "secret" in str(logged[0].exc_info[1])
    assert "test.v1.Echo/Boom" in logged[0].getMessage()


def test_a_handler_answering_the_wrong_type_is_internal(server: Server, client: Client) -> None:
    server.register(SERVICE, "Wrong", t.StateRequest, t.StateResponse,
                    lambda req, ctx: empty_pb2.Empty())  # type: ignore[arg-type, return-value]
    with pytest.raises(errors.Internal):
        client.call(SERVICE, "Wrong", t.StateRequest(), t.StateResponse)


def test_unknown_methods_are_unimplemented(client: Client) -> None:
    with pytest.raises(errors.Unimplemented, match="^method Nope$"):
        client.call(SERVICE, "Nope", t.StateRequest(), t.StateResponse)
    with pytest.raises(errors.Unimplemented, match="^service other.Svc$"):
        client.call("other.Svc", "Echo", t.StateRequest(), t.StateResponse)


def test_registering_a_method_twice_is_refused(server: Server) -> None:
    with pytest.raises(errors.AlreadyExists):
        server.register(SERVICE, "Echo", t.StateRequest, t.StateResponse, lambda r, c: t.StateResponse())


def test_the_timeout_becomes_the_handlers_deadline(server: Server, client: Client) -> None:
    seen: list[float | None] = []

    def remaining(req: t.StateRequest, ctx: RequestContext) -> t.StateResponse:
        seen.append(ctx.time_remaining())
        return t.StateResponse()

    server.register(SERVICE, "Remaining", t.StateRequest, t.StateResponse, remaining)
    client.call(SERVICE, "Remaining", t.StateRequest(), t.StateResponse, timeout=30)
    client.call(SERVICE, "Remaining", t.StateRequest(), t.StateResponse)
    assert seen[0] is not None and 29 < seen[0] <= 30
    assert seen[1] is None  # containerd's Wait carries no deadline


def test_a_handler_waiting_on_its_context_ends_at_the_deadline(server: Server) -> None:
    server.register(SERVICE, "Wait", t.StateRequest, t.StateResponse, until_done)
    with connect(server.path) as raw:  # the server's own answer, with no client-side timer
        t0 = time.monotonic()
        raw.sendall(frame(1, 1, request(method="Wait", timeout_nano=300_000_000)))
        resp = read_response(raw)[3]
        assert resp.status.code == Code.DEADLINE_EXCEEDED and 0.25 < time.monotonic() - t0 < 3
        raw.sendall(frame(3, 1, request(method="Wait", timeout_nano=-1)))  # already past
        assert read_response(raw)[3].status.code == Code.DEADLINE_EXCEEDED


def test_the_client_gives_up_at_its_timeout_and_the_connection_stays_usable(server: Server,
                                                                           client: Client) -> None:
    release = threading.Event()
    server.register(SERVICE, "Stuck", t.StateRequest, t.StateResponse,
                    lambda req, ctx: (release.wait(10), t.StateResponse())[1])
    t0 = time.monotonic()
    with pytest.raises(errors.DeadlineExceeded):
        client.call(SERVICE, "Stuck", t.StateRequest(), t.StateResponse, timeout=0.2)
    assert time.monotonic() - t0 < 2
    release.set()  # its late answer is dropped, not handed to the next call
    assert client.call(SERVICE, "Echo", t.StateRequest(id="next"), t.StateResponse).id == "next"


def test_metadata_reaches_the_handler_as_a_multimap(server: Server, client: Client) -> None:
    got: dict[str, tuple[str, ...]] = {}

    def meta(req: t.StateRequest, ctx: RequestContext) -> t.StateResponse:
        got.update(ctx.metadata)
        return t.StateResponse(exec_id=ctx.first("containerd-namespace-ttrpc"), bundle=ctx.first("absent", "-"))

    server.register(SERVICE, "Meta", t.StateRequest, t.StateResponse, meta)
    resp = client.call(SERVICE, "Meta", t.StateRequest(), t.StateResponse,
                       metadata={"containerd-namespace-ttrpc": "k8s.io", "trace": ["a", "b"]})
    assert got == {"containerd-namespace-ttrpc": ("k8s.io",), "trace": ("a", "b")}
    assert (resp.exec_id, resp.bundle) == ("k8s.io", "-")


def test_the_peer_is_known_to_the_handler(server: Server, client: Client) -> None:
    import os

    server.register(SERVICE, "Peer", t.StateRequest, t.StateResponse,
                    lambda req, ctx: t.StateResponse(pid=ctx.peer.pid, exit_status=ctx.peer.uid))
    resp = client.call(SERVICE, "Peer", t.StateRequest(), t.StateResponse)
    assert (resp.pid, resp.exit_status) == (os.getpid(), ME)


def test_a_slow_request_does_not_hold_up_a_fast_one_on_the_same_connection(server: Server,
                                                                          client: Client) -> None:
    release = threading.Event()
    started = threading.Event()

    def slow(req: t.StateRequest, ctx: RequestContext) -> t.StateResponse:
        started.set()
        release.wait(10)
        return t.StateResponse(id="slow")

    server.register(SERVICE, "Slow", t.StateRequest, t.StateResponse, slow)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(client.call, SERVICE, "Slow", t.StateRequest(), t.StateResponse)
        assert started.wait(5)
        t0 = time.monotonic()
        assert client.call(SERVICE, "Echo", t.StateRequest(id="fast"), t.StateResponse, timeout=5).id == "fast"
        assert time.monotonic() - t0 < 1 and not pending.done()
        release.set()
        assert pending.result(5).id == "slow"


def test_fifty_calls_in_parallel_on_one_connection_each_get_their_own_answer(server: Server,
                                                                             client: Client) -> None:
    barrier = threading.Barrier(50, timeout=10)

    def together(req: t.StateRequest, ctx: RequestContext) -> t.StateResponse:
        barrier.wait()  # all 50 are in their handlers at once, or this times out
        return t.StateResponse(id=req.id, pid=ctx.stream_id)

    server.register(SERVICE, "Together", t.StateRequest, t.StateResponse, together)
    with ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(lambda i: client.call(SERVICE, "Together", t.StateRequest(id=f"r{i}"),
                                                      t.StateResponse, timeout=20), range(50)))
    assert [a.id for a in answers] == [f"r{i}" for i in range(50)]
    assert sorted(a.pid for a in answers) == list(range(1, 100, 2))  # one odd stream id each


def test_requests_beyond_the_cap_are_refused_not_queued() -> None:
    release = threading.Event()
    with socket_dir() as d:
        s = echo_server(f"{d}/t.sock", max_requests=2, stop_grace=0.2)
        s.register(SERVICE, "Hold", t.StateRequest, t.StateResponse,
                   lambda req, ctx: (release.wait(10), t.StateResponse())[1])
        with s, Client(s.path) as c, ThreadPoolExecutor(2) as pool:
            held = [pool.submit(c.call, SERVICE, "Hold", t.StateRequest(), t.StateResponse) for _ in range(2)]
            time.sleep(0.3)
            with connect(s.path) as raw:
                raw.sendall(frame(1, 1, request()))
                resp = read_response(raw)[3]
                assert resp.status.code == Code.RESOURCE_EXHAUSTED
            release.set()
            assert all(h.result(5) == t.StateResponse() for h in held)
            assert c.call(SERVICE, "Echo", t.StateRequest(id="after"), t.StateResponse).id == "after"


def test_a_request_too_large_to_send_is_refused_by_the_client(client: Client) -> None:
    with pytest.raises(errors.InvalidArgument, match="maximum message size"):
        client.call(SERVICE, "Echo", t.StateRequest(id="x" * (5 << 20)), t.StateResponse)
    assert client.call(SERVICE, "Echo", t.StateRequest(id="ok"), t.StateResponse).id == "ok"


def test_an_answer_too_large_to_send_is_resource_exhausted(server: Server, client: Client) -> None:
    server.register(SERVICE, "Huge", t.StateRequest, t.StateResponse,
                    lambda req, ctx: t.StateResponse(bundle="b" * (5 << 20)))
    with pytest.raises(errors.Internal, match="^RESOURCE_EXHAUSTED: response of"):
        client.call(SERVICE, "Huge", t.StateRequest(), t.StateResponse)
