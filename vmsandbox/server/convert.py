"""Conversion between containerd's protobuf messages and :mod:`vmsandbox.model` values.

The only module of the server that knows both shapes. Rules: an unset Timestamp is None in
the model and None is written as an unset field; Any values keep their type URL exactly as
received or produced (containerd's bare form or ``type.googleapis.com/...``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime, timezone

from google.protobuf import any_pb2, timestamp_pb2
from google.protobuf.message import Message

from ..errors import InvalidArgument
from ..model import (
    AnyMessage,
    ControllerInstance,
    CreateOptions,
    ControllerStatus,
    ExitStatus,
    Metric,
    Mount,
    Phase,
    Platform,
    Runtime,
    SandboxMetadata,
    SandboxState,
    SandboxSummary,
)
from ..proto.containerd.services.sandbox.v1 import sandbox_pb2 as api
from ..proto.vmsandbox.admin.v1 import admin_pb2
from ..proto.containerd.types import metrics_pb2, mount_pb2, platform_pb2
from ..proto.containerd.types import sandbox_pb2 as types_sandbox_pb2

__all__ = [
    "summary_to_proto",
    "summary_from_proto",
    "status_from_response",
    "wait_from_response",
    "timestamp_to_datetime",
    "datetime_to_timestamp",
    "any_from_proto",
    "any_to_proto",
    "mount_from_proto",
    "mount_to_proto",
    "sandbox_from_proto",
    "sandbox_to_proto",
    "platform_to_proto",
    "platform_from_proto",
    "metric_to_proto",
    "metric_from_proto",
    "create_from_request",
    "update_from_request",
    "stop_timeout",
    "start_response",
    "wait_response",
    "status_response",
]


# --- well-known types -------------------------------------------------------------------------


def timestamp_to_datetime(ts: timestamp_pb2.Timestamp) -> datetime:
    """A Timestamp as an aware UTC datetime."""
    return ts.ToDatetime(tzinfo=timezone.utc)


def datetime_to_timestamp(dt: datetime) -> timestamp_pb2.Timestamp:
    """An aware datetime (a naive one is taken as UTC) as a Timestamp."""
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(dt)
    return ts


def _opt_time(holder: Message, name: str) -> datetime | None:
    """The Timestamp field ``name`` of message ``holder`` as a datetime, None when unset."""
    if not holder.HasField(name):
        return None
    ts = getattr(holder, name)
    assert isinstance(ts, timestamp_pb2.Timestamp)
    return timestamp_to_datetime(ts)


def _set_time(ts: timestamp_pb2.Timestamp, dt: datetime | None) -> None:
    """Fill the sub-message ``ts`` from ``dt``; None leaves the field unset."""
    if dt is not None:
        ts.CopyFrom(datetime_to_timestamp(dt))


def any_from_proto(a: any_pb2.Any) -> AnyMessage:
    return AnyMessage(type_url=a.type_url, value=a.value)


def any_to_proto(a: AnyMessage) -> any_pb2.Any:
    return any_pb2.Any(type_url=a.type_url, value=a.value)


def _opt_any(holder: Message, name: str) -> AnyMessage | None:
    """The Any field ``name`` of message ``holder``, None when unset."""
    if not holder.HasField(name):
        return None
    a = getattr(holder, name)
    assert isinstance(a, any_pb2.Any)
    return any_from_proto(a)


def _set_any(target: any_pb2.Any, a: AnyMessage | None) -> None:
    if a is not None:
        target.CopyFrom(any_to_proto(a))


# --- containerd.types -------------------------------------------------------------------------


def mount_from_proto(m: mount_pb2.Mount) -> Mount:
    return Mount(type=m.type, source=m.source, target=m.target, options=tuple(m.options))


def mount_to_proto(m: Mount) -> mount_pb2.Mount:
    return mount_pb2.Mount(type=m.type, source=m.source, target=m.target, options=list(m.options))


def sandbox_from_proto(sb: types_sandbox_pb2.Sandbox, *, sandbox_id: str | None = None) -> SandboxMetadata:
    """A ``containerd.types.Sandbox`` as a model SandboxMetadata; ``sandbox_id`` fills an empty id."""
    runtime = Runtime(name=sb.runtime.name, options=_opt_any(sb.runtime, "options"))
    return SandboxMetadata(
        id=sb.sandbox_id or (sandbox_id or ""),
        runtime=runtime,
        spec=_opt_any(sb, "spec"),
        labels=dict(sb.labels),
        extensions={k: any_from_proto(v) for k, v in sb.extensions.items()},
        sandboxer=sb.sandboxer,
        created_at=_opt_time(sb, "created_at"),
        updated_at=_opt_time(sb, "updated_at"),
    )


def sandbox_to_proto(sb: SandboxMetadata) -> types_sandbox_pb2.Sandbox:
    msg = types_sandbox_pb2.Sandbox(sandbox_id=sb.id, labels=sb.labels, sandboxer=sb.sandboxer)
    msg.runtime.name = sb.runtime.name
    _set_any(msg.runtime.options, sb.runtime.options)
    if not sb.runtime.name and sb.runtime.options is None:
        msg.ClearField("runtime")
    _set_any(msg.spec, sb.spec)
    for k, v in sb.extensions.items():
        msg.extensions[k].CopyFrom(any_to_proto(v))
    _set_time(msg.created_at, sb.created_at)
    _set_time(msg.updated_at, sb.updated_at)
    return msg


def platform_to_proto(p: Platform) -> platform_pb2.Platform:
    return platform_pb2.Platform(
        os=p.os, architecture=p.architecture, variant=p.variant, os_version=p.os_version
    )


def platform_from_proto(p: platform_pb2.Platform) -> Platform:
    return Platform(os=p.os, architecture=p.architecture, variant=p.variant, os_version=p.os_version)


def metric_to_proto(m: Metric) -> metrics_pb2.Metric:
    msg = metrics_pb2.Metric(id=m.id, data=any_to_proto(m.data))
    _set_time(msg.timestamp, m.timestamp)
    return msg


def metric_from_proto(m: metrics_pb2.Metric) -> Metric:
    ts = _opt_time(m, "timestamp")
    return Metric(
        timestamp=ts if ts is not None else datetime(1970, 1, 1, tzinfo=timezone.utc),
        id=m.id,
        data=any_from_proto(m.data),
    )


# --- Controller requests ----------------------------------------------------------------------


def _request_sandbox(sandbox_id: str, has_sandbox: bool, sb: types_sandbox_pb2.Sandbox) -> SandboxMetadata:
    if not has_sandbox:
        return SandboxMetadata(id=sandbox_id)
    if sb.sandbox_id and sb.sandbox_id != sandbox_id:
        raise InvalidArgument(
            f"request sandbox_id {sandbox_id!r} differs from sandbox.sandbox_id {sb.sandbox_id!r}",
            sandbox_id=sandbox_id,
        )
    return sandbox_from_proto(sb, sandbox_id=sandbox_id)


def create_from_request(req: api.ControllerCreateRequest) -> tuple[SandboxMetadata, CreateOptions]:
    """The sandbox and options of a Create request.

    The request's ``sandbox_id`` is authoritative; a ``sandbox`` naming another id is
    InvalidArgument. An absent ``sandbox`` gives a bare SandboxMetadata; its empty ``sandboxer`` is
    taken from the request. ``options`` stays an opaque Any (CRI's PodSandboxConfig).
    """
    sb = _request_sandbox(req.sandbox_id, req.HasField("sandbox"), req.sandbox)
    if not sb.sandboxer and req.sandboxer:
        sb = replace(sb, sandboxer=req.sandboxer)
    opts = CreateOptions(
        rootfs=tuple(mount_from_proto(m) for m in req.rootfs),
        options=_opt_any(req, "options"),
        netns_path=req.netns_path,
        annotations=dict(req.annotations),
    )
    return sb, opts


def update_from_request(req: api.ControllerUpdateRequest) -> tuple[SandboxMetadata, tuple[str, ...]]:
    """The sandbox and field names of an Update request (same id rule as Create)."""
    sb = _request_sandbox(req.sandbox_id, req.HasField("sandbox"), req.sandbox)
    return sb, tuple(req.fields)


def stop_timeout(req: api.ControllerStopRequest) -> float | None:
    """Stop's grace period: ``timeout_secs=0`` (what CRI sends) means the controller default."""
    return float(req.timeout_secs) if req.timeout_secs > 0 else None


# --- Controller responses ---------------------------------------------------------------------


def _str_map(m: Mapping[str, str]) -> dict[str, str]:
    return {str(k): str(v) for k, v in m.items()}


def start_response(inst: ControllerInstance) -> api.ControllerStartResponse:
    """``ControllerStartResponse`` from ``start``'s result (no spec: we produce none)."""
    msg = api.ControllerStartResponse(
        sandbox_id=inst.sandbox_id,
        pid=inst.pid,
        labels=_str_map(inst.labels),
        address=inst.address,
        version=inst.version,
    )
    _set_time(msg.created_at, inst.created_at)
    return msg


def wait_response(st: ExitStatus) -> api.ControllerWaitResponse:
    msg = api.ControllerWaitResponse(exit_status=st.exit_status)
    _set_time(msg.exited_at, st.exited_at)
    return msg


def status_response(st: ControllerStatus) -> api.ControllerStatusResponse:
    msg = api.ControllerStatusResponse(
        sandbox_id=st.sandbox_id,
        pid=st.pid,
        state=st.state,
        info=_str_map(st.info),
        address=st.address,
        version=st.version,
    )
    _set_time(msg.created_at, st.created_at)
    _set_time(msg.exited_at, st.exited_at)
    _set_any(msg.extra, st.extra)
    return msg


# --- vmsandbox.admin.v1 -----------------------------------------------------------------------


def summary_to_proto(s: SandboxSummary) -> admin_pb2.SandboxSummary:
    msg = admin_pb2.SandboxSummary(id=s.id, phase=s.phase.value, state=s.state.value, pid=s.pid)
    _set_time(msg.created_at, s.created_at)
    _set_time(msg.exited_at, s.exited_at)
    return msg


def summary_from_proto(m: admin_pb2.SandboxSummary) -> SandboxSummary:
    return SandboxSummary(
        id=m.id, phase=Phase(m.phase), state=SandboxState(m.state), pid=m.pid,
        created_at=timestamp_to_datetime(m.created_at), exited_at=_opt_time(m, "exited_at"),
    )


# --- client side: what a Controller caller gets back ----------------------------------------


def status_from_response(resp: api.ControllerStatusResponse) -> ControllerStatus:
    return ControllerStatus(
        sandbox_id=resp.sandbox_id, pid=resp.pid, state=resp.state, info=_str_map(resp.info),
        created_at=timestamp_to_datetime(resp.created_at), exited_at=_opt_time(resp, "exited_at"),
        extra=_opt_any(resp, "extra"), address=resp.address, version=resp.version,
    )


def wait_from_response(resp: api.ControllerWaitResponse) -> ExitStatus:
    return ExitStatus(exit_status=resp.exit_status, exited_at=timestamp_to_datetime(resp.exited_at))
