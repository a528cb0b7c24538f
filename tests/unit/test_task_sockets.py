"""A task API socket per running sandbox: its path, Start/Status/Shutdown, recovery, removal."""

from __future__ import annotations

import os
import shutil
import socket
import string
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.rig import Rig
from vmsandbox import Config, FailedPrecondition, InvalidArgument, NotFound, SandboxMetadata
from vmsandbox.config import MAX_RUN_DIR
from vmsandbox.proto.containerd.task.v3 import shim_pb2 as pb
from vmsandbox.task import SERVICE_NAME
from vmsandbox.task.sockets import (
    SOCKET_PATH_LIMIT,
    TASK_API_VERSION,
    TaskServingController,
    TaskSockets,
    task_address,
    task_socket_path,
)
from vmsandbox.ttrpc import Client

HEX64 = "a" * 64


def test_a_cri_id_gets_its_own_folder_under_the_run_dir() -> None:
    p = task_socket_path(Path("/run/vmsandbox"), HEX64)
    assert p == Path(f"/run/vmsandbox/{HEX64}/task.sock") and len(str(p)) == 89
    assert task_address(Path("/run/vmsandbox"), HEX64) == f"ttrpc+unix:///run/vmsandbox/{HEX64}/task.sock"


@pytest.mark.parametrize("length", [1, 64, 75, 80, 128])
def test_every_valid_id_fits_the_socket_limit_even_in_the_longest_run_dir(length: int) -> None:
    run = Path("/" + "r" * (MAX_RUN_DIR - 1))
    ids = [(c * length) for c in string.ascii_letters[:5]] + [("x" * (length - 1) + "y")]
    paths = {task_socket_path(run, i) for i in ids}
    assert len(paths) == len(ids), "two ids share a socket"
    assert all(len(os.fsencode(p)) < SOCKET_PATH_LIMIT for p in paths)
    assert all(p.parent.parent == run for p in paths)


@pytest.mark.parametrize("run_dir", ["relative", "/" + "r" * MAX_RUN_DIR])
def test_a_run_dir_that_cannot_hold_every_socket_is_refused(run_dir: str) -> None:
    with pytest.raises(InvalidArgument, match="run_dir"):
        Config(run_dir=Path(run_dir))


def test_run_dir_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMSANDBOX_RUN_DIR", "/run/vsbx-test")
    assert Config.from_env().run_dir == Path("/run/vsbx-test")
    assert Config().run_dir == Path("/run/vmsandbox")


def test_containerd_address_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Config().containerd_address == "/run/containerd/containerd.sock"
    monkeypatch.setenv("VMSANDBOX_CONTAINERD_ADDRESS", "/run/c/containerd.sock")
    assert Config.from_env().containerd_address == "/run/c/containerd.sock"
    monkeypatch.setenv("VMSANDBOX_CONTAINERD_ADDRESS", "")  # publish no events
    assert Config.from_env().containerd_address == ""


@pytest.fixture
def run_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="vsbxt-", dir="/tmp"))  # short: pytest's tmp_path may be too long
    yield d / "run"
    shutil.rmtree(d)


@pytest.fixture
def served(tmp_path: Path, run_dir: Path) -> Iterator[tuple[Rig, TaskServingController]]:
    rig = Rig(tmp_path, run_dir=run_dir)
    sockets = TaskSockets(run_dir, lambda sid: rig.ctl.guest_channel(sid), allowed_uids=(os.getuid(),))
    rig.ctl = rig.new_controller(events=sockets.on_lifecycle)
    yield rig, TaskServingController(rig.ctl, sockets)
    sockets.close_all()
    rig.close()


def answers(address: str) -> bool:
    """The task service answers there (NotFound for a container it does not know)."""
    with Client(address) as c:
        with pytest.raises(NotFound):
            c.call(SERVICE_NAME, "State", pb.StateRequest(id="nope"), pb.StateResponse, timeout=5)
    return True


def test_start_serves_the_task_api_and_returns_it_version_3(served: tuple[Rig, TaskServingController],
                                                             run_dir: Path) -> None:
    rig, ctl = served
    ctl.create(SandboxMetadata("sb1"))
    assert ctl.status("sb1").address == ""  # created, not running: nothing served
    inst = ctl.start("sb1")
    assert (inst.address, inst.version) == (f"ttrpc+unix://{run_dir}/sb1/task.sock", TASK_API_VERSION)
    assert answers(inst.address)
    st = ctl.status("sb1")
    assert (st.address, st.version) == (inst.address, 3)
    assert ctl.start("sb1").address == inst.address  # idempotent
    ctl.shutdown("sb1")
    assert not (run_dir / "sb1").exists()
    assert os.listdir(run_dir) == []


