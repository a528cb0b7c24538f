"""Streaming guest processes: one SSH session channel per process, output pumped to sinks.

:func:`spawn` opens a channel on the sandbox's transport (a pty first when asked), starts the
``vsbx-exec`` request and returns a :class:`SshProcess`, whose reader thread hands stdout and
stderr to the caller's sinks as they arrive. A sink that blocks holds the SSH window, so the
guest process blocks too (back-pressure, not buffering); a sink that raises is dropped and
that stream discarded, so a dead reader never wedges the process.
"""

from __future__ import annotations

import logging
import select
import threading
from collections.abc import Callable

import paramiko

from .._sinks import Sinks
from ..errors import DeadlineExceeded, FailedPrecondition, Unavailable
from ..model import PtySize, signal_name

__all__ = ["SshProcess", "spawn_on", "record_exit_signals", "exit_status", "exit_signal"]

log = logging.getLogger(__name__)

OutputSink = Callable[[bytes], None]

_TRANSIENT = (paramiko.SSHException, OSError, EOFError)
_CHUNK = 65536
# The names dropbear sends in "exit-signal" (its signames table), by their Linux number.
_EXIT_SIGNALS = {"HUP": 1, "INT": 2, "QUIT": 3, "ILL": 4, "ABRT": 6, "FPE": 8, "KILL": 9, "USR1": 10,
                 "SEGV": 11, "USR2": 12, "PIPE": 13, "ALRM": 14, "TERM": 15}
_EXIT_SIGNAL_ATTR = "_vsbx_exit_signal"


def _handle_request(chan: paramiko.Channel, m: paramiko.Message) -> None:
    start = m.packet.tell()
    if m.get_text() == "exit-signal":
        m.get_boolean()  # want-reply: always false for exit-signal (RFC 4254 6.10)
        setattr(chan, _EXIT_SIGNAL_ATTR, m.get_text())
        return
    m.packet.seek(start)
    getattr(paramiko.Channel, "_handle_request")(chan, m)


def record_exit_signals(transport: paramiko.Transport) -> None:
    """Make ``transport`` keep each channel's RFC 4254 "exit-signal" for :func:`exit_signal`.

    dropbear reports a session whose process (vsbx-exec) was killed by a signal (an SSH
    "signal" KILL) with exit-signal instead of exit-status; paramiko drops that request
    ("Unhandled channel request"). Its transport dispatches channel messages through a
    class-level table, so this transport gets its own copy with our handler in front.
    Call it before the transport opens channels."""
    table = dict(getattr(transport, "_channel_handler_table"))
    table[paramiko.common.MSG_CHANNEL_REQUEST] = _handle_request
    setattr(transport, "_channel_handler_table", table)


def exit_signal(chan: paramiko.Channel) -> int | None:
    """128+N when the guest reported that the session's process was killed by signal N."""
    num = _EXIT_SIGNALS.get(getattr(chan, _EXIT_SIGNAL_ATTR, None) or "")
    return None if num is None else 128 + num


def exit_status(chan: paramiko.Channel) -> int | None:
    """The channel's exit status, else 128+N for an exit-signal N; None when neither came."""
    if chan.exit_status_ready():
        code = chan.recv_exit_status()
        if code >= 0:
            return code
    return exit_signal(chan)


def spawn_on(transport: paramiko.Transport, command: str, *, stdout: OutputSink, stderr: OutputSink,
             tty: bool, size: PtySize | None, term: str, sandbox_id: str, what: str,
             supervised: bool = False) -> SshProcess:
    """Open a channel on ``transport`` and run ``command`` (an encoded vsbx-exec request).

    ``supervised``: the request supervises a daemon (or rejoins a keeper); vsbx-exec killed
    by a signal then tells nothing of the daemon's status, so wait() raises Unavailable."""
    try:
        chan = transport.open_session(timeout=30)
    except _TRANSIENT as e:
        raise Unavailable(f"cannot open a channel to the guest: {e}", sandbox_id=sandbox_id) from e
    try:
        if tty:
            sz = size or PtySize(80, 24)
            chan.get_pty(term=term, width=sz.width, height=sz.height)
        chan.exec_command(command)
    except _TRANSIENT as e:
        chan.close()
        raise Unavailable(f"cannot start {what!r} in the guest: {e}", sandbox_id=sandbox_id) from e
    return SshProcess(chan, transport, stdout=stdout, stderr=stderr, tty=tty, sandbox_id=sandbox_id, what=what,
                      supervised=supervised)


