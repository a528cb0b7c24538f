"""A guest command with its stdio streamed (``exec`` and ``run ... -- CMD``): its output as it
comes, in constant memory; our stdin to it with ``-i``; our terminal, in raw mode, as its
terminal with ``-t``; our signals forwarded to it, and nothing left running when we end.
"""

from __future__ import annotations

import collections
import os
import select
import signal
import sys
import termios
import threading
import time
import tty
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import BinaryIO, Protocol

from ..errors import DeadlineExceeded, InvalidArgument, VmSandboxError
from ..model import PtySize

__all__ = ["Spawner", "Process", "parse_env_file", "stream_command", "FORWARDED_SIGNALS"]

OutputSink = Callable[[bytes], None]
"""As :data:`vmsandbox.sandbox.ports.OutputSink` (the CLI names no orchestration module)."""

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
"""What the CLI passes on to the command instead of dying of it (as ``docker exec`` does)."""

_POLL = 0.1
"""How often the waiting loop looks at the signals that came (handlers only note them: a
handler runs between two bytecodes of the main thread, maybe inside a lock of the process)."""
_READ = 64 * 1024


class Process(Protocol):
    """What streaming uses of :class:`vmsandbox.sandbox.ports.GuestProcess`."""

    def write_stdin(self, data: bytes) -> None: ...

    def close_stdin(self) -> None: ...

    def resize(self, size: PtySize) -> None: ...

    def signal(self, signum: int) -> None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    @property
    def done(self) -> bool: ...

    def abort(self) -> None: ...


class Spawner(Protocol):
    """What streaming needs of a controller, ours or serve's (``spawn`` of either)."""

    def spawn(self, sandbox_id: str, argv: Sequence[str], *, stdout: OutputSink, stderr: OutputSink,
              env: Mapping[str, str] | None = None, cwd: str | None = None, user: str | None = None,
              tty: bool = False, size: PtySize | None = None, in_guest_root: bool = False) -> Process: ...


def parse_env_file(text: str, environ: Mapping[str, str], *, name: str = "env file") -> dict[str, str]:
    """Docker's ``--env-file``: ``KEY=VALUE`` lines (the value as it is, no quotes removed),
    ``#`` comments and blank lines skipped, leading blanks ignored; a bare ``KEY`` takes its
    value from ``environ`` and is left out when it has none. InvalidArgument for a line with
    no name or a name with blanks."""
    env: dict[str, str] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.lstrip()
        if not line or line.startswith("#"):
            continue
        key, eq, value = line.partition("=")
        if not key:
            raise InvalidArgument(f"{name} line {n}: no variable name in {raw!r}")
        if any(c.isspace() for c in key):
            raise InvalidArgument(f"{name} line {n}: variable {key!r} contains whitespace")
        if eq:
            env[key] = value
        elif key in environ:
            env[key] = environ[key]
    return env


def _writer(stream: BinaryIO, broken: threading.Event) -> OutputSink:
    def write(data: bytes) -> None:
        if not data or broken.is_set():
            return
        try:
            stream.write(data)
            stream.flush()
        except BrokenPipeError:
            broken.set()  # the reader is gone (`| head`): the waiting loop aborts the command
    return write


def _terminal_size(fd: int) -> PtySize:
    cols, rows = os.get_terminal_size(fd)
    return PtySize(width=cols, height=rows)


@contextmanager
def _raw(fd: int) -> Iterator[None]:
    """Our terminal in raw mode (keys, Ctrl-C and Ctrl-D included, go to the guest's terminal
    as they are), and its settings back however we leave."""
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd, termios.TCSANOW)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


