"""ContainerdEvents against a real gRPC Events service on a unix socket, and with none there."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from google.protobuf import empty_pb2

from tests.unit.ttrpc_rig import socket_dir
from vmsandbox.proto.containerd.events import task_pb2 as ev
from vmsandbox.proto.containerd.services.events.v1 import events_pb2, events_pb2_grpc
from vmsandbox.server.events import ContainerdEvents


class Events(events_pb2_grpc.EventsServicer):
    def __init__(self, delay: float = 0) -> None:
        self.got: list[tuple[str, str, str, bytes]] = []
        self.delay = delay
        self.cond = threading.Condition()

    def Publish(self, request: events_pb2.PublishRequest, context: grpc.ServicerContext) -> empty_pb2.Empty:
        time.sleep(self.delay)
        ns = dict(context.invocation_metadata()).get("containerd-namespace", "")
        with self.cond:
            self.got.append((str(ns), request.topic, request.event.type_url, request.event.value))
            self.cond.notify_all()
        return empty_pb2.Empty()

    def wait(self, n: int, timeout: float = 10) -> list[tuple[str, str, str, bytes]]:
        with self.cond:
            self.cond.wait_for(lambda: len(self.got) >= n, timeout)
            return list(self.got)


@pytest.fixture
def sock() -> Iterator[Path]:
    with socket_dir() as d:
        yield Path(d) / "containerd.sock"


def serve(path: Path, svc: Events) -> grpc.Server:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    events_pb2_grpc.add_EventsServicer_to_server(svc, server)  # type: ignore[no-untyped-call]
    server.add_insecure_port(f"unix://{path}")
    server.start()
    return server


def sender_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "vsbx-events"]


def test_events_reach_containerd_in_order_with_their_namespace(sock: Path) -> None:
    svc = Events()
    server = serve(sock, svc)
    pub = ContainerdEvents(str(sock))
    try:
        pub.publish("k8s.io", "/tasks/start", ev.TaskStart(container_id="c1", pid=7))
        pub.publish("k8s.io", "/tasks/oom", ev.TaskOOM(container_id="c1"))
        pub.publish("other", "/tasks/exit", ev.TaskExit(container_id="c1", id="c1", pid=7, exit_status=137))
        got = svc.wait(3)
    finally:
        pub.close()
        server.stop(None)
    assert [(ns, topic, url) for ns, topic, url, _ in got] == [
        ("k8s.io", "/tasks/start", "containerd.events.TaskStart"),
        ("k8s.io", "/tasks/oom", "containerd.events.TaskOOM"),
        ("other", "/tasks/exit", "containerd.events.TaskExit")]
    assert ev.TaskExit.FromString(got[2][3]).exit_status == 137
    assert pub.sent == 3 and not sender_threads()


def test_no_containerd_never_blocks_and_is_logged_once(sock: Path, caplog: pytest.LogCaptureFixture) -> None:
    before = set(threading.enumerate())
    pub = ContainerdEvents(str(sock), timeout=1)
    with caplog.at_level(logging.WARNING, logger="vmsandbox.server.events"):
        t0 = time.monotonic()
        for i in range(20):
            pub.publish("k8s.io", "/tasks/start", ev.TaskStart(container_id=f"c{i}"))
        assert time.monotonic() - t0 < 0.5
        pub.close(timeout=10)
    assert pub.sent == 0
    assert len([r for r in caplog.records if "cannot publish" in r.getMessage()]) == 1
    assert set(threading.enumerate()) <= before


def test_containerd_coming_later_gets_the_later_events(sock: Path) -> None:
    pub = ContainerdEvents(str(sock), timeout=1)
    pub.publish("k8s.io", "/tasks/create", ev.TaskCreate(container_id="early"))
    deadline = time.monotonic() + 5
    while not pub._failing and time.monotonic() < deadline:
        time.sleep(0.05)
    svc = Events()
    server = serve(sock, svc)
    try:
        deadline = time.monotonic() + 30  # the channel reconnects with its backoff
        while not svc.got and time.monotonic() < deadline:
            pub.publish("k8s.io", "/tasks/start", ev.TaskStart(container_id="late"))
            time.sleep(0.5)
        assert svc.got and all(topic == "/tasks/start" for _, topic, _, _ in svc.got)
    finally:
        pub.close()
        server.stop(None)


def test_a_full_queue_drops_and_close_is_bounded(sock: Path) -> None:
    svc = Events(delay=0.5)
    server = serve(sock, svc)
    pub = ContainerdEvents(str(sock), max_queued=2, timeout=5)
    try:
        t0 = time.monotonic()
        for i in range(10):
            pub.publish("k8s.io", "/tasks/start", ev.TaskStart(container_id=f"c{i}"))
        assert time.monotonic() - t0 < 0.5  # never blocks
        pub.close(timeout=1)
        assert time.monotonic() - t0 < 5
        pub.publish("k8s.io", "/tasks/start", ev.TaskStart(container_id="after"))  # ignored once closed
    finally:
        server.stop(None)
    assert 1 <= len(svc.got) <= 3 and not sender_threads()
