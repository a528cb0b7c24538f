"""A process started in a sandbox (:meth:`vmsandbox.Sandbox.spawn`): its streams while it runs.

Output goes to the caller's callbacks, or into a bounded buffer per stream that
:attr:`Process.stdout` and :attr:`Process.stderr` iterate; a full buffer stops reading from
the guest (back-pressure reaches the process there) instead of growing without bound.
"""

from __future__ import annotations

import collections
import signal as _signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence

from ..errors import DeadlineExceeded
from ..model import PtySize
from ..sandbox.ports import GuestProcess

__all__ = ["Process", "OutputStream", "OutputCallback", "DEFAULT_BUFFER"]

OutputCallback = Callable[[bytes], None]
"""Called from a reader thread with each chunk as it arrives (never with ``b""``)."""

DEFAULT_BUFFER = 16 * 1024 * 1024
"""Bytes a stream's buffer holds before the guest process is made to wait for a reader."""


class OutputStream:
    """One output stream of a :class:`Process`: iterate it for chunks as they arrive.

    Iteration ends when the process closed the stream. Thread-safe; each chunk goes to one
    reader. While ``limit`` bytes wait unread, the process in the guest blocks on its writes.
    """

    def __init__(self, limit: int = DEFAULT_BUFFER) -> None:
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._limit = limit
        self._eof = False
        self._discard = False
        self._cond = threading.Condition()

    # the producer side (the process's reader thread)
    def _put(self, data: bytes) -> None:
        with self._cond:
            if not data:
                self._eof = True
            elif not self._discard:
                while self._size >= self._limit and not self._discard:
                    self._cond.wait(0.5)
                if not self._discard:
                    self._chunks.append(data)
                    self._size += len(data)
            self._cond.notify_all()

    def _close(self) -> None:
        """Stop buffering: what comes later is dropped (the process was left)."""
        with self._cond:
            self._discard = True
            self._cond.notify_all()

    # the consumer side
    def __iter__(self) -> Iterator[bytes]:
        while True:
            chunk = self.read_chunk()
            if chunk is None:
                return
            yield chunk

    def read_chunk(self, timeout: float | None = None) -> bytes | None:
        """The next chunk; None at the end of the stream. DeadlineExceeded after ``timeout`` s."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._chunks or self._eof, timeout):
                raise DeadlineExceeded(f"no output within {timeout}s")
            if not self._chunks:
                return None
            chunk = self._chunks.popleft()
            self._size -= len(chunk)
            self._cond.notify_all()
            return chunk

    def read(self) -> bytes:
        """Everything up to the end of the stream (blocks until the process closed it)."""
        return b"".join(self)

    def lines(self) -> Iterator[bytes]:
        """The stream split after each ``\\n`` (the last line may have none)."""
        pending = b""
        for chunk in self:
            pending += chunk
            *full, pending = pending.split(b"\n")
            for line in full:
                yield line + b"\n"
        if pending:
            yield pending


class Process:
    """A process running in a sandbox. Thread-safe.

    Use as a context manager to be sure it is gone afterwards (killed if still running).
    ``returncode`` is None while it runs, then its exit status (128+N after signal N).
    """

    def __init__(self, argv: Sequence[str], start: Callable[[OutputCallback, OutputCallback], GuestProcess], *,
                 on_stdout: OutputCallback | None, on_stderr: OutputCallback | None, tty: bool,
                 timeout: float | None, buffer: int = DEFAULT_BUFFER) -> None:
        self.argv = list(argv)
        self.tty = tty
        self.stdout = OutputStream(buffer)
        self.stderr = OutputStream(buffer)
        """A terminal has one stream: with ``tty`` everything is on :attr:`stdout`."""
        self.started_at = time.monotonic()
        self.timed_out = False
        self._returncode: int | None = None
        self._lock = threading.Lock()

        def sink(callback: OutputCallback | None, stream: OutputStream) -> OutputCallback:
            if callback is None:
                return stream._put

            def call(data: bytes) -> None:
                if data:
                    callback(data)
                else:
                    stream._put(b"")
            return call

        self._proc = start(sink(on_stdout, self.stdout), sink(on_stderr, self.stderr))
        self._timer: threading.Timer | None = None
        if timeout is not None:
            self._timer = threading.Timer(timeout, self._on_timeout)
            self._timer.daemon = True
            self._timer.start()

    def _on_timeout(self) -> None:
        if not self._proc.done:
            self.timed_out = True
            self.kill()

    # ------------------------------------------------------------------ input
    def write(self, data: bytes | str) -> None:
        """Send ``data`` to its stdin (str as UTF-8); blocks while the guest does not read.
        FailedPrecondition after :meth:`close_stdin`, Unavailable when the connection is gone."""
        self._proc.write_stdin(data.encode() if isinstance(data, str) else data)

    def close_stdin(self) -> None:
        """End of input (a terminal has no end of input: send ``b"\\x04"`` there). Idempotent."""
        self._proc.close_stdin()

    def resize(self, rows: int, cols: int) -> None:
        """Change its terminal's size (SIGWINCH in the guest); FailedPrecondition without a tty."""
        self._proc.resize(PtySize(width=cols, height=rows))

    # ------------------------------------------------------------------ signals
    def send_signal(self, signum: int) -> None:
        """Deliver ``signum`` (SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGKILL, SIGUSR1, SIGUSR2) to
        its process group; a no-op once it ended; InvalidArgument for another signal."""
        self._proc.signal(signum)

    def terminate(self) -> None:
        """SIGTERM (:meth:`send_signal`)."""
        self.send_signal(_signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: it ends at once (exit status 137)."""
        self.send_signal(_signal.SIGKILL)

    # ------------------------------------------------------------------ the end
    def wait(self, timeout: float | None = None) -> int:
        """Its exit status, once it ended and its output reached the buffers or callbacks.
        DeadlineExceeded after ``timeout`` seconds (it keeps running); Unavailable when the
        connection to the guest dropped first."""
        code = self._proc.wait(timeout)
        with self._lock:
            self._returncode = code
            if self._timer is not None:
                self._timer.cancel()
        return code

    @property
    def returncode(self) -> int | None:
        if self._returncode is None and self._proc.done:
            try:
                self.wait(0)
            except Exception:  # noqa: BLE001 - a lost connection: still no code
                return None
        return self._returncode

    def close(self) -> None:
        """Kill it if it still runs and let go of its streams. Idempotent."""
        self.stdout._close()  # first: a reader thread waiting on a full buffer goes on
        self.stderr._close()
        if not self._proc.done:
            self.kill()
            try:
                self._proc.wait(5)
            except Exception:  # noqa: BLE001 - it is aborted below either way
                pass
        self._proc.abort()
        if self._timer is not None:
            self._timer.cancel()

    def __enter__(self) -> Process:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Process {self.argv!r} returncode={self._returncode}>"
