"""Running the Controller service on a unix socket: :func:`serve` and :class:`ControllerServer`.

Stopping the server (by :meth:`ControllerServer.stop` or SIGTERM/SIGINT) ends the gRPC
endpoint only: running sandboxes keep running and are found again by the next server.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Iterable
from concurrent import futures
from dataclasses import dataclass
from types import FrameType
from typing import Optional, Union

import grpc

from ..controller import Controller
from ..errors import FailedPrecondition
from .admin import MAX_MESSAGE_BYTES, AdminServicer, AdminTarget
from .service import ControllerServicer
from ..unixsocket import prepare_socket_path, remove_socket, secure_socket

__all__ = ["serve", "ControllerServer", "DEFAULT_STOP_GRACE"]

log = logging.getLogger(__name__)

#: Seconds in-flight rpcs get when a signal stops the server (``serve(stop_grace=None)``).
DEFAULT_STOP_GRACE = 5.0

# Workers kept free of long-lived Wait calls so that Create/Start/Status are always served.
_RESERVED_WORKERS = 8
# The admin socket serves a person's CLI commands, a few at a time.
_ADMIN_WORKERS = 16

# What signal.getsignal returns (None: a handler not installed from Python).
_SigHandler = Union[Callable[[int, Optional[FrameType]], object], int, None]


@dataclass
class _Endpoint:
    """One gRPC server on one unix socket."""

    server: grpc.Server
    servicer: ControllerServicer
    executor: futures.ThreadPoolExecutor
    path: str
    stat: os.stat_result | None


class ControllerServer:
    """A started gRPC server for one controller on one unix socket (plus the admin socket)."""

    def __init__(self, endpoints: list[_Endpoint], stop_grace: float) -> None:
        self._endpoints = endpoints
        self._server = endpoints[0].server
        self._servicer = endpoints[0].servicer
        self._socket_path = endpoints[0].path
        self._stop_grace = stop_grace
        self._lock = threading.Lock()
        self._stopping = False
        self._stopped = threading.Event()
        self._saved_handlers: dict[int, _SigHandler] = {}

    @property
    def socket_path(self) -> str:
        """The absolute path of the socket (containerd's ``proxy_plugins.<name>.address``)."""
        return self._socket_path

    @property
    def servicer(self) -> ControllerServicer:
        return self._servicer

    @property
    def address(self) -> str:
        """The gRPC target for a client: ``unix:<socket_path>``."""
        return f"unix:{self._socket_path}"

    @property
    def admin_socket_path(self) -> str | None:
        """The root-only socket of the admin service (and a second Controller service)."""
        return self._endpoints[1].path if len(self._endpoints) > 1 else None

    def stop(self, grace: float | None = None) -> None:
        """Stop serving and remove the socket file; idempotent, blocks until done.

        In-flight rpcs get ``grace`` seconds (None: they are cancelled at once). Pending Wait
        calls end with UNAVAILABLE within one poll interval, either way (a cancelled call is
        UNAVAILABLE to the client too): containerd's proxy retries Wait on UNAVAILABLE until a
        server answers again, so a restart is not taken for the sandbox's exit. The controller
        and its sandboxes are not touched.
        """
        with self._lock:
            first = not self._stopping
            self._stopping = True
        if not first:
            self._stopped.wait()
            return
        log.info("stopping the gRPC server on %s; sandboxes keep running", self._socket_path)
        try:
            for ep in self._endpoints:
                ep.servicer.begin_shutdown()
            events = [ep.server.stop(grace) for ep in self._endpoints]
            for ep, ev in zip(self._endpoints, events):
                ev.wait()
                ep.executor.shutdown(wait=False, cancel_futures=True)
                remove_socket(ep.path, ep.stat)
        finally:
            self._stopped.set()
        log.info("gRPC server on %s stopped", self._socket_path)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server has stopped; False if ``timeout`` seconds passed first.

        Called from the main thread, it restores the signal handlers that
        :meth:`install_signal_handlers` replaced once the server has stopped.
        """
        stopped = self._stopped.wait(timeout)
        if stopped and threading.current_thread() is threading.main_thread():
            self.restore_signal_handlers()
        return stopped

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    def install_signal_handlers(self, signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT)) -> None:
        """Stop the server (not the sandboxes) on SIGTERM/SIGINT. Main thread only.

        The first signal stops gracefully (``stop_grace``) on a helper thread, so the handler
        never blocks; a second one cancels in-flight rpcs at once.
        """
        for sig in signals:
            self._saved_handlers.setdefault(sig, signal.getsignal(sig))
            signal.signal(sig, self._on_signal)

    def restore_signal_handlers(self) -> None:
        """Put back the handlers :meth:`install_signal_handlers` replaced. Main thread only."""
        saved, self._saved_handlers = self._saved_handlers, {}
        for sig, handler in saved.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        with self._lock:
            again = self._stopping
        if again:
            log.warning("%s again: cancelling in-flight rpcs", name)
            for ep in self._endpoints:
                threading.Thread(target=ep.server.stop, args=(0,), name="vmsandbox-stop-now", daemon=True).start()
            return
        log.info("%s: stopping the gRPC server (grace %.1fs); sandboxes keep running", name, self._stop_grace)
        threading.Thread(target=self.stop, args=(self._stop_grace,), name="vmsandbox-stop", daemon=True).start()


def serve(
    controller: Controller,
    socket_path: str,
    *,
    socket_group: str | None = None,
    max_workers: int = 64,
    stop_grace: float | None = None,
    wait_poll_interval: float = 1.0,
    admin: AdminTarget | None = None,
    admin_socket_path: str | None = None,
) -> ControllerServer:
    """Serve ``controller`` as containerd's sandbox Controller on the unix socket ``socket_path``.

    The socket is made 0600 (0660 and owned by ``socket_group`` when given); a missing parent
    directory is created 0700; a stale socket file is replaced, but a live one or a non-socket
    path is refused with FailedPrecondition. ``max_workers`` bounds concurrent rpcs: every
    running sandbox holds one long-lived Wait, and a few workers are kept free of Waits, so
    size it above the number of sandboxes. ``stop_grace`` is what signal-initiated stops give
    in-flight rpcs (None: :data:`DEFAULT_STOP_GRACE`).

    With ``admin`` and ``admin_socket_path``, a second server on that socket (always 0600,
    root) serves the admin service and the Controller service again, for the vmsandbox CLI.
    """
    if max_workers < 2:
        raise ValueError("max_workers must be at least 2")
    reserved = min(_RESERVED_WORKERS, max_workers // 4)
    endpoints: list[_Endpoint] = []
    try:
        servicer = ControllerServicer(
            controller, wait_poll_interval=wait_poll_interval, max_concurrent_waits=max_workers - max(1, reserved)
        )
        endpoints.append(_listen(socket_path, socket_group, servicer, None, max_workers))
        if admin is not None and admin_socket_path is not None:
            admin_servicer = ControllerServicer(
                controller, wait_poll_interval=wait_poll_interval, max_concurrent_waits=_ADMIN_WORKERS - 4)
            endpoints.append(_listen(admin_socket_path, None, admin_servicer, AdminServicer(admin), _ADMIN_WORKERS))
    except BaseException:
        for ep in endpoints:
            ep.server.stop(None)
            ep.executor.shutdown(wait=False)
            remove_socket(ep.path, ep.stat)
        raise
    for ep in endpoints:
        log.info("serving %s on %s", "containerd sandbox Controller" if ep is endpoints[0] else "vmsandbox admin", ep.path)
    grace = DEFAULT_STOP_GRACE if stop_grace is None else stop_grace
    return ControllerServer(endpoints, grace)


def _listen(
    socket_path: str, group: str | None, servicer: ControllerServicer, admin: AdminServicer | None, workers: int
) -> _Endpoint:
    path = prepare_socket_path(socket_path)
    executor = futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vmsandbox-grpc")
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)] if admin is not None else []
    server = grpc.server(executor, options=options)
    servicer.add_to_server(server)
    if admin is not None:
        admin.add_to_server(server)
    try:
        server.add_insecure_port(f"unix:{path}")
    except RuntimeError as e:
        executor.shutdown(wait=False)
        raise FailedPrecondition(f"cannot listen on {path}: {e}") from e
    try:
        st = secure_socket(path, group)
        server.start()
    except BaseException:
        server.stop(None)
        executor.shutdown(wait=False)
        remove_socket(path, None)
        raise
    return _Endpoint(server, servicer, executor, path, st)
