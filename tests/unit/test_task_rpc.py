"""The task API over ttrpc, in the orders containerd calls it (task-api.md section 2).

One ttrpc connection per container, as containerd's shim manager opens it; Wait runs
concurrently with the rest on the same connection. The engine runs over the fake guest and
fake crun of task_rig, with real FIFOs.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf import any_pb2

from tests.unit.task_rig import CID, Rig, fifos
from tests.unit.ttrpc_rig import ME, socket_dir
from vmsandbox import errors
from vmsandbox.guest.fake import FakeProcess
from vmsandbox.model import PtySize
from vmsandbox.proto.containerd.task.v3 import shim_pb2 as pb
from vmsandbox.proto.containerd.types import mount_pb2
from vmsandbox.task import RPCS, SERVICE_NAME, TaskService
from vmsandbox.ttrpc import Client, Server

PROCESS_URL = "types.containerd.io/opencontainers/runtime-spec/1/Process"


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.engine.close()


@pytest.fixture
def client(rig: Rig) -> Iterator[Client]:
    with socket_dir() as d, Server(allowed_uids=(ME,)) as server:
        TaskService(rig.engine).register(server)
        server.start(f"{d}/task.sock")
        with Client(f"ttrpc+unix://{server.path}") as c:
            yield c


def call(c: Client, name: str, req: object, timeout: float | None = 10) -> object:
    resp = {n: r for n, _, r in RPCS}[name]
    return c.call(SERVICE_NAME, name, req, resp, timeout=timeout)  # type: ignore[arg-type]


def background(c: Client, name: str, req: object) -> tuple[threading.Thread, list[object]]:
    got: list[object] = []

    def run() -> None:
        try:
            got.append(call(c, name, req, timeout=None))  # containerd's Wait has no deadline
        except errors.VmSandboxError as e:
            got.append(e)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, got


def test_a_container_as_cri_runs_stops_and_removes_it(rig: Rig, client: Client, tmp_path: Path) -> None:
    rig.crun.on_start = lambda proc: proc.emit(b"started\n")
    with fifos(tmp_path, "init") as (_, o, e):
        mounts = [mount_pb2.Mount(type="overlay", source="overlay", options=["lowerdir=/l", "upperdir=/u"])]
        created = call(client, "Create", pb.CreateTaskRequest(id=CID, bundle=rig.bundle(), rootfs=mounts,
                                                              stdout=o.path, stderr=e.path))
        o.collect()
        e.collect()
        conn = call(client, "Connect", pb.ConnectRequest(id=CID))
        assert conn.task_pid == created.pid > 0 and conn.shim_pid > 0  # type: ignore[attr-defined]
        waiting, got = background(client, "Wait", pb.WaitRequest(id=CID))
        started = call(client, "Start", pb.StartRequest(id=CID))
        state = call(client, "State", pb.StateRequest(id=CID))
        assert state.pid == started.pid == created.pid  # type: ignore[attr-defined]
        assert state.status == 2  # type: ignore[attr-defined]  # RUNNING
        assert (state.stdout, state.bundle) == (o.path, rig.bundle())  # type: ignore[attr-defined]
        assert waiting.is_alive()
        call(client, "Kill", pb.KillRequest(id=CID, signal=15))  # StopContainer
        waiting.join(5)
        (w,) = got
        assert isinstance(w, pb.WaitResponse) and w.exit_status == 143 and w.exited_at.seconds > 0
        # CRI's handleContainerExit: State, Connect+Wait, Kill(9, all) via WithProcessKill, State, Delete, Shutdown
        assert call(client, "State", pb.StateRequest(id=CID)).status == 3  # type: ignore[attr-defined]
        assert call(client, "Wait", pb.WaitRequest(id=CID)).exit_status == 143  # type: ignore[attr-defined]
        with pytest.raises(errors.NotFound):
            call(client, "Kill", pb.KillRequest(id=CID, signal=9, all=True))
        assert o.eof.wait(5) and bytes(o.data) == b"started\n"
        deleted = call(client, "Delete", pb.DeleteRequest(id=CID))
        assert (deleted.pid, deleted.exit_status, deleted.exited_at) == (  # type: ignore[attr-defined]
            created.pid, 143, w.exited_at)  # type: ignore[attr-defined]
        call(client, "Shutdown", pb.ShutdownRequest(id=CID))
        assert rig.stager.unstaged == [CID]
        with pytest.raises(errors.NotFound):
            call(client, "State", pb.StateRequest(id=CID))


def test_exec_sync_as_cri_runs_it(rig: Rig, client: Client, tmp_path: Path) -> None:
    def cat(proc: FakeProcess) -> None:
        proc.wait_stdin(lambda p: p.stdin_closed)
        proc.emit(bytes(proc.stdin).upper())
        proc.exit(3)
    rig.crun.on_exec = cat
    with fifos(tmp_path, "init") as (_, o, e), fifos(tmp_path, "x", stdin=True) as (xi, xo, xe):
        assert xi is not None
        call(client, "Create", pb.CreateTaskRequest(id=CID, bundle=rig.bundle(), stdout=o.path, stderr=e.path))
        call(client, "Start", pb.StartRequest(id=CID))
        call(client, "State", pb.StateRequest(id=CID))
        spec = any_pb2.Any(type_url=PROCESS_URL, value=json.dumps({"args": ["cat"], "cwd": "/"}).encode())
        call(client, "Exec", pb.ExecProcessRequest(id=CID, exec_id="x", stdin=xi.path, stdout=xo.path,
                                                   stderr=xe.path, spec=spec))
        xo.collect()
        assert call(client, "State", pb.StateRequest(id=CID, exec_id="x")).status == 1  # type: ignore[attr-defined]
        waiting, got = background(client, "Wait", pb.WaitRequest(id=CID, exec_id="x"))
        time.sleep(0.1)
        assert waiting.is_alive()
        xi.open_writer()
        pid = call(client, "Start", pb.StartRequest(id=CID, exec_id="x")).pid  # type: ignore[attr-defined]
        xi.write(b"abc")
        xi.close()
        call(client, "CloseIO", pb.CloseIORequest(id=CID, exec_id="x", stdin=True))
        waiting.join(5)
        assert got and got[0].exit_status == 3  # type: ignore[attr-defined]
        assert xo.eof.wait(5) and bytes(xo.data) == b"ABC"
        with pytest.raises(errors.NotFound):
            call(client, "Kill", pb.KillRequest(id=CID, exec_id="x", signal=9, all=True))
        d = call(client, "Delete", pb.DeleteRequest(id=CID, exec_id="x"))
        assert (d.pid, d.exit_status) == (pid, 3)  # type: ignore[attr-defined]
        assert [p.pid for p in call(client, "Pids", pb.PidsRequest(id=CID)).processes] == [  # type: ignore[attr-defined]
            call(client, "Connect", pb.ConnectRequest(id=CID)).task_pid]  # type: ignore[attr-defined]


def test_a_wait_whose_connection_is_cut_ends(rig: Rig, tmp_path: Path) -> None:
    returned = threading.Event()
    real_wait = rig.engine.wait

    def wait(*a: object, **kw: object) -> object:
        try:
            return real_wait(*a, **kw)  # type: ignore[arg-type]
        finally:
            returned.set()
    rig.engine.wait = wait  # type: ignore[assignment,method-assign]
    with fifos(tmp_path, "init") as (_, o, e), socket_dir() as d, Server(allowed_uids=(ME,)) as server:
        TaskService(rig.engine).register(server)
        server.start(f"{d}/task.sock")
        c = Client(f"ttrpc+unix://{server.path}")
        call(c, "Create", pb.CreateTaskRequest(id=CID, bundle=rig.bundle(), stdout=o.path, stderr=e.path))
        waiting, got = background(c, "Wait", pb.WaitRequest(id=CID))
        time.sleep(0.2)
        assert not returned.is_set()
        c.close()
        waiting.join(5)
        assert not waiting.is_alive() and isinstance(got[0], errors.Unavailable)
        assert returned.wait(5), "the server-side Wait outlived its connection"
        with Client(f"ttrpc+unix://{server.path}") as again:  # the container is still there
            assert call(again, "State", pb.StateRequest(id=CID)).status == 1  # type: ignore[attr-defined]


def test_errors_map_to_the_codes_containerd_expects(rig: Rig, client: Client) -> None:
    with pytest.raises(errors.NotFound):
        call(client, "State", pb.StateRequest(id="nope"))
    with pytest.raises(errors.InvalidArgument):
        call(client, "Create", pb.CreateTaskRequest(id=CID, bundle="/nowhere"))
    with pytest.raises(errors.InvalidArgument):
        call(client, "Exec", pb.ExecProcessRequest(id=CID, exec_id="x", spec=any_pb2.Any(value=b"{")))
    for name in ("Pause", "Resume", "Checkpoint"):
        req = {n: q for n, q, _ in RPCS}[name]
        with pytest.raises(errors.Unimplemented):
            call(client, name, req(id=CID))


def test_resize_pty_of_a_tty_exec(rig: Rig, client: Client, tmp_path: Path) -> None:
    with fifos(tmp_path, "init") as (_, o, e), fifos(tmp_path, "t") as (_, to, te):
        call(client, "Create", pb.CreateTaskRequest(id=CID, bundle=rig.bundle(), stdout=o.path, stderr=e.path))
        call(client, "Start", pb.StartRequest(id=CID))
        spec = any_pb2.Any(type_url=PROCESS_URL, value=json.dumps({"args": ["sh"], "terminal": True}).encode())
        call(client, "Exec", pb.ExecProcessRequest(id=CID, exec_id="t", terminal=True, stdout=to.path,
                                                   stderr=te.path, spec=spec))
        call(client, "ResizePty", pb.ResizePtyRequest(id=CID, exec_id="t", width=100, height=30))
        call(client, "Start", pb.StartRequest(id=CID, exec_id="t"))
        call(client, "ResizePty", pb.ResizePtyRequest(id=CID, exec_id="t", width=120, height=40))
        proc = rig.guests.processes[-1]
        assert proc.call.tty and proc.call.size == PtySize(100, 30) and proc.sizes == [PtySize(120, 40)]
        assert call(client, "State", pb.StateRequest(id=CID, exec_id="t")).terminal  # type: ignore[attr-defined]
        with pytest.raises(errors.FailedPrecondition):
            call(client, "ResizePty", pb.ResizePtyRequest(id=CID, width=1, height=1))  # the init has no tty
