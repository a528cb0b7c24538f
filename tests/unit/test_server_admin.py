"""The admin socket and RemoteController over a real unix socket, with the in-memory fake.

This is what the CLI on a node uses when `vmsandbox serve` owns the state dir: results come
back typed, errors come back as the vmsandbox.errors class the server raised, and the admin
socket is root-only even when containerd's socket is shared with a group.
"""

from __future__ import annotations

import os
import signal
import stat
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.unit.test_server_rpc import T0, FakeController
from vmsandbox import errors
from vmsandbox.guest.fake import FakeProcess, SpawnCall
from vmsandbox.model import ExecResult, Phase, PtySize, SandboxState, SandboxSummary
from vmsandbox.sandbox.ports import OutputSink
from vmsandbox.server import ControllerServer, serve
from vmsandbox.server.client import RemoteController


@dataclass
class FakeAdmin(FakeController):
    execs: list[tuple[str, list[str], dict[str, str], str | None, bytes | None, float | None]] = field(
        default_factory=list)
    exec_where: list[tuple[str | None, bool]] = field(default_factory=list)  # (user, in_guest_root) per exec
    console: bytes = b"line one\nline two\n"
    processes: list[FakeProcess] = field(default_factory=list)
    on_spawn: Callable[[FakeProcess], None] = lambda proc: None

    def spawn(self, sandbox_id: str, argv: Sequence[str], *, stdout: OutputSink, stderr: OutputSink,
              env: Mapping[str, str] | None = None, cwd: str | None = None, user: str | None = None,
              tty: bool = False, size: PtySize | None = None, in_guest_root: bool = False) -> FakeProcess:
        self._get(sandbox_id)
        call = SpawnCall(sandbox_id, tuple(argv), dict(env or {}), cwd, tty, size, in_guest_root, None, user=user)
        proc = FakeProcess(call, stdout, stderr, sandbox_id)
        self.processes.append(proc)
        self.on_spawn(proc)
        return proc

    def share_path(self, sandbox_id: str) -> Path:
        self._get(sandbox_id)
        return Path("/var/lib/vmsandbox/sandboxes") / sandbox_id / "shared"

    def list(self) -> list[SandboxSummary]:
        return [SandboxSummary(id=i, phase=Phase.RUNNING if r.phase == "running" else Phase.CREATED,
                               state=SandboxState.READY if r.phase == "running" else SandboxState.NOTREADY,
                               pid=4242, created_at=T0) for i, r in sorted(self.records.items())]

    def exec(self, sandbox_id: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
             cwd: str | None = None, stdin: bytes | None = None, timeout: float | None = None,
             user: str | None = None, in_guest_root: bool = False) -> ExecResult:
        self._get(sandbox_id)
        self.execs.append((sandbox_id, list(argv), dict(env or {}), cwd, stdin, timeout))
        self.exec_where.append((user, in_guest_root))
        if argv[0] == "slow":
            raise errors.DeadlineExceeded("command timed out", sandbox_id=sandbox_id)
        return ExecResult(exit_code=3, stdout=b"out" + (stdin or b""), stderr=b"err")

    def read_console_log(self, sandbox_id: str, max_bytes: int = 0) -> bytes:
        self._get(sandbox_id)
        return self.console[-max_bytes:] if max_bytes else self.console


@pytest.fixture
def admin(tmp_path: Path) -> Iterator[tuple[FakeAdmin, ControllerServer, RemoteController]]:
    fake = FakeAdmin()
    srv = serve(fake, str(tmp_path / "ctl.sock"), socket_group="0", wait_poll_interval=0.05,
                admin=fake, admin_socket_path=str(tmp_path / "admin.sock"))
    remote = RemoteController(str(tmp_path / "admin.sock"))
    try:
        yield fake, srv, remote
    finally:
        remote.close()
        srv.stop()


def test_admin_socket_is_root_only_and_removed_at_stop(admin, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, srv, _ = admin
    assert srv.admin_socket_path == str(tmp_path / "admin.sock")
    assert stat.S_IMODE(os.stat(tmp_path / "admin.sock").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "ctl.sock").st_mode) == 0o660  # containerd's may be shared
    srv.stop()
    assert not (tmp_path / "admin.sock").exists() and not (tmp_path / "ctl.sock").exists()


