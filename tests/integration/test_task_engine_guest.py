"""The task engine on a real guest, with a shell stand-in for crun (the image has no crun yet).

What is real: the SSH channel per process and its streaming, vsbx-exec's supervision of the
daemon a "crun create" leaves behind, the pid published in ``.ready``, host FIFOs opened and
pumped as CRI's ends see them, stdin and CloseIO, kill statuses (a terminal needs crun's console
socket: test_task_crun.py). What is
not: crun itself (``fakecrun`` below forks and execs the process's args the way crun leaves
an init behind) and the stager (files are written into the guest over exec; no rootfs).
"""

from __future__ import annotations

import json
import time
import os
import select
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import unique
from tests.integration.test_guest_process import running_guest
from tests.unit.task_rig import Fifo, fifos
from vmsandbox import LibvirtController, NotFound, SandboxMetadata
from vmsandbox.proto.containerd.task.v3 import shim_pb2 as pb
from vmsandbox.sandbox.ports import GuestChannel
from vmsandbox.task import SERVICE_NAME, IoSpec, StagedBundle, Status, TaskEngine
from vmsandbox.task.sockets import TaskServingController, TaskSockets
from vmsandbox.ttrpc import Client

pytestmark = pytest.mark.integration

BASE = "/run/vsbx-test-task"
# crun's verbs as used by the engine. The "init" waits for start, then execs the args
# (written by the stager as <file>.cmd). Its stdin is kept through fd 3: busybox sh gives an
# async list /dev/null even with an explicit <&0.
FAKE_CRUN = r"""#!/bin/sh
verb=$1; shift
exec 3<&0
case $verb in
create) b=$2 f=$4 id=$5; mkdir -p /run/fakecrun/$id
  sh -c 'while [ ! -e /run/fakecrun/$0/started ]; do sleep 0.05; done; exec sh -c "$1"' $id "$(cat $b/config.json.cmd)" <&3 &
  echo $! > /run/fakecrun/$id/pid; echo $! > $f ;;
start) touch /run/fakecrun/$1/started ;;
exec) p=$3 f=$5; sh -c "$(cat $p.cmd)" <&3 & echo $! > $f ;;
kill) [ "$1" = --all ] && shift; kill -$2 $(cat /run/fakecrun/$1/pid) ;;
delete) kill -9 $(cat /run/fakecrun/$2/pid) 2>/dev/null; rm -rf /run/fakecrun/$2 ;;
esac
"""


class ExecStager:
    """Writes a container's files into the guest over exec (no share, no rootfs)."""

    def __init__(self, channel: Callable[[], GuestChannel]) -> None:
        self.channel = channel

    def _sh(self, script: str, stdin: bytes | None = None) -> None:
        r = self.channel().exec(["sh", "-c", script], stdin=stdin, in_guest_root=True, timeout=30)
        assert r.exit_code == 0, r.stderr

    def stage(self, container_id: str, rootfs: object, binds: object) -> StagedBundle:
        d = f"{BASE}/{container_id}"
        self._sh(f"mkdir -p {d}/rootfs")
        return StagedBundle(d, f"{d}/rootfs", {})

    def put_file(self, container_id: str, name: str, data: bytes) -> str:
        path = f"{BASE}/{container_id}/{name}"
        doc = json.loads(data)
        args = (doc.get("process") or doc)["args"]
        self._sh(f"cat > {path}", data)
        self._sh(f"cat > {path}.cmd", args[2].encode() if args[:2] == ["sh", "-c"] else " ".join(args).encode())
        return path

    def guest_file(self, container_id: str, name: str, *, create: bool = False) -> int | None:
        return None  # nothing of the guest dir is visible to the host: the init is not kept

    def unstage(self, container_id: str) -> None:
        self._sh(f"rm -rf {BASE}/{container_id}")


@pytest.fixture(scope="module")
def channel(controller: LibvirtController) -> Iterator[GuestChannel]:
    with running_guest(controller, "task") as ch:
        r = ch.exec(["sh", "-c", "mkdir -p /usr/local/bin && cat > /usr/local/bin/crun && chmod +x /usr/local/bin/crun"],
                    stdin=FAKE_CRUN.encode(), in_guest_root=True, timeout=30)
        assert r.exit_code == 0, r.stderr
        yield ch


@pytest.fixture
def engine(channel: GuestChannel) -> Iterator[TaskEngine]:
    eng = TaskEngine("guest", lambda: channel, ExecStager(lambda: channel), ready_timeout=60)
    yield eng
    eng.close()


def bundle(tmp: Path, script: str) -> str:
    d = tmp / "bundle"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"process": {"args": ["sh", "-c", script], "cwd": "/"},
                                               "root": {"path": "rootfs"}}))
    return str(d)


