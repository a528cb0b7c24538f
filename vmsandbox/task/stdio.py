"""A process's host FIFOs (CRI's stdin/stdout/stderr) pumped to and from its guest process.

CRI opens stdout/stderr for reading and stdin for writing before it sends Create or Exec
(``containerd/fifo``, O_NONBLOCK). We open stdout/stderr O_WRONLY (O_NONBLOCK fails with
ENXIO until a reader exists, so we retry briefly; a full FIFO makes the writer wait, so a
slow reader slows the guest process rather than filling our memory, until :meth:`Stdio.cancel`) and stdin O_RDONLY|O_NONBLOCK
plus a writer of our own on it, so that the stdin FIFO never reads EOF while nobody writes:
containerd reports the end of stdin with CloseIO, and ``crictl attach`` may open a new
writer later. A reader that goes away (EPIPE) makes that stream be discarded, never a hang;
except for a held process (a container's init): as runc's shim does, we keep a read end of
its stdout/stderr FIFOs ourselves (never read), so that while containerd restarts its output
waits in the FIFO (64 KiB, then the writer waits) for the next containerd instead of EPIPE.
stdout/stderr are closed only after the process ended and its output drained: containerd's
Delete waits for that EOF.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import stat
import threading
import time
from typing import TYPE_CHECKING

from ..errors import FailedPrecondition, InvalidArgument
from ..sandbox.ports import GuestProcess
from .holder import hold, release

if TYPE_CHECKING:
    from .process import IoSpec

__all__ = ["Stdio", "FIFO_OPEN_TIMEOUT"]

log = logging.getLogger(__name__)

FIFO_OPEN_TIMEOUT = 10.0
"""How long we wait for CRI's reader on a stdout/stderr FIFO."""
TAIL = 4096
EOT = b"\x04"


def _check_fifo(path: str) -> None:
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise InvalidArgument(f"stdio path {path!r}: {e.strerror}") from e
    if not stat.S_ISFIFO(mode):
        raise InvalidArgument(f"stdio path {path!r} is not a FIFO")


def _open_writer(path: str, timeout: float) -> int:
    _check_fifo(path)
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise InvalidArgument(f"cannot open {path!r} for writing: {e.strerror}") from e
            if time.monotonic() >= deadline:
                raise FailedPrecondition(f"nobody reads the FIFO {path!r}") from e
            time.sleep(0.02)
            continue
        return fd


class _Out:
    """One output stream: a sink that writes to a FIFO (or nowhere) and keeps a short tail."""

    def __init__(self, fd: int | None) -> None:
        self.fd, self.tail = fd, b""
        self._lock = threading.Lock()
        self.cancelled = threading.Event()

    def __call__(self, data: bytes) -> None:
        if not data:
            return
        self.tail = (self.tail + data)[-TAIL:]
        with self._lock:
            view = memoryview(data)
            while view and self.fd is not None:
                try:
                    view = view[os.write(self.fd, view):]
                except BlockingIOError:  # the FIFO is full: wait for the reader, or a cancel
                    if self.cancelled.is_set():
                        log.info("stdio reader stalled; discarding the rest")
                        self._close_locked()
                    else:
                        select.select([], [self.fd], [], 0.2)
                except OSError as e:  # EPIPE: the reader went away; keep the process going
                    log.info("stdio reader went away (%s); discarding the rest", e.strerror)
                    self._close_locked()

    def close(self) -> None:
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)


