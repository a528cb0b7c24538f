"""Kept container inits (vsbx-exec token k) over the fakes: output followed from the files on
the host's side of the share, host-only records, and a new engine taking the containers back
as a restarted ``vmsandbox serve`` does."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pytest

from tests.unit.task_rig import CID, SID, FakeCrun, Fifo, Rig, fifos, leak_checked
from vmsandbox import InvalidArgument
from vmsandbox.guest.fake import ExecCall, FakeProcess
from vmsandbox.model import ExecResult
from vmsandbox.task.engine import TaskEngine
from vmsandbox.task.fake import FakeStager
from vmsandbox.task.outfile import CHUNK, Follower, open_guest_file, read_offsets
from vmsandbox.task.process import IoSpec, Status
from vmsandbox.task.records import TaskRecords

ROOTFS = ()


# ---------------------------------------------------------------------- the files
def test_a_guest_symlink_or_special_file_is_never_opened(tmp_path: Path) -> None:
    root = tmp_path / "share"
    (root / "c").mkdir(parents=True)
    secret = tmp_path / "host-secret"
    secret.write_text("host only\n")
    (root / "c" / "init.out").symlink_to(secret)
    (root / "d").symlink_to(tmp_path)  # a guest-made symlink in place of a container dir
    os.mkfifo(root / "c" / "fifo")
    for parts in (["c", "init.out"], ["d", "host-secret"], ["c", "fifo"], ["c", ".."]):
        with pytest.raises(InvalidArgument):
            os.close(open_guest_file(root, parts))
    with pytest.raises(FileNotFoundError):
        open_guest_file(root, ["c", "none"])
    fd = open_guest_file(root, ["c", "init.out"], create=True)  # replaces the link, not its target
    os.write(fd, b"x")
    os.close(fd)
    assert secret.read_text() == "host only\n" and (root / "c" / "init.out").read_bytes() == b"x"
    with pytest.raises(InvalidArgument):
        open_guest_file(root, ["d", "new"], create=True)
    assert not (tmp_path / "new").exists()


def follower(path: Path, got: list[bytes], offsets: Path) -> Follower:
    fd = open_guest_file(path.parent, [path.name])
    return Follower([fd], [got.append], offsets_file=offsets, offsets=read_offsets(offsets)).start()


def test_the_follower_drains_before_it_ends_resumes_at_saved_offsets_and_punches(tmp_path: Path) -> None:
    out, offsets = tmp_path / "init.out", tmp_path / "init.offsets"
    first = b"a" * (3 * CHUNK + 100)
    out.write_bytes(first)
    got: list[bytes] = []
    f = follower(out, got, offsets)
    deadline = time.monotonic() + 5
    while sum(map(len, got)) < len(first) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert b"".join(got) == first
    assert os.stat(out).st_blocks * 512 <= 8192  # what was delivered is punched out
    assert os.stat(out).st_size == len(first)
    f.stop()  # as serve stops
    assert read_offsets(offsets) == [len(first)]
    with open(out, "ab") as w:
        w.write(b"while serve was down\n")
    again: list[bytes] = []
    f = follower(out, again, offsets)
    with open(out, "ab") as w:
        w.write(b"last words\n")
    f.finish(5)  # the writer ended: everything up to the end, then it stops
    assert b"".join(again) == b"while serve was down\nlast words\n"


# ---------------------------------------------------------------------- the engine
@dataclass
class KeepingCrun(FakeCrun):
    """FakeCrun as the keeper runs it: output and exit code in the files of the share."""

    share: Path = Path("/nonexistent")

    def spawned(self, proc: FakeProcess) -> None:
        if proc.call.rejoin is not None:
            cid = Path(proc.call.rejoin).parent.name
            self.containers[cid].proc = proc  # crun kill now ends the rejoining process
            exit_file = Path(self.share, cid, "init.exit")
            if exit_file.exists():
                threading.Thread(target=proc.exit, args=(int(exit_file.read_text()),)).start()
            return
        assert proc.call.keep == f"/run/vsbx/shared/{proc.call.argv[-1]}/init", proc.call
        super().spawned(proc)

    def handle(self, call: ExecCall) -> ExecResult:
        if call.argv[:2] == ("crun", "kill") and call.argv[-2] in self.containers:
            self.write_exit(call.argv[-2], 128 + int(call.argv[-1]))
        return super().handle(call)

    def write_exit(self, cid: str, code: int) -> None:
        Path(self.share, cid, "init.exit").write_text(f"{code}\n")

    def emit(self, cid: str, data: bytes, stream: str = "out") -> None:
        with open(Path(self.share, cid, f"init.{stream}"), "ab") as f:
            f.write(data)


class KeepRig(Rig):
    crun: KeepingCrun

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        self.share = tmp / "share"
        self.stager = FakeStager(host=self.share)
        self.records = TaskRecords(tmp / "sandbox" / "tasks")
        self.crun = KeepingCrun(self.guests, share=self.share)
        self.engine = self.new_engine()

    def new_engine(self) -> TaskEngine:
        return TaskEngine(SID, lambda: self.channel, self.stager, records=self.records, ready_timeout=5,
                          fifo_timeout=1, events=self.events)


def holders() -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        try:
            if Path("/proc", d, "cmdline").read_bytes().startswith(f"vsbx-hold-{CID}\0".encode()):
                out.append(int(d))
        except OSError:
            pass
    return out


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[KeepRig]:
    with leak_checked(KeepRig(tmp_path)) as r:
        yield r
    assert holders() == []


def until(cond: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def started(rig: KeepRig, o: Fifo, e: Fifo) -> int:
    pid = rig.engine.create(CID, bundle=rig.bundle(), rootfs=ROOTFS, io=IoSpec("", o.path, e.path))
    o.collect()
    e.collect()
    rig.engine.start(CID)
    return pid


def test_a_kept_init_survives_a_new_engine_and_is_then_stoppable(rig: KeepRig, tmp_path: Path) -> None:
    with fifos(tmp_path, "init") as (_, o, e):
        pid = started(rig, o, e)
        rig.crun.emit(CID, b"before\n")
        rig.crun.emit(CID, b"oops\n", "err")
        until(lambda: o.data == b"before\n" and e.data == b"oops\n")
        assert (tmp_path / "sandbox" / "tasks" / f"{CID}.json").exists()
        assert not any(p.name.endswith(".json") and p.parent.name == CID for p in rig.share.rglob("*.json"))
        rig.engine.detach()  # serve stops
        assert not o.eof.is_set() and holders()  # CRI's reader sees no EOF: the holder keeps the FIFO open
        rig.crun.emit(CID, b"while down\n")
        rig.engine = rig.new_engine()
        rig.engine.recover()
        st = rig.engine.state(CID)
        assert (st.status, st.pid, st.io.stdout) == (Status.RUNNING, pid, o.path)
        (rejoin,) = [p for p in rig.guests.processes if p.call.rejoin]
        assert rejoin.call.rejoin == f"/run/vsbx/shared/{CID}/init" and rejoin.call.argv == ()
        rig.crun.emit(CID, b"after\n")
        until(lambda: o.data == b"before\nwhile down\nafter\n")
        rig.engine.kill(CID, "", 15)
        ex = rig.engine.wait(CID)
        assert ex is not None and ex.exit_status == 143
        assert ex.exited_at == datetime.fromtimestamp(os.stat(rig.share / CID / "init.exit").st_mtime, timezone.utc)
        until(o.eof.is_set)
        assert rig.engine.delete(CID).exit_status == 143
        assert list((tmp_path / "sandbox" / "tasks").iterdir()) == [] and holders() == []
        assert rig.stager.unstaged == [CID]


def test_an_init_that_ended_while_serve_was_down_gets_its_code_and_time(rig: KeepRig, tmp_path: Path) -> None:
    with fifos(tmp_path, "init") as (_, o, e):
        started(rig, o, e)
        rig.engine.detach()
        rig.crun.emit(CID, b"bye\n")
        rig.crun.write_exit(CID, 3)
        when = time.time() - 60
        os.utime(rig.share / CID / "init.exit", (when, when))
        rig.engine = rig.new_engine()
        rig.engine.recover()
        ex = rig.engine.wait(CID)
        assert ex is not None and ex.exit_status == 3
        assert ex.exited_at == datetime.fromtimestamp(when, timezone.utc)
        until(o.eof.is_set)
        assert o.data == b"bye\n"
        rig.engine.delete(CID)


def test_a_failed_create_reports_cruns_message_from_the_err_file(rig: KeepRig, tmp_path: Path) -> None:
    def fail(proc: FakeProcess) -> None:
        rig.crun.emit(CID, b"no such image\n", "err")
        proc.exit(1)

    rig.crun.fail_create = b""
    rig.crun.spawned = lambda proc: threading.Thread(target=fail, args=(proc,)).start()  # type: ignore[method-assign]
    rig.guests.on_spawn = rig.crun.spawned
    with fifos(tmp_path, "init") as (_, o, e):
        with pytest.raises(Exception, match="no such image"):
            rig.engine.create(CID, bundle=rig.bundle(), rootfs=ROOTFS, io=IoSpec("", o.path, e.path))
    assert not (tmp_path / "sandbox" / "tasks" / f"{CID}.json").exists() and holders() == []


def test_close_as_the_sandbox_goes_removes_the_records(rig: KeepRig, tmp_path: Path) -> None:
    with fifos(tmp_path, "init") as (_, o, e):
        started(rig, o, e)
        rig.engine.close()
        assert rig.records.load() == [] and holders() == []


def test_serve_stopping_publishes_no_exit_and_the_next_one_publishes_it_in_the_namespace(
        rig: KeepRig, tmp_path: Path) -> None:
    from vmsandbox.task.events import Topic

    with fifos(tmp_path, "init") as (_, o, e):
        rig.engine.create(CID, bundle=rig.bundle(), rootfs=ROOTFS, io=IoSpec("", o.path, e.path), namespace="k8s.io")
        o.collect()
        e.collect()
        rig.engine.start(CID)
        rig.engine.detach()
        time.sleep(0.2)
        assert Topic.EXIT not in rig.events.topics()
        rig.engine = rig.new_engine()
        rig.engine.recover()
        rig.engine.kill(CID, "", 9)
        assert rig.engine.wait(CID) is not None
        assert rig.events.topics(until=Topic.EXIT)[-1] == Topic.EXIT
        assert [ns for ns, t, _ in rig.events.got if t == Topic.EXIT] == ["k8s.io"]
        rig.engine.delete(CID)


def test_a_dropped_channel_while_serve_runs_rejoins_the_keeper(rig: KeepRig, tmp_path: Path) -> None:
    with fifos(tmp_path, "init") as (_, o, e):
        started(rig, o, e)
        first = rig.crun.containers[CID].proc
        first.lose()  # the guest connection was replaced under the init's channel
        until(lambda: any(p.call.rejoin for p in rig.guests.processes))
        assert rig.engine.state(CID).status is Status.RUNNING
        rig.crun.emit(CID, b"still here\n")
        until(lambda: o.data == b"still here\n")
        rig.engine.kill(CID, "", 9)
        ex = rig.engine.wait(CID)
        assert ex is not None and ex.exit_status == 137
        rig.engine.delete(CID)