def started(engine: TaskEngine, cid: str, tmp: Path, script: str, o: Fifo, e: Fifo,
            i: Fifo | None = None) -> int:
    pid = engine.create(cid, bundle=bundle(tmp, script), rootfs=(),
                        io=IoSpec(i.path if i else "", o.path, e.path))
    o.collect()
    e.collect()
    return pid


def test_container_output_exit_and_delete(engine: TaskEngine, channel: GuestChannel, tmp_path: Path) -> None:
    cid = unique("c")
    with fifos(tmp_path, "init") as (_, o, e):
        pid = started(engine, cid, tmp_path, "echo one; echo err >&2; sleep 2; echo two; exit 3", o, e)
        assert pid > 1 and engine.state(cid).status is Status.CREATED
        assert channel.exec(["kill", "-0", str(pid)], in_guest_root=True, timeout=10).exit_code == 0
        time.sleep(0.5)
        assert not o.data, "the init ran before Start"
        t0 = time.monotonic()
        engine.start(cid)
        deadline = time.monotonic() + 20
        while b"one\n" not in o.data:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        first = time.monotonic()
        ex = engine.wait(cid)
        end = time.monotonic()
        assert ex is not None and ex.exit_status == 3 and ex.pid == pid
        assert end - first >= 1.5, "output was held back until the exit"
        assert first - t0 < 1.5
        assert o.eof.wait(5) and e.eof.wait(5)
        assert (bytes(o.data), bytes(e.data)) == (b"one\ntwo\n", b"err\n")
        assert engine.delete(cid).exit_status == 3
        assert channel.exec(["test", "-e", f"{BASE}/{cid}"], in_guest_root=True, timeout=10).exit_code == 1


def test_kill_of_a_running_container_is_128_plus_signal(engine: TaskEngine, tmp_path: Path) -> None:
    cid = unique("k")
    with fifos(tmp_path, "init") as (_, o, e):
        started(engine, cid, tmp_path, "exec sleep 60", o, e)
        engine.start(cid)
        time.sleep(0.3)
        engine.kill(cid, signal=15)
        ex = engine.wait(cid)
        assert ex is not None and ex.exit_status == 128 + 15
        with pytest.raises(NotFound):
            engine.kill(cid, signal=9, all=True)
        engine.delete(cid)


def test_exec_with_stdin_and_close_io(engine: TaskEngine, tmp_path: Path) -> None:
    cid = unique("x")
    with fifos(tmp_path, "init") as (_, o, e), fifos(tmp_path, "cat", stdin=True) as (ci, co, ce):
        assert ci is not None
        started(engine, cid, tmp_path, "exec sleep 60", o, e)
        engine.start(cid)
        engine.exec(cid, "cat", io=IoSpec(ci.path, co.path, ce.path), process={"args": ["sh", "-c", "cat; exit 3"]})
        co.collect()
        ce.collect()
        ci.open_writer()
        pid = engine.start(cid, "cat")
        assert pid > 1 and engine.state(cid, "cat").status is Status.RUNNING
        ci.write(b"through the guest\n")
        ci.close()
        engine.close_io(cid, "cat")
        ex = engine.wait(cid, "cat")
        assert ex is not None and ex.exit_status == 3
        assert co.eof.wait(5) and bytes(co.data) == b"through the guest\n"
        engine.delete(cid, "cat")

        engine.kill(cid, signal=9)
        engine.wait(cid)
        engine.delete(cid)


