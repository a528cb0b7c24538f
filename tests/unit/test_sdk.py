"""The SDK's Sandbox and Process over the fake-wired controller; Files' guest scripts run
for real with the host's busybox (they only need /proc/1/root, so: as root)."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from vmsandbox import DeadlineExceeded, ExecResult, FailedPrecondition, InvalidArgument, NotFound
from vmsandbox.guest.fake import FakeProcess
from vmsandbox.sdk import CommandFailed, Files, Sandbox
from vmsandbox.sdk.files import GUEST_BUSYBOX, GUEST_SHARE

from .rig import Rig


@pytest.fixture
def rig(tmp_path: Path) -> Any:
    r = Rig(tmp_path)
    yield r
    r.close()


def test_create_runs_and_close_removes_everything(rig: Any) -> None:
    rig.guests.handler = lambda call: ExecResult(0, b"hi\n", b"") if call.argv == ("echo", "hi") else ExecResult(1, b"", b"")
    sb = Sandbox.create(controller=rig.ctl, id="sdk1", memory_mib=512, vcpus=2, env={"A": "1"})
    assert rig.ctl.status("sdk1").state == "SANDBOX_READY"
    assert rig.record("sdk1")["annotations"]["vmsandbox.io/memory-mib"] == "512"
    res = sb.run(["echo", "hi"], env={"B": "2"})
    assert (res.exit_code, res.stdout) == (0, b"hi\n")
    call = rig.guests.execs[-1]
    assert call.env == {"A": "1", "B": "2"} and not call.in_guest_root
    with pytest.raises(CommandFailed) as err:
        sb.run(["false"], check=True)
    assert err.value.result.exit_code == 1
    sb.close()
    sb.close()  # idempotent
    assert rig.leftovers("sdk1") == []
    with pytest.raises(InvalidArgument):
        sb.run(["true"])


def test_a_string_is_a_shell_command_and_argv_must_be_strings(rig: Any) -> None:
    with Sandbox.create(controller=rig.ctl, id="sdk2") as sb:
        sb.run("echo $HOME")
        assert rig.guests.execs[-1].argv == ("/bin/sh", "-c", "echo $HOME")
        for bad in ([], [1], ["a", None]):
            with pytest.raises(InvalidArgument):
                sb.run(bad)  # type: ignore[arg-type]


def test_a_failed_start_leaves_nothing(rig: Any) -> None:
    rig.hv.fp.fail("start", RuntimeError("qemu said no"))
    with pytest.raises(Exception):
        Sandbox.create(controller=rig.ctl, id="sdk3")
    assert rig.leftovers("sdk3") == []
    assert [s.id for s in rig.ctl.list()] == []


def test_spawn_streams_output_as_it_comes_and_sees_signals(rig: Any) -> None:
    procs: list[FakeProcess] = []
    rig.guests.on_spawn = procs.append
    with Sandbox.create(controller=rig.ctl, id="sdk4") as sb:
        p = sb.spawn(["server"], user="app")
        assert procs[0].call.user == "app"
        procs[0].emit(b"line one\nline ")
        it = p.stdout.lines()
        assert next(it) == b"line one\n"  # before the process ended
        assert p.returncode is None
        p.terminate()
        p.send_signal(signal.SIGUSR1)
        assert procs[0].signals == [signal.SIGTERM, signal.SIGUSR1]
        with pytest.raises(InvalidArgument):
            p.send_signal(signal.SIGSEGV)
        procs[0].emit(b"two\n")
        procs[0].emit(b"oops", 2)
        procs[0].exit(143)
        assert list(it) == [b"line two\n"]
        assert p.stderr.read() == b"oops"
        assert p.wait(5) == 143 and p.returncode == 143


def test_stdin_callbacks_and_a_timeout(rig: Any) -> None:
    procs: list[FakeProcess] = []
    rig.guests.on_spawn = procs.append
    seen: list[bytes] = []
    with Sandbox.create(controller=rig.ctl, id="sdk5") as sb:
        p = sb.spawn(["cat"], on_stdout=seen.append)
        p.write("abc")
        p.close_stdin()
        procs[0].wait_stdin(lambda fp: fp.stdin_closed)
        assert bytes(procs[0].stdin) == b"abc"
        procs[0].emit(b"abc")
        procs[0].exit(0)
        assert p.wait(5) == 0 and seen == [b"abc"]

        def killed_on_kill(fp: FakeProcess) -> None:
            def watch() -> None:
                while signal.SIGKILL not in fp.signals:
                    time.sleep(0.01)
                fp.exit(137)
            threading.Thread(target=watch, daemon=True).start()
        rig.guests.on_spawn = killed_on_kill
        with pytest.raises(DeadlineExceeded):
            sb.run(["sleep", "100"], timeout=0.2, on_stdout=seen.append)


def test_a_full_buffer_holds_the_guest_back_instead_of_growing(rig: Any) -> None:
    procs: list[FakeProcess] = []
    rig.guests.on_spawn = procs.append
    with Sandbox.create(controller=rig.ctl, id="sdk6") as sb:
        p = sb._start(["yes"], env=None, cwd=None, user=None, on_stdout=None, on_stderr=None, timeout=None, tty=None)
        p.stdout._limit = 10
        procs[0].emit(b"x" * 10)
        blocked = threading.Thread(target=procs[0].emit, args=(b"y" * 10,), daemon=True)
        blocked.start()
        blocked.join(0.3)
        assert blocked.is_alive()  # the pump waits for a reader
        assert p.stdout.read_chunk(1) == b"x" * 10
        blocked.join(2)
        assert not blocked.is_alive()
    # close() killed what still ran and ended the process
    assert procs[0].signals == [signal.SIGKILL] and procs[0].aborted


def test_pty_and_shell_ask_for_a_terminal(rig: Any) -> None:
    procs: list[FakeProcess] = []
    rig.guests.on_spawn = procs.append
    with Sandbox.create(controller=rig.ctl, id="sdk7") as sb:
        sh = sb.shell(rows=30, cols=100)
        assert procs[0].call.tty and procs[0].call.argv == ("/bin/sh",)
        assert (procs[0].call.size.height, procs[0].call.size.width) == (30, 100)  # type: ignore[union-attr]
        sh.resize(40, 120)
        assert (procs[0].sizes[-1].height, procs[0].sizes[-1].width) == (40, 120)


def test_the_shared_controller_is_closed_with_the_last_sandbox(rig: Any, monkeypatch: Any) -> None:
    import vmsandbox.host

    monkeypatch.setattr(vmsandbox.host, "LibvirtController", rig.controller_factory())
    a = Sandbox.create(config=rig.config, id="sdk8")
    b = Sandbox.create(config=rig.config, id="sdk9")
    assert a._b is b._b and a._b is not rig.ctl
    a.close()
    assert not a._b._closed  # type: ignore[attr-defined]
    b.close()
    assert b._b._closed  # type: ignore[attr-defined]
    assert rig.leftovers("sdk8") == rig.leftovers("sdk9") == []


# ---------------------------------------------------------------------- Files, for real
class HostOps:
    """FileOps over the host: the sandbox root is the host's, the share a temp folder."""

    def __init__(self, share: Path) -> None:
        self._share = share
        self.calls: list[list[str]] = []

    def run_root(self, argv: Sequence[str]) -> ExecResult:
        args = [a.replace(GUEST_SHARE, str(self._share)).replace(GUEST_BUSYBOX, "/bin/busybox") for a in argv]
        self.calls.append(args)
        r = subprocess.run(args, capture_output=True)
        return ExecResult(r.returncode, r.stdout, r.stderr)

    def share(self) -> Path:
        return self._share


