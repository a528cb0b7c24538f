"""vmsandbox's admin service (``vmsandbox.admin.v1.Admin``): list, exec and console logs.

Served by ``vmsandbox serve`` on a root-only socket in its state dir, together with a second
instance of the Controller service, so the CLI on a node goes through the process that owns
the state dir (and holds each guest's only agent connection) instead of racing it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any as _Any
from typing import Protocol, TypeVar

import grpc

from ..errors import InvalidArgument
from ..model import ExecResult, SandboxSummary
from ..proto.vmsandbox.admin.v1 import admin_pb2 as pb
from . import convert
from .service import _unary
from .status import to_status

__all__ = ["ADMIN_SERVICE_NAME", "MAX_MESSAGE_BYTES", "AdminTarget", "AdminServicer"]

log = logging.getLogger(__name__)

ADMIN_SERVICE_NAME = "vmsandbox.admin.v1.Admin"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""Exec output and console logs travel whole; both ends allow messages up to this size."""

_R = TypeVar("_R")


class AdminTarget(Protocol):
    """What the admin service needs beyond the Controller contract."""

    def list(self) -> list[SandboxSummary]: ...

    def exec(
        self,
        sandbox_id: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | None = None,
        timeout: float | None = None,
    ) -> ExecResult: ...

    def read_console_log(self, sandbox_id: str, max_bytes: int = 0) -> bytes: ...


class AdminServicer:
    """Serves one controller's list/exec/console log to the vmsandbox CLI."""

    def __init__(self, target: AdminTarget) -> None:
        self._target = target

    def _serve(self, rpc: str, sandbox_id: str, context: grpc.ServicerContext, fn: Callable[[], _R]) -> _R:
        try:
            return fn()
        except Exception as e:
            code, details = to_status(e, rpc=f"admin {rpc}", sandbox_id=sandbox_id)
            context.abort(code, details)
        raise AssertionError("unreachable: context.abort returned")

    def List(self, request: pb.ListRequest, context: grpc.ServicerContext) -> pb.ListResponse:
        return self._serve("List", "-", context, lambda: pb.ListResponse(
            sandboxes=[convert.summary_to_proto(s) for s in self._target.list()]))

    def Exec(self, request: pb.ExecRequest, context: grpc.ServicerContext) -> pb.ExecResponse:
        def run() -> pb.ExecResponse:
            if not request.argv:
                raise InvalidArgument("exec needs a command")
            res = self._target.exec(
                request.sandbox_id, list(request.argv), env=dict(request.env), cwd=request.cwd or None,
                stdin=request.stdin if request.has_stdin else None,
                timeout=request.timeout_seconds if request.timeout_seconds > 0 else None,
            )
            return pb.ExecResponse(exit_code=res.exit_code, stdout=res.stdout, stderr=res.stderr)

        return self._serve("Exec", request.sandbox_id, context, run)

    def ConsoleLog(self, request: pb.ConsoleLogRequest, context: grpc.ServicerContext) -> pb.ConsoleLogResponse:
        def run() -> pb.ConsoleLogResponse:
            cap = MAX_MESSAGE_BYTES - 1024
            want = min(request.max_bytes, cap) if request.max_bytes else cap
            return pb.ConsoleLogResponse(data=self._target.read_console_log(request.sandbox_id, want))

        return self._serve("ConsoleLog", request.sandbox_id, context, run)

    def method_handlers(self) -> dict[str, grpc.RpcMethodHandler[_Any, _Any]]:
        return {
            "List": _unary(self.List, pb.ListRequest, pb.ListResponse),
            "Exec": _unary(self.Exec, pb.ExecRequest, pb.ExecResponse),
            "ConsoleLog": _unary(self.ConsoleLog, pb.ConsoleLogRequest, pb.ConsoleLogResponse),
        }

    def add_to_server(self, server: grpc.Server) -> None:
        handlers = self.method_handlers()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(ADMIN_SERVICE_NAME, handlers),))
        server.add_registered_method_handlers(ADMIN_SERVICE_NAME, handlers)
