"""A test-side client of the Kubernetes remotecommand protocol over WebSocket (stdlib only).

What `kubectl exec -it` / `kubectl attach` (through the kubelet) and `crictl exec -it` speak to
containerd's CRI streaming server once RuntimeService.Exec / Attach returned a URL. The server
is k8s.io/kubelet/pkg/cri/streaming/remotecommand (websocket.go) on wsstream: it offers the
subprotocols channel.k8s.io, base64.channel.k8s.io, v4.channel.k8s.io and
v4.base64.channel.k8s.io (no v5 in containerd 2.1: stdin cannot be half-closed, only the whole
connection). With v4.channel.k8s.io each binary message is one channel byte then data:
0 stdin (client to server), 1 stdout, 2 stderr, 3 the exit status as a metav1.Status JSON
(written once, at the end), 4 resize, a JSON {"Width": W, "Height": H} (client to server).
The server first sends an empty message on the lowest writable channel (the "connected" mark).

Framing is RFC 6455: client frames are masked, server frames are not; pings are answered.
"""

from __future__ import annotations

import base64
import ctypes
import hashlib
import json
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

V4 = "v4.channel.k8s.io"
STDIN, STDOUT, STDERR, ERROR, RESIZE = 0, 1, 2, 3, 4
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def accept_key(key: str) -> str:
    """The Sec-WebSocket-Accept a server must answer to Sec-WebSocket-Key ``key``."""
    return base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()


def encode_frame(opcode: int, payload: bytes, mask: bytes | None = None, fin: bool = True) -> bytes:
    """One client frame (masked with ``mask``, 4 random bytes unless given)."""
    mask = os.urandom(4) if mask is None else mask
    assert len(mask) == 4
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 1 << 16:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def decode_frame(buf: bytes) -> tuple[bool, int, bytes, int] | None:
    """(fin, opcode, payload, bytes used) of the first whole frame in ``buf``, or None if
    ``buf`` holds less than one frame. Unmasks a masked frame."""
    if len(buf) < 2:
        return None
    fin, opcode = bool(buf[0] & 0x80), buf[0] & 0x0F
    masked, n, at = bool(buf[1] & 0x80), buf[1] & 0x7F, 2
    if n == 126:
        if len(buf) < 4:
            return None
        n, at = struct.unpack("!H", buf[2:4])[0], 4
    elif n == 127:
        if len(buf) < 10:
            return None
        n, at = struct.unpack("!Q", buf[2:10])[0], 10
    mask = b""
    if masked:
        if len(buf) < at + 4:
            return None
        mask, at = buf[at:at + 4], at + 4
    if len(buf) < at + n:
        return None
    payload = buf[at:at + n]
    if masked:
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return fin, opcode, payload, at + n


def connect_in_netns(address: tuple[str, int], netns: str | None, timeout: float) -> socket.socket:
    """A TCP connection made from network namespace ``netns`` (a path; None: ours). The
    private containerd listens on 127.0.0.1 of the node's namespace. setns(2) moves only the
    calling thread, so a short-lived thread joins the namespace and connects; the socket
    keeps that namespace after the thread is gone."""
    if netns is None:
        return socket.create_connection(address, timeout=timeout)
    got: list[socket.socket | BaseException] = []

    def run() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            with open(netns) as f:
                if libc.setns(f.fileno(), 0x40000000) != 0:  # CLONE_NEWNET
                    raise OSError(ctypes.get_errno(), f"setns {netns}")
            got.append(socket.create_connection(address, timeout=timeout))
        except BaseException as e:  # handed to the caller's thread
            got.append(e)

    t = threading.Thread(target=run, name="netns-connect")
    t.start()
    t.join()
    if isinstance(got[0], BaseException):
        raise got[0]
    return got[0]


@dataclass
class Result:
    """What one session received: each output channel's bytes and the status (channel 3)."""

    out: dict[int, bytes] = field(default_factory=dict)
    status: dict[str, object] | None = None
    closed: bool = False

    @property
    def stdout(self) -> bytes:
        return self.out.get(STDOUT, b"")

    @property
    def stderr(self) -> bytes:
        return self.out.get(STDERR, b"")

    @property
    def exit_code(self) -> int | None:
        """0 for a Success status, the ExitCode cause of a NonZeroExitCode one, else None."""
        if self.status is None:
            return None
        if self.status.get("status") == "Success":
            return 0
        details = self.status.get("details")
        if self.status.get("reason") == "NonZeroExitCode" and isinstance(details, dict):
            for cause in details.get("causes", []):
                if cause.get("reason") == "ExitCode":
                    return int(cause["message"])
        return None


