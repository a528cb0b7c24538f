"""``exec``'s streaming over the fake guest process: output as it comes, the exit status, stdin,
signals forwarded, a real pty in raw mode and back, and no process left behind.

:func:`vmsandbox.cli.stream.stream_command` runs in pytest's main thread, so its signal
handlers are the real ones; the guest side is played by :class:`FakeProcess` in a thread.
"""

from __future__ import annotations

import fcntl
import io
import os
import signal
import struct
import termios
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

import pytest

from vmsandbox import errors
from vmsandbox.cli.stream import parse_env_file, stream_command
from vmsandbox.guest.fake import FakeProcess, SpawnCall
from vmsandbox.model import PtySize


class Spawner:
    """A controller whose spawn gives a FakeProcess that ``play(proc)`` drives in a thread."""

    def __init__(self, play: Callable[[FakeProcess], None]) -> None:
        self.play = play
        self.processes: list[FakeProcess] = []
        self.failure: BaseException | None = None

    def spawn(self, sandbox_id: str, argv: Sequence[str], *, stdout: Callable[[bytes], None],
              stderr: Callable[[bytes], None], env: Mapping[str, str] | None = None, cwd: str | None = None,
              user: str | None = None, tty: bool = False, size: PtySize | None = None,
              in_guest_root: bool = False) -> FakeProcess:
        call = SpawnCall(sandbox_id, tuple(argv), dict(env or {}), cwd, tty, size, in_guest_root, None, user=user)
        proc = FakeProcess(call, stdout, stderr, sandbox_id)
        self.processes.append(proc)

        def run() -> None:
            try:
                self.play(proc)
            except BaseException as e:  # noqa: BLE001 - shown by the test
                self.failure = e
                proc.exit(99)

        threading.Thread(target=run, daemon=True).start()
        return proc


class Recorder(io.RawIOBase):
    """A binary stream that notes when each write came."""

    def __init__(self) -> None:
        self.writes: list[tuple[float, bytes]] = []

    def writable(self) -> bool:
        return True

    def write(self, b: bytes) -> int:  # type: ignore[override]
        self.writes.append((time.monotonic(), bytes(b)))
        return len(b)

    @property
    def data(self) -> bytes:
        return b"".join(d for _, d in self.writes)


def eventually(check: Callable[[], bool], timeout: float = 5) -> None:
    end = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


# --------------------------------------------------------------------------- --env-file
def test_env_file_is_dockers_format() -> None:
    text = "# a comment\n\nA=1\n  B=two words \nC=\nD=x=y\nFROM_US\nNOT_SET\n  # indented\nQ=\"kept\"\n"
    assert parse_env_file(text, {"FROM_US": "ours", "A": "not this"}) == {
        "A": "1", "B": "two words ", "C": "", "D": "x=y", "FROM_US": "ours", "Q": '"kept"'}


@pytest.mark.parametrize("line, message", [
    pytest.param("=value", "no variable name", id="no-name"),
    pytest.param("MY VAR=1", "contains whitespace", id="blank-in-name"),
])
def test_env_file_errors_name_the_line(line: str, message: str) -> None:
    with pytest.raises(errors.InvalidArgument, match=f"f.env line 2: .*{message}"):
        parse_env_file(f"OK=1\n{line}\n", {}, name="f.env")


# --------------------------------------------------------------------------- streaming
def test_output_arrives_while_the_command_runs_and_its_status_is_the_result() -> None:
    out, err = Recorder(), Recorder()
    ended: list[float] = []

    def play(p: FakeProcess) -> None:
        p.emit(b"first\n")
        eventually(lambda: out.data == b"first\n")  # our stdout has it before the command goes on
        p.emit(b"warn\n", 2)
        time.sleep(0.3)
        p.emit(b"second\n")
        ended.append(time.monotonic())
        p.exit(3)

    sp = Spawner(play)
    assert stream_command(sp, "a", ["sh"], stdin=io.BytesIO(b""), stdout=out, stderr=err) == 3  # type: ignore[arg-type]
    assert sp.failure is None
    assert out.data == b"first\nsecond\n" and err.data == b"warn\n"
    assert out.writes[0][0] < ended[0] - 0.2
    assert sp.processes[0].stdin_closed and not sp.processes[0].aborted  # no -i: EOF at once


def test_interactive_pumps_our_stdin_then_its_end() -> None:
    def play(p: FakeProcess) -> None:
        p.wait_stdin(lambda q: q.stdin_closed)
        p.emit(bytes(p.stdin).upper())
        p.exit(0)

    sp = Spawner(play)
    out = Recorder()
    code = stream_command(sp, "a", ["cat"], env={"K": "V"}, cwd="/srv", user="1000", interactive=True,
                          stdin=io.BytesIO(b"hello " * 50_000), stdout=out, stderr=Recorder())  # type: ignore[arg-type]
    assert code == 0 and out.data == b"HELLO " * 50_000
    c = sp.processes[0].call
    assert (c.env, c.cwd, c.user, c.tty) == ({"K": "V"}, "/srv", "1000", False)


