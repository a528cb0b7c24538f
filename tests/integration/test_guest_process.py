"""Streaming guest processes (GuestChannel.spawn) on a real guest: output as it comes, stdin,
exit statuses, a pty and its resize, abort, signals, the user a command runs as, and
vsbx-exec's supervision of a daemon.

One sandbox without a rootfs (commands run in the guest's busybox root) serves the module.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests.conftest import unique
from vmsandbox import LibvirtController, SandboxMetadata, Unavailable
from vmsandbox.model import PtySize
from vmsandbox.sandbox.ports import GuestChannel

pytestmark = pytest.mark.integration


class Sink:
    """Collects one stream with the arrival time of each chunk."""

    def __init__(self) -> None:
        self.chunks: list[tuple[float, bytes]] = []
        self.eof = threading.Event()
        self._cond = threading.Condition()

    def __call__(self, data: bytes) -> None:
        with self._cond:
            if data:
                self.chunks.append((time.monotonic(), data))
            else:
                self.eof.set()
            self._cond.notify_all()

    @property
    def data(self) -> bytes:
        return b"".join(d for _, d in self.chunks)

    def until(self, needle: bytes, timeout: float = 20) -> float:
        """Wait until ``needle`` arrived; the time it did."""
        with self._cond:
            assert self._cond.wait_for(lambda: needle in self.data, timeout), f"{needle!r} never came: {self.data!r}"
            acc = b""
            for t, d in self.chunks:
                acc += d
                if needle in acc:
                    return t
        raise AssertionError("unreachable")


@contextmanager
def running_guest(controller: LibvirtController, name: str) -> Iterator[GuestChannel]:
    """A sandbox without a rootfs, booted; its agent channel (the controller owns the one
    connection QEMU serves, and hands it out as it does to the task engine)."""
    sid = unique(name)
    try:
        controller.create(SandboxMetadata(sid))
        controller.start(sid)
        yield controller.guest_channel(sid)
    finally:
        controller.shutdown(sid)


@pytest.fixture(scope="module")
def channel(controller: LibvirtController) -> Iterator[GuestChannel]:
    with running_guest(controller, "proc") as ch:
        yield ch


def spawn(ch: GuestChannel, argv: list[str], **kw: object) -> tuple[object, Sink, Sink]:
    out, err = Sink(), Sink()
    p = ch.spawn(argv, stdout=out, stderr=err, in_guest_root=True, **kw)  # type: ignore[arg-type]
    return p, out, err


def test_output_arrives_while_the_process_runs(channel: GuestChannel) -> None:
    p, out, err = spawn(channel, ["sh", "-c", "echo one; echo e1 >&2; sleep 2; echo two"])
    t_one = out.until(b"one\n")
    assert not p.done  # type: ignore[attr-defined]
    assert err.until(b"e1\n") - t_one < 1.5
    assert p.wait(30) == 0  # type: ignore[attr-defined]
    t_end = time.monotonic()
    t_two = out.until(b"two\n")
    assert t_two - t_one >= 1.5, "the first line was held back until the end"
    assert t_end >= t_two
    assert out.data == b"one\ntwo\n" and err.data == b"e1\n"
    assert out.eof.is_set() and err.eof.is_set()


def test_stdin_round_trips_and_eof_ends_cat(channel: GuestChannel) -> None:
    p, out, _ = spawn(channel, ["cat"])
    p.write_stdin(b"hello\n")  # type: ignore[attr-defined]
    out.until(b"hello\n")
    assert not p.done  # type: ignore[attr-defined]
    blob = bytes(range(256)) * 2000  # 512 KB, more than one SSH window
    p.write_stdin(blob)  # type: ignore[attr-defined]
    p.close_stdin()  # type: ignore[attr-defined]
    assert p.wait(60) == 0  # type: ignore[attr-defined]
    assert out.data == b"hello\n" + blob


@pytest.mark.parametrize(("script", "status"), [("exit 3", 3), ("kill -9 $$", 128 + 9), ("kill -TERM $$", 128 + 15)])
def test_exit_statuses(channel: GuestChannel, script: str, status: int) -> None:
    p, _, _ = spawn(channel, ["sh", "-c", script])
    assert p.wait(30) == status  # type: ignore[attr-defined]


def test_a_tty_process_sees_its_size_and_a_resize(channel: GuestChannel) -> None:
    script = "stty size; trap 'echo winch' WINCH; read x; stty size; echo done"
    p, out, err = spawn(channel, ["sh", "-c", script], tty=True, size=PtySize(100, 30))
    out.until(b"30 100")
    p.resize(PtySize(120, 40))  # type: ignore[attr-defined]
    p.write_stdin(b"go\r")  # type: ignore[attr-defined]
    assert p.wait(30) == 0  # type: ignore[attr-defined]
    text = out.data.decode(errors="replace")
    assert "40 120" in text and "done" in text, text
    assert text.index("30 100") < text.index("40 120")
    assert err.data == b""  # a pty has one stream


def test_abort_ends_the_guest_process(channel: GuestChannel) -> None:
    p, out, _ = spawn(channel, ["sh", "-c", "echo $$; exec sleep 60"])
    pid = int(out.until(b"\n") and out.data.split()[0])
    p.abort()  # type: ignore[attr-defined]
    with pytest.raises(Unavailable):
        p.wait(10)  # type: ignore[attr-defined]
    deadline = time.monotonic() + 15
    while channel.exec(["kill", "-0", str(pid)], in_guest_root=True, timeout=10).exit_code == 0:
        assert time.monotonic() < deadline, f"guest process {pid} outlived its aborted channel"
        time.sleep(0.2)


def test_supervised_daemon_is_waited_for_and_its_pid_published(channel: GuestChannel) -> None:
    pidfile = f"/tmp/{unique('init')}.pid"
    script = 'sh -c "echo from-daemon; sleep 1; exit 6" & echo $! > "$0"'
    p, out, _ = spawn(channel, ["sh", "-c", script, pidfile], supervise_pidfile=pidfile)
    deadline = time.monotonic() + 20
    while (r := channel.exec(["cat", pidfile + ".ready"], in_guest_root=True, timeout=10)).exit_code != 0:
        assert time.monotonic() < deadline and not p.done  # type: ignore[attr-defined]
        time.sleep(0.05)
    pid = int(r.stdout)
    assert pid > 1
    assert p.wait(30) == 6  # type: ignore[attr-defined]
    assert out.data == b"from-daemon\n"
    channel.exec(["rm", "-f", pidfile, pidfile + ".ready"], in_guest_root=True, timeout=10)


def test_channels_opened_while_others_end_all_start(channel: GuestChannel) -> None:
    """Many channels opening while others end (the task engine's spawn + ``.ready`` polling):
    Debian 12's dropbear closed about one new channel in three before its command started
    ("Channel closed." / "Unable to open channel"), unless the host opens it again."""
    stop = time.monotonic() + 15
    failures: list[str] = []
    rounds = [0]

    def worker(i: int) -> None:
        n = 0
        while time.monotonic() < stop and len(failures) < 5:
            n += 1
            pidfile = f"/tmp/{unique(f'chan{i}')}.pid"
            try:
                p, _, _ = spawn(channel, ["sh", "-c", 'sleep 0.1; sleep 0.2 & echo $! > "$0"', pidfile],
                                supervise_pidfile=pidfile)
                while channel.exec(["cat", pidfile + ".ready"], in_guest_root=True, timeout=10).exit_code != 0:
                    assert not p.done  # type: ignore[attr-defined]
                    time.sleep(0.05)
                if n % 3 == 0:
                    p.abort()  # type: ignore[attr-defined]
                else:
                    assert p.wait(30) == 0  # type: ignore[attr-defined]
                assert channel.exec(["rm", "-f", pidfile, pidfile + ".ready"], in_guest_root=True,
                                    timeout=10).exit_code == 0
                rounds[0] += 1
            except Exception as e:  # noqa: BLE001 - collected, asserted below
                failures.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures, f"{len(failures)} failures in {rounds[0]} rounds: {failures}"
    assert rounds[0] >= 10


# ---------------------------------------------------------------- user (token u) and signals
# The guest root's /etc/passwd has root and nobody (images/build.sh).

IDS = ["sh", "-c", 'id -u; id -g; id -G; echo "$HOME"']


@pytest.mark.parametrize(("user", "expected"), [
    ("nobody", b"65534\n65534\n65534\n/nonexistent\n"),  # by name: its entry's gid and home
    ("1000:1000", b"1000\n1000\n1000\n/\n"),  # numeric ids need no entry; HOME / without one
    ("nobody:0", b"65534\n0\n0\n/nonexistent\n"),
    (None, b"0\n0\n0\n/root\n"),
])
def test_exec_and_spawn_run_as_the_user(channel: GuestChannel, user: str | None, expected: bytes) -> None:
    r = channel.exec(IDS, in_guest_root=True, timeout=20, user=user)
    assert (r.exit_code, r.stdout) == (0, expected), r.stderr
    p, out, _ = spawn(channel, IDS, user=user)
    assert p.wait(30) == 0  # type: ignore[attr-defined]
    assert out.data == expected


def test_an_unknown_user_is_126_with_a_message(channel: GuestChannel) -> None:
    r = channel.exec(["id"], in_guest_root=True, timeout=20, user="nosuchuser")
    assert (r.exit_code, r.stdout, r.stderr) == (126, b"", b"vsbx-exec: no user nosuchuser in /etc/passwd\n")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_a_signal_reaches_the_command_which_ends_with_its_own_status(channel: GuestChannel,
                                                                     sig: signal.Signals) -> None:
    name = sig.name[3:]
    script = f'trap "echo got {name}; exit 3" {name}; echo ready; while :; do sleep 0.1; done'
    p, out, _ = spawn(channel, ["sh", "-c", script])
    out.until(b"ready\n")
    p.signal(sig)  # type: ignore[attr-defined]
    assert p.wait(30) == 3  # type: ignore[attr-defined]
    assert out.data == f"ready\ngot {name}\n".encode()


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGTERM, 128 + 15), (signal.SIGKILL, 128 + 9)], ids=["TERM", "KILL"])
def test_a_signalled_sleep_ends_with_128_plus_n(channel: GuestChannel, sig: signal.Signals, status: int) -> None:
    p, out, _ = spawn(channel, ["sh", "-c", "echo $$; exec sleep 100"])
    out.until(b"\n")
    pid = int(out.data.split()[0])
    p.signal(sig)  # type: ignore[attr-defined]
    assert p.wait(30) == status  # type: ignore[attr-defined]
    deadline = time.monotonic() + 15  # after KILL: PDEATHSIG, then PID 1 reaps it
    while channel.exec(["kill", "-0", str(pid)], in_guest_root=True, timeout=10).exit_code == 0:
        assert time.monotonic() < deadline, f"guest process {pid} outlived the signal"
        time.sleep(0.2)


def test_a_signal_reaches_a_user_command(channel: GuestChannel) -> None:
    p, out, _ = spawn(channel, ["sh", "-c", 'trap "id -u; exit 4" TERM; echo ready; while :; do sleep 0.1; done'],
                      user="nobody")
    out.until(b"ready\n")
    p.signal(signal.SIGTERM)  # type: ignore[attr-defined]
    assert p.wait(30) == 4  # type: ignore[attr-defined]
    assert out.data == b"ready\n65534\n"


def test_a_signal_reaches_a_tty_command(channel: GuestChannel) -> None:
    p, out, _ = spawn(channel, ["sh", "-c", 'trap "echo got TERM; exit 3" TERM; echo ready; read x'], tty=True)
    out.until(b"ready")
    p.signal(signal.SIGTERM)  # type: ignore[attr-defined]
    assert p.wait(30) == 3  # type: ignore[attr-defined]
    out.until(b"got TERM")
