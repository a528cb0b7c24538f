"""The only module that imports paramiko: the control channel into a guest.

The guest's dropbear is reached over a virtio-serial port that QEMU exposes as a unix socket
on the host (no guest network needed, works under TCG and without vhost-vsock). One SSH
transport per sandbox, many exec channels on it; the host key is pinned at create time.
Exec requests are encoded for the guest's ``vsbx-exec`` login shell (images/README.md):
argv is never interpreted by a shell.
"""

from __future__ import annotations

import base64
import io
import logging
import select
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence

import paramiko
from tenacity import Retrying, retry_if_exception_type, wait_exponential

from ..errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, Unavailable
from ..model import ExecResult, PtySize
from .process import OutputSink, SshProcess, exit_status, record_exit_signals, spawn_on

__all__ = ["GuestAgent", "encode_exec_request", "EXEC_TIMEOUT_EXIT"]

log = logging.getLogger(__name__)

EXEC_TIMEOUT_EXIT = 124
# dropbear drops the whole connection for a command string over 9000 bytes (MAX_STRING_LEN).
MAX_REQUEST = 8192
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_TRANSIENT = (paramiko.SSHException, OSError, EOFError)
MAX_OUTPUT = 32 * 1024 * 1024
"""Default cap on what one exec may print (stdout and stderr together), in bytes."""
# Readiness: retry transient connection failures while the guest boots, backing off from
# 50 ms to 0.5 s, until the caller's deadline (the stop condition is set per call).
READINESS_WAIT = wait_exponential(multiplier=0.05, max=0.5)
RECONNECT_BANNER_WAITS = (1.0, 2.0, 4.0, 8.0)
"""How long each reconnect attempt to a booted guest waits for its SSH banner (then 8 s each).

A booted guest's agent answers within milliseconds. When it does not, the connection is
wedged (QEMU 7.2's char-socket serving a new client before the guest saw the old one leave)
and a fresh one works: measured after a controller restart, one 10 s wait made the first
exec take 10.5 s. Short waits first make that prompt; doubling keeps a slow guest reachable.
"""


