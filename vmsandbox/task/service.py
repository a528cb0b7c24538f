"""containerd.task.v3.Task on a ttrpc server: every rpc registered, none implemented yet.

The skeleton of the task API a sandbox serves to containerd (issue 11). Each rpc is one
method here with its request and response message types; all of them answer UNIMPLEMENTED
for now. The real handlers replace them one by one.
"""

from __future__ import annotations

from collections.abc import Callable

from google.protobuf import empty_pb2
from google.protobuf.message import Message

from ..errors import Unimplemented
from ..proto.containerd.task.v3 import shim_pb2 as pb
from ..ttrpc import RequestContext, Server

__all__ = ["SERVICE_NAME", "RPCS", "TaskService"]

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


class TaskService:
    """The task API of one sandbox. :meth:`register` puts every rpc of :data:`RPCS` on a server."""

    def register(self, server: Server) -> None:
        for name, request_type, response_type in RPCS:
            server.register(SERVICE_NAME, name, request_type, response_type, self._unimplemented(name))

    @staticmethod
    def _unimplemented(name: str) -> Callable[[Message, RequestContext], Message]:
        def handler(request: Message, ctx: RequestContext) -> Message:
            raise Unimplemented(f"{SERVICE_NAME}/{name} is not implemented yet")
        return handler