@contextmanager
def _noted(signums: Sequence[int], pending: collections.deque[int]) -> Iterator[None]:
    """While inside, these signals are noted in ``pending`` instead of acting (main thread
    only: Python runs signal handlers there; elsewhere, as in a test's thread, nothing)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, lambda n, _f: pending.append(n)) for s in signums}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _pump_stdin(stdin: BinaryIO, proc: Process, stop: threading.Event) -> None:
    """Our stdin to the process until its EOF (then the process's stdin is closed) or ``stop``.
    A file descriptor is read directly, a little at a time as it is ready, so that this
    thread ends with the command (a thread left blocked in the buffered ``sys.stdin`` makes
    the interpreter abort at exit); anything else (a test's BytesIO) through ``read1``."""
    try:
        try:
            fd: int | None = stdin.fileno()
        except (AttributeError, OSError, ValueError):
            fd = None
        while not stop.is_set():
            if fd is None:
                data = stdin.read1(_READ) if hasattr(stdin, "read1") else stdin.read(_READ)
            elif select.select([fd], [], [], _POLL)[0]:
                data = os.read(fd, _READ)
            else:
                continue
            if not data:
                break
            proc.write_stdin(data)
    except (OSError, ValueError, VmSandboxError):
        pass  # our stdin or the process is gone; either way there is no more input
    finally:
        try:
            proc.close_stdin()
        except VmSandboxError:
            pass


def stream_command(ctl: Spawner, sandbox_id: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
                   cwd: str | None = None, user: str | None = None, interactive: bool = False,
                   terminal: bool = False, timeout: float | None = None, stdin: BinaryIO | None = None,
                   stdout: BinaryIO | None = None, stderr: BinaryIO | None = None) -> int:
    """Run ``argv`` in the sandbox with its output written to ``stdout``/``stderr`` (ours by
    default) as it comes, and return its exit status.

    ``interactive``: our stdin goes to it (EOF closes its stdin); else its stdin is closed at
    once. ``terminal``: it gets a terminal of our terminal's size (and later sizes, on
    SIGWINCH) and TERM, and our terminal is raw meanwhile; InvalidArgument when our stdin is
    not a terminal. SIGINT, SIGTERM, SIGHUP and SIGQUIT are forwarded to it. ``timeout``:
    DeadlineExceeded after that many seconds. However we leave (an error, an exception, a
    broken output pipe: exit 141), the command does not outlive us.
    """
    stdin = stdin if stdin is not None else sys.stdin.buffer
    stdout = stdout if stdout is not None else sys.stdout.buffer
    stderr = stderr if stderr is not None else sys.stderr.buffer
    env = dict(env or {})
    size = None
    fd = -1
    if terminal:
        try:
            fd = stdin.fileno()
        except (AttributeError, OSError, ValueError):
            fd = -1
        if fd < 0 or not os.isatty(fd):
            raise InvalidArgument("the input device is not a terminal: -t/--tty needs one on stdin "
                                  "(leave -t out to pipe input with -i)")
        size = _terminal_size(fd)
        env.setdefault("TERM", os.environ.get("TERM", "xterm"))
    broken, stop = threading.Event(), threading.Event()
    pump: threading.Thread | None = None
    pending: collections.deque[int] = collections.deque()
    deadline = None if timeout is None else time.monotonic() + timeout
    signums = [*FORWARDED_SIGNALS, *([signal.SIGWINCH] if terminal else [])]
    # Signals are noted (and the terminal raw) before the process starts: none is lost between.
    with _noted(signums, pending), (_raw(fd) if terminal else _nothing()):
        proc = ctl.spawn(sandbox_id, argv, stdout=_writer(stdout, broken), stderr=_writer(stderr, broken),
                         env=env, cwd=cwd, user=user, tty=terminal, size=size)
        try:
            if interactive:
                pump = threading.Thread(target=_pump_stdin, args=(stdin, proc, stop), daemon=True,
                                        name="vsbx-cli-stdin")
                pump.start()
            else:
                proc.close_stdin()
            while True:
                while pending:
                    n = pending.popleft()
                    if n == signal.SIGWINCH:
                        proc.resize(_terminal_size(fd))
                    else:
                        proc.signal(n)
                if broken.is_set():
                    proc.abort()
                    return 128 + signal.SIGPIPE
                step = _POLL
                if deadline is not None:
                    if (left := deadline - time.monotonic()) <= 0:
                        raise DeadlineExceeded(f"{list(argv)!r} still ran after {timeout}s; stopped it",
                                               sandbox_id=sandbox_id)
                    step = min(step, left)
                try:
                    return proc.wait(step)
                except DeadlineExceeded:
                    continue
        finally:
            stop.set()
            if not proc.done:
                proc.abort()
            if pump is not None:
                pump.join(1)


@contextmanager
def _nothing() -> Iterator[None]:
    yield