def encode_exec_request(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    timeout: float | None = None,
    in_guest_root: bool = False,
    supervise_pidfile: str | None = None,
    keep: str | None = None,
    rejoin: str | None = None,
    console_socket: str | None = None,
    user: str | None = None,
) -> str:
    """The command string for ``vsbx-exec``: ``vsbx1`` then hex tokens, no shell syntax.

    ``keep`` (with ``supervise_pidfile``): a detached keeper supervises the daemon, its output
    in ``<keep>.out``/``.err`` and its exit code in ``<keep>.exit``; ``rejoin`` (no argv):
    wait for the keeper of that prefix and end with its code (images/README.md, tokens k, w).
    ``user``: ``NAME|UID[:GROUP|GID]`` to run as, resolved in the root the command runs in
    (token u, as runc resolves an image's User; not with ``supervise_pidfile``: crun runs as
    root and a container's user is in its OCI spec); None runs as root. The default
    ``HOME=/root`` is sent only without ``user``: with one the guest sets HOME from the
    user's passwd entry unless ``env`` has HOME."""
    for what, path in (("keep", keep), ("rejoin", rejoin)):
        if path is not None and (not path.startswith("/") or "\0" in path):
            raise InvalidArgument(f"the {what} prefix must be an absolute path, not {path!r}")
    if keep is not None and supervise_pidfile is None:
        raise InvalidArgument("keep needs supervise_pidfile")
    if rejoin is not None:
        if argv:
            raise InvalidArgument("rejoin takes no argv")
        return "vsbx1 w" + rejoin.encode("utf-8", "surrogateescape").hex()
    if not argv or not all(isinstance(a, str) for a in argv):
        raise InvalidArgument("argv must be a non-empty sequence of strings")
    if len(argv) > 1000:
        raise InvalidArgument("argv has more than 1000 elements")
    environ = {"PATH": DEFAULT_PATH, "HOME": "/root", "TERM": "dumb"}
    if user is not None:
        del environ["HOME"]
    environ.update(env or {})
    for k, v in environ.items():
        if not k or "=" in k or "\0" in k or "\0" in v:
            raise InvalidArgument(f"bad environment variable {k!r}")
    for a in argv:
        if "\0" in a:
            raise InvalidArgument("argv elements must not contain NUL")
    if cwd is not None and (not cwd.startswith("/") or "\0" in cwd):
        raise InvalidArgument(f"cwd must be an absolute path, not {cwd!r}")
    if supervise_pidfile is not None and (not supervise_pidfile.startswith("/") or "\0" in supervise_pidfile):
        raise InvalidArgument(f"the pid file must be an absolute path, not {supervise_pidfile!r}")
    if console_socket is not None and (supervise_pidfile is None or not console_socket.startswith("/")
                                       or "\0" in console_socket or len(console_socket.encode()) > 107):
        raise InvalidArgument(f"a console socket needs a pid file and a short absolute path, not {console_socket!r}")
    if user is not None and (not user or any(c in user for c in "\0\n") or user.count(":") > 1
                             or "" in user.split(":")):
        raise InvalidArgument(f"user must be NAME, UID, NAME:GROUP or UID:GID, not {user!r}")
    if user is not None and supervise_pidfile is not None:
        raise InvalidArgument("user is not for a supervised command: the OCI spec carries a container's user")

    def hx(text: str) -> str:
        return text.encode("utf-8", "surrogateescape").hex()

    tokens = ["vsbx1"]
    tokens += ["a" + hx(a) for a in argv]
    tokens += ["e" + hx(f"{k}={v}") for k, v in environ.items()]
    if cwd:
        tokens.append("c" + hx(cwd))
    if timeout is not None:
        tokens.append("t" + str(max(1, int(timeout * 1000))).encode().hex())
    if in_guest_root:
        tokens.append("r")
    if supervise_pidfile is not None:
        tokens.append("p" + hx(supervise_pidfile))
    if keep is not None:
        tokens.append("k" + hx(keep))
    if console_socket is not None:
        tokens.append("y" + hx(console_socket))
    if user is not None:
        tokens.append("u" + hx(user))
    cmd = " ".join(tokens)
    if len(cmd) > MAX_REQUEST:
        raise InvalidArgument(
            f"exec request too large ({len(cmd)} bytes encoded, at most {MAX_REQUEST}): keep argv and env "
            "under about 3.9 KB and pass bulk data on stdin")
    return cmd


def _feed(chan: paramiko.Channel, data: bytes) -> None:
    try:
        chan.sendall(data)
        chan.shutdown_write()
    except _TRANSIENT:
        pass  # the command exited without reading it all, or the channel closed