class Session:
    """One remotecommand stream: connect to a streaming URL, send on stdin/resize, read the
    output channels until the status or the close."""

    def __init__(self, url: str, protocol: str = V4, timeout: float = 60, netns: str | None = None) -> None:
        u = urlsplit(url)
        assert u.scheme == "http", url  # containerd's stream server here has no TLS
        self.sock = connect_in_netns((u.hostname or "127.0.0.1", u.port or 80), netns, timeout)
        self.buf = b""
        self.partial: list[bytes] = []
        self.result = Result()
        key = base64.b64encode(os.urandom(16)).decode()
        path = u.path + (f"?{u.query}" if u.query else "")
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {u.netloc}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                           f"Sec-WebSocket-Protocol: {protocol}\r\n\r\n").encode())
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(4096)
            assert chunk, f"stream server closed during the handshake: {self.buf!r}"
            self.buf += chunk
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        assert lines[0].split(" ", 2)[1] == "101", f"no upgrade: {head!r}"
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        assert headers.get("sec-websocket-accept") == accept_key(key), headers
        self.protocol = headers.get("sec-websocket-protocol", "")

    def send(self, channel: int, data: bytes) -> None:
        self.sock.sendall(encode_frame(OP_BINARY, bytes([channel]) + data))

    def stdin(self, data: bytes | str) -> None:
        self.send(STDIN, data.encode() if isinstance(data, str) else data)

    def resize(self, width: int, height: int) -> None:
        self.send(RESIZE, json.dumps({"Width": width, "Height": height}).encode())

    def close(self) -> None:
        try:
            self.sock.sendall(encode_frame(OP_CLOSE, struct.pack("!H", 1000)))
        except OSError:
            pass
        self.sock.close()

    def _message(self) -> bytes | None:
        """The next whole data message (control frames handled here), None at the close."""
        while True:
            frame = decode_frame(self.buf)
            if frame is None:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return None
                self.buf += chunk
                continue
            fin, opcode, payload, used = frame
            self.buf = self.buf[used:]
            if opcode == OP_PING:
                self.sock.sendall(encode_frame(OP_PONG, payload))
            elif opcode == OP_CLOSE:
                return None
            elif opcode in (OP_TEXT, OP_BINARY, OP_CONT):
                self.partial.append(payload)
                if fin:
                    msg, self.partial = b"".join(self.partial), []
                    return msg

    def pump(self) -> bool:
        """Receive one message into the result; False once the server closed."""
        if self.result.closed:
            return False
        msg = self._message()
        if msg is None:
            self.result.closed = True
            return False
        if msg:
            channel, data = msg[0], msg[1:]
            if channel == ERROR:
                self.result.status = json.loads(data) if data else None
            else:
                self.result.out[channel] = self.result.out.get(channel, b"") + data
        return True

    def until(self, what: bytes, channel: int = STDOUT, timeout: float = 60) -> Result:
        """Read until ``channel`` holds ``what``."""
        end = time.monotonic() + timeout
        while what not in self.result.out.get(channel, b""):
            assert time.monotonic() < end, f"no {what!r} on channel {channel} within {timeout}s: {self.result}"
            self.sock.settimeout(max(0.1, end - time.monotonic()))
            try:
                assert self.pump(), f"closed before {what!r} on channel {channel}: {self.result}"
            except TimeoutError:
                raise AssertionError(f"no {what!r} on channel {channel} within {timeout}s: {self.result}") from None
        return self.result

    def wait(self, timeout: float = 60) -> Result:
        """Read until the server closes the stream (after the status)."""
        end = time.monotonic() + timeout
        while True:
            assert time.monotonic() < end, f"stream not closed within {timeout}s: {self.result}"
            self.sock.settimeout(max(0.1, end - time.monotonic()))
            try:
                more = self.pump()
            except TimeoutError:
                raise AssertionError(f"stream not closed within {timeout}s: {self.result}") from None
            if not more:
                self.sock.close()
                return self.result

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
