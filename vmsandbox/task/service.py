"""containerd.task.v3.Task on a ttrpc server: each rpc is proto <-> :class:`TaskEngine`.

Every request names the container by ``id`` (and an exec by ``exec_id``). Errors are
vmsandbox.errors classes; the ttrpc server turns them into google.rpc.Status codes
(NotFound for an unknown id or a finished process on Kill, as containerd expects). Pause,
Resume, Checkpoint answer Unimplemented.

Stats answers an ``io.containerd.cgroups.v2.Metrics`` Any read from the container's cgroup in
the guest (also after its exit, until Delete: CRI's OOMKilled check); Update takes a
runtime-spec ``LinuxResources`` JSON Any and applies it with ``crun update``. Create records
the request's containerd namespace (ttrpc metadata), in which the engine publishes the
container's ``/tasks/*`` events.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

from google.protobuf import any_pb2, empty_pb2
from google.protobuf.message import Message

from ..errors import InvalidArgument, Unimplemented
from ..model import AnyMessage, Mount, PtySize
from ..payloads import cgroupsv2
from ..payloads.linux_resources import parse_linux_resources
from ..proto.containerd.task.v3 import shim_pb2 as pb
from ..proto.containerd.types.task import task_pb2 as task_types
from ..ttrpc import RequestContext, Server
from .engine import TaskEngine
from .events import namespace_of, timestamp
from .process import IoSpec

__all__ = ["SERVICE_NAME", "RPCS", "TaskService", "UNIMPLEMENTED"]

SERVICE_NAME = "containerd.task.v3.Task"

#: Every rpc of the service: name, request type, response type (the order of shim.proto).
RPCS: tuple[tuple[str, type[Message], type[Message]], ...] = (
    ("State", pb.StateRequest, pb.StateResponse),
    ("Create", pb.CreateTaskRequest, pb.CreateTaskResponse),
    ("Start", pb.StartRequest, pb.StartResponse),
    ("Delete", pb.DeleteRequest, pb.DeleteResponse),
    ("Pids", pb.PidsRequest, pb.PidsResponse),
    ("Pause", pb.PauseRequest, empty_pb2.Empty),
    ("Resume", pb.ResumeRequest, empty_pb2.Empty),
    ("Checkpoint", pb.CheckpointTaskRequest, empty_pb2.Empty),
    ("Kill", pb.KillRequest, empty_pb2.Empty),
    ("Exec", pb.ExecProcessRequest, empty_pb2.Empty),
    ("ResizePty", pb.ResizePtyRequest, empty_pb2.Empty),
    ("CloseIO", pb.CloseIORequest, empty_pb2.Empty),
    ("Update", pb.UpdateTaskRequest, empty_pb2.Empty),
    ("Wait", pb.WaitRequest, pb.WaitResponse),
    ("Stats", pb.StatsRequest, pb.StatsResponse),
    ("Connect", pb.ConnectRequest, pb.ConnectResponse),
    ("Shutdown", pb.ShutdownRequest, empty_pb2.Empty),
)
UNIMPLEMENTED = frozenset({"Pause", "Resume", "Checkpoint"})
VERSION = "vmsandbox-task-v3"


class TaskService:
    """The task API of one sandbox. :meth:`register` puts every rpc of :data:`RPCS` on a server."""

    def __init__(self, engine: TaskEngine | None = None) -> None:
        self.engine = engine

    def register(self, server: Server) -> None:
        for name, request_type, response_type in RPCS:
            handler = getattr(self, name, None) if self.engine is not None and name not in UNIMPLEMENTED else None
            server.register(SERVICE_NAME, name, request_type, response_type, handler or self._unimplemented(name))

    @staticmethod
    def _unimplemented(name: str) -> Callable[[Message, RequestContext], Message]:
        def handler(request: Message, ctx: RequestContext) -> Message:
            raise Unimplemented(f"{SERVICE_NAME}/{name} is not implemented yet")
        return handler

    @property
    def _e(self) -> TaskEngine:
        assert self.engine is not None
        return self.engine

    # ------------------------------------------------------------------ rpcs
    def Create(self, r: pb.CreateTaskRequest, ctx: RequestContext) -> pb.CreateTaskResponse:
        rootfs = tuple(Mount(m.type, m.source, m.target, tuple(m.options)) for m in r.rootfs)
        pid = self._e.create(r.id, bundle=r.bundle, rootfs=rootfs, checkpoint=r.checkpoint,
                             io=IoSpec(r.stdin, r.stdout, r.stderr, r.terminal), namespace=namespace_of(ctx.metadata))
        return pb.CreateTaskResponse(pid=pid)

    def Start(self, r: pb.StartRequest, ctx: RequestContext) -> pb.StartResponse:
        return pb.StartResponse(pid=self._e.start(r.id, r.exec_id))

    def State(self, r: pb.StateRequest, ctx: RequestContext) -> pb.StateResponse:
        s = self._e.state(r.id, r.exec_id)
        return pb.StateResponse(id=s.id, exec_id=s.exec_id, bundle=s.bundle, pid=s.pid,
                                status=s.status.name, stdin=s.io.stdin,
                                stdout=s.io.stdout, stderr=s.io.stderr, terminal=s.io.terminal,
                                exit_status=s.exit_status, exited_at=timestamp(s.exited_at))

    def Wait(self, r: pb.WaitRequest, ctx: RequestContext) -> pb.WaitResponse:
        ex = self._e.wait(r.id, r.exec_id, abandon=ctx.done)
        if ex is None:
            ctx.check()
            raise Unimplemented("unreachable: Wait abandoned without a reason")
        return pb.WaitResponse(exit_status=ex.exit_status, exited_at=timestamp(ex.exited_at))

    def Kill(self, r: pb.KillRequest, ctx: RequestContext) -> empty_pb2.Empty:
        self._e.kill(r.id, r.exec_id, signal=r.signal, all=r.all)
        return empty_pb2.Empty()

    def Delete(self, r: pb.DeleteRequest, ctx: RequestContext) -> pb.DeleteResponse:
        ex = self._e.delete(r.id, r.exec_id)
        return pb.DeleteResponse(pid=ex.pid, exit_status=ex.exit_status, exited_at=timestamp(ex.exited_at))

    def Exec(self, r: pb.ExecProcessRequest, ctx: RequestContext) -> empty_pb2.Empty:
        try:
            process = json.loads(r.spec.value)
        except (ValueError, UnicodeDecodeError) as e:
            raise InvalidArgument(f"the exec spec ({r.spec.type_url}) is not JSON: {e}") from e
        if not isinstance(process, dict):
            raise InvalidArgument("the exec spec must be a runtime-spec Process object")
        self._e.exec(r.id, r.exec_id, io=IoSpec(r.stdin, r.stdout, r.stderr, r.terminal), process=process)
        return empty_pb2.Empty()

    def ResizePty(self, r: pb.ResizePtyRequest, ctx: RequestContext) -> empty_pb2.Empty:
        self._e.resize(r.id, r.exec_id, PtySize(r.width, r.height))
        return empty_pb2.Empty()

    def CloseIO(self, r: pb.CloseIORequest, ctx: RequestContext) -> empty_pb2.Empty:
        self._e.close_io(r.id, r.exec_id, stdin=r.stdin)
        return empty_pb2.Empty()

    def Pids(self, r: pb.PidsRequest, ctx: RequestContext) -> pb.PidsResponse:
        return pb.PidsResponse(processes=[task_types.ProcessInfo(pid=p) for p in self._e.pids(r.id)])

    def Update(self, r: pb.UpdateTaskRequest, ctx: RequestContext) -> empty_pb2.Empty:
        self._e.update(r.id, parse_linux_resources(AnyMessage(r.resources.type_url, r.resources.value)))
        return empty_pb2.Empty()

    def Stats(self, r: pb.StatsRequest, ctx: RequestContext) -> pb.StatsResponse:
        a = cgroupsv2.to_any(self._e.stats(r.id))
        return pb.StatsResponse(stats=any_pb2.Any(type_url=a.type_url, value=a.value))

    def Connect(self, r: pb.ConnectRequest, ctx: RequestContext) -> pb.ConnectResponse:
        return pb.ConnectResponse(shim_pid=os.getpid(), task_pid=self._e.connect(r.id), version=VERSION)

    def Shutdown(self, r: pb.ShutdownRequest, ctx: RequestContext) -> empty_pb2.Empty:
        self._e.shutdown()
        return empty_pb2.Empty()
