"""The task socket's relay: a small process per sandbox that outlives ``vmsandbox serve``.

containerd treats a failed Wait as the container's death (CRI kills and deletes the task), and
a Wait fails as soon as the connection under it closes. So containerd does not talk to serve
directly: it connects to this relay on ``task.sock``, and the relay forwards each of its
connections to serve's own socket (``serve.sock`` beside it). When serve goes away the relay
keeps containerd's connection, reconnects to the next serve, and sends it again every request
that had no response yet (a Wait, typically); new requests wait for it. A request whose
answer was lost with the old serve is therefore run twice (Kill, say). ttrpc frames are
10-byte headers (length, stream id, type, flags) and a payload; only types matter here.

Run as a script (``python relay.py LISTEN UPSTREAM UID...``), not as ``-m``: it imports the
standard library only, so it starts fast and never holds vmsandbox's modules. SIGTERM ends it.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import sys
import threading
import time

HEADER = struct.Struct(">IIBB")
REQUEST, RESPONSE = 1, 2
MAX_FRAME = 4 << 20
RETRY, MAX_RETRY = 0.1, 1.0
WATCH = 2.0  # how often the relay checks that its socket is still its own (else it ends)
_UCRED = struct.Struct("3i")


def read_frame(sock: socket.socket) -> bytes | None:
    """One whole frame (header + payload); None at EOF or on an error."""
    buf = b""
    try:
        while len(buf) < HEADER.size:
            got = sock.recv(HEADER.size - len(buf))
            if not got:
                return None
            buf += got
        length = HEADER.unpack(buf)[0]
        if length > MAX_FRAME:
            return None
        while len(buf) < HEADER.size + length:
            got = sock.recv(HEADER.size + length - len(buf))
            if not got:
                return None
            buf += got
    except OSError:
        return None
    return buf


class Pipe:
    """One containerd connection and its (re)connected upstream."""

    def __init__(self, down: socket.socket, upstream: str) -> None:
        self.down, self.path = down, upstream
        self.lock = threading.Lock()  # guards up, inflight and every write to up
        self.inflight: dict[int, bytes] = {}
        self.up: socket.socket | None = None
        self.closed = threading.Event()

    def _connect(self) -> socket.socket | None:
        wait = RETRY
        while not self.closed.is_set():
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(self.path)
                return s
            except OSError:
                s.close()
                self.closed.wait(wait)
                wait = min(wait * 2, MAX_RETRY)
        return None

    def run(self) -> None:
        threading.Thread(target=self._from_down, daemon=True).start()
        while not self.closed.is_set():
            up = self._connect()
            if up is None:
                break
            with self.lock:
                self.up = up
                try:
                    for pending in self.inflight.values():  # what the last serve left unanswered
                        up.sendall(pending)
                except OSError:
                    pass  # gone again: read_frame sees it, and the next one gets them
            while (frame := read_frame(up)) is not None:
                if HEADER.unpack_from(frame)[2] == RESPONSE:
                    with self.lock:
                        self.inflight.pop(HEADER.unpack_from(frame)[1], None)
                try:
                    self.down.sendall(frame)
                except OSError:
                    self.closed.set()
                    break
            with self.lock:
                self.up = None
            up.close()
        self.down.close()

    def _from_down(self) -> None:
        while (frame := read_frame(self.down)) is not None:
            _, stream, kind, _ = HEADER.unpack_from(frame)
            with self.lock:
                if kind == REQUEST:
                    self.inflight[stream] = frame
                if self.up is not None:
                    try:
                        self.up.sendall(frame)
                    except OSError:
                        pass  # serve is gone: sent again to the next one
        self.closed.set()
        with self.lock:
            if self.up is not None:
                try:
                    self.up.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def serve(listen: str, upstream: str, uids: set[int]) -> None:
    try:
        os.unlink(listen)
    except FileNotFoundError:
        pass
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(listen + ".tmp")
    os.chmod(listen + ".tmp", 0o600)
    lsock.listen(64)
    os.rename(listen + ".tmp", listen)  # connectable once it shows up
    mine = os.stat(listen).st_ino
    lsock.settimeout(WATCH)
    while True:
        try:
            conn, _ = lsock.accept()
        except (InterruptedError, TimeoutError):
            try:
                if os.stat(listen).st_ino == mine:
                    continue
            except OSError:
                pass
            return  # its socket was removed (the sandbox went without telling us): end
        conn.settimeout(None)
        uid = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))[1]
        if uid not in uids:
            conn.close()
            continue
        threading.Thread(target=Pipe(conn, upstream).run, daemon=True).start()


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print("usage: relay.py LISTEN UPSTREAM UID...", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        serve(argv[0], argv[1], {int(u) for u in argv[2:]})
    except OSError as e:
        print(f"relay {argv[0]}: {e}", file=sys.stderr)
        time.sleep(0.1)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
