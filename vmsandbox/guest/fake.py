"""In-memory guest agents for the unit tier: the GuestChannel port with failpoints.

:class:`FakeGuests` is the GuestFactory; each channel answers once its VM runs (``vm_running``,
by agent socket path, usually the fake hypervisor's view). ``exec`` runs ``handler(argv)``
(default: exit 0, no output); the power-off helper calls ``on_poweroff(socket_path)``.
A wrong host key is refused like the real agent refuses it. :meth:`FakeGuests.break_transport`
leaves a channel half-dead, as a paramiko transport whose session channels can no longer be
opened: it still reports itself connected and ``connect`` returns at once, but every exec
fails with Unavailable until the channel is closed and connected again.

``spawn`` returns a :class:`FakeProcess` the test drives: ``emit``/``exit``/``lose`` play the
guest side, and what the caller did (stdin bytes, EOF, resizes, abort) is recorded on it.
``on_spawn(process)`` runs first (to script it); closing the channel loses every process.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from .._failpoints import Failpoints
from ..errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, Unavailable
from ..model import ExecResult, PtySize, signal_name

__all__ = ["FakeGuests", "FakeChannel", "ExecCall", "SpawnCall", "FakeProcess"]

POWEROFF = "/sbin/vsbx-poweroff"


@dataclass(frozen=True)
class ExecCall:
    socket_path: str
    argv: tuple[str, ...]
    env: dict[str, str]
    cwd: str | None
    stdin: bytes | None
    timeout: float | None
    in_guest_root: bool
    user: str | None = None


@dataclass(frozen=True)
class SpawnCall:
    socket_path: str
    argv: tuple[str, ...]
    env: dict[str, str]
    cwd: str | None
    tty: bool
    size: PtySize | None
    in_guest_root: bool
    supervise_pidfile: str | None
    keep: str | None = None
    rejoin: str | None = None
    console_socket: str | None = None
    user: str | None = None


class FakeProcess:
    """A guest process of the fake: its output, exit and connection loss are played by the test."""

    def __init__(self, call: SpawnCall, stdout: Callable[[bytes], None], stderr: Callable[[bytes], None],
                 sandbox_id: str) -> None:
        self.call, self.sandbox_id = call, sandbox_id
        self._sinks = (stdout, stderr)
        self._cond = threading.Condition()
        self.stdin = bytearray()
        self.stdin_closed = False
        self.sizes: list[PtySize] = []
        self.signals: list[int] = []
        self.aborted = False
        self.status: int | None = None
        self._done = False
        self.stdin_failure: BaseException | None = None

    # the guest side, played by tests
    def emit(self, data: bytes, stream: int = 1) -> None:
        """Output on stdout (1) or stderr (2), delivered to the caller's sink at once."""
        with self._cond:
            if self._done:
                raise AssertionError("the process ended; it cannot print")
        self._sinks[stream - 1](data)

    def exit(self, status: int) -> None:
        self._end(status)

    def lose(self) -> None:
        """The connection dropped: ``wait`` raises Unavailable."""
        self._end(None)

    def _end(self, status: int | None) -> None:
        with self._cond:
            if self._done:
                return
            self._done, self.status = True, status
        for sink in self._sinks:
            sink(b"")
        with self._cond:
            self._cond.notify_all()

    # the port
    def write_stdin(self, data: bytes) -> None:
        if self.stdin_failure is not None:
            raise self.stdin_failure
        with self._cond:
            if self.stdin_closed:
                raise FailedPrecondition("stdin is closed", sandbox_id=self.sandbox_id)
            if self._done and self.status is None:
                raise Unavailable("the connection is gone", sandbox_id=self.sandbox_id)
            self.stdin += data
            self._cond.notify_all()

    def close_stdin(self) -> None:
        with self._cond:
            self.stdin_closed = True
            self._cond.notify_all()

    def resize(self, size: PtySize) -> None:
        if not self.call.tty:
            raise FailedPrecondition("no terminal", sandbox_id=self.sandbox_id)
        self.sizes.append(size)

    def wait(self, timeout: float | None = None) -> int:
        with self._cond:
            if not self._cond.wait_for(lambda: self._done, timeout):
                raise DeadlineExceeded("still running", sandbox_id=self.sandbox_id)
            if self.status is None:
                raise Unavailable("the connection closed before the process ended", sandbox_id=self.sandbox_id)
            return self.status

    @property
    def done(self) -> bool:
        return self._done

    def signal(self, signum: int) -> None:
        """Recorded in ``signals``; the test plays what the process does with it, except that
        SIGKILL ends it (137), as it would in a guest."""
        signal_name(signum)
        if not self._done:
            self.signals.append(signum)
            if signum == 9:
                self._end(137)

    def abort(self) -> None:
        self.aborted = True
        self.lose()

    def wait_stdin(self, predicate: Callable[[FakeProcess], bool], timeout: float = 5) -> None:
        """For tests: block until ``predicate(self)`` holds (stdin bytes or EOF arrived)."""
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(self), timeout):
                raise AssertionError("timed out waiting for stdin")


