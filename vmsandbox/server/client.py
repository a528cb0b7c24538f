"""A client of a running `vmsandbox serve`: the CLI's controller when serve owns the state dir.

:class:`RemoteController` speaks to the admin socket (``<state_dir>/admin.sock``): the
Controller service for status, platform, metrics, stop, wait and shutdown, and the admin
service for list, exec, spawn, share paths and console logs. gRPC status codes come back as
the :mod:`vmsandbox.errors` classes they were made from.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TypeVar
from typing import Any as _Any

import grpc

from .. import errors
from .._sinks import Sinks
from ..model import (ControllerStatus, ExecResult, ExitStatus, ImageConfig, Metric, Platform, PtySize,
                     SandboxSummary, signal_name)
from ..proto.containerd.services.sandbox.v1 import sandbox_pb2 as api
from ..proto.containerd.services.sandbox.v1 import sandbox_pb2_grpc as api_grpc
from ..proto.vmsandbox.admin.v1 import admin_pb2 as pb
from ..proto.vmsandbox.admin.v1 import admin_pb2_grpc as pb_grpc
from . import convert
from .admin import MAX_MESSAGE_BYTES, OutputSink
from .status import ERROR_CODES

__all__ = ["RemoteController", "RemoteProcess", "error_from_rpc"]

log = logging.getLogger(__name__)
SANDBOXER = "vmsandbox"
_FROM_CODE = {code: cls for cls, code in ERROR_CODES.items()}
_T = TypeVar("_T")
_INPUT_CHUNKS = 16
"""Input messages waiting for the call's flow control; past that write_stdin blocks."""


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
        user: str | None = None,
        in_guest_root: bool = False,
    ) -> ExecResult:
        if isinstance(argv, str):
            raise errors.InvalidArgument("argv must be a sequence of strings, not one string")
        req = pb.ExecRequest(sandbox_id=sandbox_id, argv=list(argv), env=dict(env or {}), cwd=cwd or "",
                             stdin=stdin or b"", has_stdin=stdin is not None, timeout_seconds=timeout or 0.0,
                             user=user or "", in_guest_root=in_guest_root)
        # The guest bounds the command by `timeout`; the call gets a little longer on top.
        resp = self._call("exec", lambda: self._admin.Exec(req, timeout=None if timeout is None else timeout + 30))
        return ExecResult(exit_code=resp.exit_code, stdout=resp.stdout, stderr=resp.stderr)

    def read_console_log(self, sandbox_id: str, max_bytes: int = 0) -> bytes:
        req = pb.ConsoleLogRequest(sandbox_id=sandbox_id, max_bytes=max_bytes)
        return bytes(self._call("logs", lambda: self._admin.ConsoleLog(req, timeout=60).data))

    def spawn(self, sandbox_id: str, argv: Sequence[str], *, stdout: OutputSink, stderr: OutputSink,
              env: Mapping[str, str] | None = None, cwd: str | None = None, user: str | None = None,
              tty: bool = False, size: PtySize | None = None, in_guest_root: bool = False) -> RemoteProcess:
        """As the local controller's ``spawn``, over the admin Spawn call: returns once the
        process runs (or raises its error); the call lives as long as the process."""
        if isinstance(argv, str):
            raise errors.InvalidArgument("argv must be a sequence of strings, not one string")
        start = pb.SpawnStart(sandbox_id=sandbox_id, argv=list(argv), env=dict(env or {}), cwd=cwd or "",
                              user=user or "", tty=tty, in_guest_root=in_guest_root)
        if size is not None:
            start.size.CopyFrom(pb.TerminalSize(width=size.width, height=size.height))
        return RemoteProcess(self._admin.Spawn, start, stdout=stdout, stderr=stderr, address=self.address)

    def share_path(self, sandbox_id: str) -> Path:
        """The host folder of the sandbox's share, as serve (on this host) has it."""
        req = pb.SharePathRequest(sandbox_id=sandbox_id)
        return Path(self._call("share path", lambda: self._admin.SharePath(req, timeout=60).path))

    def image_config(self, sandbox_id: str) -> ImageConfig | None:
        """None: serve's sandboxes are containerd's pods, made from no image of ours."""
        return None


