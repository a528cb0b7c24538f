"""A kept container init on a real guest survives its engine and its guest connection, as
when ``vmsandbox serve`` restarts: real crun, the real share (ShareStager, a bind-mounted
busybox rootfs), the keeper in the guest, host FIFOs read as CRI reads them."""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from tests.conftest import unique
from tests.integration.test_guest_process import running_guest
from tests.integration.test_task_crun import bundle, oci_spec
from tests.unit.task_rig import Fifo, fifos
from vmsandbox import LibvirtController, Mount, NotFound
from vmsandbox.hostmount import SystemHostMounts
from vmsandbox.model import utcnow
from vmsandbox.sandbox.ports import GuestChannel
from vmsandbox.task import IoSpec, Status, TaskEngine
from vmsandbox.task.records import TaskRecords
from vmsandbox.task.stager import ShareStager

pytestmark = pytest.mark.integration

LOOP = "i=0; while true; do echo line$i; i=$((i+1)); sleep 0.2; done"


@pytest.fixture(scope="module")
def guest(controller: LibvirtController) -> Iterator[tuple[str, GuestChannel]]:
    with running_guest(controller, "survive") as ch:
        if ch.exec(["crun", "--version"], in_guest_root=True, timeout=30).exit_code != 0:
            pytest.skip("the guest image has no crun")
        yield next(r.id for r in controller.list() if r.id.endswith("-survive")), ch


@pytest.fixture
def rootfs(qemu_tmp: Path) -> Mount:
    d = qemu_tmp / "rootfs"
    for sub in ("bin", "proc", "dev", "sys", "tmp"):
        (d / sub).mkdir(parents=True)
    shutil.copy2("/bin/busybox", d / "bin" / "busybox")
    for applet in ("sh", "sleep", "echo"):
        os.symlink("busybox", d / "bin" / applet)
    return Mount("bind", str(d), "", ("rbind", "rw"))


def numbers(data: bytes | bytearray) -> list[int]:
    return [int(n) for n in re.findall(rb"line(\d+)\n", data)]


def until(cond: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_a_kept_container_survives_a_new_engine_and_connection(controller: LibvirtController,
                                                                guest: tuple[str, GuestChannel], rootfs: Mount,
                                                                tmp_path: Path) -> None:
    sid, ch = guest
    share = controller.share_path(sid)
    stager = ShareStager(SystemHostMounts(), share)
    records = TaskRecords(tmp_path / "tasks")
    cid = unique("keep")

    def engine() -> TaskEngine:
        return TaskEngine(sid, lambda: controller.guest_channel(sid), stager, records=records, ready_timeout=120)

    first = engine()
    second: TaskEngine | None = None
    o: Fifo
    try:
        with fifos(tmp_path, "init") as (_, o, e):
            pid = first.create(cid, bundle=bundle(tmp_path, oci_spec(ch, ["sh", "-c", LOOP])), rootfs=[rootfs],
                               io=IoSpec("", o.path, e.path))
            o.collect()
            e.collect()
            first.start(cid)
            until(lambda: len(numbers(o.data)) >= 3)
            assert (share / cid / "init.out").is_file() and (tmp_path / "tasks" / f"{cid}.json").is_file()

            first.detach()  # serve stops ...
            controller.guest_channel(sid).close()  # ... and its guest connection goes with it
            t_down = time.monotonic()
            time.sleep(2)
            assert not o.eof.is_set()  # CRI's reader saw no EOF: the holder kept the FIFO open
            state = controller.guest_channel(sid).exec(["crun", "state", cid], in_guest_root=True, timeout=60)
            assert b'"running"' in state.stdout, state

            second = engine()
            second.recover()
            recovered = time.monotonic() - t_down
            st = second.state(cid)
            assert (st.status, st.pid) == (Status.RUNNING, pid)
            seen = len(numbers(o.data))
            until(lambda: len(numbers(o.data)) >= seen + 5)
            got = numbers(o.data)
            assert got == list(range(len(got))), got  # nothing lost, nothing twice across the restart

            second.kill(cid, "", 9)
            ex = second.wait(cid)
            assert ex is not None and ex.exit_status == 137
            assert abs(ex.exited_at - utcnow()) < timedelta(seconds=30)
            until(o.eof.is_set)
            assert second.delete(cid).exit_status == 137
            with pytest.raises(NotFound):
                second.state(cid)
            assert not (share / cid).exists() and records.load() == []
            assert not list((tmp_path / "tasks").glob(f"{cid}*"))
            print(f"taken back {recovered:.2f}s after the engine went ({len(got)} lines, none lost)")
    finally:
        for eng in (first, second):
            if eng is not None:
                eng.close()
        stager.unstage(cid)


def test_a_kept_container_is_rejoined_when_the_guest_connection_drops(controller: LibvirtController,
                                                                      guest: tuple[str, GuestChannel], rootfs: Mount,
                                                                      tmp_path: Path) -> None:
    sid, ch = guest
    stager = ShareStager(SystemHostMounts(), controller.share_path(sid))
    eng = TaskEngine(sid, lambda: controller.guest_channel(sid), stager, records=TaskRecords(tmp_path / "tasks"),
                     ready_timeout=120)
    cid = unique("rejoin")
    try:
        with fifos(tmp_path, "init") as (_, o, e):
            eng.create(cid, bundle=bundle(tmp_path, oci_spec(ch, ["sh", "-c", LOOP])), rootfs=[rootfs],
                       io=IoSpec("", o.path, e.path))
            o.collect()
            e.collect()
            eng.start(cid)
            until(lambda: len(numbers(o.data)) >= 3)
            controller.guest_channel(sid).close()  # serve runs on; its guest connection goes
            seen = len(numbers(o.data))
            until(lambda: len(numbers(o.data)) >= seen + 5)
            assert eng.state(cid).status is Status.RUNNING
            eng.kill(cid, "", 9)
            ex = eng.wait(cid)
            assert ex is not None and ex.exit_status == 137
            eng.delete(cid)
    finally:
        eng.close()
        stager.unstage(cid)
