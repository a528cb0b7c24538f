"""One accepted ttrpc connection: its reader thread, a thread per request, one locked writer.

Protocol checks follow containerd/ttrpc ``server.go``: an even stream id, a re-used or
decreasing one, or data for a stream that is not active is answered InvalidArgument on that
stream id and the connection carries on; a frame of an unknown type is ignored (ttrpc keeps it
for future extensions); an oversized frame is skipped and answered RESOURCE_EXHAUSTED.
The connection is never closed for being idle; it ends when the peer closes it or the
server stops.
"""

from __future__ import annotations

import logging
import socket
import threading
from dataclasses import dataclass, field
from typing import Any, Protocol

from google.protobuf.message import DecodeError, Message

from ..codes import INTERNAL_MESSAGE, Code, code_for
from ..errors import InvalidArgument
from ..proto.ttrpc import request_pb2 as pb
from .context import PeerCredentials, RequestContext, metadata_from_pairs
from .frame import (
    FLAG_REMOTE_OPEN,
    MAX_DATA_LENGTH,
    Frame,
    FrameReader,
    FrameTooLarge,
    MessageType,
    TruncatedFrame,
    encode_frame,
)

__all__ = ["Connection", "ConnectionHost", "Method"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Method:
    """A registered unary method: how to decode its request, what it returns, who answers."""

    request_type: type[Message]
    response_type: type[Message]
    handler: Any  # Callable[[request_type, RequestContext], response_type]; typed at Server.register


class ConnectionHost(Protocol):
    """What a connection needs from its server."""

    def lookup(self, service: str, method: str) -> Method | str: ...
    def admit(self) -> bool: ...
    def release(self) -> None: ...
    def forget(self, conn: Connection) -> None: ...


@dataclass
class _Call:
    ctx: RequestContext
    thread: threading.Thread = field(repr=False)


class Connection:
    """Serves the requests of one peer until it hangs up or the server stops it."""

    def __init__(self, host: ConnectionHost, sock: socket.socket, peer: PeerCredentials) -> None:
        self._host = host
        self._sock = sock
        self.peer = peer
        self._wlock = threading.Lock()  # one frame at a time on the socket; guards _closed
        self._lock = threading.Lock()  # the state below; taken before _wlock, never after
        self._idle = threading.Condition(self._lock)
        self._calls: dict[int, _Call] = {}
        self._threads: set[threading.Thread] = set()
        self._last_id = 0
        self._reading = True
        self._draining = False
        self._closed = False
        self._reader = threading.Thread(target=self._read_loop, name=f"ttrpc-conn-pid{peer.pid}", daemon=True)

    def start(self) -> None:
        self._reader.start()

    # --- reading -------------------------------------------------------------------------------
    def _read_loop(self) -> None:
        reader = FrameReader(self._sock)
        why = "the client closed the connection"
        try:
            while True:
                try:
                    frame = reader.read()
                except FrameTooLarge as e:
                    self._reply(e.header.stream_id, Code.RESOURCE_EXHAUSTED, str(e))
                    continue
                if frame is None:
                    break
                self._on_frame(frame)
        except (OSError, TruncatedFrame) as e:
            why = f"connection lost: {e}"
        except Exception:
            log.exception("ttrpc connection of pid %d: reader failed", self.peer.pid)
            why = "the server's reader failed"
        finally:
            self._reader_done(why)

    def _on_frame(self, frame: Frame) -> None:
        sid = frame.stream_id
        if sid % 2 == 0:
            self._reply(sid, Code.INVALID_ARGUMENT, "StreamID must be odd for client initiated streams")
        elif frame.type == MessageType.REQUEST:
            self._on_request(frame)
        elif frame.type == MessageType.DATA:
            with self._lock:
                active = sid in self._calls
            if active:  # a unary stream takes no data (PROTOCOL.md); its response still comes
                log.warning("ttrpc: ignoring a data frame on unary stream %d", sid)
            else:
                self._reply(sid, Code.INVALID_ARGUMENT, "StreamID is no longer active")
        else:
            log.warning("ttrpc: ignoring a frame of unknown type %#x on stream %d", frame.type, sid)

    def _on_request(self, frame: Frame) -> None:
        sid = frame.stream_id
        with self._lock:
            reused = sid <= self._last_id
            if not reused:
                self._last_id = sid
            draining = self._draining
        if reused:
            self._reply(sid, Code.INVALID_ARGUMENT, "StreamID cannot be re-used and must increment")
            return
        if draining:
            self._reply(sid, Code.UNAVAILABLE, "the ttrpc server is shutting down")
            return
        if frame.header.flags & FLAG_REMOTE_OPEN:
            self._reply(sid, Code.UNIMPLEMENTED, "streaming requests are not supported")
            return
        try:
            req = pb.Request.FromString(frame.data)
        except DecodeError as e:
            self._reply(sid, Code.INVALID_ARGUMENT, f"unmarshal request error: {e}")
            return
        found = self._host.lookup(req.service, req.method)
        if isinstance(found, str):
            self._reply(sid, Code.UNIMPLEMENTED, found)
            return
        if not self._host.admit():
            self._reply(sid, Code.RESOURCE_EXHAUSTED, "too many ttrpc requests in flight")
            return
        # timeout_nano < 0 is a deadline already past, as Go's context.WithTimeout makes it.
        timeout = None if req.timeout_nano == 0 else max(0.0, req.timeout_nano / 1e9)
        ctx = RequestContext(service=req.service, method=req.method, stream_id=sid, peer=self.peer,
                             metadata=metadata_from_pairs((kv.key, kv.value) for kv in req.metadata),
                             timeout=timeout)
        thread = threading.Thread(target=self._serve, args=(found, req.payload, ctx), daemon=True,
                                  name=f"ttrpc-{req.method}-{sid}")
        with self._lock:
            self._calls[sid] = _Call(ctx, thread)
            self._threads = {t for t in self._threads if t.is_alive()}
            self._threads.add(thread)
        thread.start()

    # --- serving -------------------------------------------------------------------------------
    def _serve(self, method: Method, payload: bytes, ctx: RequestContext) -> None:
        rpc = f"{ctx.service}/{ctx.method}"
        code, message, data = Code.OK, "", b""
        try:
            try:
                request = method.request_type.FromString(payload)
            except DecodeError as e:
                raise InvalidArgument(f"cannot decode {method.request_type.DESCRIPTOR.full_name}: {e}") from e
            response = method.handler(request, ctx)
            if not isinstance(response, method.response_type):
                raise TypeError(f"{rpc} handler returned {type(response).__name__}, "
                                f"not {method.response_type.__name__}")
            data = response.SerializeToString()
        except Exception as e:
            code = code_for(e)
            if code is Code.INTERNAL:
                log.error("%s (stream %d): internal error", rpc, ctx.stream_id, exc_info=e)
                message = INTERNAL_MESSAGE
            else:
                log.info("%s (stream %d): %s: %s", rpc, ctx.stream_id, code.name, e)
                message = str(e)
        finally:
            try:  # also when cancelled: at a stop the client still reads (a lost peer: a no-op)
                self._reply(ctx.stream_id, code, message, data)
            finally:
                self._finish(ctx.stream_id)

    def _reply(self, sid: int, code: Code, message: str, payload: bytes = b"") -> None:
        resp = pb.Response(payload=payload)
        resp.status.SetInParent()  # ttrpc's Go server always sends a status, code 0 on success
        if code is not Code.OK:
            resp.status.code, resp.status.message = int(code), message
        data = resp.SerializeToString()
        if len(data) > MAX_DATA_LENGTH:
            log.error("ttrpc stream %d: response of %d bytes exceeds the maximum message size", sid, len(data))
            err = pb.Response(status=pb.Status(code=int(Code.RESOURCE_EXHAUSTED),
                                               message=f"response of {len(data)} bytes exceeds the maximum "
                                                       f"message size of {MAX_DATA_LENGTH}"))
            data = err.SerializeToString()
        self._send(encode_frame(sid, MessageType.RESPONSE, 0, data))

    def _send(self, frame: bytes) -> None:
        with self._wlock:
            if self._closed:
                return
            try:
                self._sock.sendall(frame)
            except OSError as e:  # the peer is gone; the reader sees it too and cleans up
                log.debug("ttrpc connection of pid %d: send failed: %s", self.peer.pid, e)

    def _finish(self, sid: int) -> None:
        with self._lock:
            call = self._calls.pop(sid, None)
            self._idle.notify_all()
        if call is not None:
            self._host.release()
        self._maybe_close()

    def _reader_done(self, why: str) -> None:
        with self._lock:
            self._reading = False
            orphans = [] if self._draining else list(self._calls.values())
        for call in orphans:  # nobody is left to read their answers
            call.ctx.cancel(why)
        self._maybe_close()

    def _maybe_close(self) -> None:
        with self._lock:
            if self._reading or self._calls or self._closed:
                return
            self._close_locked()
        self._host.forget(self)

    def _close_locked(self) -> None:
        with self._wlock:
            self._closed = True
            self._sock.close()

    # --- stopping (called by the server) -------------------------------------------------------
    def drain(self) -> None:
        """Stop reading new requests; in-flight ones still get their answers."""
        with self._lock:
            self._draining = True
        try:
            self._sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass

    def wait_idle(self, timeout: float) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: not self._calls, timeout)

    def cancel_all(self, reason: str) -> None:
        with self._lock:
            calls = list(self._calls.values())
        for call in calls:
            call.ctx.cancel(reason)

    def close(self) -> list[threading.Thread]:
        """Close the socket now; returns the threads to join (reader and handlers)."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._reader.join()
        with self._lock:
            if not self._closed:
                self._close_locked()
            threads = list(self._threads)
        self._host.forget(self)
        return threads