@pytest.fixture
def files(tmp_path: Path) -> tuple[Files, Path, HostOps]:
    if not os.path.exists("/bin/busybox"):
        pytest.skip("needs /bin/busybox (hack/setup.sh installs busybox-static)")
    (tmp_path / "share").mkdir()
    (tmp_path / "root").mkdir()
    ops = HostOps(tmp_path / "share")
    return Files(ops, sandbox_id="f", cwd=str(tmp_path / "root")), tmp_path / "root", ops


def test_files_write_read_list_stat_remove(files: tuple[Files, Path, HostOps]) -> None:
    f, root, _ = files
    f.write("a/b/c.txt", "hello", mode=0o640)
    assert (root / "a/b/c.txt").read_bytes() == b"hello"
    assert (root / "a/b/c.txt").stat().st_mode & 0o777 == 0o640
    assert f.read("a/b/c.txt") == b"hello"
    f.write(root / "a/b/c.txt", b"new")  # replaced
    assert f.read_text(str(root / "a/b/c.txt")) == "new"
    (root / "a" / "we ird\nname").write_text("x")
    os.symlink("b", root / "a/link")
    names = {e.name: e for e in f.list("a")}
    assert set(names) == {"b", "link", "we ird\nname"}
    assert (names["b"].type, names["link"].type, names["we ird\nname"].type) == ("dir", "symlink", "file")
    assert names["we ird\nname"].size == 1
    assert f.stat("a/b/c.txt").mode == 0o644 and f.exists("a/b") and not f.exists("nope")
    with pytest.raises(NotFound):
        f.read("nope")
    with pytest.raises(InvalidArgument):
        f.read("a")
    with pytest.raises(InvalidArgument):
        f.write("a", "x")  # a directory
    with pytest.raises(InvalidArgument):
        f.list("a/b/c.txt")
    with pytest.raises(InvalidArgument):
        f.remove("a")  # not empty
    f.remove("a/link")
    assert (root / "a/b").is_dir()  # the link went, not its target
    f.remove("a", recursive=True)
    assert not (root / "a").exists()
    with pytest.raises(NotFound):
        f.remove("a")
    with pytest.raises(InvalidArgument):
        f.remove("/")


