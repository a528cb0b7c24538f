"""vmsandbox.server's unix socket and lifecycle: permissions, stale/live sockets, signals."""

from __future__ import annotations

import grp
import os
import signal
import socket
import stat
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path

import grpc
import pytest

from vmsandbox import errors
from vmsandbox.model import AnyMessage, ControllerInstance, ControllerStatus, ExitStatus, Metric, Mount, Platform, SandboxMetadata
from vmsandbox.proto.containerd.services.sandbox.v1 import sandbox_pb2 as api
from vmsandbox.proto.containerd.services.sandbox.v1 import sandbox_pb2_grpc
from vmsandbox.server import ControllerServer, serve

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def new_stub(ch: grpc.Channel) -> sandbox_pb2_grpc.ControllerStub:
    """The generated client stub (the generated _grpc module has no type stubs)."""
    return sandbox_pb2_grpc.ControllerStub(ch)  # type: ignore[no-untyped-call]


class TinyController:
    """Just enough Controller for lifecycle tests: one running sandbox "sb"; records calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def create(
        self,
        sandbox: SandboxMetadata,
        *,
        rootfs: Iterable[Mount] = (),
        options: AnyMessage | None = None,
        netns_path: str = "",
        annotations: Mapping[str, str] | None = None,
    ) -> None:
        self.calls.append("create")

    def start(self, sandbox_id: str) -> ControllerInstance:
        self.calls.append("start")
        return ControllerInstance(sandbox_id=sandbox_id, pid=1, created_at=T0)

    def platform(self, sandbox_id: str) -> Platform:
        return Platform(os="linux", architecture="amd64")

    def stop(self, sandbox_id: str, *, timeout: float | None = None) -> None:
        self.calls.append("stop")

    def wait(self, sandbox_id: str, timeout: float | None = None) -> ExitStatus:
        time.sleep(timeout or 0)
        raise errors.DeadlineExceeded("running", sandbox_id=sandbox_id)

    def status(self, sandbox_id: str, *, verbose: bool = False) -> ControllerStatus:
        return ControllerStatus(sandbox_id=sandbox_id, pid=1, state="SANDBOX_READY", created_at=T0)

    def shutdown(self, sandbox_id: str) -> None:
        self.calls.append("shutdown")

    def metrics(self, sandbox_id: str) -> Metric:
        raise errors.Unimplemented("no metrics")

    def update(self, sandbox_id: str, sandbox: SandboxMetadata, *fields: str) -> None:
        raise errors.Unimplemented("no update")


@pytest.fixture
def servers() -> Iterator[list[ControllerServer]]:
    started: list[ControllerServer] = []
    yield started
    for s in started:
        s.stop(0)
        s.restore_signal_handlers()


def start(servers: list[ControllerServer], path: Path, **kw: object) -> ControllerServer:
    srv = serve(TinyController(), str(path), wait_poll_interval=0.05, **kw)  # type: ignore[arg-type]
    servers.append(srv)
    return srv


def platform_os(address: str) -> str:
    with grpc.insecure_channel(address) as ch:
        stub = new_stub(ch)
        return str(stub.Platform(api.ControllerPlatformRequest(sandbox_id="sb"), timeout=5).platform.os)


def test_socket_is_0600_and_serves(tmp_path: Path, servers: list[ControllerServer]) -> None:
    path = tmp_path / "ctl.sock"
    srv = start(servers, path)
    st = os.lstat(path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert srv.socket_path == str(path) and srv.address == f"unix:{path}"
    assert platform_os(srv.address) == "linux"


def test_socket_group_gives_0660(tmp_path: Path, servers: list[ControllerServer]) -> None:
    group = grp.getgrgid(os.getgid()).gr_name
    path = tmp_path / "g.sock"
    start(servers, path, socket_group=group)
    st = os.lstat(path)
    assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == os.getgid()


def test_unknown_socket_group_refused(tmp_path: Path) -> None:
    path = tmp_path / "g.sock"
    with pytest.raises(errors.InvalidArgument, match="no-such-group-xyz"):
        serve(TinyController(), str(path), socket_group="no-such-group-xyz")
    assert not path.exists()


def test_missing_parent_created_0700(tmp_path: Path, servers: list[ControllerServer]) -> None:
    path = tmp_path / "run" / "vmsandbox" / "ctl.sock"
    start(servers, path)
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    assert path.exists()


def test_relative_path_made_absolute(tmp_path: Path, servers: list[ControllerServer], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    srv = start(servers, Path("rel.sock"))
    assert srv.socket_path == str(tmp_path / "rel.sock")


def test_stale_socket_replaced(tmp_path: Path, servers: list[ControllerServer]) -> None:
    path = tmp_path / "stale.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # the file stays, nothing listens: what a crashed server leaves
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    srv = start(servers, path)
    assert platform_os(srv.address) == "linux"


def test_live_socket_refused(tmp_path: Path) -> None:
    path = tmp_path / "live.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        other.bind(str(path))
        other.listen(1)
        ino = os.lstat(path).st_ino
        with pytest.raises(errors.FailedPrecondition, match="another server is listening"):
            serve(TinyController(), str(path))
        assert os.lstat(path).st_ino == ino  # not stolen


def test_second_server_on_same_path_refused(tmp_path: Path, servers: list[ControllerServer]) -> None:
    path = tmp_path / "one.sock"
    first = start(servers, path)
    with pytest.raises(errors.FailedPrecondition):
        serve(TinyController(), str(path))
    assert platform_os(first.address) == "linux"


def test_non_socket_refused(tmp_path: Path) -> None:
    path = tmp_path / "file.sock"
    path.write_text("precious")
    with pytest.raises(errors.FailedPrecondition, match="not a socket"):
        serve(TinyController(), str(path))
    assert path.read_text() == "precious"


def test_too_long_path_refused(tmp_path: Path) -> None:
    with pytest.raises(errors.InvalidArgument, match="longer than"):
        serve(TinyController(), str(tmp_path / ("x" * 120) / "s.sock"))


def test_stop_removes_socket_and_is_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    srv = serve(TinyController(), str(path))
    srv.stop(0)
    assert not path.exists() and srv.stopped and srv.wait(0)
    srv.stop(0)
    srv.stop(None)


def test_wait_times_out_while_running(tmp_path: Path, servers: list[ControllerServer]) -> None:
    srv = start(servers, tmp_path / "w.sock")
    assert srv.wait(0.05) is False
    threading.Timer(0.1, srv.stop, args=(0,)).start()
    assert srv.wait(5) is True


def test_sigterm_stops_server_not_sandboxes(tmp_path: Path, servers: list[ControllerServer]) -> None:
    path = tmp_path / "sig.sock"
    ctl = TinyController()
    srv = serve(ctl, str(path), stop_grace=1.0, wait_poll_interval=0.05)
    servers.append(srv)
    before = signal.getsignal(signal.SIGTERM)
    srv.install_signal_handlers()
    assert signal.getsignal(signal.SIGTERM) != before
    # a Wait in flight must not keep the process from stopping
    ch = grpc.insecure_channel(srv.address)
    fut = new_stub(ch).Wait.future(api.ControllerWaitRequest(sandbox_id="sb"))
    deadline = time.monotonic() + 5
    while srv.servicer.active_waits == 0 and time.monotonic() < deadline:
        time.sleep(0.01)

    os.kill(os.getpid(), signal.SIGTERM)
    assert srv.wait(10) is True
    assert not path.exists()
    assert signal.getsignal(signal.SIGTERM) == before  # wait() on the main thread restored it
    with pytest.raises(grpc.RpcError) as ei:
        fut.result(timeout=5)
    assert ei.value.code() is grpc.StatusCode.UNAVAILABLE
    ch.close()
    assert ctl.calls == []  # no stop/shutdown of sandboxes


def test_signal_handler_called_directly(tmp_path: Path, servers: list[ControllerServer]) -> None:
    """The handler itself only starts the stop; a second signal does not hang either."""
    srv = start(servers, tmp_path / "h.sock", stop_grace=0.5)
    srv.install_signal_handlers([signal.SIGINT])
    handler = signal.getsignal(signal.SIGINT)
    assert callable(handler)
    handler(signal.SIGINT, None)
    handler(signal.SIGINT, None)
    assert srv.wait(10) is True
    assert not (tmp_path / "h.sock").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