class RemoteProcess:
    """The :class:`~vmsandbox.sandbox.ports.GuestProcess` port over one admin Spawn call.

    A reader thread hands the output to the sinks as it arrives (and ``b""`` to both at the
    end); while a sink blocks nothing more is read, and the server and the guest wait too.
    """

    def __init__(self, spawn: Callable[..., _Any], start: pb.SpawnStart, *, stdout: OutputSink,
                 stderr: OutputSink, address: str) -> None:
        self._what, self.sandbox_id, self._tty = list(start.argv), start.sandbox_id, start.tty
        self._address = address
        self._sinks = Sinks(stdout, stderr, sandbox_id=start.sandbox_id, what=" ".join(start.argv))
        self._inputs: queue.Queue[pb.SpawnInput | None] = queue.Queue(_INPUT_CHUNKS)
        self._inputs.put(pb.SpawnInput(start=start))
        self._lock = threading.Lock()
        self._stdin_closed = False
        self._aborted = False
        self._status: int | None = None
        self._error: errors.VmSandboxError | None = None
        self._done = threading.Event()
        self._call = spawn(self._requests())
        try:
            first = next(self._call)
        except grpc.RpcError as e:
            self._inputs.put(None)
            raise error_from_rpc(e, what="spawn", address=address) from e
        if first.WhichOneof("output") != "started":
            self._call.cancel()
            raise errors.Internal(f"spawn: the server answered {first.WhichOneof('output')} before started")
        self._reader = threading.Thread(target=self._pump, daemon=True, name=f"vsbx-remote-proc-{self.sandbox_id}")
        self._reader.start()

    def _requests(self) -> Iterator[pb.SpawnInput]:
        while (msg := self._inputs.get()) is not None:
            yield msg

    def _send(self, msg: pb.SpawnInput) -> None:
        while not self._done.is_set():
            try:
                self._inputs.put(msg, timeout=0.5)
                return
            except queue.Full:
                pass
        raise errors.Unavailable(f"{self._what!r} has ended; its input is gone", sandbox_id=self.sandbox_id)

    def _pump(self) -> None:
        try:
            for msg in self._call:
                what = msg.WhichOneof("output")
                if what == "stdout":
                    self._sinks.deliver(0, msg.stdout)
                elif what == "stderr":
                    self._sinks.deliver(1, msg.stderr)
                elif what == "exit_status":
                    self._status = msg.exit_status
            if self._status is None:
                self._error = errors.Unavailable("the spawn call ended without an exit status",
                                                 sandbox_id=self.sandbox_id)
        except grpc.RpcError as e:
            if self._aborted:
                self._error = errors.Unavailable(f"{self._what!r} was aborted", sandbox_id=self.sandbox_id)
            else:
                self._error = error_from_rpc(e, what="spawn", address=self._address)
        finally:
            self._sinks.deliver(0, b"")
            self._sinks.deliver(1, b"")
            self._done.set()
            try:
                self._inputs.put_nowait(None)  # ends the request iterator grpc reads
            except queue.Full:
                pass

    # ------------------------------------------------------------------ the port
    def write_stdin(self, data: bytes) -> None:
        with self._lock:
            if self._stdin_closed:
                raise errors.FailedPrecondition(f"stdin of {self._what!r} is closed", sandbox_id=self.sandbox_id)
            if data:
                self._send(pb.SpawnInput(stdin=data))

    def close_stdin(self) -> None:
        with self._lock:
            if self._stdin_closed:
                return
            self._stdin_closed = True
            if not self._done.is_set():
                try:
                    self._send(pb.SpawnInput(close_stdin=True))
                except errors.Unavailable:
                    pass  # it ended meanwhile: nothing left to close

    def resize(self, size: PtySize) -> None:
        if not self._tty:
            raise errors.FailedPrecondition(f"{self._what!r} has no terminal to resize", sandbox_id=self.sandbox_id)
        if not self._done.is_set():
            try:
                self._send(pb.SpawnInput(resize=pb.TerminalSize(width=size.width, height=size.height)))
            except errors.Unavailable:
                pass  # a no-op once it ended

    def wait(self, timeout: float | None = None) -> int:
        if not self._done.wait(timeout):
            raise errors.DeadlineExceeded(f"{self._what!r} still runs after {timeout}s", sandbox_id=self.sandbox_id)
        if self._status is None:
            raise self._error or errors.Unavailable("the process was aborted", sandbox_id=self.sandbox_id)
        return self._status

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def signal(self, signum: int) -> None:
        signal_name(signum)
        if not self._done.is_set():
            try:
                self._send(pb.SpawnInput(signal=int(signum)))
            except errors.Unavailable:
                pass  # a no-op once it ended

    def abort(self) -> None:
        """Cancel the call: serve aborts the guest process. Idempotent."""
        if not self._done.is_set():
            self._aborted = True
            self._call.cancel()
        self._done.wait(5)
