"""vmsandbox.server.convert and the generated messages: the wire contract with containerd."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from google.protobuf import any_pb2

from vmsandbox.errors import InvalidArgument
from vmsandbox.model import (
    EPOCH,
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
from vmsandbox.proto.containerd.types import metrics_pb2, mount_pb2, platform_pb2
from vmsandbox.proto.containerd.types import sandbox_pb2 as types_pb2
from vmsandbox.server import convert

T0 = datetime(2026, 3, 4, 5, 6, 7, 890123, tzinfo=timezone.utc)


def numbers(message: type) -> dict[str, int]:
    return {f.name: f.number for f in message.DESCRIPTOR.fields}  # type: ignore[attr-defined]


def test_wire_names_and_field_numbers() -> None:
    """Every message and number from containerd's api/ (reference section 1 and 3)."""
    assert api.DESCRIPTOR.package == "containerd.services.sandbox.v1"
    assert types_pb2.DESCRIPTOR.package == "containerd.types"
    svc = api.DESCRIPTOR.services_by_name["Controller"]
    assert [m.name for m in svc.methods] == [
        "Create", "Start", "Platform", "Stop", "Wait", "Status", "Shutdown", "Metrics", "Update",
    ]  # fmt: skip
    assert numbers(api.ControllerCreateRequest) == {
        "sandbox_id": 1, "rootfs": 2, "options": 3, "netns_path": 4, "annotations": 5, "sandbox": 6, "sandboxer": 10,
    }  # fmt: skip
    assert numbers(api.ControllerStartResponse) == {
        "sandbox_id": 1, "pid": 2, "created_at": 3, "labels": 4, "address": 5, "version": 6, "spec": 7,
    }  # fmt: skip
    assert numbers(api.ControllerStopRequest) == {"sandbox_id": 1, "timeout_secs": 2, "sandboxer": 10}
    assert numbers(api.ControllerWaitResponse) == {"exit_status": 1, "exited_at": 2}
    assert numbers(api.ControllerStatusRequest) == {"sandbox_id": 1, "verbose": 2, "sandboxer": 10}
    assert numbers(api.ControllerStatusResponse) == {
        "sandbox_id": 1, "pid": 2, "state": 3, "info": 4, "created_at": 5, "exited_at": 6, "extra": 7,
        "address": 8, "version": 9,
    }  # fmt: skip
    assert numbers(api.ControllerUpdateRequest) == {"sandbox_id": 1, "sandboxer": 2, "sandbox": 3, "fields": 4}
    for req in (api.ControllerStartRequest, api.ControllerPlatformRequest, api.ControllerWaitRequest,
                api.ControllerShutdownRequest, api.ControllerMetricsRequest):  # fmt: skip
        assert numbers(req) == {"sandbox_id": 1, "sandboxer": 10}
    assert numbers(api.ControllerPlatformResponse) == {"platform": 1}
    assert numbers(api.ControllerMetricsResponse) == {"metrics": 1}
    assert numbers(types_pb2.Sandbox) == {
        "sandbox_id": 1, "runtime": 2, "spec": 3, "labels": 4, "created_at": 5, "updated_at": 6, "extensions": 7,
        "sandboxer": 10,
    }  # fmt: skip
    assert numbers(types_pb2.Sandbox.Runtime) == {"name": 1, "options": 2}
    assert numbers(mount_pb2.Mount) == {"type": 1, "source": 2, "target": 3, "options": 4}
    assert numbers(platform_pb2.Platform) == {
        "os": 1, "architecture": 2, "variant": 3, "os_version": 4, "os_features": 5,
    }  # fmt: skip
    assert numbers(metrics_pb2.Metric) == {"timestamp": 1, "id": 2, "data": 3}


def test_update_sandboxer_quirk_on_the_wire() -> None:
    raw = api.ControllerUpdateRequest(sandboxer="x").SerializeToString()
    assert raw == b"\x12\x01x"  # field 2, length-delimited
    raw = api.ControllerStartRequest(sandboxer="x").SerializeToString()
    assert raw == b"\x52\x01x"  # field 10


def test_timestamps() -> None:
    ts = convert.datetime_to_timestamp(T0)
    assert (ts.seconds, ts.nanos) == (int(T0.timestamp()), 890123000)
    assert convert.timestamp_to_datetime(ts) == T0
    naive = convert.datetime_to_timestamp(T0.replace(tzinfo=None))
    assert naive == ts  # naive is taken as UTC
    other_tz = T0.astimezone(timezone(timedelta(hours=2)))
    assert convert.datetime_to_timestamp(other_tz) == ts