def test_files_upload_download_keep_modes_and_leave_no_staging(files: tuple[Files, Path, HostOps],
                                                              tmp_path: Path) -> None:
    f, root, ops = files
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "run.sh").write_text("#!/bin/sh\n")
    (src / "run.sh").chmod(0o751)
    (src / "sub" / "data").write_bytes(os.urandom(3 << 20))
    os.symlink("run.sh", src / "alias")
    f.upload(src, "tree")
    assert (root / "tree/run.sh").stat().st_mode & 0o777 == 0o751
    assert os.readlink(root / "tree/alias") == "run.sh"
    assert (root / "tree/sub/data").read_bytes() == (src / "sub/data").read_bytes()
    f.download("tree", tmp_path / "back")
    assert (tmp_path / "back/run.sh").stat().st_mode & 0o777 == 0o751
    assert (tmp_path / "back/sub/data").read_bytes() == (src / "sub/data").read_bytes()
    f.upload(src / "run.sh", "one")
    f.download("one", tmp_path / "one")
    assert (tmp_path / "one").stat().st_mode & 0o777 == 0o751
    with pytest.raises(NotFound):
        f.upload(tmp_path / "missing", "x")
    with pytest.raises(FailedPrecondition):
        f.read("tree/sub/data", max_bytes=1024)
    assert list((ops.share() / ".vsbx-files").iterdir()) == []


def test_the_asyncio_flavour_awaits_the_same_calls(rig: Any) -> None:
    import asyncio

    from vmsandbox.sdk.aio import AsyncSandbox, achunks

    procs: list[FakeProcess] = []
    rig.guests.on_spawn = procs.append
    rig.guests.handler = lambda call: ExecResult(0, b"ok", b"")

    async def main() -> list[bytes]:
        async with await AsyncSandbox.create(controller=rig.ctl, id="sdka") as sb:
            assert (await sb.run(["x"])).stdout == b"ok"
            p = await sb.spawn(["y"])
            procs[0].emit(b"1")
            procs[0].emit(b"2")
            procs[0].exit(0)
            got = [c async for c in achunks(p.stdout)]
            assert await sb.wait(p, 5) == 0
            return got
    assert asyncio.run(main()) == [b"1", b"2"]
    assert rig.leftovers("sdka") == []
