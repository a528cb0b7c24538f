"""vsbx-exec's console socket (token ``y``), built for the host and run on a pty of its own.

A small Python "crun" stands in for ``crun create --console-socket``: it makes a pty, starts
the container's process on its slave (a session of its own, that pty its controlling
terminal), sends the master over the console socket with SCM_RIGHTS, writes the process's
pid to the pid file and exits, as crun does. The pty vsbx-exec itself runs on stands for the
SSH channel's: what the "host" writes there must reach the container's terminal byte for
byte, a window-size change there must reach the container (SIGWINCH), and vsbx-exec ends with
the process's status once its terminal is drained.
"""

from __future__ import annotations

import fcntl
import os
import select
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.test_exec_encoding import req, vsbx_exec  # noqa: F401 - the fixture

FAKE_CRUN = r"""
import os, socket, sys, time
sock, pidfile, script = sys.argv[1:4]
master, slave = os.openpty()
pid = os.fork()
if pid == 0:
    os.close(master)
    os.setsid()
    import fcntl, termios
    fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
    for fd in (0, 1, 2):
        os.dup2(slave, fd)
    if script == "FAIL":  # as crun's child reports a failed execve: on the terminal
        os.write(2, b"executable file not found\n")
        os._exit(127)
    while not os.path.exists(pidfile + ".ready"):  # like an init waiting for crun start
        time.sleep(0.01)
    os.execvp("sh", ["sh", "-c", script])
os.close(slave)
with socket.socket(socket.AF_UNIX) as s:
    s.connect(sock)
    socket.send_fds(s, [b"console"], [master])
if script == "FAIL":
    os.waitpid(pid, 0)
    sys.exit(1)
with open(pidfile + ".tmp", "w") as f:
    f.write(str(pid))
os.rename(pidfile + ".tmp", pidfile)
"""


def set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class Terminal:
    """vsbx-exec running on a pty whose master is ours (the host's end of the SSH pty)."""

    def __init__(self, exe: Path, tmp: Path, script: str, rows: int = 24, cols: int = 80) -> None:
        crun = tmp / "fakecrun.py"
        crun.write_text(FAKE_CRUN)
        self.sock, self.pidfile = tmp / "console.sock", tmp / "init.pid"
        self.master, slave = os.openpty()
        set_size(self.master, rows, cols)
        request = req([sys.executable, str(crun), str(self.sock), str(self.pidfile), script],
                      env={"PATH": os.environ["PATH"]}, supervise_pidfile=str(self.pidfile),
                      console_socket=str(self.sock))

        def controlling_tty() -> None:
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.proc = subprocess.Popen([str(exe), "-c", request], stdin=slave, stdout=slave, stderr=slave,
                                     start_new_session=True, preexec_fn=controlling_tty)
        os.close(slave)
        self.out = bytearray()

    def until(self, want: bytes, timeout: float = 15.0) -> bytes:
        end = time.monotonic() + timeout
        while want not in self.out:
            assert time.monotonic() < end, bytes(self.out)
            r, _, _ = select.select([self.master], [], [], 0.2)
            if r:
                try:
                    self.out += os.read(self.master, 65536)
                except OSError:
                    break
        assert want in self.out, bytes(self.out)
        return bytes(self.out)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        os.close(self.master)


@pytest.fixture
def terminal(vsbx_exec: Path, tmp_path: Path) -> Iterator[type[Terminal]]:  # noqa: F811
    made: list[Terminal] = []

    def make(script: str, rows: int = 24, cols: int = 80) -> Terminal:
        t = Terminal(vsbx_exec, tmp_path, script, rows, cols)
        made.append(t)
        return t

    yield make  # type: ignore[misc]
    for t in made:
        t.close()


def test_the_container_gets_its_own_terminal_sized_like_ours(terminal: type[Terminal]) -> None:
    script = ("tty; stty size; trap 'stty size' WINCH; echo ready; until read line; do :; done; echo got:$line; "
              "read line; exit 5")
    t = terminal(script, rows=30, cols=100)
    out = t.until(b"ready")
    assert b"/dev/pts/" in out and b"30 100" in out
    assert (t.sock.parent / "init.pid.ready").read_text().strip() == t.pidfile.read_text().strip()
    assert not t.sock.exists(), "the console socket stays behind"
    set_size(t.master, 40, 120)  # the host's window-change: SIGWINCH on vsbx-exec's pty
    t.until(b"40 120")
    os.write(t.master, b"hello\r")  # raw on our side: the container's line discipline echoes it
    out = t.until(b"got:hello")
    assert b"hello\r\n" in out
    os.write(t.master, b"\x04")  # ^D passes through: EOF for the container's read
    assert t.proc.wait(15) == 5


def test_a_signalled_terminal_process_is_128_plus_n(terminal: type[Terminal]) -> None:
    t = terminal("echo up; kill -9 $$")
    t.until(b"up")
    assert t.proc.wait(15) == 128 + 9


def test_a_failed_create_shows_what_its_terminal_got(terminal: type[Terminal]) -> None:
    t = terminal("FAIL")
    assert b"executable file not found" in t.until(b"not found")
    assert t.proc.wait(15) == 1
    assert not t.sock.exists()


def test_no_terminal_on_the_socket_is_a_failure(vsbx_exec: Path, tmp_path: Path) -> None:  # noqa: F811
    pidfile = tmp_path / "init.pid"
    script = 'sh -c "sleep 30" & echo $! > "$0"'
    t0 = time.monotonic()
    p = subprocess.run([str(vsbx_exec), "-c", req(["sh", "-c", script, str(pidfile)], supervise_pidfile=str(pidfile),
                                                  console_socket=str(tmp_path / "c.sock"))],
                       capture_output=True, timeout=20)
    assert p.returncode == 126 and b"no terminal" in p.stderr
    assert time.monotonic() - t0 < 10
    pid = int(pidfile.read_text())
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


def test_a_console_socket_needs_a_pid_file(vsbx_exec: Path) -> None:  # noqa: F811
    bad = "vsbx1 a" + b"true".hex() + " r y" + b"/tmp/x.sock".hex()
    p = subprocess.run([str(vsbx_exec), "-c", bad], capture_output=True, timeout=20)
    assert p.returncode == 126 and b"pid file" in p.stderr
