"""vmsandbox.server over a real unix socket: every rpc, the error table, Wait's lifetime.

An in-memory FakeController implements the Controller protocol; the client is a real gRPC
channel with the stubs generated from our .proto files, as containerd's proxy would dial it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent import futures
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import grpc
import pytest
from google.protobuf import any_pb2

from vmsandbox import errors
from vmsandbox.payloads import cgroupsv2
from vmsandbox.controller import Controller
from vmsandbox.model import (
    AnyMessage,
    ControllerInstance,
    ControllerStatus,
    ExitStatus,
    Metric,
    Mount,
    Platform,
    Runtime,
    SandboxMetadata,
)
from vmsandbox.proto.containerd.services.sandbox.v1 import sandbox_pb2 as api
from vmsandbox.proto.containerd.services.sandbox.v1 import sandbox_pb2_grpc
from vmsandbox.proto.containerd.types import mount_pb2
from vmsandbox.proto.containerd.types import sandbox_pb2 as types_pb2
from vmsandbox.proto.k8s.runtime.v1 import api_pb2 as cri
from vmsandbox.server import ControllerServer, serve
from vmsandbox.server.status import INTERNAL_MESSAGE

T0 = datetime(2026, 5, 1, 12, 0, 0, 123456, tzinfo=timezone.utc)


def new_stub(ch: grpc.Channel) -> sandbox_pb2_grpc.ControllerStub:
    """The generated client stub (the generated _grpc module has no type stubs)."""
    return sandbox_pb2_grpc.ControllerStub(ch)  # type: ignore[no-untyped-call]


# --- the fake -------------------------------------------------------------------------------


@dataclass
class _Record:
    sandbox: SandboxMetadata
    rootfs: tuple[Mount, ...]
    options: AnyMessage | None
    netns_path: str
    annotations: dict[str, str]
    phase: str = "created"
    exit: ExitStatus | None = None


@dataclass
class FakeController:
    """In-memory Controller: records calls; ``exit()`` ends a sandbox and releases waiters."""

    records: dict[str, _Record] = field(default_factory=dict)
    calls: list[tuple[str, tuple[object, ...]]] = field(default_factory=list)
    fail: dict[str, BaseException] = field(default_factory=dict)
    cond: threading.Condition = field(default_factory=threading.Condition)
    waiting: int = 0
    wait_calls: int = 0

    def _enter(self, op: str, *args: object) -> None:
        with self.cond:
            self.calls.append((op, args))
        if op in self.fail:
            raise self.fail[op]

    def _get(self, sandbox_id: str) -> _Record:
        try:
            return self.records[sandbox_id]
        except KeyError:
            raise errors.NotFound("no such sandbox", sandbox_id=sandbox_id) from None

    def create(
        self,
        sandbox: SandboxMetadata,
        *,
        rootfs: Iterable[Mount] = (),
        options: AnyMessage | None = None,
        netns_path: str = "",
        annotations: Mapping[str, str] | None = None,
    ) -> None:
        self._enter("create", sandbox)
        with self.cond:
            if sandbox.id in self.records:
                raise errors.AlreadyExists("sandbox exists", sandbox_id=sandbox.id)
            self.records[sandbox.id] = _Record(sandbox, tuple(rootfs), options, netns_path, dict(annotations or {}))

    def start(self, sandbox_id: str) -> ControllerInstance:
        self._enter("start", sandbox_id)
        rec = self._get(sandbox_id)
        rec.phase = "running"
        return ControllerInstance(
            sandbox_id=sandbox_id,
            pid=4242,
            created_at=T0,
            address="ttrpc+unix:///run/vmsandbox/x/task.sock",
            version=3,
            labels={"selinux_label": "system_u:system_r:container_t:s0"},
        )

    def platform(self, sandbox_id: str) -> Platform:
        self._enter("platform", sandbox_id)
        self._get(sandbox_id)
        return Platform(os="linux", architecture="amd64", variant="v2", os_version="6.1")

    def stop(self, sandbox_id: str, *, timeout: float | None = None) -> None:
        self._enter("stop", sandbox_id, timeout)
        if sandbox_id in self.records:
            self.exit(sandbox_id, 0)

    def wait(self, sandbox_id: str, timeout: float | None = None) -> ExitStatus:
        self._enter("wait", sandbox_id, timeout)
        with self.cond:
            self.wait_calls += 1
            rec = self._get(sandbox_id)
            self.waiting += 1
            try:
                if not self.cond.wait_for(lambda: rec.exit is not None, timeout=timeout):
                    raise errors.DeadlineExceeded("still running", sandbox_id=sandbox_id)
            finally:
                self.waiting -= 1
            assert rec.exit is not None
            return rec.exit

    def status(self, sandbox_id: str, *, verbose: bool = False) -> ControllerStatus:
        self._enter("status", sandbox_id, verbose)
        rec = self._get(sandbox_id)
        return ControllerStatus(
            sandbox_id=sandbox_id,
            pid=4242 if rec.phase == "running" else 0,
            state="SANDBOX_READY" if rec.phase == "running" else "SANDBOX_NOTREADY",
            info={"verbose": str(verbose)} if verbose else {},
            created_at=T0,
            exited_at=rec.exit.exited_at if rec.exit else None,
            extra=AnyMessage("vmsandbox.v1.Extra", b"\x01\x02") if verbose else None,
            address="ttrpc+unix:///run/vmsandbox/x/task.sock",
            version=3,
        )

    def shutdown(self, sandbox_id: str) -> None:
        self._enter("shutdown", sandbox_id)
        with self.cond:
            self.records.pop(sandbox_id, None)

    def metrics(self, sandbox_id: str) -> Metric:
        self._enter("metrics", sandbox_id)
        self._get(sandbox_id)
        data = cgroupsv2.to_any(cgroupsv2.CgroupV2Metrics(cpu=cgroupsv2.CPUStat(usage_usec=77)))
        return Metric(timestamp=T0, id=sandbox_id, data=data)

    def update(self, sandbox_id: str, sandbox: SandboxMetadata, *fields: str) -> None:
        self._enter("update", sandbox_id, sandbox, fields)
        self._get(sandbox_id)

    # test helpers
    def add(self, sandbox_id: str, phase: str = "running") -> None:
        with self.cond:
            self.records[sandbox_id] = _Record(SandboxMetadata(id=sandbox_id), (), None, "", {}, phase=phase)

    def exit(self, sandbox_id: str, code: int, at: datetime = T0 + timedelta(minutes=5)) -> None:
        with self.cond:
            self.records[sandbox_id].exit = ExitStatus(exit_status=code, exited_at=at)
            self.records[sandbox_id].phase = "stopped"
            self.cond.notify_all()

    def last(self, op: str) -> tuple[object, ...]:
        with self.cond:
            return [args for name, args in self.calls if name == op][-1]


def test_fake_satisfies_protocol() -> None:
    assert isinstance(FakeController(), Controller)


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture
def fake() -> FakeController:
    return FakeController()


@pytest.fixture
def server(fake: FakeController, tmp_path: Path) -> Iterator[ControllerServer]:
    srv = serve(fake, str(tmp_path / "ctl.sock"), wait_poll_interval=0.05)
    yield srv
    srv.stop(0)


@pytest.fixture
def channel(server: ControllerServer) -> Iterator[grpc.Channel]:
    ch = grpc.insecure_channel(server.address)
    yield ch
    ch.close()


@pytest.fixture
def stub(channel: grpc.Channel) -> sandbox_pb2_grpc.ControllerStub:
    return new_stub(channel)


def code_of(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as ei:
        call()
    err = ei.value
    return err.code(), err.details() or ""


def wait_until(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


# --- every rpc round-trips ------------------------------------------------------------------


def pod_config_any() -> any_pb2.Any:
    cfg = cri.PodSandboxConfig(metadata=cri.PodSandboxMetadata(name="web", uid="u1", namespace="ns"), hostname="web")
    return any_pb2.Any(type_url="runtime.v1.PodSandboxConfig", value=cfg.SerializeToString())


def test_create_passes_everything(stub: sandbox_pb2_grpc.ControllerStub, fake: FakeController) -> None:
    sb = types_pb2.Sandbox(
        sandbox_id="sb1",
        labels={"name": "web"},
        sandboxer="vmsandbox",
        runtime=types_pb2.Sandbox.Runtime(
            name="io.containerd.vmsandbox.v1",
            options=any_pb2.Any(type_url="runtimeoptions.v1.Options", value=b"\x0a\x01x"),
        ),
        extensions={
            "metadata": any_pb2.Any(type_url="github.com/containerd/cri/pkg/store/sandbox/Metadata", value=b'{"ID":"sb1"}')
        },
    )
    sb.created_at.FromDatetime(T0)
    sb.updated_at.FromDatetime(T0 + timedelta(seconds=1))
    req = api.ControllerCreateRequest(
        sandbox_id="sb1",
        rootfs=[mount_pb2.Mount(type="ext4", source="/dev/vdb", target="/", options=["ro", "noatime"])],
        options=pod_config_any(),
        netns_path="/var/run/netns/cni-1234",
        annotations={"a": "b"},
        sandbox=sb,
        sandboxer="vmsandbox",
    )
    assert stub.Create(req).sandbox_id == "sb1"
    rec = fake.records["sb1"]
    assert rec.sandbox == SandboxMetadata(
        id="sb1",
        runtime=Runtime(name="io.containerd.vmsandbox.v1", options=AnyMessage("runtimeoptions.v1.Options", b"\x0a\x01x")),
        spec=None,
        labels={"name": "web"},
        extensions={"metadata": AnyMessage("github.com/containerd/cri/pkg/store/sandbox/Metadata", b'{"ID":"sb1"}')},
        sandboxer="vmsandbox",
        created_at=T0,
        updated_at=T0 + timedelta(seconds=1),
    )
    assert rec.rootfs == (Mount(type="ext4", source="/dev/vdb", target="/", options=("ro", "noatime")),)
    assert rec.options == AnyMessage("runtime.v1.PodSandboxConfig", pod_config_any().value)
    assert rec.netns_path == "/var/run/netns/cni-1234"
    assert rec.annotations == {"a": "b"}


def test_create_minimal_request(stub: sandbox_pb2_grpc.ControllerStub, fake: FakeController) -> None:
    """No sandbox object, no options: a bare SandboxMetadata, sandboxer from the request, times None."""
    stub.Create(api.ControllerCreateRequest(sandbox_id="sb2", sandboxer="vmsandbox"))
    rec = fake.records["sb2"]
    assert rec.sandbox == SandboxMetadata(id="sb2", sandboxer="vmsandbox")
    assert rec.options is None and rec.rootfs == () and rec.annotations == {} and rec.netns_path == ""


def test_create_sandbox_without_id_takes_request_id(stub: sandbox_pb2_grpc.ControllerStub, fake: FakeController) -> None:
    stub.Create(api.ControllerCreateRequest(sandbox_id="sb3", sandbox=types_pb2.Sandbox(labels={"x": "y"})))
    assert fake.records["sb3"].sandbox.id == "sb3"
    assert fake.records["sb3"].sandbox.labels == {"x": "y"}


def test_create_with_mismatched_ids_is_invalid(stub: sandbox_pb2_grpc.ControllerStub, fake: FakeController) -> None:
    req = api.ControllerCreateRequest(sandbox_id="a", sandbox=types_pb2.Sandbox(sandbox_id="b"))
    code, details = code_of(lambda: stub.Create(req))
    assert code is grpc.StatusCode.INVALID_ARGUMENT and "'b'" in details
    assert fake.calls == []


def test_create_twice_already_exists(stub: sandbox_pb2_grpc.ControllerStub) -> None:
    stub.Create(api.ControllerCreateRequest(sandbox_id="dup"))
    code, details = code_of(lambda: stub.Create(api.ControllerCreateRequest(sandbox_id="dup")))
    assert code is grpc.StatusCode.ALREADY_EXISTS and "dup" in details


def test_start(stub: sandbox_pb2_grpc.ControllerStub, fake: FakeController) -> None:
    fake.add("sb", phase="created")
    resp = stub.Start(api.ControllerStartRequest(sandbox_id="sb", sandboxer="vmsandbox"))
    assert resp.sandbox_id == "sb" and resp.pid == 4242
    assert resp.created_at.ToDatetime(tzinfo=timezone.utc) == T0
    assert dict(resp.labels) == {"selinux_label": "system_u:system_r:container_t:s0"}
    assert resp.address == "ttrpc+unix:///run/vmsandbox/x/task.sock" and resp.version == 3
    assert not resp.HasField("spec")


def test_platform(stub: sandbox_pb2_grpc.ControllerStub, fake: FakeController) -> None:
    fake.add("sb")
    p = stub.Platform(api.ControllerPlatformRequest(sandbox_id="sb")).platform
    assert (p.os, p.architecture, p.variant, p.os_version) == ("linux", "amd64", "v2", "6.1")


@pytest.mark.parametrize(("secs", "want"), [(0, None), (1, 1.0), (30, 30.0)])
def test_stop_timeout(stub: sandbox_pb2_grpc.ControllerStub, fake: FakeController, secs: int, want: float | None) -> None:
    fake.add("sb")
    stub.Stop(api.ControllerStopRequest(sandbox_id="sb", timeout_secs=secs))
    assert fake.last("stop") == ("sb", want)


def test_stop_unknown_succeeds(stub: sandbox_pb2_grpc.ControllerStub) -> None:
    """The fake, like the contract, treats Stop of a missing sandbox as success."""
    stub.Stop(api.ControllerStopRequest(sandbox_id="nope"))


def test_wait_returns_exit(stub: sandbox_pb2_grpc.ControllerStub, fake: FakeController) -> None:
    fake.add("sb")
    fut = stub.Wait.future(api.ControllerWaitRequest(sandbox_id="sb"))
    wait_until(lambda: fake.waiting == 1)
    assert not fut.done()
    fake.exit("sb", 137, at=T0 + timedelta(hours=1))
    resp = fut.result(timeout=5)
    assert resp.exit_status == 137
    assert resp.exited_at.ToDatetime(tzinfo=timezone.utc) == T0 + timedelta(hours=1)


def test_wait_on_exited_sandbox_returns_at_once(stub: sandbox_pb2_grpc.ControllerStub, fake: FakeController) -> None:
    fake.add("sb")
    fake.exit("sb", 0)
    assert stub.Wait(api.ControllerWaitRequest(sandbox_id="sb"), timeout=5).exit_status == 0


def test_status(stub: sandbox_pb2_grpc.ControllerStub, fake: FakeController) -> None:
    fake.add("sb")
    st = stub.Status(api.ControllerStatusRequest(sandbox_id="sb"))
    assert (st.sandbox_id, st.pid, st.state) == ("sb", 4242, "SANDBOX_READY")
    assert st.created_at.ToDatetime(tzinfo=timezone.utc) == T0
    assert not st.HasField("exited_at") and not st.HasField("extra") and dict(st.info) == {}
    assert st.address == "ttrpc+unix:///run/vmsandbox/x/task.sock" and st.version == 3
    assert fake.last("status") == ("sb", False)

    fake.exit("sb", 0)
    st = stub.Status(api.ControllerStatusRequest(sandbox_id="sb", verbose=True))
    assert fake.last("status") == ("sb", True)
    assert st.state == "SANDBOX_NOTREADY" and st.pid == 0
    assert st.exited_at.ToDatetime(tzinfo=timezone.utc) == T0 + timedelta(minutes=5)
    assert (st.extra.type_url, st.extra.value) == ("vmsandbox.v1.Extra", b"\x01\x02")
    assert dict(st.info) == {"verbose": "True"}


def test_shutdown(stub: sandbox_pb2_grpc.ControllerStub, fake: FakeController) -> None:
    fake.add("sb")
    stub.Shutdown(api.ControllerShutdownRequest(sandbox_id="sb"))
    assert "sb" not in fake.records
    stub.Shutdown(api.ControllerShutdownRequest(sandbox_id="sb"))  # idempotent


def test_metrics(stub: sandbox_pb2_grpc.ControllerStub, fake: FakeController) -> None:
    fake.add("sb")
    m = stub.Metrics(api.ControllerMetricsRequest(sandbox_id="sb")).metrics
    assert m.id == "sb" and m.timestamp.ToDatetime(tzinfo=timezone.utc) == T0
    assert m.data.type_url == "io.containerd.cgroups.v2.Metrics"
    assert cgroupsv2.from_any(AnyMessage(m.data.type_url, m.data.value)).cpu.usage_usec == 77


def test_update(stub: sandbox_pb2_grpc.ControllerStub, fake: FakeController) -> None:
    fake.add("sb")
    sb = types_pb2.Sandbox(
        sandbox_id="sb",
        extensions={"updated-resources": any_pb2.Any(type_url="io.containerd.cri.v1/UpdatedResources", value=b"{}")},
    )
    stub.Update(api.ControllerUpdateRequest(sandbox_id="sb", sandboxer="vmsandbox", sandbox=sb, fields=["extensions"]))
    sandbox_id, sandbox, fields = fake.last("update")
    assert sandbox_id == "sb" and fields == ("extensions",)
    assert sandbox == SandboxMetadata(
        id="sb", extensions={"updated-resources": AnyMessage("io.containerd.cri.v1/UpdatedResources", b"{}")}
    )


def test_update_without_fields_or_sandbox(stub: sandbox_pb2_grpc.ControllerStub, fake: FakeController) -> None:
    fake.add("sb")
    stub.Update(api.ControllerUpdateRequest(sandbox_id="sb"))
    assert fake.last("update") == ("sb", SandboxMetadata(id="sb"), ())


def test_update_mismatched_ids_invalid(stub: sandbox_pb2_grpc.ControllerStub, fake: FakeController) -> None:
    fake.add("sb")
    req = api.ControllerUpdateRequest(sandbox_id="sb", sandbox=types_pb2.Sandbox(sandbox_id="other"))
    assert code_of(lambda: stub.Update(req))[0] is grpc.StatusCode.INVALID_ARGUMENT


# --- ids and errors -------------------------------------------------------------------------

ALL_RPCS: list[tuple[str, Callable[[str], object]]] = [
    ("Create", lambda i: api.ControllerCreateRequest(sandbox_id=i)),
    ("Start", lambda i: api.ControllerStartRequest(sandbox_id=i)),
    ("Platform", lambda i: api.ControllerPlatformRequest(sandbox_id=i)),
    ("Stop", lambda i: api.ControllerStopRequest(sandbox_id=i)),
    ("Wait", lambda i: api.ControllerWaitRequest(sandbox_id=i)),
    ("Status", lambda i: api.ControllerStatusRequest(sandbox_id=i)),
    ("Shutdown", lambda i: api.ControllerShutdownRequest(sandbox_id=i)),
    ("Metrics", lambda i: api.ControllerMetricsRequest(sandbox_id=i)),
    ("Update", lambda i: api.ControllerUpdateRequest(sandbox_id=i)),
]


@pytest.mark.parametrize(("rpc", "make"), ALL_RPCS, ids=[r for r, _ in ALL_RPCS])
def test_empty_sandbox_id_is_invalid(
    stub: sandbox_pb2_grpc.ControllerStub, fake: FakeController, rpc: str, make: Callable[[str], object]
) -> None:
    code, details = code_of(lambda: getattr(stub, rpc)(make(""), timeout=5))
    assert code is grpc.StatusCode.INVALID_ARGUMENT and "sandbox_id" in details
    assert fake.calls == []


@pytest.mark.parametrize(
    ("rpc", "make"),
    [r for r in ALL_RPCS if r[0] in ("Start", "Platform", "Wait", "Status", "Metrics", "Update")],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_unknown_id_is_not_found(stub: sandbox_pb2_grpc.ControllerStub, rpc: str, make: Callable[[str], object]) -> None:
    code, details = code_of(lambda: getattr(stub, rpc)(make("ghost"), timeout=5))
    assert code is grpc.StatusCode.NOT_FOUND and "ghost" in details


@pytest.mark.parametrize(
    ("exc", "want"),
    [
        (errors.NotFound("gone"), grpc.StatusCode.NOT_FOUND),
        (errors.AlreadyExists("taken"), grpc.StatusCode.ALREADY_EXISTS),
        (errors.InvalidArgument("bad mount"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.FailedPrecondition("stopped"), grpc.StatusCode.FAILED_PRECONDITION),
        (errors.Unavailable("libvirtd down"), grpc.StatusCode.UNAVAILABLE),
        (errors.DeadlineExceeded("guest slow"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (errors.Unimplemented("no update"), grpc.StatusCode.UNIMPLEMENTED),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, Exception) else "",
)
def test_error_table(
    stub: sandbox_pb2_grpc.ControllerStub, fake: FakeController, exc: errors.VmSandboxError, want: grpc.StatusCode
) -> None:
    fake.add("sb")
    fake.fail["start"] = type(exc)(exc.message, sandbox_id="sb")
    code, details = code_of(lambda: stub.Start(api.ControllerStartRequest(sandbox_id="sb")))
    assert code is want
    assert details == f"sandbox sb: {exc.message}"


def test_error_subclass_maps_like_its_base(stub: sandbox_pb2_grpc.ControllerStub, fake: FakeController) -> None:
    class GuestGone(errors.NotFound):
        pass

    fake.add("sb")
    fake.fail["status"] = GuestGone("guest vanished")
    assert code_of(lambda: stub.Status(api.ControllerStatusRequest(sandbox_id="sb")))[0] is grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    "exc",
    [errors.Internal("libvirt said: secret path /root/x"), RuntimeError("secret path /root/x"), KeyError("secret"),
     errors.VmSandboxError("secret base class")],
    ids=["Internal", "RuntimeError", "KeyError", "VmSandboxError"],
)  # fmt: skip
def test_internal_and_unexpected_errors_hide_details(
    stub: sandbox_pb2_grpc.ControllerStub, fake: FakeController, exc: BaseException, caplog: pytest.LogCaptureFixture
) -> None:
    fake.add("sb")
    fake.fail["metrics"] = exc
    with caplog.at_level(logging.ERROR, logger="vmsandbox.server"):
        code, details = code_of(lambda: stub.Metrics(api.ControllerMetricsRequest(sandbox_id="sb")))
    assert code is grpc.StatusCode.INTERNAL
    assert details == INTERNAL_MESSAGE and "secret" not in details
    rec = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert rec and rec[-1].exc_info is not None and "sb" in rec[-1].getMessage()


# --- Wait: many callers, cancellation, shutdown, the cap -----------------------------------


def test_twenty_concurrent_waits_all_released(stub: sandbox_pb2_grpc.ControllerStub, fake: FakeController) -> None:
    fake.add("sb")
    futs = [stub.Wait.future(api.ControllerWaitRequest(sandbox_id="sb")) for _ in range(20)]
    wait_until(lambda: fake.waiting == 20)
    assert not any(f.done() for f in futs)
    # other rpcs are still served while 20 Waits are pending
    assert stub.Status(api.ControllerStatusRequest(sandbox_id="sb"), timeout=5).state == "SANDBOX_READY"
    fake.exit("sb", 0)
    results = [f.result(timeout=10) for f in futs]
    assert [r.exit_status for r in results] == [0] * 20


def test_cancelled_wait_returns(server: ControllerServer, stub: sandbox_pb2_grpc.ControllerStub, fake: FakeController) -> None:
    fake.add("sb")
    fut = stub.Wait.future(api.ControllerWaitRequest(sandbox_id="sb"))
    wait_until(lambda: server.servicer.active_waits == 1)
    fut.cancel()
    wait_until(lambda: server.servicer.active_waits == 0, timeout=5)
    calls = fake.wait_calls
    time.sleep(0.3)
    assert fake.wait_calls == calls  # no longer polling the controller
    assert fake.records["sb"].phase == "running"


def test_wait_with_client_deadline(server: ControllerServer, stub: sandbox_pb2_grpc.ControllerStub, fake: FakeController) -> None:
    fake.add("sb")
    code, _ = code_of(lambda: stub.Wait(api.ControllerWaitRequest(sandbox_id="sb"), timeout=0.3))
    assert code is grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(lambda: server.servicer.active_waits == 0, timeout=5)


def test_server_stop_ends_waits_with_unavailable(fake: FakeController, tmp_path: Path) -> None:
    """containerd's proxy retries Wait on UNAVAILABLE, so a restart does not look like an exit."""
    srv = serve(fake, str(tmp_path / "s.sock"), wait_poll_interval=0.05)
    fake.add("sb")
    with grpc.insecure_channel(srv.address) as ch:
        stub = new_stub(ch)
        futs = [stub.Wait.future(api.ControllerWaitRequest(sandbox_id="sb")) for _ in range(3)]
        wait_until(lambda: srv.servicer.active_waits == 3)
        srv.stop(2.0)
        for f in futs:
            with pytest.raises(grpc.RpcError) as ei:
                f.result(timeout=5)
            assert ei.value.code() is grpc.StatusCode.UNAVAILABLE
    assert fake.records["sb"].phase == "running"
    assert not [c for c in fake.calls if c[0] in ("stop", "shutdown")]


