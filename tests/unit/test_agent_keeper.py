"""vsbx-exec's keeper (tokens k and w of images/agent/agent.c), built for the host.

The "crun create" is a shell script that leaves a daemon behind and writes its pid, as crun
does. What is checked: the keeper outlives the vsbx-exec that started it (killed as a dropped
SSH session kills it), the daemon's output lands in the files, its exit code in PREFIX.exit,
and ``w`` waits for the keeper from a new process and ends with the daemon's code (255 when
the keeper was killed and left none).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.unit.test_agent_bridge import agent_binary  # noqa: F401 - the fixture
from vmsandbox.guest.agent import encode_exec_request

CREATE = 'sh -c "$1" daemon </dev/null & echo $! > "$0"'


@pytest.fixture
def vsbx_exec(agent_binary: Path, tmp_path: Path) -> Path:  # noqa: F811
    link = tmp_path / "vsbx-exec"
    link.symlink_to(agent_binary)
    return link


def run(exe: Path, cmd: str, tmp: Path) -> subprocess.Popen[bytes]:
    env = {"VSBX_KEEP_DIR": str(tmp / "keep"), "PATH": os.environ["PATH"]}
    return subprocess.Popen([str(exe), "-c", cmd], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)


def kept(exe: Path, tmp: Path, script: str) -> tuple[subprocess.Popen[bytes], str, int]:
    prefix, pidfile = str(tmp / "init"), str(tmp / "init.pid")
    cmd = encode_exec_request(["sh", "-c", CREATE, pidfile, script], in_guest_root=True,
                              supervise_pidfile=pidfile, keep=prefix)
    p = run(exe, cmd, tmp)
    deadline = time.monotonic() + 10
    while not os.path.exists(pidfile + ".ready"):
        assert time.monotonic() < deadline and p.poll() is None, p.communicate()
        time.sleep(0.02)
    return p, prefix, int(Path(pidfile + ".ready").read_text())


def rejoin(exe: Path, tmp: Path, prefix: str) -> subprocess.Popen[bytes]:
    return run(exe, encode_exec_request([], rejoin=prefix), tmp)


def test_the_keeper_outlives_its_session_and_rejoin_gets_the_exit(vsbx_exec: Path, tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    p, prefix, pid = kept(vsbx_exec, tmp_path, f"echo before; read x < {tmp_path}/fifo; echo after; echo oops >&2; exit 7")
    os.killpg(p.pid, signal.SIGKILL)  # the session goes, as when serve restarts
    p.wait(5)
    os.kill(pid, 0)  # the daemon runs on
    w = rejoin(vsbx_exec, tmp_path, prefix)
    time.sleep(0.3)
    assert w.poll() is None  # it waits for the keeper
    (tmp_path / "fifo").write_text("go\n")
    assert w.wait(10) == 7
    assert Path(prefix + ".out").read_text() == "before\nafter\n"
    assert Path(prefix + ".err").read_text() == "oops\n"
    assert Path(prefix + ".exit").read_text() == "7\n"
    assert rejoin(vsbx_exec, tmp_path, prefix).wait(5) == 7  # after the end too


def test_the_session_ends_with_the_daemons_signal(vsbx_exec: Path, tmp_path: Path) -> None:
    p, prefix, pid = kept(vsbx_exec, tmp_path, "exec sleep 60")
    os.kill(pid, signal.SIGTERM)
    assert p.wait(10) == 143
    assert Path(prefix + ".exit").read_text() == "143\n"


def test_a_killed_keeper_leaves_no_exit_and_rejoin_says_255(vsbx_exec: Path, tmp_path: Path) -> None:
    p, prefix, pid = kept(vsbx_exec, tmp_path, "exec sleep 60")
    keeper = int(subprocess.run(["ps", "-o", "ppid=", "-p", str(pid)], capture_output=True, text=True).stdout)
    w = rejoin(vsbx_exec, tmp_path, prefix)
    os.kill(keeper, signal.SIGKILL)
    os.kill(pid, signal.SIGKILL)
    assert w.wait(10) == 255
    assert p.wait(10) == 255
    assert not os.path.exists(prefix + ".exit")


def test_a_failing_create_reports_its_status_and_message(vsbx_exec: Path, tmp_path: Path) -> None:
    prefix, pidfile = str(tmp_path / "init"), str(tmp_path / "init.pid")
    cmd = encode_exec_request(["sh", "-c", "echo no such image >&2; exit 1"], in_guest_root=True,
                              supervise_pidfile=pidfile, keep=prefix)
    assert run(vsbx_exec, cmd, tmp_path).wait(10) == 1
    assert Path(prefix + ".err").read_text() == "no such image\n"
    assert Path(prefix + ".exit").read_text() == "1\n"