def test_a_removal_by_another_path_closes_the_socket(served: tuple[Rig, TaskServingController],
                                                    run_dir: Path) -> None:
    rig, ctl = served
    ctl.create(SandboxMetadata("sb2"))
    ctl.start("sb2")
    rig.ctl.shutdown("sb2")  # the CLI's admin socket talks to the controller itself
    assert not (run_dir / "sb2").exists()


def test_a_stopped_sandbox_reports_no_endpoint(served: tuple[Rig, TaskServingController]) -> None:
    _, ctl = served
    ctl.create(SandboxMetadata("sb3"))
    ctl.start("sb3")
    ctl.stop("sb3", timeout=0)
    st = ctl.status("sb3")
    assert (st.address, st.version) == ("", 0)


def test_recovery_serves_the_running_sandboxes_again(tmp_path: Path, run_dir: Path) -> None:
    rig = Rig(tmp_path, run_dir=run_dir)
    try:
        first = TaskSockets(run_dir, lambda sid: rig.ctl.guest_channel(sid), allowed_uids=(os.getuid(),))
        rig.ctl.create(SandboxMetadata("sb4"))
        address = TaskServingController(rig.ctl, first).start("sb4").address
        first.close_all()  # `vmsandbox serve` exits; the sandbox runs on
        path = task_socket_path(run_dir, "sb4")
        path.parent.mkdir()
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(path))  # a socket file left behind, nobody listening
        s.close()
        again = TaskSockets(run_dir, lambda sid: rig.ctl.guest_channel(sid), allowed_uids=(os.getuid(),))
        ctl = TaskServingController(rig.restart(), again, running=["sb4"])
        assert ctl.status("sb4").address == address and answers(address)
        again.close_all()
    finally:
        rig.close()


def test_a_start_whose_socket_cannot_be_served_removes_the_sandbox(tmp_path: Path, run_dir: Path) -> None:
    rig = Rig(tmp_path, run_dir=run_dir)
    try:
        run_dir.mkdir(parents=True)
        (run_dir / "sb5").write_text("not a folder")
        sockets = TaskSockets(run_dir, lambda sid: rig.ctl.guest_channel(sid))
        ctl = TaskServingController(rig.ctl, sockets)
        ctl.create(SandboxMetadata("sb5"))
        with pytest.raises(FailedPrecondition, match="task socket folder"):
            ctl.start("sb5")
        with pytest.raises(NotFound):
            ctl.status("sb5")
    finally:
        rig.close()



def test_with_a_relay_the_socket_and_its_connections_outlive_serve(tmp_path: Path, run_dir: Path) -> None:
    from vmsandbox.task.sockets import _relay_pid

    rig = Rig(tmp_path, run_dir=run_dir)
    uids = (os.getuid(),)
    try:
        first = TaskSockets(run_dir, lambda sid: rig.ctl.guest_channel(sid), allowed_uids=uids, relay=True)
        rig.ctl.create(SandboxMetadata("sb6"))
        address = TaskServingController(rig.ctl, first).start("sb6").address
        path = task_socket_path(run_dir, "sb6")
        pid = _relay_pid(path)
        assert pid and answers(address)
        with Client(address) as containerd:  # one connection, kept across the restart
            first.close_all()  # `vmsandbox serve` exits: the relay and its socket stay
            assert path.exists() and _relay_pid(path) == pid
            again = TaskSockets(run_dir, lambda sid: rig.ctl.guest_channel(sid), allowed_uids=uids, relay=True)
            ctl = TaskServingController(rig.restart(), again, running=["sb6"])
            assert ctl.status("sb6").address == address and _relay_pid(path) == pid
            with pytest.raises(NotFound):
                containerd.call(SERVICE_NAME, "State", pb.StateRequest(id="nope"), pb.StateResponse, timeout=10)
        ctl.shutdown("sb6")
        assert _relay_pid(path) == 0 and not path.parent.exists()
    finally:
        rig.close()
