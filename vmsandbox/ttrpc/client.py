"""A small ttrpc client: unary calls multiplexed on one unix-socket connection.

For tests and the shim entry point. Calls from many threads share the connection: each gets
the next odd stream id, a reader thread hands every Response to its caller. A non-OK status
comes back as the :mod:`vmsandbox.errors` class it stands for (:func:`vmsandbox.codes.error_for`).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Mapping, Sequence
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from ..codes import Code, error_for
from ..errors import DeadlineExceeded, Internal, Unavailable, VmSandboxError
from ..proto.ttrpc import request_pb2 as pb
from .frame import FrameReader, FrameTooLarge, MessageType, TruncatedFrame, encode_frame

__all__ = ["Client", "socket_path"]

log = logging.getLogger(__name__)

RespT = TypeVar("RespT", bound=Message)

_MAX_STREAM_ID = 0xFFFFFFFF


def socket_path(address: str) -> str:
    """The filesystem path of ``address``: a path, ``unix://PATH`` or ``ttrpc+unix://PATH``."""
    for prefix in ("ttrpc+unix://", "unix://"):
        if address.startswith(prefix):
            return address[len(prefix):]
    return address


class _Pending:
    """A call waiting for its Response frame."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.data = b""
        self.error: VmSandboxError | None = None


class Client:
    """One connection to a ttrpc server; thread-safe; close it (or use ``with``)."""

    def __init__(self, address: str, *, connect_timeout: float = 5.0) -> None:
        self.address = address
        path = socket_path(address)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(connect_timeout)
        try:
            sock.connect(path)
        except OSError as e:
            sock.close()
            raise Unavailable(f"cannot connect to ttrpc server {address}: {e}") from e
        sock.settimeout(None)
        self._sock = sock
        self._lock = threading.Lock()
        self._wlock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        self._next_id = 1
        self._closed: str | None = None  # why, once the connection is unusable
        self._reader = threading.Thread(target=self._read_loop, name="ttrpc-client", daemon=True)
        self._reader.start()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(
        self,
        service: str,
        method: str,
        request: Message,
        response_type: type[RespT],
        *,
        timeout: float | None = None,
        metadata: Mapping[str, str | Sequence[str]] | None = None,
    ) -> RespT:
        """Call ``service``/``method`` and return its answer decoded as ``response_type``.

        ``timeout`` (seconds) is sent as timeout_nano and bounds the wait here
        (DeadlineExceeded); a metadata value may be a list for a repeated key. Unavailable if
        the connection is or gets closed; the server's errors as their classes.
        """
        req = pb.Request(service=service, method=method, payload=request.SerializeToString())
        if timeout is not None:
            req.timeout_nano = max(1, int(timeout * 1e9))
        for key, values in (metadata or {}).items():
            for value in [values] if isinstance(values, str) else values:
                req.metadata.add(key=key, value=value)
        data = req.SerializeToString()
        pending = _Pending()
        # The server refuses a stream id lower than one it has seen, so ids go out in the order
        # they are taken: both under the write lock.
        with self._wlock:
            with self._lock:
                if self._closed is not None:
                    raise Unavailable(f"ttrpc connection to {self.address} is closed: {self._closed}")
                if self._next_id > _MAX_STREAM_ID:
                    raise Unavailable(f"ttrpc connection to {self.address} ran out of stream ids; reconnect")
                sid = self._next_id
                frame = encode_frame(sid, MessageType.REQUEST, 0, data)  # InvalidArgument if too large
                self._next_id += 2
                self._pending[sid] = pending
            try:
                self._sock.sendall(frame)
            except OSError as e:
                self._forget(sid)
                raise Unavailable(f"ttrpc {service}/{method} to {self.address}: {e}") from e
        if not pending.done.wait(timeout):
            self._forget(sid)
            raise DeadlineExceeded(f"ttrpc {service}/{method} to {self.address}: no answer in {timeout} s")
        if pending.error is not None:
            raise pending.error
        return _decode(pending.data, response_type, f"{service}/{method}")

    def close(self) -> None:
        """Close the connection; calls still waiting get Unavailable. Idempotent."""
        self._fail_all("closed by the client")
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if self._reader is not threading.current_thread():
            self._reader.join()
        self._sock.close()

    def _forget(self, sid: int) -> None:
        with self._lock:
            self._pending.pop(sid, None)

    def _read_loop(self) -> None:
        reader = FrameReader(self._sock)
        why = "the server closed the connection"
        try:
            while True:
                try:
                    frame = reader.read()
                except FrameTooLarge as e:
                    self._answer(e.header.stream_id, b"", Internal(f"ttrpc response refused: {e}"))
                    continue
                if frame is None:
                    break
                if frame.type == MessageType.RESPONSE:
                    self._answer(frame.stream_id, frame.data, None)
                else:
                    log.debug("ttrpc client: ignoring a frame of type %#x on stream %d", frame.type, frame.stream_id)
        except (OSError, TruncatedFrame) as e:
            why = f"connection lost: {e}"
        finally:
            self._fail_all(why)

    def _answer(self, sid: int, data: bytes, error: VmSandboxError | None) -> None:
        with self._lock:
            pending = self._pending.pop(sid, None)
        if pending is None:  # its caller gave up (timeout)
            return
        pending.data, pending.error = data, error
        pending.done.set()

    def _fail_all(self, why: str) -> None:
        with self._lock:
            if self._closed is None:
                self._closed = why
            pending, self._pending = list(self._pending.values()), {}
        for p in pending:
            p.error = Unavailable(f"ttrpc connection to {self.address}: {why}")
            p.done.set()


def _decode(data: bytes, response_type: type[RespT], rpc: str) -> RespT:
    try:
        resp = pb.Response.FromString(data)
    except DecodeError as e:
        raise Internal(f"ttrpc {rpc}: undecodable response: {e}") from e
    if resp.HasField("status") and resp.status.code != Code.OK:
        raise error_for(resp.status.code, resp.status.message)
    try:
        return response_type.FromString(resp.payload)
    except DecodeError as e:
        raise Internal(f"ttrpc {rpc}: cannot decode {response_type.DESCRIPTOR.full_name}: {e}") from e
