"""vmsandbox's admin service (``vmsandbox.admin.v1.Admin``): list, exec, spawn (stdio streamed
both ways), share paths and console logs.

Served by ``vmsandbox serve`` on a root-only socket in its state dir, together with a second
instance of the Controller service, so the CLI on a node goes through the process that owns
the state dir (and holds each guest's only agent connection) instead of racing it.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any as _Any
from typing import Protocol, TypeVar

import grpc

from ..errors import InvalidArgument, VmSandboxError
from ..model import ExecResult, PtySize, SandboxSummary
from ..proto.vmsandbox.admin.v1 import admin_pb2 as pb
from . import convert
from .service import _unary
from .status import to_status

OutputSink = Callable[[bytes], None]
"""Where a spawned process's output goes (as :data:`vmsandbox.sandbox.ports.OutputSink`)."""


class GuestProcess(Protocol):
    """What Spawn uses of :class:`vmsandbox.sandbox.ports.GuestProcess` (the server names
    nothing of the orchestration)."""

    def write_stdin(self, data: bytes) -> None: ...

    def close_stdin(self) -> None: ...

    def resize(self, size: PtySize) -> None: ...

    def signal(self, signum: int) -> None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    @property
    def done(self) -> bool: ...

    def abort(self) -> None: ...

__all__ = ["ADMIN_SERVICE_NAME", "MAX_MESSAGE_BYTES", "AdminTarget", "AdminServicer"]

log = logging.getLogger(__name__)