def test_list_exec_and_logs_through_the_admin_socket(admin) -> None:  # type: ignore[no-untyped-def]
    fake, _, remote = admin
    fake.add("a")
    fake.add("b", phase="created")
    remote.ping()
    rows = remote.list()
    assert [(r.id, r.phase, r.state, r.pid, r.created_at, r.exited_at) for r in rows] == [
        ("a", Phase.RUNNING, SandboxState.READY, 4242, T0, None),
        ("b", Phase.CREATED, SandboxState.NOTREADY, 4242, T0, None)]
    res = remote.exec("a", ["sh", "-c", "x"], env={"K": "V"}, cwd="/tmp", stdin=b"in", timeout=7.5)
    assert res == ExecResult(3, b"outin", b"err")
    assert fake.execs[-1] == ("a", ["sh", "-c", "x"], {"K": "V"}, "/tmp", b"in", 7.5)
    assert fake.exec_where[-1] == (None, False)
    remote.exec("a", ["true"], user="1000:1000", in_guest_root=True)
    assert fake.execs[-1] == ("a", ["true"], {}, None, None, None)  # no stdin is not empty stdin
    assert fake.exec_where[-1] == ("1000:1000", True)
    assert remote.share_path("a") == Path("/var/lib/vmsandbox/sandboxes/a/shared")
    assert remote.image_config("a") is None
    assert remote.read_console_log("a") == b"line one\nline two\n"
    assert remote.read_console_log("a", 9) == b"line two\n"


def test_controller_calls_through_the_admin_socket(admin) -> None:  # type: ignore[no-untyped-def]
    fake, _, remote = admin
    fake.add("a")
    st = remote.status("a", verbose=True)
    assert (st.state, st.pid, st.info, st.created_at, st.version) == ("SANDBOX_READY", 4242, {"verbose": "True"}, T0, 3)
    assert remote.platform("a").os == "linux"
    assert remote.metrics("a").id == "a"
    with pytest.raises(errors.DeadlineExceeded):
        remote.wait("a", timeout=0.3)
    remote.stop("a", timeout=4)
    assert fake.last("stop") == ("a", 4.0)
    assert remote.wait("a").exit_status == 0
    remote.shutdown("a")
    assert "a" not in fake.records


@pytest.mark.parametrize("call, cls", [
    (lambda r: r.exec("nope", ["true"]), errors.NotFound),
    (lambda r: r.exec("a", []), errors.InvalidArgument),
    (lambda r: r.exec("a", ["slow"]), errors.DeadlineExceeded),
    (lambda r: r.status("nope"), errors.NotFound),
    (lambda r: r.read_console_log("nope"), errors.NotFound),
    (lambda r: r.share_path("nope"), errors.NotFound),
    (lambda r: r.spawn("nope", ["sh"], stdout=print, stderr=print), errors.NotFound),
    (lambda r: r.spawn("a", [], stdout=print, stderr=print), errors.InvalidArgument),
])
def test_errors_come_back_as_their_class(admin, call, cls) -> None:  # type: ignore[no-untyped-def]
    fake, _, remote = admin
    fake.add("a")
    with pytest.raises(cls):
        call(remote)


def test_a_server_that_is_gone_is_unavailable(tmp_path: Path) -> None:
    remote = RemoteController(str(tmp_path / "admin.sock"))
    with pytest.raises(errors.Unavailable, match="does not answer"):
        remote.ping(timeout=1)
    remote.close()


# --------------------------------------------------------------------------- Spawn: stdio streamed both ways
class Collect:
    """Sinks that record what came, in order, with the stream it came on."""

    def __init__(self) -> None:
        self.got: list[tuple[str, bytes]] = []
        self.out = lambda data: self.got.append(("out", data))
        self.err = lambda data: self.got.append(("err", data))


def eventually(check: Callable[[], bool], timeout: float = 5) -> None:
    end = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_spawn_streams_the_output_in_order_then_the_exit_status(admin) -> None:  # type: ignore[no-untyped-def]
    fake, _, remote = admin
    fake.add("a")
    sinks = Collect()
    proc = remote.spawn("a", ["sh", "-c", "x"], stdout=sinks.out, stderr=sinks.err, env={"K": "V"}, cwd="/srv",
                        user="nobody", in_guest_root=True)
    (fp,) = fake.processes
    assert (fp.call.argv, fp.call.env, fp.call.cwd, fp.call.user, fp.call.in_guest_root, fp.call.tty) == (
        ("sh", "-c", "x"), {"K": "V"}, "/srv", "nobody", True, False)
    fp.emit(b"one ")
    eventually(lambda: sinks.got == [("out", b"one ")])  # before the process ends
    assert not proc.done
    fp.emit(b"oops", 2)
    fp.emit(b"two")
    fp.exit(3)
    assert proc.wait(5) == 3 and proc.done
    assert sinks.got == [("out", b"one "), ("err", b"oops"), ("out", b"two"), ("out", b""), ("err", b"")]


