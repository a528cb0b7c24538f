"""A ttrpc server on a unix socket: registered unary methods, many connections, clean stop.

Each connection has a reader thread and each request a thread of its own, so a long-lived
request (containerd's Wait) never holds up the others on the same connection; a cap on the
requests in flight (all connections together) answers RESOURCE_EXHAUSTED beyond it rather
than queueing behind requests that may never end. Only peers whose uid (SO_PEERCRED) is
allowed get in: root alone by default, as containerd's task API requires.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Collection
from typing import TypeVar

from google.protobuf.message import Message

from ..errors import AlreadyExists, FailedPrecondition
from ..unixsocket import prepare_socket_path, remove_socket, secure_socket
from ._connection import Connection, Method
from .context import PeerCredentials, RequestContext

__all__ = ["Server", "DEFAULT_MAX_REQUESTS", "DEFAULT_STOP_GRACE"]

log = logging.getLogger(__name__)

ReqT = TypeVar("ReqT", bound=Message)
RespT = TypeVar("RespT", bound=Message)

#: Requests in flight over all connections; every running container holds at least one Wait.
DEFAULT_MAX_REQUESTS = 4096
#: Seconds :meth:`Server.stop` lets in-flight requests finish before cancelling them.
DEFAULT_STOP_GRACE = 5.0
#: Seconds a cancelled request gets to answer before its connection is closed under it.
_CANCEL_GRACE = 1.0
_JOIN_TIMEOUT = 1.0
_BACKLOG = 128
_UCRED = struct.Struct("3i")


class Server:
    """Serves registered ``service``/``method`` pairs over ttrpc on one unix socket.

    Use as a context manager or call :meth:`start` and :meth:`stop`. Methods may be registered
    before or after start; an unknown one is answered UNIMPLEMENTED.
    """

    def __init__(
        self,
        *,
        allowed_uids: Collection[int] = (0,),
        max_requests: int = DEFAULT_MAX_REQUESTS,
        stop_grace: float = DEFAULT_STOP_GRACE,
    ) -> None:
        self._allowed_uids = frozenset(allowed_uids)
        self._max_requests = max_requests
        self._stop_grace = stop_grace
        self._methods: dict[str, dict[str, Method]] = {}
        self._lock = threading.Lock()
        self._conns: set[Connection] = set()
        self._in_flight = 0
        self._state = "new"  # -> running -> stopping -> stopped
        self._path = ""
        self._listener: socket.socket | None = None
        self._owned: os.stat_result | None = None
        self._waker: tuple[socket.socket, socket.socket] | None = None  # wakes the acceptor at stop
        self._acceptor: threading.Thread | None = None

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def path(self) -> str:
        """The socket path being served ("" before :meth:`start`)."""
        return self._path

    # --- registration --------------------------------------------------------------------------
    def register(
        self,
        service: str,
        method: str,
        request_type: type[ReqT],
        response_type: type[RespT],
        handler: Callable[[ReqT, RequestContext], RespT],
    ) -> None:
        """Serve ``service``/``method``: decode ``request_type``, call ``handler``, send its answer.

        The handler raises :mod:`vmsandbox.errors` classes for error statuses (NotFound ...);
        anything else becomes INTERNAL with the traceback logged. AlreadyExists if the pair is
        registered already.
        """
        with self._lock:
            methods = self._methods.setdefault(service, {})
            if method in methods:
                raise AlreadyExists(f"ttrpc method {service}/{method} is registered already")
            methods[method] = Method(request_type, response_type, handler)

    def lookup(self, service: str, method: str) -> Method | str:
        """The method, or the UNIMPLEMENTED message ttrpc sends ("service X" / "method Y")."""
        with self._lock:
            methods = self._methods.get(service)
            if methods is None:
                return f"service {service}"
            return methods.get(method) or f"method {method}"

    # --- the connections' side -----------------------------------------------------------------
    def admit(self) -> bool:
        """Count a new request in flight; False when stopping or at ``max_requests``."""
        with self._lock:
            if self._state != "running" or self._in_flight >= self._max_requests:
                return False
            self._in_flight += 1
            return True

    def release(self) -> None:
        """A request admitted by :meth:`admit` has answered."""
        with self._lock:
            self._in_flight -= 1

    def forget(self, conn: Connection) -> None:
        """A connection has closed; idempotent."""
        with self._lock:
            self._conns.discard(conn)

    # --- lifecycle -----------------------------------------------------------------------------
    def start(self, path: str) -> str:
        """Listen on ``path`` (created 0600) and start accepting; returns the absolute path.

        A stale socket file is replaced; FailedPrecondition if a server answers on it or the
        path is not a socket (:func:`vmsandbox.unixsocket.prepare_socket_path`).
        """
        with self._lock:
            if self._state != "new":
                raise FailedPrecondition(f"the ttrpc server is {self._state}; it starts once")
            self._state = "starting"
        try:
            path = prepare_socket_path(path)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                listener.bind(path)
                self._owned = secure_socket(path, None)
                listener.listen(_BACKLOG)
                listener.setblocking(False)
            except OSError as e:
                listener.close()
                raise FailedPrecondition(f"cannot listen on {path}: {e}") from e
        except BaseException:
            with self._lock:
                self._state = "new"
            raise
        self._listener, self._path = listener, path
        self._waker = socket.socketpair()
        self._acceptor = threading.Thread(target=self._accept_loop, name="ttrpc-accept", daemon=True)
        with self._lock:
            self._state = "running"
        self._acceptor.start()
        log.info("ttrpc server listening on %s", path)
        return path

    def stop(self, grace: float | None = None, *, answer: bool = True) -> None:
        """Stop serving; idempotent. Returns once every thread of the server has ended.

        New connections and requests are refused at once; in-flight requests get ``grace``
        seconds (default: the constructor's ``stop_grace``) to answer, are then cancelled
        (their :class:`RequestContext` is done) and get a little longer before the connections
        close. A handler that ignores cancellation is left behind, logged. ``answer=False``:
        the connections close first, so no client hears of the cancelled requests (a relay
        sends them again to the next server).
        """
        grace = self._stop_grace if grace is None else grace
        with self._lock:
            state = self._state
            if state in ("stopping", "stopped"):
                return
            self._state = "stopping"
        if state == "running":
            assert self._acceptor is not None and self._listener is not None and self._waker is not None
            self._waker[1].send(b"x")
            self._acceptor.join()
            self._listener.close()
            for w in self._waker:
                w.close()
            remove_socket(self._path, self._owned)
        with self._lock:
            conns = list(self._conns)
        if not answer:
            self._abandon(conns)
            return
        for c in conns:
            c.drain()
        end = time.monotonic() + grace
        for c in conns:
            c.wait_idle(max(0.0, end - time.monotonic()))
        for c in conns:
            c.cancel_all("the ttrpc server is stopping")
        end = time.monotonic() + _CANCEL_GRACE
        for c in conns:
            c.wait_idle(max(0.0, end - time.monotonic()))
        threads = [t for c in conns for t in c.close()]
        for t in threads:
            t.join(_JOIN_TIMEOUT)
            if t.is_alive():
                log.warning("ttrpc: %s is still running after stop; leaving it behind", t.name)
        with self._lock:
            self._state = "stopped"
        if state == "running":
            log.info("ttrpc server on %s stopped", self._path)

    def _abandon(self, conns: list[Connection]) -> None:
        threads = [t for c in conns for t in c.close()]
        for c in conns:
            c.cancel_all("the ttrpc server is going away")
        for t in threads:
            t.join(_JOIN_TIMEOUT)
        with self._lock:
            self._state = "stopped"

    def _accept_loop(self) -> None:
        assert self._listener is not None and self._waker is not None
        wake = self._waker[0]
        poller = select.poll()
        poller.register(self._listener, select.POLLIN)
        poller.register(wake, select.POLLIN)
        backoff = 0.0
        while True:
            if any(fd == wake.fileno() for fd, _ in poller.poll()):
                return
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as e:  # EMFILE and the like: back off instead of spinning
                backoff = min(1.0, (backoff or 0.005) * 2)
                log.error("ttrpc: accept on %s failed: %s; retrying in %.3f s", self._path, e, backoff)
                if select.select([wake], [], [], backoff)[0]:
                    return
                continue
            backoff = 0.0
            self._admit_connection(sock)

    def _admit_connection(self, sock: socket.socket) -> None:
        try:
            sock.setblocking(True)
            pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        except OSError as e:
            log.warning("ttrpc: cannot read the peer credentials of a connection: %s", e)
            sock.close()
            return
        if uid not in self._allowed_uids:
            log.warning("ttrpc: refused a connection on %s from pid %d uid %d (allowed uids: %s)",
                        self._path, pid, uid, ",".join(map(str, sorted(self._allowed_uids))))
            sock.close()
            return
        conn = Connection(self, sock, PeerCredentials(pid=pid, uid=uid, gid=gid))
        with self._lock:
            if self._state != "running":
                sock.close()
                return
            self._conns.add(conn)
            conn.start()
        log.debug("ttrpc: connection from pid %d uid %d", pid, uid)