ADMIN_SERVICE_NAME = "vmsandbox.admin.v1.Admin"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""Exec output and console logs travel whole; both ends allow messages up to this size."""

SPAWN_QUEUE_CHUNKS = 16
"""Output chunks a Spawn call holds for a slow client (each at most a guest read, 32 KiB);
past that the guest's sink blocks, and the guest process with it."""

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
        user: str | None = None,
        in_guest_root: bool = False,
    ) -> ExecResult: ...

    def spawn(self, sandbox_id: str, argv: Sequence[str], *, stdout: OutputSink, stderr: OutputSink,
              env: Mapping[str, str] | None = None, cwd: str | None = None, user: str | None = None,
              tty: bool = False, size: PtySize | None = None, in_guest_root: bool = False) -> GuestProcess: ...

    def share_path(self, sandbox_id: str) -> Path: ...

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
                user=request.user or None, in_guest_root=request.in_guest_root,
            )
            return pb.ExecResponse(exit_code=res.exit_code, stdout=res.stdout, stderr=res.stderr)

        return self._serve("Exec", request.sandbox_id, context, run)

    def ConsoleLog(self, request: pb.ConsoleLogRequest, context: grpc.ServicerContext) -> pb.ConsoleLogResponse:
        def run() -> pb.ConsoleLogResponse:
            cap = MAX_MESSAGE_BYTES - 1024
            want = min(request.max_bytes, cap) if request.max_bytes else cap
            return pb.ConsoleLogResponse(data=self._target.read_console_log(request.sandbox_id, want))

        return self._serve("ConsoleLog", request.sandbox_id, context, run)

    def SharePath(self, request: pb.SharePathRequest, context: grpc.ServicerContext) -> pb.SharePathResponse:
        return self._serve("SharePath", request.sandbox_id, context, lambda: pb.SharePathResponse(
            path=str(self._target.share_path(request.sandbox_id))))

    def Spawn(self, requests: Iterator[pb.SpawnInput], context: grpc.ServicerContext) -> Iterator[pb.SpawnOutput]:
        """See the proto. Three threads per call: this one (start, then the output), the
        guest's (its sink puts output on a bounded queue), and one feeding the client's input
        to the process."""
        first = next(requests, None)
        if first is None or first.WhichOneof("input") != "start":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message of Spawn must be a SpawnStart")
        start = first.start
        out: queue.Queue[tuple[str, _Any]] = queue.Queue(SPAWN_QUEUE_CHUNKS)
        gone = threading.Event()  # the call ended: nobody reads `out` any more

        def sink(kind: str) -> OutputSink:
            def put(data: bytes) -> None:
                if not data:
                    return  # the exit status (after both ends) closes the stream
                while not gone.is_set():
                    try:
                        out.put((kind, data), timeout=0.5)
                        return
                    except queue.Full:
                        pass
            return put

        def begin() -> GuestProcess:
            if not start.argv:
                raise InvalidArgument("spawn needs a command")
            size = PtySize(start.size.width, start.size.height) if start.HasField("size") else None
            return self._target.spawn(
                start.sandbox_id, list(start.argv), stdout=sink("stdout"), stderr=sink("stderr"),
                env=dict(start.env), cwd=start.cwd or None, user=start.user or None, tty=start.tty, size=size,
                in_guest_root=start.in_guest_root)

        proc = self._serve("Spawn", start.sandbox_id, context, begin)

        def ended() -> None:
            gone.set()
            if not proc.done:
                log.info("admin Spawn sandbox %s: the client went away; aborting %r", start.sandbox_id,
                         list(start.argv))
                proc.abort()

        if not context.add_callback(ended):
            ended()
            return
        threading.Thread(target=_feed, args=(requests, proc, start.sandbox_id), daemon=True,
                         name=f"vsbx-admin-spawn-in-{start.sandbox_id}").start()

        def reap() -> None:
            try:
                item: tuple[str, _Any] = ("exit", proc.wait())
            except Exception as e:  # noqa: BLE001 - goes to the client through the status table
                item = ("error", e)
            while not gone.is_set():
                try:
                    out.put(item, timeout=0.5)
                    return
                except queue.Full:
                    pass

        threading.Thread(target=reap, daemon=True, name=f"vsbx-admin-spawn-wait-{start.sandbox_id}").start()
        yield pb.SpawnOutput(started=True)
        while True:
            try:
                kind, value = out.get(timeout=0.5)
            except queue.Empty:
                if gone.is_set():
                    return  # cancelled: this pool thread must not wait for a reader that left
                continue
            if kind == "stdout":
                yield pb.SpawnOutput(stdout=value)
            elif kind == "stderr":
                yield pb.SpawnOutput(stderr=value)
            elif kind == "exit":
                yield pb.SpawnOutput(exit_status=value)
                return
            else:
                code, details = to_status(value, rpc="admin Spawn", sandbox_id=start.sandbox_id)
                context.abort(code, details)

    def method_handlers(self) -> dict[str, grpc.RpcMethodHandler[_Any, _Any]]:
        return {
            "List": _unary(self.List, pb.ListRequest, pb.ListResponse),
            "Exec": _unary(self.Exec, pb.ExecRequest, pb.ExecResponse),
            "ConsoleLog": _unary(self.ConsoleLog, pb.ConsoleLogRequest, pb.ConsoleLogResponse),
            "SharePath": _unary(self.SharePath, pb.SharePathRequest, pb.SharePathResponse),
            "Spawn": grpc.stream_stream_rpc_method_handler(
                self.Spawn, request_deserializer=pb.SpawnInput.FromString,
                response_serializer=pb.SpawnOutput.SerializeToString),
        }

    def add_to_server(self, server: grpc.Server) -> None:
        handlers = self.method_handlers()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(ADMIN_SERVICE_NAME, handlers),))
        server.add_registered_method_handlers(ADMIN_SERVICE_NAME, handlers)


def _feed(requests: Iterator[pb.SpawnInput], proc: GuestProcess, sandbox_id: str) -> None:
    """The client's stdin, EOF, sizes and signals to the process, until the client half-closes
    or the call ends. A failure of one of them (the process ended, the connection dropped)
    shows in the exit status the client gets; nothing else is to be done with it here."""
    try:
        for msg in requests:
            what = msg.WhichOneof("input")
            try:
                if what == "stdin":
                    proc.write_stdin(msg.stdin)
                elif what == "close_stdin":
                    proc.close_stdin()
                elif what == "resize":
                    proc.resize(PtySize(msg.resize.width, msg.resize.height))
                elif what == "signal":
                    proc.signal(msg.signal)
                else:
                    raise InvalidArgument(f"unexpected {what} after the start of Spawn")
            except VmSandboxError as e:
                log.debug("admin Spawn sandbox %s: %s ignored: %s", sandbox_id, what, e)
    except grpc.RpcError:
        pass  # cancelled: the done callback aborts the process