class SshProcess:
    """The GuestProcess port over one paramiko channel (see :class:`vmsandbox.sandbox.ports.GuestProcess`)."""

    def __init__(self, chan: paramiko.Channel, transport: paramiko.Transport, *, stdout: OutputSink,
                 stderr: OutputSink, tty: bool, sandbox_id: str, what: str, supervised: bool = False) -> None:
        self._chan, self._t = chan, transport
        self._sinks = Sinks(stdout, stderr, sandbox_id=sandbox_id, what=what)
        self._tty, self.sandbox_id, self._what = tty, sandbox_id, what
        self._stdin_lock = threading.Lock()
        self._stdin_closed = False
        self._status: int | None = None
        self._lost: str | None = None
        self._aborted = False
        self._supervised = supervised
        self._done = threading.Event()
        self._reader = threading.Thread(target=self._pump, daemon=True, name=f"vsbx-proc-{sandbox_id}")
        self._reader.start()

    # ------------------------------------------------------------------ output
    def _pump(self) -> None:
        chan = self._chan
        try:
            while True:
                select.select([chan], [], [], 0.5)
                moved = False
                while chan.recv_ready():
                    self._sinks.deliver(0, chan.recv(_CHUNK))
                    moved = True
                while chan.recv_stderr_ready():
                    self._sinks.deliver(1, chan.recv_stderr(_CHUNK))
                    moved = True
                if moved:
                    continue
                if chan.exit_status_ready() and (chan.eof_received or chan.closed):
                    break
                if chan.closed or not self._t.is_active():
                    break
            code = exit_status(chan)
            # A signal that killed vsbx-exec is the command's status (it dies with it), but
            # not after our own abort, nor of a supervised daemon, which runs on.
            if code is not None and not ((self._aborted or self._supervised) and exit_signal(chan) is not None):
                self._status = code
            if self._status is None:
                self._lost = "the connection to the guest closed before the process ended"
        except _TRANSIENT as e:
            self._lost = f"the guest connection failed: {e}"
        finally:
            self._sinks.deliver(0, b"")
            self._sinks.deliver(1, b"")
            chan.close()
            self._done.set()

    # ------------------------------------------------------------------ the port
    def write_stdin(self, data: bytes) -> None:
        with self._stdin_lock:
            if self._stdin_closed:
                raise FailedPrecondition(f"stdin of {self._what!r} is closed", sandbox_id=self.sandbox_id)
            try:
                self._chan.sendall(data)
            except _TRANSIENT as e:
                raise Unavailable(f"cannot write to {self._what!r}: {e}", sandbox_id=self.sandbox_id) from e

    def close_stdin(self) -> None:
        with self._stdin_lock:
            if self._stdin_closed:
                return
            self._stdin_closed = True
            if self._tty:
                # A terminal has no EOF; an SSH EOF would also end our window-changes
                # (paramiko refuses requests on a channel once it sent EOF).
                return
            try:
                self._chan.shutdown_write()
            except _TRANSIENT:
                pass  # the process or the channel is gone already: nothing left to close

    def resize(self, size: PtySize) -> None:
        if not self._tty:
            raise FailedPrecondition(f"{self._what!r} has no terminal to resize", sandbox_id=self.sandbox_id)
        if self._done.is_set():
            return
        try:
            self._chan.resize_pty(width=size.width, height=size.height)
        except _TRANSIENT as e:
            if not self._done.is_set():
                raise Unavailable(f"cannot resize the terminal of {self._what!r}: {e}",
                                  sandbox_id=self.sandbox_id) from e

    def wait(self, timeout: float | None = None) -> int:
        if not self._done.wait(timeout):
            raise DeadlineExceeded(f"{self._what!r} still runs after {timeout}s", sandbox_id=self.sandbox_id)
        if self._status is None:
            raise Unavailable(self._lost or "the process was aborted", sandbox_id=self.sandbox_id)
        return self._status

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def signal(self, signum: int) -> None:
        name = signal_name(signum)
        if not self._done.is_set():
            self._signal(name)

    def abort(self) -> None:
        if not self._done.is_set():
            self._aborted = True
            self._signal("KILL")
            # Let dropbear report the exit and close the channel itself first: a close from
            # us racing the child's exit made a later exec's new channel come back closed
            # ("Channel closed.") about one run in three of test_abort_ends_the_guest_process.
            self._done.wait(5)
        self._chan.close()
        self._done.wait(5)

    def _signal(self, name: str) -> None:
        # RFC 4254 6.9 "signal"; dropbear delivers it to vsbx-exec, which passes it on to its
        # command's group (KILL: vsbx-exec dies, and its command with it, PDEATHSIG). A bare channel close is not enough: dropbear closes the pipes but lets
        # a process that never writes (sleep) run on. paramiko has no API for this request.
        m = paramiko.Message()
        m.add_byte(paramiko.common.cMSG_CHANNEL_REQUEST)
        m.add_int(self._chan.remote_chanid)
        m.add_string("signal")
        m.add_boolean(False)
        m.add_string(name)
        send = getattr(self._t, "_send_user_message")  # what Channel's own requests use
        # Only while the channel is open, checked and sent under its lock (paramiko marks a
        # channel closed under it before it sends our CLOSE, so this request goes first): once
        # dropbear has both CLOSEs the channel's id is free. A request for a freed id makes
        # dropbear exit ("Unknown channel"), which wedges the connection, and a new channel
        # that reused the id would get the KILL.
        with self._chan.lock:
            if self._chan.closed or not self._chan.active:
                return
            try:
                send(m)
            except _TRANSIENT:
                pass  # the connection is gone: the guest ends the whole session anyway