def test_wait_cap_keeps_workers_free(fake: FakeController, tmp_path: Path) -> None:
    srv = serve(fake, str(tmp_path / "c.sock"), max_workers=8, wait_poll_interval=0.05)  # 6 Waits max
    fake.add("sb")
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = new_stub(ch)
            futs = [stub.Wait.future(api.ControllerWaitRequest(sandbox_id="sb")) for _ in range(6)]
            wait_until(lambda: srv.servicer.active_waits == 6)
            code, _ = code_of(lambda: stub.Wait(api.ControllerWaitRequest(sandbox_id="sb"), timeout=5))
            assert code is grpc.StatusCode.UNAVAILABLE
            assert stub.Status(api.ControllerStatusRequest(sandbox_id="sb"), timeout=5).pid == 4242
            fake.exit("sb", 0)
            assert all(f.result(timeout=5).exit_status == 0 for f in futs)
    finally:
        srv.stop(0)


def test_handlers_cover_the_service() -> None:
    from vmsandbox.server import SERVICE_NAME, ControllerServicer

    svc = api.DESCRIPTOR.services_by_name["Controller"]
    assert svc.full_name == SERVICE_NAME
    assert set(ControllerServicer(FakeController()).method_handlers()) == {m.name for m in svc.methods}


def test_generated_servicer_registration_is_compatible(fake: FakeController, tmp_path: Path) -> None:
    """Our servicer also plugs into the generated add_ControllerServicer_to_server."""
    from vmsandbox.server import ControllerServicer

    fake.add("sb")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    sandbox_pb2_grpc.add_ControllerServicer_to_server(ControllerServicer(fake), server)  # type: ignore[no-untyped-call]
    server.add_insecure_port(f"unix:{tmp_path / 'g.sock'}")
    server.start()
    try:
        with grpc.insecure_channel(f"unix:{tmp_path / 'g.sock'}") as ch:
            stub = new_stub(ch)
            assert stub.Platform(api.ControllerPlatformRequest(sandbox_id="sb"), timeout=5).platform.os == "linux"
    finally:
        server.stop(0)
