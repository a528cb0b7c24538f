"""The ttrpc server's socket, who may connect, and stopping it without leaking threads or fds."""

from __future__ import annotations

import gc
import logging
import os
import socket
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.unit.ttrpc_rig import ME, SERVICE, connect, echo_server, new_threads, open_fds, socket_dir, until_done
from vmsandbox import errors
from vmsandbox.proto.containerd.task.v3 import shim_pb2 as t
from vmsandbox.ttrpc import Client, RequestContext, Server


def test_the_socket_is_created_0600_and_removed_at_stop() -> None:
    with socket_dir() as d:
        s = echo_server(f"{d}/t.sock")
        st = os.lstat(s.path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        s.stop()
        assert not os.path.exists(f"{d}/t.sock")


def test_a_live_socket_is_refused_and_left_alone() -> None:
    with socket_dir() as d, echo_server(f"{d}/t.sock") as first:
        with pytest.raises(errors.FailedPrecondition, match="another server is listening"):
            echo_server(f"{d}/t.sock")
        with Client(first.path) as c:  # the first server still owns it
            assert c.call(SERVICE, "Echo", t.StateRequest(id="a"), t.StateResponse).id == "a"


def test_a_stale_socket_is_replaced() -> None:
    with socket_dir() as d:
        dead = socket.socket(socket.AF_UNIX)
        dead.bind(f"{d}/t.sock")
        dead.close()  # the file stays, nobody listens
        with echo_server(f"{d}/t.sock") as s, Client(s.path) as c:
            assert c.call(SERVICE, "Echo", t.StateRequest(id="b"), t.StateResponse).id == "b"


def test_a_path_that_is_not_a_socket_is_refused() -> None:
    with socket_dir() as d:
        open(f"{d}/t.sock", "w").close()
        with pytest.raises(errors.FailedPrecondition, match="not a socket"):
            echo_server(f"{d}/t.sock")
        assert os.path.isfile(f"{d}/t.sock")


def test_root_alone_may_connect_by_default() -> None:
    s = Server()
    assert s._allowed_uids == frozenset({0})
    s.stop()


def test_a_peer_with_another_uid_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    with socket_dir() as d:
        s = Server(allowed_uids=(ME + 4242,))
        s.register(SERVICE, "Echo", t.StateRequest, t.StateResponse, lambda r, c: t.StateResponse())
        with s, caplog.at_level(logging.WARNING, logger="vmsandbox.ttrpc"):
            s.start(f"{d}/t.sock")
            with Client(s.path) as c, pytest.raises(errors.Unavailable):  # closed, or EPIPE if sooner
                c.call(SERVICE, "Echo", t.StateRequest(), t.StateResponse, timeout=5)
        assert f"uid {ME} (allowed uids: {ME + 4242})" in caplog.text


def test_a_server_starts_once() -> None:
    with socket_dir() as d, echo_server(f"{d}/t.sock") as s:
        with pytest.raises(errors.FailedPrecondition, match="starts once"):
            s.start(f"{d}/other.sock")


def test_a_client_that_goes_away_cancels_its_requests() -> None:
    cancelled = threading.Event()

    def wait(req: t.StateRequest, ctx: RequestContext) -> t.StateResponse:
        if ctx.wait(10) and ctx.cancelled:
            cancelled.set()
        return t.StateResponse()

    with socket_dir() as d, echo_server(f"{d}/t.sock") as s:
        s.register(SERVICE, "Wait", t.StateRequest, t.StateResponse, wait)
        c = Client(s.path)
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(c.call, SERVICE, "Wait", t.StateRequest(), t.StateResponse)
            time.sleep(0.2)
            c.close()
            with pytest.raises(errors.Unavailable):
                pending.result(5)
        assert cancelled.wait(5)


def test_stop_finishes_what_ends_in_the_grace_period_and_cancels_the_rest() -> None:
    def quick(req: t.StateRequest, ctx: RequestContext) -> t.StateResponse:
        time.sleep(0.3)
        return t.StateResponse(id="finished")

    with socket_dir() as d:
        s = echo_server(f"{d}/t.sock", stop_grace=1.0)
        s.register(SERVICE, "Quick", t.StateRequest, t.StateResponse, quick)
        s.register(SERVICE, "Forever", t.StateRequest, t.StateResponse, until_done)
        with Client(s.path) as c, ThreadPoolExecutor(2) as pool:
            q = pool.submit(c.call, SERVICE, "Quick", t.StateRequest(), t.StateResponse)
            f = pool.submit(c.call, SERVICE, "Forever", t.StateRequest(), t.StateResponse)
            time.sleep(0.1)
            t0 = time.monotonic()
            s.stop()
            took = time.monotonic() - t0
            assert q.result(5).id == "finished"
            with pytest.raises(errors.Unavailable, match="server is stopping"):
                f.result(5)
            assert 0.9 < took < 3
            with pytest.raises(errors.Unavailable):  # the connection is closed now
                c.call(SERVICE, "Echo", t.StateRequest(), t.StateResponse, timeout=2)
        with pytest.raises(errors.Unavailable):
            Client(f"{d}/t.sock")
        s.stop()  # idempotent


@pytest.mark.filterwarnings("error::ResourceWarning", "error::pytest.PytestUnraisableExceptionWarning")
def test_stop_leaves_no_thread_and_no_fd_behind() -> None:
    """Every socket is closed by the server itself; one left to the garbage collector (its
    ResourceWarning) fails the test as a leak."""
    before_threads, before_fds = set(threading.enumerate()), open_fds()

    with socket_dir() as d:
        s = echo_server(f"{d}/t.sock", stop_grace=0.2)
        s.register(SERVICE, "Wait", t.StateRequest, t.StateResponse, until_done)
        clients = [Client(s.path) for _ in range(5)]
        with ThreadPoolExecutor(10) as pool:
            waits = [pool.submit(c.call, SERVICE, "Wait", t.StateRequest(), t.StateResponse) for c in clients]
            for c in clients:
                for i in range(3):
                    assert c.call(SERVICE, "Echo", t.StateRequest(id=str(i)), t.StateResponse).id == str(i)
            idle = connect(s.path)  # a raw connection that never sends anything
            time.sleep(0.2)
            assert len(new_threads(before_threads)) >= 1 + 5 + 5 + 5  # accept, readers, clients, waits
            s.stop()
            for w in waits:
                with pytest.raises(errors.Unavailable):
                    w.result(5)
        assert idle.recv(1) == b""  # the server closed it
        idle.close()
        for c in clients:
            c.close()
    deadline = time.monotonic() + 5
    while new_threads(before_threads) and time.monotonic() < deadline:
        time.sleep(0.05)  # the executor's own threads wind down after shutdown
    assert new_threads(before_threads) == []
    gc.collect()
    assert open_fds() == before_fds


def test_stopping_a_server_that_never_started_is_harmless() -> None:
    before = open_fds()
    Server().stop()
    assert open_fds() == before
