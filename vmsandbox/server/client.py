"""A client of a running `vmsandbox serve`: the CLI's controller when serve owns the state dir.

:class:`RemoteController` speaks to the admin socket (``<state_dir>/admin.sock``): the
Controller service for status, platform, metrics, stop, wait and shutdown, and the admin
service for list, exec and console logs. gRPC status codes come back as the
:mod:`vmsandbox.errors` classes they were made from.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import grpc

from .. import errors
from ..model import ControllerStatus, ExecResult, ExitStatus, Metric, Platform, SandboxSummary
from ..proto.containerd.services.sandbox.v1 import sandbox_pb2 as api
from ..proto.containerd.services.sandbox.v1 import sandbox_pb2_grpc as api_grpc
from ..proto.vmsandbox.admin.v1 import admin_pb2 as pb
from ..proto.vmsandbox.admin.v1 import admin_pb2_grpc as pb_grpc
from . import convert
from .admin import MAX_MESSAGE_BYTES
from .status import ERROR_CODES

__all__ = ["RemoteController", "error_from_rpc"]

SANDBOXER = "vmsandbox"
_FROM_CODE = {code: cls for cls, code in ERROR_CODES.items()}
_T = TypeVar("_T")


def error_from_rpc(err: grpc.RpcError, *, what: str, address: str) -> errors.VmSandboxError:
    """The :mod:`vmsandbox.errors` class for a failed call (the inverse of the server's table)."""
    code = err.code() if isinstance(err, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (err.details() if isinstance(err, grpc.Call) else "") or str(code)
    if code is grpc.StatusCode.UNAVAILABLE and "connect" in details.lower():
        return errors.Unavailable(f"vmsandbox serve does not answer on {address}: {details}")
    cls = _FROM_CODE.get(code, errors.Internal)
    return cls(f"{details}" if cls is not errors.Internal else f"{what}: {details}")


class RemoteController:
    """The subset of :class:`~vmsandbox.LibvirtController` the CLI uses, over gRPC."""

    def __init__(self, admin_socket: str) -> None:
        self.address = admin_socket
        opts = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
        self._channel = grpc.insecure_channel(f"unix:{admin_socket}", options=opts)
        self._ctl = api_grpc.ControllerStub(self._channel)  # type: ignore[no-untyped-call]
        self._admin = pb_grpc.AdminStub(self._channel)  # type: ignore[no-untyped-call]

    def __enter__(self) -> RemoteController:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, what: str, fn: Callable[[], _T]) -> _T:
        try:
            return fn()
        except grpc.RpcError as e:
            raise error_from_rpc(e, what=what, address=self.address) from e

    def ping(self, timeout: float = 5.0) -> None:
        """Raise Unavailable unless the server answers within ``timeout`` seconds."""
        self._call("list", lambda: self._admin.List(pb.ListRequest(), timeout=timeout, wait_for_ready=False))

    # --- Controller service ------------------------------------------------------------------
    def status(self, sandbox_id: str, *, verbose: bool = False) -> ControllerStatus:
        req = api.ControllerStatusRequest(sandbox_id=sandbox_id, verbose=verbose, sandboxer=SANDBOXER)
        return self._call("status", lambda: convert.status_from_response(self._ctl.Status(req, timeout=60)))

    def platform(self, sandbox_id: str) -> Platform:
        req = api.ControllerPlatformRequest(sandbox_id=sandbox_id, sandboxer=SANDBOXER)
        return self._call("platform", lambda: convert.platform_from_proto(self._ctl.Platform(req, timeout=60).platform))

    def metrics(self, sandbox_id: str) -> Metric:
        req = api.ControllerMetricsRequest(sandbox_id=sandbox_id, sandboxer=SANDBOXER)
        return self._call("metrics", lambda: convert.metric_from_proto(self._ctl.Metrics(req, timeout=60).metrics))

    def stop(self, sandbox_id: str, *, timeout: float | None = None) -> None:
        if timeout is not None and timeout < 0:
            raise errors.InvalidArgument("stop timeout must not be negative")
        if timeout == 0:
            # The wire's timeout_secs=0 means "the server's default": force with the least it can say.
            timeout = 1
        secs = 0 if timeout is None else max(1, round(timeout))
        req = api.ControllerStopRequest(sandbox_id=sandbox_id, timeout_secs=secs, sandboxer=SANDBOXER)
        self._call("stop", lambda: self._ctl.Stop(req, timeout=secs + 120))

    def wait(self, sandbox_id: str, *, timeout: float | None = None) -> ExitStatus:
        req = api.ControllerWaitRequest(sandbox_id=sandbox_id, sandboxer=SANDBOXER)
        return self._call("wait", lambda: convert.wait_from_response(self._ctl.Wait(req, timeout=timeout)))

    def shutdown(self, sandbox_id: str) -> None:
        req = api.ControllerShutdownRequest(sandbox_id=sandbox_id, sandboxer=SANDBOXER)
        self._call("shutdown", lambda: self._ctl.Shutdown(req, timeout=180))

    # --- admin service -----------------------------------------------------------------------
    def list(self) -> list[SandboxSummary]:
        resp = self._call("list", lambda: self._admin.List(pb.ListRequest(), timeout=60))
        return [convert.summary_from_proto(s) for s in resp.sandboxes]

    def exec(
        self,
        sandbox_id: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | None = None,
        timeout: float | None = None,
    ) -> ExecResult:
        if isinstance(argv, str):
            raise errors.InvalidArgument("argv must be a sequence of strings, not one string")
        req = pb.ExecRequest(sandbox_id=sandbox_id, argv=list(argv), env=dict(env or {}), cwd=cwd or "",
                             stdin=stdin or b"", has_stdin=stdin is not None, timeout_seconds=timeout or 0.0)
        # The guest bounds the command by `timeout`; the call gets a little longer on top.
        resp = self._call("exec", lambda: self._admin.Exec(req, timeout=None if timeout is None else timeout + 30))
        return ExecResult(exit_code=resp.exit_code, stdout=resp.stdout, stderr=resp.stderr)

    def read_console_log(self, sandbox_id: str, max_bytes: int = 0) -> bytes:
        req = pb.ConsoleLogRequest(sandbox_id=sandbox_id, max_bytes=max_bytes)
        return bytes(self._call("logs", lambda: self._admin.ConsoleLog(req, timeout=60).data))