def test_start_serves_the_task_api_and_a_container_runs_through_it(controller: LibvirtController,
                                                                   tmp_path: Path) -> None:
    """containerd's view: Start's address, then the task rpcs on that socket."""
    run_dir = Path(tempfile.mkdtemp(prefix="vsbxt-", dir="/tmp"))
    sockets = TaskSockets(run_dir, controller.guest_channel,
                          stager_of=lambda sid: ExecStager(lambda: controller.guest_channel(sid)))
    ctl = TaskServingController(controller, sockets)
    sid, cid = unique("sock"), unique("c")
    try:
        ctl.create(SandboxMetadata(sid))
        t0 = time.monotonic()
        inst = ctl.start(sid)
        booted = time.monotonic() - t0
        assert inst.version == 3 and inst.address == f"ttrpc+unix://{run_dir}/{sid}/task.sock"
        assert ctl.status(sid).address == inst.address
        ch = controller.guest_channel(sid)
        r = ch.exec(["sh", "-c", "mkdir -p /usr/local/bin && cat > /usr/local/bin/crun && chmod +x /usr/local/bin/crun"],
                    stdin=FAKE_CRUN.encode(), in_guest_root=True, timeout=30)
        assert r.exit_code == 0, r.stderr
        with fifos(tmp_path, "init") as (_, o, e), Client(inst.address) as c:
            def rpc(name: str, req: object, resp: type) -> object:
                return c.call(SERVICE_NAME, name, req, resp, timeout=120)  # type: ignore[arg-type]
            t1 = time.monotonic()
            created = rpc("Create", pb.CreateTaskRequest(id=cid, bundle=bundle(tmp_path, "echo from-guest; exit 7"),
                                                         stdout=o.path, stderr=e.path), pb.CreateTaskResponse)
            create_s = time.monotonic() - t1
            o.collect()
            e.collect()
            assert rpc("Connect", pb.ConnectRequest(id=cid), pb.ConnectResponse).task_pid == created.pid > 1  # type: ignore[attr-defined]
            rpc("Start", pb.StartRequest(id=cid), pb.StartResponse)
            w = rpc("Wait", pb.WaitRequest(id=cid), pb.WaitResponse)
            assert w.exit_status == 7  # type: ignore[attr-defined]
            assert o.eof.wait(5) and bytes(o.data) == b"from-guest\n"
            d = rpc("Delete", pb.DeleteRequest(id=cid), pb.DeleteResponse)
            assert (d.pid, d.exit_status) == (created.pid, 7)  # type: ignore[attr-defined]
        print(f"boot+socket {booted:.2f}s, Create (supervised create + pid poll) {create_s:.2f}s")
        ctl.shutdown(sid)
        assert not (run_dir / sid).exists()
    finally:
        ctl.shutdown(sid)
        sockets.close_all()
        shutil.rmtree(run_dir)
        assert not os.path.exists(run_dir)


def test_a_dropped_guest_connection_ends_every_wait_with_255(engine: TaskEngine, channel: GuestChannel,
                                                             tmp_path: Path) -> None:
    cid = unique("drop")
    with fifos(tmp_path, "init") as (_, o, e), fifos(tmp_path, "x") as (_, xo, xe):
        pid = started(engine, cid, tmp_path, "exec sleep 60", o, e)
        engine.start(cid)
        engine.exec(cid, "x", io=IoSpec("", xo.path, xe.path), process={"args": ["sleep", "60"]})
        xo.collect()
        xe.collect()
        engine.start(cid, "x")
        t0 = time.monotonic()
        channel.close()  # the agent connection is gone (guest or QEMU trouble)
        init, ex = engine.wait(cid), engine.wait(cid, "x")
        assert init is not None and ex is not None and (init.exit_status, ex.exit_status) == (255, 255)
        assert time.monotonic() - t0 < 10
        assert o.eof.wait(5) and xo.eof.wait(5)  # CRI's log copy ends too
        channel.connect(time.monotonic() + 30)
        engine.delete(cid, "x")
        assert channel.exec(["kill", "-0", str(pid)], in_guest_root=True, timeout=10).exit_code == 0  # orphaned
        assert engine.delete(cid).exit_status == 255  # crun delete --force ends the orphaned init
        assert channel.exec(["kill", "-0", str(pid)], in_guest_root=True, timeout=10).exit_code != 0


def test_a_stdout_reader_that_goes_away_neither_hangs_nor_kills_the_container(engine: TaskEngine,
                                                                              tmp_path: Path) -> None:
    """CRI's log reader closes its end mid-stream (containerd crashed, the log copy died):
    the rest of stdout is discarded (EPIPE), stderr still flows, the init exits on its own
    with its real status, and Wait and Delete return."""
    cid = unique("gone")
    script = "yes out-line | head -c 2000000; echo after-the-flood >&2; exit 5"
    with fifos(tmp_path, "gone") as (_, o, e):
        engine.create(cid, bundle=bundle(tmp_path, script), rootfs=(), io=IoSpec("", o.path, e.path))
        e.collect()
        engine.start(cid)
        assert o.fd is not None
        got = b""
        deadline = time.monotonic() + 30
        while len(got) < 100_000:  # more than a FIFO holds: the writer blocked on us at least once
            assert time.monotonic() < deadline, len(got)
            select.select([o.fd], [], [], 1)
            try:
                got += os.read(o.fd, 65536)
            except BlockingIOError:
                pass
        os.close(o.fd)
        o.fd = None
        deadline = time.monotonic() + 60
        ex = engine.wait(cid, abandon=lambda: time.monotonic() > deadline)
        assert ex is not None, "Wait hung after the reader went away"
        assert ex.exit_status == 5
        assert e.eof.wait(5) and bytes(e.data) == b"after-the-flood\n"
        assert engine.delete(cid).exit_status == 5
        assert got.startswith(b"out-line\n")