def test_a_timeout_stops_the_command() -> None:
    sp = Spawner(lambda p: None)  # never ends
    with pytest.raises(errors.DeadlineExceeded, match="still ran after 0.3s"):
        stream_command(sp, "a", ["sleep", "9"], timeout=0.3, stdin=io.BytesIO(), stdout=Recorder(),  # type: ignore[arg-type]
                       stderr=Recorder())  # type: ignore[arg-type]
    assert sp.processes[0].aborted


def test_a_broken_output_pipe_aborts_the_command() -> None:
    class Gone(Recorder):
        def write(self, b: bytes) -> int:  # type: ignore[override]
            raise BrokenPipeError

    sp = Spawner(lambda p: p.emit(b"x"))
    assert stream_command(sp, "a", ["yes"], stdin=io.BytesIO(), stdout=Gone(), stderr=Recorder()) == 141  # type: ignore[arg-type]
    assert sp.processes[0].aborted


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_our_signals_go_to_the_command(signum: int) -> None:
    def play(p: FakeProcess) -> None:
        time.sleep(0.2)
        os.kill(os.getpid(), signum)
        eventually(lambda: p.signals == [signum])
        p.exit(128 + signum)

    sp = Spawner(play)
    previous = signal.getsignal(signum)
    assert stream_command(sp, "a", ["sleep", "9"], stdin=io.BytesIO(), stdout=Recorder(), stderr=Recorder()) == 128 + signum  # type: ignore[arg-type]
    assert sp.failure is None and not sp.processes[0].aborted
    assert signal.getsignal(signum) is previous  # our handler is gone with the command


def test_a_terminal_needs_one_on_stdin() -> None:
    sp = Spawner(lambda p: p.exit(0))
    with pytest.raises(errors.InvalidArgument, match="not a terminal"):
        stream_command(sp, "a", ["sh"], terminal=True, stdin=io.BytesIO(), stdout=Recorder(), stderr=Recorder())  # type: ignore[arg-type]
    assert sp.processes == []


def _set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


@pytest.fixture
def pty_stdin() -> Iterator[io.BufferedReader]:
    master, slave = os.openpty()
    _set_size(slave, 30, 100)
    f = os.fdopen(slave, "rb")
    try:
        yield f
    finally:
        f.close()
        os.close(master)


def test_a_terminal_is_raw_while_it_runs_sized_and_resized_and_restored(
        pty_stdin: io.BufferedReader, monkeypatch: pytest.MonkeyPatch) -> None:
    fd = pty_stdin.fileno()
    before = termios.tcgetattr(fd)
    monkeypatch.setenv("TERM", "vt220")
    seen: dict[str, object] = {}

    def play(p: FakeProcess) -> None:
        seen["icanon"] = bool(termios.tcgetattr(fd)[3] & termios.ICANON)
        _set_size(fd, 40, 120)
        os.kill(os.getpid(), signal.SIGWINCH)
        eventually(lambda: p.sizes == [PtySize(120, 40)])
        p.emit(b"$ ")
        p.exit(3)

    sp = Spawner(play)
    out = Recorder()
    assert stream_command(sp, "a", ["sh"], terminal=True, stdin=pty_stdin, stdout=out, stderr=Recorder()) == 3  # type: ignore[arg-type]
    assert sp.failure is None
    c = sp.processes[0].call
    assert (c.tty, c.size, c.env["TERM"]) == (True, PtySize(100, 30), "vt220")
    assert seen["icanon"] is False  # raw while it ran
    assert termios.tcgetattr(fd) == before  # and back after
    assert out.data == b"$ "


def test_the_stdin_pump_ends_with_the_command_though_our_stdin_stays_open() -> None:
    """A reader thread left blocked in our stdin made the interpreter abort at exit (SIGABRT,
    "could not acquire lock for <stdin>"): the pump must end with the command."""
    r, w = os.pipe()
    try:
        def play(p: FakeProcess) -> None:
            p.wait_stdin(lambda q: bytes(q.stdin) == b"ls\n")
            p.exit(0)

        before = {t.name for t in threading.enumerate()}
        os.write(w, b"ls\n")
        with os.fdopen(r, "rb", closefd=False) as stdin:
            assert stream_command(Spawner(play), "a", ["sh"], interactive=True, stdin=stdin,  # type: ignore[arg-type]
                                  stdout=Recorder(), stderr=Recorder()) == 0  # type: ignore[arg-type]
        assert "vsbx-cli-stdin" not in {t.name for t in threading.enumerate()} - before
    finally:
        os.close(r)
        os.close(w)


def test_cp_targets_follow_dockers_rule() -> None:
    from vmsandbox.cli.copy import _into, split_target

    assert split_target("box:/tmp/x") == ("box", "/tmp/x")
    assert split_target("box:") == ("box", ".")
    assert split_target("/host/a:b") == (None, "/host/a:b")
    assert split_target("./a:b") == (None, "./a:b")
    assert split_target("plain") == (None, "plain")
    assert _into("/tmp/dst", "proj", True) == ("/tmp/dst/proj", False)
    assert _into("/tmp/dst", "proj/.", True) == ("/tmp/dst", True)
    assert _into("/tmp/new", "proj", False) == ("/tmp/new", False)