@dataclass
class FakeGuests:
    vm_running: Callable[[str], bool] = lambda socket_path: True
    on_poweroff: Callable[[str], None] = lambda socket_path: None
    handler: Callable[[ExecCall], ExecResult] = lambda call: ExecResult(0, b"", b"")
    on_spawn: Callable[[FakeProcess], None] = lambda process: None
    processes: list[FakeProcess] = field(default_factory=list)
    fp: Failpoints = field(default_factory=Failpoints)
    channels: list[FakeChannel] = field(default_factory=list)
    execs: list[ExecCall] = field(default_factory=list)
    host_keys: dict[str, str] = field(default_factory=dict)  # socket -> the key the guest presents
    connects: list[tuple[str, bool]] = field(default_factory=list)  # (sandbox id, booting) per connect call

    def __call__(self, socket_path: str, client_key_pem: bytes, host_key_line: str, sandbox_id: str) -> FakeChannel:
        ch = FakeChannel(self, socket_path, host_key_line, sandbox_id)
        self.channels.append(ch)
        return ch

    def open_channels(self) -> list[FakeChannel]:
        return [c for c in self.channels if c.connected]

    def break_transport(self, socket_path: str) -> None:
        """Make the connected channels of ``socket_path`` half-dead (see the module docstring)."""
        for c in self.channels:
            if c.socket_path == socket_path and c.connected:
                c.stale = True


class FakeChannel:
    def __init__(self, guests: FakeGuests, socket_path: str, host_key_line: str, sandbox_id: str) -> None:
        self._g, self.socket_path, self.sandbox_id = guests, socket_path, sandbox_id
        self._host_key = host_key_line
        self._connected = False
        self.stale = False
        self.rekeyed = False
        self._lock = threading.Lock()

    @property
    def connected(self) -> bool:
        return self._connected and self._g.vm_running(self.socket_path)

    def connect(self, deadline: float, alive: Callable[[], bool] | None = None, *, booting: bool = False) -> None:
        self._g.fp.hit("connect")
        self._g.connects.append((self.sandbox_id, booting))
        with self._lock:
            if self.connected:
                return
            while True:
                if alive is not None and not alive():
                    raise FailedPrecondition("the VM stopped while booting", sandbox_id=self.sandbox_id)
                if self._g.vm_running(self.socket_path):
                    presented = self._g.host_keys.get(self.socket_path, self._host_key)
                    if presented != self._host_key:
                        raise FailedPrecondition("the guest presented another host key", sandbox_id=self.sandbox_id)
                    self._connected = True
                    return
                if time.monotonic() >= deadline:
                    raise DeadlineExceeded("guest agent did not answer in time", sandbox_id=self.sandbox_id)
                time.sleep(0.01)

    def exec(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | None = None,
        timeout: float | None = None,
        in_guest_root: bool = False,
        max_output: int | None = None,
        user: str | None = None,
    ) -> ExecResult:
        call = ExecCall(self.socket_path, tuple(argv), dict(env or {}), cwd, stdin, timeout, in_guest_root, user)
        self._g.fp.hit("exec")
        if not self.connected:
            raise Unavailable("no connection to the guest agent", sandbox_id=self.sandbox_id)
        if self.stale:
            raise Unavailable("cannot open a channel to the guest: transport is half-dead", sandbox_id=self.sandbox_id)
        self._g.execs.append(call)
        if tuple(argv) == (POWEROFF,):
            self._g.on_poweroff(self.socket_path)
            return ExecResult(0, b"", b"")
        return self._g.handler(call)

    def spawn(
        self,
        argv: Sequence[str],
        *,
        stdout: Callable[[bytes], None],
        stderr: Callable[[bytes], None],
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        tty: bool = False,
        size: PtySize | None = None,
        in_guest_root: bool = False,
        supervise_pidfile: str | None = None,
        keep: str | None = None,
        rejoin: str | None = None,
        console_socket: str | None = None,
        user: str | None = None,
    ) -> FakeProcess:
        self._g.fp.hit("spawn")
        if not argv and rejoin is None:
            raise InvalidArgument("argv must be a non-empty sequence of strings")
        if not self.connected or self.stale:
            raise Unavailable("no connection to the guest agent", sandbox_id=self.sandbox_id)
        call = SpawnCall(self.socket_path, tuple(argv), dict(env or {}), cwd, tty, size, in_guest_root,
                         supervise_pidfile, keep, rejoin, console_socket, user)
        proc = FakeProcess(call, stdout, stderr, self.sandbox_id)
        self._g.processes.append(proc)
        self._g.on_spawn(proc)
        return proc

    def rekey(self, client_key_pem: bytes, host_key_line: str) -> None:
        self._host_key = host_key_line
        self.rekeyed = True

    def close(self) -> None:
        self._connected = False
        self.stale = False
        for p in self._g.processes:
            if p.call.socket_path == self.socket_path:
                p.lose()
