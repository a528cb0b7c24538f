"""The task engine over the fake guest (with a fake crun), the fake stager and real FIFOs."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.task_rig import CID, Fifo, Rig, fifos, leak_checked
from vmsandbox import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unimplemented
from vmsandbox.guest.fake import ExecCall, FakeProcess
from vmsandbox.model import EPOCH, ExecResult, Mount, PtySize
from vmsandbox.task.engine import TaskEngine
from vmsandbox.task.process import Exit, IoSpec, Status

ROOTFS = (Mount("overlay", "overlay", "", ("lowerdir=/l", "upperdir=/u", "workdir=/w")),)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    with leak_checked(Rig(tmp_path)) as r:
        yield r


def io(o: Fifo, e: Fifo, i: Fifo | None = None, terminal: bool = False) -> IoSpec:
    return IoSpec(i.path if i else "", o.path, e.path, terminal)


def waiter(engine: TaskEngine, exec_id: str = "") -> tuple[threading.Thread, list[Exit | None]]:
    got: list[Exit | None] = []
    t = threading.Thread(target=lambda: got.append(engine.wait(CID, exec_id)), daemon=True)
    t.start()
    return t, got


def create(rig: Rig, o: Fifo, e: Fifo, i: Fifo | None = None, terminal: bool = False) -> int:
    pid = rig.engine.create(CID, bundle=rig.bundle(), rootfs=ROOTFS, io=io(o, e, i, terminal))
    o.collect()
    e.collect()
    return pid


def test_create_stages_rewrites_and_runs_a_supervised_crun_create(rig: Rig, tmp_path: Path) -> None:
    with fifos(tmp_path, "init") as (_, o, e):
        pid = create(rig, o, e)
        assert pid > 0 and rig.engine.connect(CID) == pid
        st = rig.engine.state(CID)
        assert (st.status, st.pid, st.exited_at, st.io.stdout) == (Status.CREATED, pid, EPOCH, o.path)
        assert st.bundle == str(tmp_path / "bundles" / CID)
        assert rig.stager.staged[CID] == (ROOTFS, ())
        guest = rig.guest_spec()
        assert guest["root"]["path"] == f"/run/vsbx/shared/{CID}/rootfs"
        assert guest["linux"]["cgroupsPath"] == f"/vsbx/{CID}"
        assert {ns["type"] for ns in guest["linux"]["namespaces"]} == {"pid", "mount"}
        # The pod files the guest has (not resolv.conf: no DNS settings), bound at /etc.
        assert {m["destination"]: m["source"] for m in guest["mounts"] if m["destination"].startswith("/etc/")} == {
            "/etc/hostname": "/run/vsbx/config/hostname", "/etc/hosts": "/run/vsbx/config/hosts"}
        (call,) = [p.call for p in rig.guests.processes]
        d = f"/run/vsbx/shared/{CID}"
        assert call.argv == ("crun", "create", "--bundle", d, "--pid-file", f"{d}/init.pid", CID)
        assert (call.supervise_pidfile, call.in_guest_root, call.tty) == (f"{d}/init.pid", True, False)
        assert rig.engine.pids(CID) == [pid]


def test_the_containerd_order_create_wait_start_exit_delete(rig: Rig, tmp_path: Path) -> None:
    def run(proc: FakeProcess) -> None:
        proc.emit(b"hello\n")
        proc.emit(b"oops\n", 2)
        time.sleep(0.2)
        proc.exit(3)
    rig.crun.on_start = run
    with fifos(tmp_path, "init") as (_, o, e):
        pid = create(rig, o, e)
        t, got = waiter(rig.engine)  # containerd waits before Start
        time.sleep(0.2)
        assert t.is_alive() and not o.eof.is_set()
        assert rig.engine.start(CID) == pid
        t.join(5)
        (ex,) = got
        assert ex is not None and (ex.pid, ex.exit_status) == (pid, 3) and ex.exited_at > EPOCH
        assert o.eof.wait(5) and e.eof.wait(5)  # closed after the exit and the drain
        assert (bytes(o.data), bytes(e.data)) == (b"hello\n", b"oops\n")
        st = rig.engine.state(CID)
        assert (st.status, st.exit_status, st.exited_at) == (Status.STOPPED, 3, ex.exited_at)
        with pytest.raises(NotFound, match="already finished"):
            rig.engine.kill(CID, signal=9, all=True)  # containerd's WithProcessKill: fine
        assert rig.engine.pids(CID) == []
        assert rig.engine.delete(CID) == ex
        assert ("crun", "delete", "--force", CID) in rig.crun.commands
        assert rig.stager.unstaged == [CID] and not rig.stager.files
        for call in (rig.engine.state, rig.engine.connect, rig.engine.delete, rig.engine.wait):
            with pytest.raises(NotFound):
                call(CID)


def test_kill_sends_the_signal_and_wait_sees_128_plus_n(rig: Rig, tmp_path: Path) -> None:
    with fifos(tmp_path, "init") as (_, o, e):
        create(rig, o, e)
        rig.engine.start(CID)
        assert rig.engine.state(CID).status is Status.RUNNING
        with pytest.raises(FailedPrecondition, match="running"):
            rig.engine.delete(CID)
        rig.engine.kill(CID, signal=15)
        ex = rig.engine.wait(CID)
        assert ex is not None and ex.exit_status == 128 + 15
        assert ("crun", "kill", CID, "15") in rig.crun.commands


def test_kill_all_and_bad_signals(rig: Rig, tmp_path: Path) -> None:
    with fifos(tmp_path, "init") as (_, o, e):
        create(rig, o, e)
        for bad in (0, 65, -1):
            with pytest.raises(InvalidArgument):
                rig.engine.kill(CID, signal=bad)
        rig.engine.kill(CID, signal=9, all=True)  # a created container can be killed too
        assert ("crun", "kill", "--all", CID, "9") in rig.crun.commands
        ex = rig.engine.wait(CID)
        assert ex is not None and ex.exit_status == 137


def test_delete_of_a_created_container_kills_it(rig: Rig, tmp_path: Path) -> None:
    with fifos(tmp_path, "init") as (_, o, e):
        pid = create(rig, o, e)
        ex = rig.engine.delete(CID)
        assert (ex.pid, ex.exit_status) == (pid, 137)
        assert o.eof.wait(5)


def test_a_failed_create_reports_crun_and_leaves_nothing(rig: Rig, tmp_path: Path) -> None:
    rig.crun.fail_create = b"crun: cannot find the rootfs\n"
    with fifos(tmp_path, "init") as (_, o, e):
        with pytest.raises(FailedPrecondition, match="crun create failed .exit 1.: crun: cannot find the rootfs"):
            rig.engine.create(CID, bundle=rig.bundle(), rootfs=ROOTFS, io=io(o, e))
        assert rig.stager.unstaged == [CID] and not rig.stager.staged
        assert ("crun", "delete", "--force", CID) in rig.crun.commands
        with pytest.raises(NotFound):
            rig.engine.state(CID)
        rig.crun.fail_create = None
        assert create(rig, o, e) > 0  # the id is free again


def test_create_refuses_duplicates_checkpoints_and_bad_input(rig: Rig, tmp_path: Path) -> None:
    with fifos(tmp_path, "init") as (_, o, e):
        create(rig, o, e)
        with pytest.raises(AlreadyExists):
            rig.engine.create(CID, bundle=rig.bundle(), rootfs=ROOTFS, io=io(o, e))
    other = "d" * 64
    with pytest.raises(Unimplemented):
        rig.engine.create(other, bundle=rig.bundle(name=other), rootfs=(), io=IoSpec(), checkpoint="/c")
    with pytest.raises(InvalidArgument, match="config.json"):
        rig.engine.create(other, bundle=str(tmp_path / "nowhere"), rootfs=(), io=IoSpec())
    with pytest.raises(InvalidArgument, match="not a FIFO"):
        rig.engine.create(other, bundle=rig.bundle(name=other), rootfs=(), io=IoSpec(stdout=str(tmp_path)))
    assert other not in rig.stager.staged


def test_a_stdout_fifo_nobody_reads_fails_the_create(rig: Rig, tmp_path: Path) -> None:
    import os
    path = tmp_path / "lonely"
    os.mkfifo(path)
    with pytest.raises(FailedPrecondition, match="nobody reads"):
        rig.engine.create(CID, bundle=rig.bundle(), rootfs=(), io=IoSpec(stdout=str(path)))
    assert not rig.stager.staged and not rig.guests.processes


def test_a_reader_that_goes_away_does_not_hang_the_process(rig: Rig, tmp_path: Path) -> None:
    with fifos(tmp_path, "init") as (_, o, e):
        create(rig, o, e)
        rig.engine.start(CID)
        (proc,) = rig.guests.processes
        proc.emit(b"first\n")
        time.sleep(0.2)
        o.close()  # CRI's reader is gone
        for _ in range(100):
            proc.emit(b"x" * 4096)  # EPIPE: discarded, never blocks
        proc.exit(0)
        ex = rig.engine.wait(CID)
        assert ex is not None and ex.exit_status == 0


def test_exec_lifecycle_with_stdin_and_close_io(rig: Rig, tmp_path: Path) -> None:
    def echo(proc: FakeProcess) -> None:
        proc.wait_stdin(lambda p: p.stdin_closed)
        proc.emit(bytes(proc.stdin))
        proc.exit(0)
    rig.crun.on_exec = echo
    with fifos(tmp_path, "init") as (_, o, e), fifos(tmp_path, "ex1", stdin=True) as (xi, xo, xe):
        assert xi is not None
        create(rig, o, e)
        with pytest.raises(FailedPrecondition, match="not running"):
            rig.engine.exec(CID, "ex1", io=io(xo, xe, xi), process={"args": ["cat"]})
        rig.engine.start(CID)
        rig.engine.exec(CID, "ex1", io=io(xo, xe, xi), process={"args": ["cat"], "cwd": "/", "terminal": True})
        xo.collect()
        xe.collect()
        with pytest.raises(AlreadyExists):
            rig.engine.exec(CID, "ex1", io=io(xo, xe, xi), process={"args": ["cat"]})
        assert rig.engine.state(CID, "ex1").status is Status.CREATED
        t, got = waiter(rig.engine, "ex1")
        xi.open_writer()
        xi.write(b"ping\n")
        pid = rig.engine.start(CID, "ex1")
        assert pid > 0 and rig.engine.state(CID, "ex1").status in (Status.RUNNING, Status.STOPPED)
        call = rig.guests.processes[-1].call
        d = f"/run/vsbx/shared/{CID}"
        assert call.argv == ("crun", "exec", "--detach", "--process", f"{d}/exec-ex1.json", "--pid-file",
                             f"{d}/exec-ex1.pid", CID)
        assert json.loads(rig.stager.files[f"{d}/exec-ex1.json"])["terminal"] is False
        with pytest.raises(FailedPrecondition):
            rig.engine.start(CID, "ex1")
        xi.close()
        rig.engine.close_io(CID, "ex1", stdin=True)
        t.join(5)
        assert got and got[0] is not None and got[0].exit_status == 0 and got[0].pid == pid
        assert xo.eof.wait(5) and bytes(xo.data) == b"ping\n"
        assert rig.engine.delete(CID, "ex1").exit_status == 0
        with pytest.raises(NotFound):
            rig.engine.state(CID, "ex1")
        assert rig.engine.state(CID).status is Status.RUNNING  # the container runs on


def test_exec_kill_running_and_never_started(rig: Rig, tmp_path: Path) -> None:
    with fifos(tmp_path, "init") as (_, o, e), fifos(tmp_path, "a") as (_, ao, ae), \
            fifos(tmp_path, "b") as (_, bo, be):
        create(rig, o, e)
        rig.engine.start(CID)
        rig.engine.exec(CID, "a", io=io(ao, ae), process={"args": ["sleep", "9"]})
        rig.engine.exec(CID, "b", io=io(bo, be), process={"args": ["sleep", "9"]})
        pid = rig.engine.start(CID, "a")
        assert sorted(rig.engine.pids(CID)) == sorted([rig.engine.connect(CID), pid])
        with pytest.raises(FailedPrecondition):
            rig.engine.delete(CID, "a")
        rig.engine.kill(CID, "a", signal=9)
        assert ("kill", "-9", str(pid)) in rig.crun.commands
        ex = rig.engine.wait(CID, "a")
        assert ex is not None and ex.exit_status == 137
        with pytest.raises(NotFound):
            rig.engine.kill(CID, "a", signal=9)
        rig.engine.kill(CID, "b", signal=9)  # never started: it just stops
        ex_b = rig.engine.wait(CID, "b")
        assert ex_b is not None and (ex_b.pid, ex_b.exit_status) == (0, 137)
        assert rig.engine.delete(CID, "b").exit_status == 137
        with pytest.raises(FailedPrecondition):
            rig.engine.start(CID, "a")


def test_resize_before_and_after_start(rig: Rig, tmp_path: Path) -> None:
    with fifos(tmp_path, "init") as (_, o, e), fifos(tmp_path, "t") as (_, to, te):
        create(rig, o, e)
        rig.engine.start(CID)
        with pytest.raises(FailedPrecondition, match="no terminal"):
            rig.engine.resize(CID, "", PtySize(80, 24))
        rig.engine.exec(CID, "t", io=io(to, te, terminal=True), process={"args": ["sh"]})
        rig.engine.resize(CID, "t", PtySize(100, 30))
        rig.engine.start(CID, "t")
        proc = rig.guests.processes[-1]
        assert (proc.call.tty, proc.call.size) == (True, PtySize(100, 30))
        rig.engine.resize(CID, "t", PtySize(120, 40))
        assert proc.sizes == [PtySize(120, 40)]


def test_a_dropped_guest_connection_ends_every_wait_with_255(rig: Rig, tmp_path: Path) -> None:
    with fifos(tmp_path, "init") as (_, o, e), fifos(tmp_path, "x") as (_, xo, xe):
        create(rig, o, e)
        rig.engine.start(CID)
        rig.engine.exec(CID, "x", io=io(xo, xe), process={"args": ["sleep", "9"]})
        xo.collect()
        rig.engine.start(CID, "x")
        t1, g1 = waiter(rig.engine)
        t2, g2 = waiter(rig.engine, "x")
        rig.channel.close()  # the transport died
        t1.join(5)
        t2.join(5)
        assert [g1[0].exit_status, g2[0].exit_status] == [255, 255]  # type: ignore[union-attr]
        assert o.eof.wait(5) and xo.eof.wait(5)
        rig.crun.containers.clear()
        rig.channel.connect(time.monotonic() + 1)
        assert rig.engine.delete(CID, "x").exit_status == 255
        assert rig.engine.delete(CID).exit_status == 255


def test_delete_of_a_stopped_container_in_a_guest_that_is_gone(rig: Rig, tmp_path: Path) -> None:
    with fifos(tmp_path, "init") as (_, o, e):
        create(rig, o, e)
        rig.channel.close()
        assert rig.engine.wait(CID) is not None
        assert rig.engine.delete(CID).exit_status == 255  # the guest is unreachable: forgotten anyway
        assert rig.stager.unstaged == [CID]


def test_close_ends_every_wait(rig: Rig, tmp_path: Path) -> None:
    with fifos(tmp_path, "init") as (_, o, e), fifos(tmp_path, "x") as (_, xo, xe):
        create(rig, o, e)
        rig.engine.start(CID)
        rig.engine.exec(CID, "x", io=io(xo, xe), process={"args": ["sleep", "9"]})
        t1, g1 = waiter(rig.engine)
        t2, g2 = waiter(rig.engine, "x")
        rig.engine.close()
        t1.join(5)
        t2.join(5)
        assert g1[0] is not None and g2[0] is not None and g1[0].exit_status == g2[0].exit_status == 255


def test_a_wait_whose_caller_went_away_returns_none(rig: Rig, tmp_path: Path) -> None:
    with fifos(tmp_path, "init") as (_, o, e):
        create(rig, o, e)
        t0 = time.monotonic()
        assert rig.engine.wait(CID, abandon=lambda: time.monotonic() - t0 > 0.3) is None


def test_unknown_ids(rig: Rig) -> None:
    eng = rig.engine
    for call in (lambda: eng.state(CID), lambda: eng.start(CID), lambda: eng.kill(CID), lambda: eng.pids(CID),
                 lambda: eng.close_io(CID), lambda: eng.delete(CID), lambda: eng.connect(CID),
                 lambda: eng.exec(CID, "x", io=IoSpec(), process={"args": ["sh"]})):
        with pytest.raises(NotFound):
            call()
    eng.shutdown()  # a no-op, always


def test_spec_of_an_exec_is_checked(rig: Rig, tmp_path: Path) -> None:
    with fifos(tmp_path, "init") as (_, o, e):
        create(rig, o, e)
        rig.engine.start(CID)
        with pytest.raises(InvalidArgument):
            rig.engine.exec(CID, "x", io=IoSpec(), process={"args": []})
        with pytest.raises(InvalidArgument):
            rig.engine.exec(CID, "", io=IoSpec(), process={"args": ["sh"]})



def test_a_reader_that_stalls_does_not_hang_close(rig: Rig, tmp_path: Path) -> None:
    with fifos(tmp_path, "init") as (_, o, e):
        rig.engine.create(CID, bundle=rig.bundle(), rootfs=(), io=io(o, e))  # CRI's reader never reads
        rig.engine.start(CID)
        (proc,) = rig.guests.processes
        flood = threading.Thread(target=lambda: proc.emit(b"x" * (1 << 20)), daemon=True)
        flood.start()  # blocks once the FIFO is full
        time.sleep(0.3)
        assert flood.is_alive()
        t0 = time.monotonic()
        rig.engine.close()  # the sandbox goes away
        flood.join(5)
        assert not flood.is_alive(), "the output pump is stuck on a reader that never reads"
        ex = rig.engine.wait(CID)
        assert ex is not None and ex.exit_status == 255 and time.monotonic() - t0 < 5


@pytest.mark.parametrize(("message", "status"), [
    ("executable file `no-such-binary` not found in $PATH: No such file or directory", 127),
    ("open executable: Permission denied", 126),
    ("container is not running", None),
])
def test_an_exec_crun_cannot_start_gets_the_shells_status(message: str, status: int | None) -> None:
    from vmsandbox.task.engine import exec_failure_status

    assert exec_failure_status(message) == status


def test_a_failing_unstage_does_not_hide_why_create_failed(rig: Rig, tmp_path: Path) -> None:
    from vmsandbox.errors import Internal

    rig.crun.fail_create = b"crun: cannot find the rootfs\n"
    rig.stager.fp.fail("unstage", Internal("umount: target is busy"))
    with fifos(tmp_path, "init") as (_, o, e):
        with pytest.raises(FailedPrecondition, match="cannot find the rootfs"):
            rig.engine.create(CID, bundle=rig.bundle(), rootfs=ROOTFS, io=io(o, e))


def test_a_terminal_process_gets_a_console_socket_one_stream_and_eot_at_close_io(rig: Rig, tmp_path: Path) -> None:
    """crun needs --console-socket for process.terminal; CRI reads no stderr FIFO of a tty."""
    with fifos(tmp_path, "init", stdin=True) as (i, o, e), fifos(tmp_path, "t", stdin=True) as (ti, to, te):
        assert i is not None and ti is not None
        e.close()  # nobody reads stderr (CRI with a tty): opening it would wait, then fail
        rig.engine.create(CID, bundle=rig.bundle(), rootfs=ROOTFS, io=io(o, e, i, terminal=True))
        call = rig.guests.processes[-1].call
        d = f"/run/vsbx/shared/{CID}"
        assert call.tty and call.console_socket is not None and call.console_socket.startswith("/run/vsbx/tty-")
        assert len(call.console_socket) < 108
        assert call.argv == ("crun", "create", "--bundle", d, "--pid-file", f"{d}/init.pid", "--console-socket",
                             call.console_socket, CID)
        assert rig.guest_spec()["process"]["terminal"] is True
        rig.engine.start(CID)
        rig.engine.exec(CID, "t", io=io(to, te, ti, terminal=True),
                        process={"args": ["sh"], "terminal": True, "consoleSize": {"width": 111, "height": 33}})
        to.collect()
        ti.open_writer()
        rig.engine.start(CID, "t")
        x = rig.guests.processes[-1]
        assert x.call.console_socket not in (None, call.console_socket)
        assert x.call.argv[-3:] == ("--console-socket", x.call.console_socket, CID)
        assert x.call.size == PtySize(111, 33)  # the user's terminal from the start, before any ResizePty
        assert json.loads(rig.stager.files[f"{d}/exec-t.json"])["terminal"] is True
        ti.write(b"exit\r")
        ti.close()
        rig.engine.close_io(CID, "t")
        x.wait_stdin(lambda p: p.stdin_closed)
        assert bytes(x.stdin) == b"exit\r\x04"  # ^D, as typed, then no more input
        x.emit(b"output\r\n")
        x.exit(0)
        assert rig.engine.wait(CID, "t") is not None
        assert to.eof.wait(5) and bytes(to.data) == b"output\r\n"


def test_an_exec_that_ends_while_its_pid_is_being_read_still_starts(rig: Rig, tmp_path: Path) -> None:
    """vsbx-exec published the pid and the quick process (``echo hi``) ended, channel and all,
    while the engine's read of ``.ready`` was on its way: that read missed the pid, and the
    next look saw the channel done. It was reported as "crun exec failed (exit 0)"."""
    rig.crun.on_exec = lambda proc: None
    handle = rig.guests.handler
    missed: list[str] = []

    def racing(call: ExecCall) -> ExecResult:
        ready = next((a for a in call.argv if a.endswith("exec-quick.pid.ready")), None)
        if ready is None or missed:
            return handle(call)
        missed.append(ready)
        data = rig.crun.files.pop(ready)
        r = handle(call)  # not there yet
        rig.crun.files[ready] = data
        proc = rig.guests.processes[-1]
        proc.emit(b"hi\n")
        proc.exit(0)
        return r

    rig.guests.handler = racing
    with fifos(tmp_path, "init") as (_, o, e), fifos(tmp_path, "quick") as (_, xo, xe):
        create(rig, o, e)
        rig.engine.start(CID)
        rig.engine.exec(CID, "quick", io=io(xo, xe), process={"args": ["echo", "hi"], "cwd": "/"})
        xo.collect()
        xe.collect()
        assert rig.engine.start(CID, "quick") > 0
        ex = rig.engine.wait(CID, "quick")
        assert missed and ex is not None and ex.exit_status == 0
        assert xo.eof.wait(5) and bytes(xo.data) == b"hi\n"
