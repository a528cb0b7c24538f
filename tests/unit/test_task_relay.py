"""The task socket relay (vmsandbox/task/relay.py) as a real process between a ttrpc client
(containerd's part) and real ttrpc servers (serve's part) that go away and come back."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.ttrpc_rig import ME, SERVICE, socket_dir
from vmsandbox.proto.containerd.task.v3 import shim_pb2 as t
from vmsandbox.task.sockets import _relay_pid, ensure_relay, stop_relay
from vmsandbox.ttrpc import Client, RequestContext, Server


def server(path: str, name: str, release: threading.Event) -> Server:
    """Answers "Wait" with its own name once ``release`` is set (a Wait in flight until then)."""
    def wait(req: t.StateRequest, ctx: RequestContext) -> t.StateResponse:
        while not release.is_set():
            ctx.check()
            release.wait(0.05)
        return t.StateResponse(id=name)
    s = Server(allowed_uids=(ME,))
    s.register(SERVICE, "Wait", t.StateRequest, t.StateResponse, wait)
    s.start(path)
    return s


@pytest.fixture
def relay() -> Iterator[tuple[Path, Path]]:
    with socket_dir() as d:
        listen, up = Path(d, "task.sock"), Path(d, "serve.sock")
        ensure_relay(listen, up, (ME,))
        try:
            yield listen, up
        finally:
            stop_relay(listen)


def test_a_wait_in_flight_when_serve_goes_is_answered_by_the_next_serve(relay: tuple[Path, Path]) -> None:
    listen, up = relay
    pid = _relay_pid(listen)
    assert pid and oct(os.stat(listen).st_mode & 0o777) == "0o600"
    ensure_relay(listen, up, (ME,))  # it runs: not a second one
    assert _relay_pid(listen) == pid
    first_go, second_go = threading.Event(), threading.Event()
    first = server(str(up), "first", first_go)
    got: list[str] = []
    with Client(f"unix://{listen}") as c:
        def call() -> None:
            got.append(c.call(SERVICE, "Wait", t.StateRequest(id="x"), t.StateResponse, timeout=30).id)
        caller = threading.Thread(target=call)
        caller.start()
        time.sleep(0.5)
        first.stop(answer=False)  # serve goes away: nobody hears of the cancelled Wait
        time.sleep(0.5)
        assert caller.is_alive() and got == []
        second = server(str(up), "second", second_go)
        second_go.set()
        caller.join(10)
        assert got == ["second"]
        first_go.set()
        got.clear()
        call()  # and the connection goes on
        assert got == ["second"]
        second.stop()
    stop_relay(listen)
    assert _relay_pid(listen) == 0


def test_a_relay_whose_socket_was_removed_ends(relay: tuple[Path, Path]) -> None:
    listen, _ = relay
    pid = _relay_pid(listen)
    listen.unlink()  # its folder went without serve (a sandbox removed while serve was away)
    deadline = time.monotonic() + 15
    while Path(f"/proc/{pid}/cmdline").exists() and Path(f"/proc/{pid}/cmdline").read_bytes():
        assert time.monotonic() < deadline, "the relay is still running"
        time.sleep(0.2)