def test_sandbox_round_trip() -> None:
    sb = SandboxMetadata(
        id="s",
        runtime=Runtime(name="io.containerd.vmsandbox.v1", options=AnyMessage("runtimeoptions.v1.Options", b"\x01")),
        spec=AnyMessage("types.containerd.io/opencontainers/runtime-spec/1/Spec", b"{}"),
        labels={"name": "n"},
        extensions={"metadata": AnyMessage("type.googleapis.com/x.Y", b"z")},
        sandboxer="vmsandbox",
        created_at=T0,
        updated_at=None,
    )
    msg = convert.sandbox_to_proto(sb)
    assert msg.HasField("created_at") and not msg.HasField("updated_at")
    assert convert.sandbox_from_proto(msg) == sb


def test_sandbox_unset_fields() -> None:
    msg = convert.sandbox_to_proto(SandboxMetadata(id="s"))
    assert not msg.HasField("runtime") and not msg.HasField("spec") and not msg.HasField("created_at")
    assert convert.sandbox_from_proto(msg) == SandboxMetadata(id="s")
    assert convert.sandbox_from_proto(types_pb2.Sandbox(), sandbox_id="fill") == SandboxMetadata(id="fill")


def test_any_type_url_kept_verbatim() -> None:
    for url in ("io.containerd.cgroups.v2.Metrics", "type.googleapis.com/io.containerd.cgroups.v2.Metrics"):
        a = convert.any_to_proto(AnyMessage(url, b"\x08\x01"))
        assert a.type_url == url
        assert convert.any_from_proto(a) == AnyMessage(url, b"\x08\x01")


def test_mount_round_trip() -> None:
    m = Mount(type="overlay", source="overlay", target="/rootfs", options=("lowerdir=/a", "upperdir=/b"))
    assert convert.mount_from_proto(convert.mount_to_proto(m)) == m


def test_platform_and_metric() -> None:
    p = Platform(os="linux", architecture="arm64", variant="v8", os_version="")
    assert convert.platform_from_proto(convert.platform_to_proto(p)) == p
    m = Metric(timestamp=T0, id="s", data=AnyMessage("io.containerd.cgroups.v2.Metrics", b""))
    assert convert.metric_from_proto(convert.metric_to_proto(m)) == m


def test_create_request_conversion() -> None:
    req = api.ControllerCreateRequest(
        sandbox_id="s",
        sandboxer="fromreq",
        rootfs=[mount_pb2.Mount(type="bind", source="/x", options=["rbind"])],
        options=any_pb2.Any(type_url="runtime.v1.PodSandboxConfig", value=b""),
        annotations={"k": "v"},
        netns_path="/run/netns/n",
        sandbox=types_pb2.Sandbox(sandbox_id="s", sandboxer="fromsb"),
    )
    sb, opts = convert.create_from_request(req)
    assert sb.sandboxer == "fromsb"
    assert opts.rootfs == (Mount(type="bind", source="/x", options=("rbind",)),)
    assert opts.options == AnyMessage("runtime.v1.PodSandboxConfig", b"")  # set-but-empty Any is kept
    assert opts.annotations == {"k": "v"} and opts.netns_path == "/run/netns/n"
    with pytest.raises(InvalidArgument):
        convert.create_from_request(api.ControllerCreateRequest(sandbox_id="s", sandbox=types_pb2.Sandbox(sandbox_id="t")))


def test_stop_timeout() -> None:
    assert convert.stop_timeout(api.ControllerStopRequest(sandbox_id="s")) is None
    assert convert.stop_timeout(api.ControllerStopRequest(sandbox_id="s", timeout_secs=5)) == 5.0


def test_responses() -> None:
    inst = ControllerInstance(sandbox_id="s", pid=9, created_at=T0, address="ttrpc+unix:///a", version=3, labels={"a": "b"})
    r = convert.start_response(inst)
    assert (r.sandbox_id, r.pid, r.address, r.version, dict(r.labels)) == ("s", 9, "ttrpc+unix:///a", 3, {"a": "b"})
    assert convert.timestamp_to_datetime(r.created_at) == T0

    w = convert.wait_response(ExitStatus(exit_status=255, exited_at=T0))
    assert w.exit_status == 255 and convert.timestamp_to_datetime(w.exited_at) == T0

    st = convert.status_response(ControllerStatus(sandbox_id="s", pid=0, state="SANDBOX_NOTREADY"))
    assert st.HasField("created_at") and convert.timestamp_to_datetime(st.created_at) == EPOCH
    assert not st.HasField("exited_at") and not st.HasField("extra")