class GuestAgent:
    """SSH over the sandbox's agent socket, with a pinned host key.

    Thread-safe: many threads may exec at once on the one transport.
    """

    def __init__(self, socket_path: str, client_key_pem: bytes, host_key_line: str, *, sandbox_id: str) -> None:
        self.socket_path = socket_path
        self.sandbox_id = sandbox_id
        self._lock = threading.Lock()
        self._transport: paramiko.Transport | None = None
        self.rekey(client_key_pem, host_key_line)

    def rekey(self, client_key_pem: bytes, host_key_line: str) -> None:
        """Authenticate later connections with these keys; the live transport stays."""
        key = paramiko.Ed25519Key.from_private_key(io.StringIO(client_key_pem.decode()))
        kind, b64 = host_key_line.split()[:2]
        host_key = paramiko.Ed25519Key(data=base64.b64decode(b64))
        with self._lock:
            self._key, self._host_key = key, host_key

    # ------------------------------------------------------------------ connect
    def _connect_once(self, timeout: float, banner_timeout: float) -> paramiko.Transport:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        t: paramiko.Transport | None = None
        try:
            sock.settimeout(timeout)
            sock.connect(self.socket_path)
            t = paramiko.Transport(sock)
            record_exit_signals(t)
            t.banner_timeout = banner_timeout
            t.handshake_timeout = timeout
            t.auth_timeout = timeout
            t.start_client(timeout=timeout)
            key = t.get_remote_server_key()
            if key.get_name() != self._host_key.get_name() or key.asbytes() != self._host_key.asbytes():
                # Not Unavailable: containerd would retry a possible man in the middle forever.
                raise FailedPrecondition("the guest presented a host key other than the one pinned at create; "
                                         "refusing to connect", sandbox_id=self.sandbox_id)
            t.auth_publickey("root", self._key)
            # Keep paramiko's own short socket timeout: its keepalives run off it.
            t.set_keepalive(15)
            return t
        except BaseException:
            # Stop the transport's reader thread before the fd is closed: otherwise it may
            # read from the next attempt's socket once the kernel reuses the fd number.
            try:
                sock.shutdown(socket.SHUT_WR)  # see _close_locked: QEMU must see EOF
            except OSError:
                pass
            if t is not None:
                t.close()
            sock.close()
            raise

    def connect(self, deadline: float, alive: Callable[[], bool] | None = None, *, booting: bool = False) -> None:
        """Connect (or keep the live transport) before ``deadline`` (time.monotonic()).

        Retries while the guest boots (the READINESS policy); ``alive()`` returning False
        (the VM died) ends the wait early with FailedPrecondition. Raises DeadlineExceeded
        when time runs out, FailedPrecondition when the guest presents the wrong host key.
        ``booting``: the guest may still be starting its agent, so one attempt waits for the
        banner as long as the deadline allows (up to 10 s); otherwise the attempts wait
        :data:`RECONNECT_BANNER_WAITS` each, so a wedged connection is replaced promptly.
        """
        banner_waits = iter(RECONNECT_BANNER_WAITS)
        with self._lock:
            t = self._transport
            if t is not None and t.is_active() and t.is_authenticated():
                return
            self._close_locked()

            def attempt() -> paramiko.Transport:
                if alive is not None and not alive():
                    raise FailedPrecondition("the VM stopped while booting", sandbox_id=self.sandbox_id)
                timeout = max(0.5, min(deadline - time.monotonic(), 10.0))
                banner = timeout if booting else min(timeout, next(banner_waits, RECONNECT_BANNER_WAITS[-1]))
                return self._connect_once(timeout, banner)

            retrying = Retrying(
                retry=retry_if_exception_type(_TRANSIENT),
                wait=READINESS_WAIT,
                stop=lambda state: time.monotonic() >= deadline,
                reraise=True,
            )
            try:
                self._transport = retrying(attempt)
            except _TRANSIENT as e:
                raise DeadlineExceeded(
                    f"guest agent did not answer in time (last error: {e})", sandbox_id=self.sandbox_id
                ) from e

    def close(self) -> None:
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        t, self._transport = self._transport, None
        if t is not None:
            # Half-close first. QEMU 7.2's char-socket can lose its HUP watch once the
            # guest has consumed host data (a race re-arming the handler from a vCPU
            # thread); it then never notices a plain close and refuses every later
            # connection. EOF on its read path is always seen.
            try:
                t.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            t.close()

    @property
    def connected(self) -> bool:
        t = self._transport
        return t is not None and t.is_active() and t.is_authenticated()

    # ------------------------------------------------------------------ exec
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
        """Run argv in the guest and collect its output.

        Raises Unavailable when there is no live transport, DeadlineExceeded when
        ``timeout`` passes, FailedPrecondition when stdout and stderr together pass
        ``max_output`` bytes (default :data:`MAX_OUTPUT`; the connection is dropped, which
        ends every exec of the sandbox in flight); either way the process is killed in the
        guest.
        """
        cap = MAX_OUTPUT if max_output is None else max_output
        if timeout is not None and timeout <= 0:
            raise InvalidArgument("timeout must be positive")
        cmd = encode_exec_request(argv, env=env, cwd=cwd, timeout=timeout, in_guest_root=in_guest_root, user=user)
        t = self._transport
        if t is None or not t.is_active():
            raise Unavailable("no connection to the guest agent", sandbox_id=self.sandbox_id)
        started = time.monotonic()
        host_deadline = None if timeout is None else started + timeout + 10.0
        try:
            chan = t.open_session(timeout=30 if timeout is None else min(30.0, timeout))
        except _TRANSIENT as e:
            raise Unavailable(f"cannot open a channel to the guest: {e}", sandbox_id=self.sandbox_id) from e
        try:
            chan.exec_command(cmd)
            feeder: threading.Thread | None = None
            if stdin:
                # Feed stdin while we drain the output: a command that echoes its input
                # (cat, gzip -d) would otherwise fill the window and block both sides.
                feeder = threading.Thread(target=_feed, args=(chan, stdin), daemon=True,
                                          name=f"vsbx-stdin-{self.sandbox_id}")
                feeder.start()
            else:
                chan.shutdown_write()
            out, err = bytearray(), bytearray()
            while True:
                select.select([chan], [], [], 0.2)
                while chan.recv_ready():
                    out += chan.recv(65536)
                while chan.recv_stderr_ready():
                    err += chan.recv_stderr(65536)
                if len(out) + len(err) > cap:
                    # Collected whole in memory: a `cat /dev/zero` must not take the host down.
                    # Closing the channel alone leaves the command blocked on a full pipe in
                    # the guest; dropping the connection ends its session, and the command
                    # with it (PDEATHSIG). Other execs of this sandbox are cut too; the next
                    # call reconnects.
                    self.close()
                    raise FailedPrecondition(
                        f"the output of {argv[0]!r} passed {cap} bytes; the command was stopped "
                        "(write large output to a file in the sandbox)", sandbox_id=self.sandbox_id)
                if chan.exit_status_ready() and chan.eof_received and not chan.recv_ready() and not chan.recv_stderr_ready():
                    break
                if chan.closed and not chan.recv_ready() and not chan.recv_stderr_ready():
                    break
                if host_deadline is not None and time.monotonic() > host_deadline:
                    raise DeadlineExceeded(f"exec of {argv[0]!r} exceeded {timeout}s", sandbox_id=self.sandbox_id)
                if not t.is_active():
                    raise Unavailable("the guest agent connection dropped during exec", sandbox_id=self.sandbox_id)
            status = exit_status(chan)
            if status is None:  # closed without an exit status
                raise Unavailable("the connection to the guest closed before the command finished",
                                  sandbox_id=self.sandbox_id)
            if feeder is not None:
                feeder.join(timeout=5)
        except _TRANSIENT as e:
            raise Unavailable(f"exec failed on the guest connection: {e}", sandbox_id=self.sandbox_id) from e
        finally:
            chan.close()
        if timeout is not None and status == EXEC_TIMEOUT_EXIT and time.monotonic() - started >= timeout:
            raise DeadlineExceeded(f"exec of {argv[0]!r} exceeded {timeout}s", sandbox_id=self.sandbox_id)
        return ExecResult(status, bytes(out), bytes(err))

    # ------------------------------------------------------------------ streaming processes
    def spawn(
        self,
        argv: Sequence[str],
        *,
        stdout: OutputSink,
        stderr: OutputSink,
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
    ) -> SshProcess:
        """Start argv on its own channel; see :meth:`vmsandbox.sandbox.ports.GuestChannel.spawn`."""
        environ = dict(env or {})
        if tty:
            environ.setdefault("TERM", "xterm")
        cmd = encode_exec_request(argv, env=environ, cwd=cwd, in_guest_root=in_guest_root,
                                  supervise_pidfile=supervise_pidfile, keep=keep, rejoin=rejoin,
                                  console_socket=console_socket, user=user)
        t = self._transport
        if t is None or not t.is_active():
            raise Unavailable("no connection to the guest agent", sandbox_id=self.sandbox_id)
        return spawn_on(t, cmd, stdout=stdout, stderr=stderr, tty=tty, size=size,
                        term=environ.get("TERM", "xterm"), sandbox_id=self.sandbox_id,
                        what=argv[0] if argv else f"rejoin {rejoin}",
                        supervised=supervise_pidfile is not None or rejoin is not None)
