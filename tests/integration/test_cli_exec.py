"""`vmsandbox exec` as an admin runs it, against a real guest: output streamed as the command
writes it, a real terminal with `-it` (driven through a pty), the same through `vmsandbox
serve`'s admin socket, and a large output in little memory.

One sandbox for the module, made by the CLI on a state dir of its own (the session's is owned
by the session controller, and the CLI would refuse to race it); the CLI runs as its own
process (`python -m vmsandbox`, this worktree first on the path).
"""

from __future__ import annotations

import fcntl
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, assert_no_domains_left, unique
from tests.serve import Serve

pytestmark = pytest.mark.integration

ENV = {**os.environ, "PYTHONPATH": str(REPO), "VMSANDBOX_TEMPLATES": "0"}  # a cold boot: no template to build


def cli(state: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "vmsandbox", "--state-dir", str(state), *args]


@pytest.fixture(scope="module")
def box(test_root: Path) -> Iterator[tuple[Path, str]]:
    d = test_root / unique("cli")
    d.mkdir()
    os.chmod(d, 0o711)
    state = d / "state"
    state.mkdir()
    sid = unique("exec")
    done = subprocess.run(cli(state, "run", sid), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    try:
        assert done.returncode == 0, done.stderr
        yield state, sid
    finally:
        subprocess.run(cli(state, "shutdown", sid), cwd=REPO, env=ENV, capture_output=True, timeout=300)
        assert_no_domains_left(state)


def test_output_arrives_while_the_command_still_runs(box: tuple[Path, str]) -> None:
    state, sid = box
    p = subprocess.Popen(cli(state, "exec", sid, "--", "sh", "-c", "echo first; sleep 3; echo second"),
                         cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None
    first = p.stdout.readline()
    t_first = time.monotonic()
    rest = p.stdout.read()
    code = p.wait(timeout=120)
    t_end = time.monotonic()
    assert (code, first, rest) == (0, b"first\n", b"second\n"), p.stderr.read() if p.stderr else ""
    assert t_end - t_first > 1.5  # "first" came about 3 s before the end, not with it


def test_exec_exits_with_the_command_status_and_keeps_stderr_apart(box: tuple[Path, str]) -> None:
    state, sid = box
    done = subprocess.run(cli(state, "exec", sid, "--", "sh", "-c", "echo out; echo err >&2; exit 7"),
                          cwd=REPO, env=ENV, capture_output=True, timeout=120)
    assert (done.returncode, done.stdout, done.stderr) == (7, b"out\n", b"err\n")


def _set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class Terminal:
    """The CLI on the slave side of a pty; the test types and reads on the master side."""

    def __init__(self, argv: list[str]) -> None:
        self.master, self.slave = os.openpty()
        _set_size(self.slave, 30, 100)
        self.before = termios.tcgetattr(self.slave)
        self.proc = subprocess.Popen(argv, cwd=REPO, env={**ENV, "TERM": "vt100"}, stdin=self.slave,
                                     stdout=self.slave, stderr=self.slave, start_new_session=True)
        self.seen = b""

    def expect(self, pattern: bytes, timeout: float = 60) -> bytes:
        end = time.monotonic() + timeout
        while not (m := re.search(pattern, self.seen)):
            left = end - time.monotonic()
            assert left > 0, f"no {pattern!r} in {self.seen[-2000:]!r}"
            if select.select([self.master], [], [], min(left, 0.5))[0]:
                try:
                    self.seen += os.read(self.master, 65536)
                except OSError:  # EIO: every slave fd is closed
                    pass
        self.seen = self.seen[m.end():]
        return m.group(0)

    def type(self, data: bytes) -> None:
        os.write(self.master, data)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)
        os.close(self.slave)


def _drive_a_shell(argv_of: list[str], exit3: list[str]) -> None:
    t = Terminal(argv_of)
    try:
        # ash asks where the cursor is (ESC [6n) after each prompt and takes what comes next for
        # the answer for a moment: type only after the prompt, and a little after it.
        t.expect(rb"# ")
        time.sleep(0.5)
        t.type(b"stty size; echo T=$TERM\r")
        assert t.expect(rb"30 100\r\nT=vt100") == b"30 100\r\nT=vt100"
        _set_size(t.master, 40, 120)
        os.kill(t.proc.pid, signal.SIGWINCH)
        t.expect(rb"# ")
        time.sleep(1)
        t.type(b"stty size\r")
        t.expect(rb"40 120")
        t.expect(rb"# ")
        time.sleep(0.5)
        t.type(b"\x04")  # Ctrl-D: the shell's EOF
        assert t.proc.wait(timeout=60) == 0
        assert termios.tcgetattr(t.slave) == t.before  # our terminal's settings are back
    finally:
        t.close()
    t = Terminal(exit3)
    try:
        assert t.proc.wait(timeout=60) == 3
        assert termios.tcgetattr(t.slave) == t.before
    finally:
        t.close()


def test_exec_it_is_a_terminal_of_our_size_resized_and_restored(box: tuple[Path, str]) -> None:
    state, sid = box
    _drive_a_shell(cli(state, "exec", "-it", sid, "--", "sh"), cli(state, "exec", "-it", sid, "--", "sh", "-c", "exit 3"))


def test_exec_it_through_serves_admin_socket(box: tuple[Path, str]) -> None:
    """serve owns the state dir (it takes the running sandbox over): the CLI goes through it."""
    state, sid = box
    srv = Serve(state, state.parent / "vmsandbox.sock", env={"VMSANDBOX_TEMPLATES": "0", "PYTHONPATH": str(REPO)})
    srv.start()
    try:
        deadline = time.monotonic() + 60
        while not (state / "admin.sock").exists():
            assert time.monotonic() < deadline, "serve made no admin socket"
            time.sleep(0.1)
        _drive_a_shell(cli(state, "exec", "-it", sid, "--", "sh"),
                       cli(state, "exec", "-it", sid, "--", "sh", "-c", "exit 3"))
        # A client killed mid-command leaves nothing running in the guest.
        p = subprocess.Popen(cli(state, "exec", sid, "--", "sh", "-c", "echo started; exec sleep 1234"),
                             cwd=REPO, env=ENV, stdout=subprocess.PIPE)
        assert p.stdout is not None and p.stdout.readline() == b"started\n"
        p.kill()
        p.wait()
        end = time.monotonic() + 30
        while True:
            ps = subprocess.run(cli(state, "exec", sid, "--", "ps"), cwd=REPO, env=ENV, capture_output=True,
                                timeout=120)
            if b"sleep 1234" not in ps.stdout:
                break
            assert time.monotonic() < end, ps.stdout
            time.sleep(1)
    finally:
        srv.stop()


def test_a_large_output_streams_in_little_memory(box: tuple[Path, str], tmp_path: Path) -> None:
    """50 MiB through exec: all bytes arrive, and the CLI's peak RSS stays small (the output
    is not collected)."""
    state, sid = box
    hwm = tmp_path / "status"
    # The CLI, with its own /proc status written at exit (VmHWM: its peak resident set).
    wrapper = ("import atexit, runpy, sys\n"
               f"atexit.register(lambda: open({str(hwm)!r}, 'w').write(open('/proc/self/status').read()))\n"
               "sys.argv = ['vmsandbox', *sys.argv[1:]]\n"
               "runpy.run_module('vmsandbox', run_name='__main__')\n")
    n = 50 * 1024 * 1024
    argv = [sys.executable, "-c", wrapper, "--state-dir", str(state), "exec", sid, "--",
            "dd", "if=/dev/zero", "bs=1048576", "count=50"]
    p = subprocess.Popen(argv, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert p.stdout is not None
    total = 0
    while chunk := p.stdout.read(1 << 20):
        assert chunk.count(0) == len(chunk)
        total += len(chunk)
    assert p.wait(timeout=600) == 0
    assert total == n
    kib = int(re.search(r"VmHWM:\s+(\d+) kB", hwm.read_text()).group(1))  # type: ignore[union-attr]
    assert kib < 100 * 1024, f"peak RSS {kib} KiB"


def test_cp_copies_files_and_folders_both_ways_keeping_modes(box: tuple[Path, str], tmp_path: Path) -> None:
    state, sid = box
    src = tmp_path / "proj"
    (src / "bin").mkdir(parents=True)
    (src / "bin" / "tool").write_bytes(os.urandom(5 << 20))
    (src / "bin" / "tool").chmod(0o750)
    (src / "README").write_text("hi\n")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(cli(state, *args), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return done

    run("exec", sid, "--", "mkdir", "-p", "/tmp/dst")
    run("cp", str(src), f"{sid}:/tmp/dst")  # an existing folder receives proj under its name
    got = run("exec", sid, "--", "stat", "-c", "%a %s", "/tmp/dst/proj/bin/tool").stdout.split()
    assert got == ["750", str(5 << 20)]
    run("cp", str(src / "README"), f"{sid}:/tmp/one.txt")  # a new name
    assert run("exec", sid, "--", "cat", "/tmp/one.txt").stdout == "hi\n"
    back = tmp_path / "back"
    back.mkdir()
    run("cp", f"{sid}:/tmp/dst/proj", str(back))
    assert (back / "proj/bin/tool").read_bytes() == (src / "bin/tool").read_bytes()
    assert (back / "proj/bin/tool").stat().st_mode & 0o777 == 0o750
    missing = subprocess.run(cli(state, "cp", f"{sid}:/nope", str(back)), cwd=REPO, env=ENV, capture_output=True,
                             text=True, timeout=120)
    assert missing.returncode != 0 and "no such file" in missing.stderr