def test_spawn_passes_stdin_its_end_sizes_and_signals(admin) -> None:  # type: ignore[no-untyped-def]
    fake, _, remote = admin
    fake.add("a")
    proc = remote.spawn("a", ["sh"], stdout=lambda d: None, stderr=lambda d: None, tty=True, size=PtySize(80, 24))
    (fp,) = fake.processes
    assert (fp.call.tty, fp.call.size) == (True, PtySize(80, 24))
    proc.write_stdin(b"echo hi\n")
    proc.resize(PtySize(100, 30))
    proc.signal(signal.SIGINT)
    proc.close_stdin()
    fp.wait_stdin(lambda p: p.stdin_closed)
    assert bytes(fp.stdin) == b"echo hi\n"
    eventually(lambda: fp.sizes == [PtySize(100, 30)] and fp.signals == [signal.SIGINT])
    with pytest.raises(errors.FailedPrecondition):
        proc.write_stdin(b"more")
    with pytest.raises(errors.InvalidArgument):
        proc.signal(signal.SIGSEGV)
    fp.exit(0)
    assert proc.wait(5) == 0
    proc.resize(PtySize(1, 1))  # a no-op once it ended
    proc.signal(signal.SIGTERM)


def test_a_resize_without_a_terminal_is_refused(admin) -> None:  # type: ignore[no-untyped-def]
    fake, _, remote = admin
    fake.add("a")
    proc = remote.spawn("a", ["true"], stdout=lambda d: None, stderr=lambda d: None)
    with pytest.raises(errors.FailedPrecondition):
        proc.resize(PtySize(80, 24))
    fake.processes[0].exit(0)
    assert proc.wait(5) == 0


@pytest.mark.parametrize("leave", ["abort", "close-the-channel"])
def test_a_client_that_goes_away_aborts_the_guest_process(admin, leave: str) -> None:  # type: ignore[no-untyped-def]
    fake, _, remote = admin
    fake.add("a")
    proc = remote.spawn("a", ["sleep", "1000"], stdout=lambda d: None, stderr=lambda d: None)
    (fp,) = fake.processes
    if leave == "abort":
        proc.abort()
        assert proc.done
        with pytest.raises(errors.Unavailable):
            proc.wait(1)
    else:
        remote.close()
    eventually(lambda: fp.aborted)


def test_a_lost_guest_connection_comes_back_as_unavailable(admin) -> None:  # type: ignore[no-untyped-def]
    fake, _, remote = admin
    fake.add("a")
    sinks = Collect()
    proc = remote.spawn("a", ["sleep", "1000"], stdout=sinks.out, stderr=sinks.err)
    fake.processes[0].lose()
    with pytest.raises(errors.Unavailable):
        proc.wait(5)
    assert sinks.got == [("out", b""), ("err", b"")]


def test_a_slow_client_holds_back_the_guest_process(admin) -> None:  # type: ignore[no-untyped-def]
    """The server holds a bounded amount of output: a client that does not read stops the
    guest's sink (and so the guest), and everything arrives once it reads again."""
    fake, _, remote = admin
    fake.add("a")
    chunk, total = b"x" * 32768, 1000  # 32 MiB
    release = threading.Event()
    got = [0]

    def slow(data: bytes) -> None:
        release.wait(30)
        got[0] += len(data)

    proc = remote.spawn("a", ["yes"], stdout=slow, stderr=lambda d: None)
    (fp,) = fake.processes
    emitted = [0]

    def guest() -> None:
        for _ in range(total):
            fp.emit(chunk)
            emitted[0] += 1
        fp.exit(0)

    threading.Thread(target=guest, daemon=True).start()
    time.sleep(1.0)
    held = emitted[0]
    time.sleep(0.5)
    assert emitted[0] == held < total  # the guest's sink blocks: nothing piles up without bound
    release.set()
    assert proc.wait(30) == 0
    assert got[0] == total * len(chunk)
