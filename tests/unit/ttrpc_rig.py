"""Helpers of the ttrpc tests: a short socket dir, raw frames on a socket, a test service."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from vmsandbox.proto.containerd.task.v3 import shim_pb2 as t
from vmsandbox.proto.ttrpc import request_pb2 as pb
from vmsandbox.ttrpc import RequestContext, Server

SERVICE = "test.v1.Echo"
ME = os.getuid()


@contextmanager
def socket_dir() -> Iterator[str]:
    """A fresh folder for sockets; pytest's tmp_path can exceed sun_path's 107 bytes."""
    d = tempfile.mkdtemp(prefix="ttrpcx-", dir="/tmp")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def echo(req: t.StateRequest, ctx: RequestContext) -> t.StateResponse:
    """Answers with the request's id; ``exec_id`` carries the stream id and the namespace."""
    return t.StateResponse(id=req.id, pid=ctx.stream_id, exec_id=ctx.first("containerd-namespace-ttrpc"))


def until_done(req: t.StateRequest, ctx: RequestContext) -> t.StateResponse:
    """As containerd's Wait: blocks until the deadline passes or the server cancels the request."""
    ctx.wait()
    ctx.check()
    return t.StateResponse()


def echo_server(path: str, **kw: object) -> Server:
    s = Server(allowed_uids=(ME,), **kw)  # type: ignore[arg-type]
    s.register(SERVICE, "Echo", t.StateRequest, t.StateResponse, echo)
    s.start(path)
    return s


def connect(path: str) -> socket.socket:
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.settimeout(5)
    c.connect(path)
    return c


def frame(sid: int, mtype: int, data: bytes, flags: int = 0, length: int | None = None) -> bytes:
    return struct.pack(">IIBB", len(data) if length is None else length, sid, mtype, flags) + data


def request(method: str = "Echo", id: str = "x", service: str = SERVICE, timeout_nano: int = 0) -> bytes:
    return pb.Request(service=service, method=method, payload=t.StateRequest(id=id).SerializeToString(),
                      timeout_nano=timeout_nano).SerializeToString()


def recv_exact(c: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = c.recv(n - len(out))
        if not chunk:
            raise EOFError(f"closed after {len(out)} of {n} bytes")
        out += chunk
    return out


def read_response(c: socket.socket) -> tuple[int, int, int, pb.Response]:
    """(stream id, type, flags, Response) of the next frame."""
    length, sid, mtype, flags = struct.unpack(">IIBB", recv_exact(c, 10))
    return sid, mtype, flags, pb.Response.FromString(recv_exact(c, length))


def new_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    return [th for th in threading.enumerate() if th not in before and th.is_alive()]


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))
