"""The ``containerd.services.sandbox.v1.Controller`` gRPC service over any :class:`Controller`.

Each rpc validates the id, converts the request (:mod:`.convert`), calls the controller and
converts the result back; every exception is mapped by the one table in :mod:`.status`.
The handlers are registered from :meth:`ControllerServicer.method_handlers`, typed, instead of
the generated ``add_ControllerServicer_to_server``; a unit test keeps the rpc names equal to
the service descriptor's.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any as _Any
from typing import TypeVar

import grpc
from google.protobuf.message import Message

from ..controller import Controller
from ..errors import DeadlineExceeded, InvalidArgument
from ..proto.containerd.services.sandbox.v1 import sandbox_pb2 as api
from . import convert
from .status import to_status

__all__ = ["SERVICE_NAME", "ControllerServicer"]

log = logging.getLogger(__name__)

SERVICE_NAME = "containerd.services.sandbox.v1.Controller"

_R = TypeVar("_R")
_Req = TypeVar("_Req", bound=Message)
_Resp = TypeVar("_Resp", bound=Message)


def _unary(
    behavior: Callable[[_Req, grpc.ServicerContext], _Resp], req: type[_Req], resp: type[_Resp]
) -> grpc.RpcMethodHandler[_Req, _Resp]:
    """A unary-unary handler that (de)serializes ``req``/``resp`` with protobuf."""
    return grpc.unary_unary_rpc_method_handler(
        behavior, request_deserializer=req.FromString, response_serializer=resp.SerializeToString
    )


class _Abort(Exception):
    """End the rpc with this status (not an error of the controller: nothing is logged)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class ControllerServicer:
    """Serves one :class:`Controller` to containerd.

    ``wait_poll_interval`` bounds how long a cancelled or shut-down Wait keeps its worker
    thread. ``max_concurrent_waits`` caps the long-lived Wait calls so that they cannot take
    every worker thread of the server; a Wait beyond the cap gets UNAVAILABLE, which
    containerd's proxy retries with backoff. None: no cap.
    """

    def __init__(
        self,
        controller: Controller,
        *,
        wait_poll_interval: float = 1.0,
        max_concurrent_waits: int | None = None,
    ) -> None:
        if wait_poll_interval <= 0:
            raise ValueError("wait_poll_interval must be positive")
        self._controller = controller
        self._poll = wait_poll_interval
        self._stopping = threading.Event()
        if max_concurrent_waits is not None and max_concurrent_waits < 1:
            raise ValueError("max_concurrent_waits must be at least 1")
        self._max_waits = max_concurrent_waits
        self._waits = 0
        self._waits_lock = threading.Lock()

    def begin_shutdown(self) -> None:
        """Make every pending and new Wait end with UNAVAILABLE (containerd retries Wait on it).

        Called when the server stops, so that the Wait handlers give their worker threads back
        within one poll interval and containerd re-waits on the next server instead of taking
        a failed Wait for the sandbox's exit.
        """
        self._stopping.set()

    @property
    def active_waits(self) -> int:
        """The number of Wait calls in progress."""
        with self._waits_lock:
            return self._waits
    # --- plumbing ---------------------------------------------------------------------------

    def _serve(self, rpc: str, sandbox_id: str, context: grpc.ServicerContext, fn: Callable[[], _R]) -> _R:
        log.debug("%s sandbox %s", rpc, sandbox_id)
        try:
            if not sandbox_id:
                raise InvalidArgument(f"{rpc}: sandbox_id is required")
            return fn()
        except _Abort as a:
            log.debug("%s sandbox %s: %s: %s", rpc, sandbox_id, a.code.name, a.details)
            context.abort(a.code, a.details)
        except Exception as e:
            code, details = to_status(e, rpc=rpc, sandbox_id=sandbox_id)
            context.abort(code, details)
        raise AssertionError("unreachable: context.abort returned")

    @contextlib.contextmanager
    def _wait_slot(self) -> Iterator[None]:
        with self._waits_lock:
            if self._max_waits is not None and self._waits >= self._max_waits:
                log.warning("more than %d concurrent Wait calls; raise the server's max_workers", self._max_waits)
                raise _Abort(grpc.StatusCode.UNAVAILABLE, "too many concurrent Wait calls; retry later")
            self._waits += 1
        try:
            yield
        finally:
            with self._waits_lock:
                self._waits -= 1

    # --- the nine rpcs ----------------------------------------------------------------------

    def Create(self, request: api.ControllerCreateRequest, context: grpc.ServicerContext) -> api.ControllerCreateResponse:
        def run() -> api.ControllerCreateResponse:
            sandbox, opts = convert.create_from_request(request)
            self._controller.create(
                sandbox,
                rootfs=opts.rootfs,
                options=opts.options,
                netns_path=opts.netns_path,
                annotations=opts.annotations,
            )
            return api.ControllerCreateResponse(sandbox_id=request.sandbox_id)

        return self._serve("Create", request.sandbox_id, context, run)

    def Start(self, request: api.ControllerStartRequest, context: grpc.ServicerContext) -> api.ControllerStartResponse:
        def run() -> api.ControllerStartResponse:
            resp = convert.start_response(self._controller.start(request.sandbox_id))
            resp.sandbox_id = resp.sandbox_id or request.sandbox_id
            return resp

        return self._serve("Start", request.sandbox_id, context, run)

    def Platform(
        self, request: api.ControllerPlatformRequest, context: grpc.ServicerContext
    ) -> api.ControllerPlatformResponse:
        def run() -> api.ControllerPlatformResponse:
            p = self._controller.platform(request.sandbox_id)
            return api.ControllerPlatformResponse(platform=convert.platform_to_proto(p))

        return self._serve("Platform", request.sandbox_id, context, run)

    def Stop(self, request: api.ControllerStopRequest, context: grpc.ServicerContext) -> api.ControllerStopResponse:
        def run() -> api.ControllerStopResponse:
            self._controller.stop(request.sandbox_id, timeout=convert.stop_timeout(request))
            return api.ControllerStopResponse()

        return self._serve("Stop", request.sandbox_id, context, run)

    def Wait(self, request: api.ControllerWaitRequest, context: grpc.ServicerContext) -> api.ControllerWaitResponse:
        # The controller's wait cannot be interrupted, so wait in slices and look in between
        # whether the client went away (containerd cancels Wait when it stops watching) or the
        # server is stopping; either way the worker thread is back within one slice.
        def run() -> api.ControllerWaitResponse:
            with self._wait_slot():
                while True:
                    if self._stopping.is_set():
                        raise _Abort(grpc.StatusCode.UNAVAILABLE, "vmsandbox server is shutting down; retry Wait")
                    if not context.is_active():
                        raise _Abort(grpc.StatusCode.CANCELLED, "Wait cancelled by the client")
                    try:
                        st = self._controller.wait(request.sandbox_id, timeout=self._poll)
                    except DeadlineExceeded:
                        continue
                    return convert.wait_response(st)

        return self._serve("Wait", request.sandbox_id, context, run)

    def Status(self, request: api.ControllerStatusRequest, context: grpc.ServicerContext) -> api.ControllerStatusResponse:
        def run() -> api.ControllerStatusResponse:
            resp = convert.status_response(self._controller.status(request.sandbox_id, verbose=request.verbose))
            resp.sandbox_id = resp.sandbox_id or request.sandbox_id
            return resp

        return self._serve("Status", request.sandbox_id, context, run)

    def Shutdown(
        self, request: api.ControllerShutdownRequest, context: grpc.ServicerContext
    ) -> api.ControllerShutdownResponse:
        def run() -> api.ControllerShutdownResponse:
            self._controller.shutdown(request.sandbox_id)
            return api.ControllerShutdownResponse()

        return self._serve("Shutdown", request.sandbox_id, context, run)

    def Metrics(self, request: api.ControllerMetricsRequest, context: grpc.ServicerContext) -> api.ControllerMetricsResponse:
        def run() -> api.ControllerMetricsResponse:
            m = self._controller.metrics(request.sandbox_id)
            return api.ControllerMetricsResponse(metrics=convert.metric_to_proto(m))

        return self._serve("Metrics", request.sandbox_id, context, run)

    def Update(self, request: api.ControllerUpdateRequest, context: grpc.ServicerContext) -> api.ControllerUpdateResponse:
        def run() -> api.ControllerUpdateResponse:
            sandbox, fields = convert.update_from_request(request)
            self._controller.update(request.sandbox_id, sandbox, *fields)
            return api.ControllerUpdateResponse()

        return self._serve("Update", request.sandbox_id, context, run)

    # --- registration -----------------------------------------------------------------------

    def method_handlers(self) -> dict[str, grpc.RpcMethodHandler[_Any, _Any]]:
        """The unary handlers of the nine rpcs, keyed by method name."""
        unary = _unary
        return {
            "Create": unary(self.Create, api.ControllerCreateRequest, api.ControllerCreateResponse),
            "Start": unary(self.Start, api.ControllerStartRequest, api.ControllerStartResponse),
            "Platform": unary(self.Platform, api.ControllerPlatformRequest, api.ControllerPlatformResponse),
            "Stop": unary(self.Stop, api.ControllerStopRequest, api.ControllerStopResponse),
            "Wait": unary(self.Wait, api.ControllerWaitRequest, api.ControllerWaitResponse),
            "Status": unary(self.Status, api.ControllerStatusRequest, api.ControllerStatusResponse),
            "Shutdown": unary(self.Shutdown, api.ControllerShutdownRequest, api.ControllerShutdownResponse),
            "Metrics": unary(self.Metrics, api.ControllerMetricsRequest, api.ControllerMetricsResponse),
            "Update": unary(self.Update, api.ControllerUpdateRequest, api.ControllerUpdateResponse),
        }

    def add_to_server(self, server: grpc.Server) -> None:
        """Register the service on ``server`` (before it starts)."""
        handlers = self.method_handlers()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
        server.add_registered_method_handlers(SERVICE_NAME, handlers)