class Stdio:
    """The FIFOs of one process. Paths may be "" (no such stream)."""

    def __init__(self, stdin: str, stdout: str, stderr: str, *, open_timeout: float = FIFO_OPEN_TIMEOUT,
                 holder: str = "", holder_pid: int = 0, terminal: bool = False) -> None:
        """``holder``: a name to keep the stdout/stderr FIFOs open in a holder process under
        (:mod:`.holder`; ``holder_pid``: one that runs already, after a restart). ``terminal``:
        CloseIO types ^D."""
        self.paths = (stdin, stdout, stderr)
        self.holder, self.holder_pid = holder, holder_pid
        self.terminal = terminal
        self._in: int | None = None
        self._keeper: int | None = None
        self._spares: list[int] = []  # our own read ends of a held process's stdout/stderr
        self.stdout, self.stderr = _Out(None), _Out(None)
        self._stop = threading.Event()
        self._stdin_closing = threading.Event()
        self._pump: threading.Thread | None = None
        self._proc: GuestProcess | None = None
        self._timeout = open_timeout

    @classmethod
    def reopened(cls, io: IoSpec, *, holder: str, holder_pid: int, open_timeout: float = FIFO_OPEN_TIMEOUT) -> Stdio:
        """The stdout/stderr FIFOs of a process taken back after a restart (its stdin does
        not come back); when they cannot be opened any more, a Stdio that discards."""
        stdio = cls("", io.stdout, io.stderr, open_timeout=open_timeout, holder=holder, holder_pid=holder_pid)
        try:
            stdio.open()
        except (InvalidArgument, FailedPrecondition) as e:
            log.warning("the FIFOs %s, %s are gone (%s): that output is discarded", io.stdout, io.stderr, e)
            stdio.close()
            return cls("", "", "")
        return stdio

    def open(self) -> None:
        """Open every FIFO named; on failure nothing stays open."""
        stdin, stdout, stderr = self.paths
        try:
            if stdout:
                self.stdout.fd = _open_writer(stdout, self._timeout)
            if stderr:
                self.stderr.fd = _open_writer(stderr, self._timeout)
            if stdin:
                _check_fifo(stdin)
                self._in = os.open(stdin, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                self._keeper = os.open(stdin, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            held = [fd for fd in (self.stdout.fd, self.stderr.fd) if fd is not None]
            if self.holder:
                self._spares = [os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC) for path in (stdout, stderr) if path]
                held += self._spares
            if self.holder and held and not self.holder_pid:
                self.holder_pid = hold(held, self.holder)
        except BaseException:
            self.close()
            raise

    @property
    def tail(self) -> str:
        """The last bytes the process wrote to stderr (or stdout), for error messages."""
        return (self.stderr.tail or self.stdout.tail).decode(errors="replace").strip()

    # ------------------------------------------------------------------ stdin
    def attach(self, proc: GuestProcess) -> None:
        """Start feeding stdin to ``proc`` (at once EOF when there is no stdin FIFO)."""
        self._proc = proc
        if self._in is None:
            proc.close_stdin()
            return
        if self._stdin_closing.is_set():
            self._close_keeper()
        self._pump = threading.Thread(target=self._feed, args=(proc,), daemon=True, name="vsbx-task-stdin")
        self._pump.start()

    def _feed(self, proc: GuestProcess) -> None:
        fd = self._in
        assert fd is not None
        eof = False
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select([fd], [], [], 0.2)
                if not ready:
                    continue
                try:
                    data = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                if not data:
                    eof = True
                    break
                proc.write_stdin(data)
        except Exception as e:  # noqa: BLE001 - the process ended or the channel dropped
            log.debug("stdin pump ended: %s", e)
        if eof:
            try:
                if self.terminal:
                    # A terminal has no EOF of its own: as typed, ^D ends a read at a line start.
                    proc.write_stdin(EOT)
                proc.close_stdin()
            except Exception as e:  # noqa: BLE001
                log.debug("stdin close failed: %s", e)

    def close_stdin(self) -> None:
        """CloseIO: what CRI already wrote still reaches the process, then EOF (for a
        terminal: ^D, as if typed)."""
        self._stdin_closing.set()
        if self._proc is None:
            return  # not started yet: attach() honours it
        if self._in is None:
            self._proc.close_stdin()
        else:
            self._close_keeper()

    def _close_keeper(self) -> None:
        fd, self._keeper = self._keeper, None
        if fd is not None:
            os.close(fd)

    # ------------------------------------------------------------------ teardown
    def cancel(self) -> None:
        """Stop waiting for stalled readers: output from now on is discarded where it would block."""
        self.stdout.cancelled.set()
        self.stderr.cancelled.set()

    def close(self) -> None:
        """Close everything: after the process ended and its output drained. Idempotent."""
        self.let_go()
        pid, self.holder_pid = self.holder_pid, 0
        if pid:
            release(pid, self.holder)  # now CRI's readers see EOF

    def let_go(self) -> None:
        """Close our ends but leave the holder (``vmsandbox serve`` stops; the process runs on)."""
        self._stop.set()
        if self._pump is not None and self._pump is not threading.current_thread():
            self._pump.join(timeout=5)
        self._close_keeper()
        fd, self._in = self._in, None
        if fd is not None:
            os.close(fd)
        self.stdout.close()
        self.stderr.close()
        spares, self._spares = self._spares, []
        for fd in spares:
            os.close(fd)
