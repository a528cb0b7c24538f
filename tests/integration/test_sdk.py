"""The SDK on real guests: files through the share, streamed output, signals, terminals, and
nothing left after close()."""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmsandbox import LibvirtController
from vmsandbox.sdk import Sandbox

from ..conftest import unique

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def sb(controller: LibvirtController) -> Iterator[Sandbox]:
    s = Sandbox.create(controller=controller, id=unique("sdk"), memory_mib=512)
    yield s
    s.close()


def _proc_threads(sandbox_id: str) -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.endswith(sandbox_id)]


def test_a_64_mib_file_round_trips_with_its_sha256_and_mode(sb: Sandbox, tmp_path: Path) -> None:
    data = os.urandom(64 << 20)
    src = tmp_path / "blob"
    src.write_bytes(data)
    src.chmod(0o750)
    sb.files.upload(src, "/var/tmp/blob")
    # the guest's own view of it
    assert sb.run(["sha256sum", "/var/tmp/blob"]).text.split()[0] == hashlib.sha256(data).hexdigest()
    assert sb.run(["stat", "-c", "%a %s", "/var/tmp/blob"]).text.split() == ["750", str(64 << 20)]
    back = tmp_path / "back"
    sb.files.download("/var/tmp/blob", back)
    assert hashlib.sha256(back.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()
    assert back.stat().st_mode & 0o777 == 0o750
    sb.files.remove("/var/tmp/blob")
    assert not sb.files.exists("/var/tmp/blob")
    assert list((sb._b.share_path(sb.id) / ".vsbx-files").iterdir()) == []


def test_written_files_are_what_the_sandbox_reads_and_lists(sb: Sandbox) -> None:
    sb.files.write("/tmp/d/hello.txt", "hi there\n", mode=0o600)
    assert sb.run(["cat", "/tmp/d/hello.txt"]).stdout == b"hi there\n"
    sb.run(["sh", "-c", "mkdir /tmp/d/sub && ln -s hello.txt /tmp/d/link && printf abc > /tmp/d/sub/x"], check=True)
    entries = {e.name: (e.type, e.mode, e.size) for e in sb.files.list("/tmp/d")}
    assert entries["hello.txt"] == ("file", 0o600, 9)
    assert entries["sub"][0] == "dir" and entries["link"][0] == "symlink"
    assert sb.files.read("/tmp/d/sub/x") == b"abc"
    sb.files.remove("/tmp/d", recursive=True)
    assert sb.run(["test", "-e", "/tmp/d"]).exit_code == 1


def test_streamed_output_arrives_before_the_command_ends(sb: Sandbox) -> None:
    t0 = time.monotonic()
    proc = sb.spawn(["sh", "-c", "echo first; sleep 3; echo second >&2; echo third"])
    arrivals = [(time.monotonic() - t0, line) for line in proc.stdout.lines()]
    assert proc.wait(30) == 0
    ended = time.monotonic() - t0
    assert [line for _, line in arrivals] == [b"first\n", b"third\n"]
    assert proc.stderr.read() == b"second\n"
    assert ended - arrivals[0][0] > 2.0, arrivals  # "first" came while sleep 3 ran
    seen: list[tuple[float, bytes]] = []
    res = sb.run(["sh", "-c", "echo a; sleep 2; echo b"], on_stdout=lambda d: seen.append((time.monotonic(), d)))
    assert res.exit_code == 0 and b"".join(d for _, d in seen) == b"a\nb\n"
    assert seen[-1][0] - seen[0][0] > 1.5


def test_a_spawned_process_is_signalled_and_its_status_seen(sb: Sandbox) -> None:
    proc = sb.spawn(["sh", "-c", "trap 'echo got TERM; exit 3' TERM; echo ready; while :; do sleep 0.1; done"])
    assert next(proc.stdout.lines()) == b"ready\n"
    proc.terminate()
    assert proc.wait(20) == 3
    assert proc.stdout.read() == b"got TERM\n"
    sleeper = sb.spawn(["sleep", "100"])
    time.sleep(0.5)
    sleeper.send_signal(signal.SIGINT)
    assert sleeper.wait(20) == 128 + signal.SIGINT
    victim = sb.spawn(["sleep", "100"])
    time.sleep(0.5)
    victim.kill()
    assert victim.wait(20) == 128 + signal.SIGKILL
    comms = sb.run(["sh", "-c", "cat /proc/[0-9]*/comm"]).text.split()
    assert "sleep" not in comms  # none left running in the guest


def test_stdin_and_a_timeout(sb: Sandbox) -> None:
    assert sb.run(["tr", "a-z", "A-Z"], stdin="shout\n").stdout == b"SHOUT\n"
    proc = sb.spawn(["cat"])
    proc.write(b"x" * 200000)
    proc.close_stdin()
    assert len(proc.stdout.read()) == 200000 and proc.wait(20) == 0
    from vmsandbox import DeadlineExceeded

    t0 = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        sb.run(["sleep", "30"], timeout=1)
    assert time.monotonic() - t0 < 25


def test_a_terminal_sees_its_size_and_a_resize_and_exits_on_ctrl_d(sb: Sandbox) -> None:
    sh = sb.shell(rows=30, cols=100)
    sh.write("stty size\n")
    out = b""
    for chunk in sh.stdout:
        out += chunk
        if b"30 100" in out:
            break
    sh.resize(40, 120)
    sh.write("stty size\n")
    for chunk in sh.stdout:
        out += chunk
        if b"40 120" in out and b"# " in out[out.index(b"40 120"):]:
            break  # the size, then the next prompt
    sh.write(b"\x04")  # Ctrl-D at the prompt ends the shell
    assert sh.wait(20) == 0


def test_close_leaves_nothing(controller: LibvirtController) -> None:
    sid = unique("sdkc")
    sb = Sandbox.create(controller=controller, id=sid)
    running = sb.spawn(["sleep", "300"])
    sb.files.write("/tmp/x", "y")
    domain_pid = controller.status(sid).pid
    assert domain_pid and os.path.exists(f"/proc/{domain_pid}")
    sb.close()
    with pytest.raises(Exception):
        controller.status(sid)
    assert not (controller.config.state_dir / "sandboxes" / sid).exists()
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{domain_pid}") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{domain_pid}"), "QEMU still runs"
    assert running.returncode is not None or running._proc.done
    assert _proc_threads(sid) == []
    assert sid not in [r.id for r in controller.list()]


def test_attach_to_a_running_sandbox(controller: LibvirtController, sb: Sandbox) -> None:
    other = Sandbox.attach(sb.id, controller=controller)
    assert other.run(["hostname"]).text.strip() == sb.id
    other.close()  # not owned: the sandbox stays
    assert sb.run(["true"]).exit_code == 0


