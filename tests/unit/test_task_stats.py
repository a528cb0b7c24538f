"""Stats, Update and the /tasks/* events of the task API, in the orders containerd calls them.

The engine runs over task_rig's fake guest and crun (its cgroup files are kernel 6.1's);
Stats is decoded as CRI decodes it, events are recorded by an in-memory sink.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from google.protobuf import any_pb2

from tests.unit.task_rig import CID, Rig, fifos
from tests.unit.test_task_rpc import PROCESS_URL, call, client, rig  # noqa: F401  (fixtures)
from vmsandbox import errors
from vmsandbox.guest.fake import FakeProcess
from vmsandbox.proto.cgroups.v2 import metrics_pb2
from vmsandbox.proto.containerd.events import task_pb2 as ev
from vmsandbox.proto.containerd.task.v3 import shim_pb2 as pb
from vmsandbox.task.events import NAMESPACE_KEY
from vmsandbox.ttrpc import Client

RESOURCES_URL = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"
K8S = {NAMESPACE_KEY: "k8s.io"}


def create(rig: Rig, client: Client, o: object, e: object) -> int:
    req = pb.CreateTaskRequest(id=CID, bundle=rig.bundle(), stdout=o.path, stderr=e.path)  # type: ignore[attr-defined]
    resp = client.call("containerd.task.v3.Task", "Create", req, pb.CreateTaskResponse, timeout=10, metadata=K8S)
    return int(resp.pid)


def stats(client: Client) -> metrics_pb2.Metrics:
    resp = call(client, "Stats", pb.StatsRequest(id=CID))
    assert resp.stats.type_url == "io.containerd.cgroups.v2.Metrics"  # type: ignore[attr-defined]
    msg = metrics_pb2.Metrics()
    msg.ParseFromString(resp.stats.value)  # type: ignore[attr-defined]
    return msg


def test_stats_read_the_containers_cgroup_with_one_guest_command(rig: Rig, client: Client, tmp_path: Path) -> None:
    with fifos(tmp_path, "init") as (_, o, e):
        create(rig, client, o, e)
        call(client, "Start", pb.StartRequest(id=CID))
        before = len(rig.crun.commands)
        m = stats(client)
        assert [c[0] for c in rig.crun.commands[before:]] == ["grep"]
        assert (m.cpu.usage_usec, m.memory.usage, m.memory.usage_limit, m.pids.current) == (
            53850270, 159744, 33554432, 1)
        assert m.memory_events.max == 4967 and m.memory_events.oom_kill == 0
        call(client, "Kill", pb.KillRequest(id=CID, signal=9))
        call(client, "Wait", pb.WaitRequest(id=CID))
        assert stats(client).cpu.usage_usec == 53850270  # exited, not deleted: the cgroup is still there
        call(client, "Delete", pb.DeleteRequest(id=CID))
        with pytest.raises(errors.NotFound):
            call(client, "Stats", pb.StatsRequest(id=CID))


def test_update_hands_the_resources_to_crun_update(rig: Rig, client: Client, tmp_path: Path) -> None:
    res = {"memory": {"limit": 50331648}, "cpu": {"quota": 50000, "period": 100000, "cpus": "0-63"},
           "pids": {"limit": 77}}
    with fifos(tmp_path, "init") as (_, o, e):
        create(rig, client, o, e)
        call(client, "Start", pb.StartRequest(id=CID))
        call(client, "Update", pb.UpdateTaskRequest(id=CID, resources=any_pb2.Any(
            type_url=RESOURCES_URL, value=json.dumps(res).encode()), annotations={"a": "b"}))
        assert rig.crun.updates == [(CID, {"memory": {"limit": 50331648}, "cpu": {"quota": 50000, "period": 100000},
                                           "pids": {"limit": 77}})]
        with pytest.raises(errors.InvalidArgument):
            call(client, "Update", pb.UpdateTaskRequest(id=CID, resources=any_pb2.Any(type_url=PROCESS_URL,
                                                                                       value=b"{}")))
        call(client, "Kill", pb.KillRequest(id=CID, signal=9))
        call(client, "Wait", pb.WaitRequest(id=CID))
        with pytest.raises(errors.FailedPrecondition):
            call(client, "Update", pb.UpdateTaskRequest(id=CID, resources=any_pb2.Any(
                type_url=RESOURCES_URL, value=b"{}")))
    with pytest.raises(errors.NotFound):
        call(client, "Update", pb.UpdateTaskRequest(id="nope", resources=any_pb2.Any(type_url=RESOURCES_URL,
                                                                                      value=b"{}")))


def test_events_in_the_namespace_of_the_create(rig: Rig, client: Client, tmp_path: Path) -> None:
    rig.crun.on_exec = lambda proc: proc.exit(3)
    with fifos(tmp_path, "init") as (_, o, e), fifos(tmp_path, "x") as (_, xo, xe):
        pid = create(rig, client, o, e)
        call(client, "Start", pb.StartRequest(id=CID))
        spec = any_pb2.Any(type_url=PROCESS_URL, value=json.dumps({"args": ["true"], "cwd": "/"}).encode())
        call(client, "Exec", pb.ExecProcessRequest(id=CID, exec_id="x", stdout=xo.path, stderr=xe.path, spec=spec))
        xpid = call(client, "Start", pb.StartRequest(id=CID, exec_id="x")).pid  # type: ignore[attr-defined]
        call(client, "Wait", pb.WaitRequest(id=CID, exec_id="x"))
        rig.events.topics(until="/tasks/exit")
        call(client, "Delete", pb.DeleteRequest(id=CID, exec_id="x"))
        call(client, "Kill", pb.KillRequest(id=CID, signal=15))
        call(client, "Wait", pb.WaitRequest(id=CID))
        call(client, "Delete", pb.DeleteRequest(id=CID))  # its /tasks/delete comes after the init's /tasks/exit
    assert rig.events.topics() == ["/tasks/create", "/tasks/start", "/tasks/exec-added", "/tasks/exec-started",
                                   "/tasks/exit", "/tasks/delete", "/tasks/exit", "/tasks/delete"]
    assert {ns for ns, _, _ in rig.events.got} == {"k8s.io"}
    got = [m for _, _, m in rig.events.got]
    assert got[0] == ev.TaskCreate(container_id=CID, bundle=rig.bundle(), pid=pid,
                                   io=ev.TaskIO(stdout=o.path, stderr=e.path))
    assert got[1] == ev.TaskStart(container_id=CID, pid=pid)
    assert got[2:4] == [ev.TaskExecAdded(container_id=CID, exec_id="x"),
                        ev.TaskExecStarted(container_id=CID, exec_id="x", pid=xpid)]
    x_exit, x_delete, exit_, delete = got[4:]
    assert isinstance(x_exit, ev.TaskExit) and (x_exit.container_id, x_exit.id, x_exit.pid, x_exit.exit_status) == (
        CID, "x", xpid, 3)
    assert isinstance(x_delete, ev.TaskDelete) and (x_delete.id, x_delete.pid, x_delete.exit_status) == ("x", xpid, 3)
    assert isinstance(exit_, ev.TaskExit) and (exit_.id, exit_.pid, exit_.exit_status) == (CID, pid, 143)
    assert exit_.exited_at.seconds > 0
    assert isinstance(delete, ev.TaskDelete) and (delete.id, delete.pid, delete.exit_status) == ("", pid, 143)
    assert delete.exited_at == exit_.exited_at


def oom_killed(proc: FakeProcess, rig: Rig) -> None:
    rig.crun.cgroup_files["memory.events"] = "low 0\nhigh 0\nmax 40\noom 5\noom_kill 1\noom_group_kill 0\n"
    proc.exit(137)


def test_an_init_the_oom_killer_took_gets_tasks_oom_before_tasks_exit(rig: Rig, client: Client,
                                                                      tmp_path: Path) -> None:
    rig.crun.on_start = lambda proc: oom_killed(proc, rig)
    with fifos(tmp_path, "init") as (_, o, e):
        create(rig, client, o, e)
        call(client, "Start", pb.StartRequest(id=CID))
        assert call(client, "Wait", pb.WaitRequest(id=CID)).exit_status == 137  # type: ignore[attr-defined]
        assert stats(client).memory_events.oom_kill == 1  # CRI's check: reason OOMKilled
        assert rig.events.topics(until="/tasks/exit") == ["/tasks/create", "/tasks/start", "/tasks/oom",
                                                          "/tasks/exit"]
        assert rig.events.got[2][2] == ev.TaskOOM(container_id=CID)
        call(client, "Delete", pb.DeleteRequest(id=CID))


def test_a_sigkill_is_no_oom(rig: Rig, client: Client, tmp_path: Path) -> None:
    with fifos(tmp_path, "init") as (_, o, e):
        create(rig, client, o, e)
        call(client, "Start", pb.StartRequest(id=CID))
        call(client, "Kill", pb.KillRequest(id=CID, signal=9))
        assert call(client, "Wait", pb.WaitRequest(id=CID)).exit_status == 137  # type: ignore[attr-defined]
        assert rig.events.topics(until="/tasks/exit") == ["/tasks/create", "/tasks/start", "/tasks/exit"]
        call(client, "Delete", pb.DeleteRequest(id=CID))


def test_a_request_without_a_namespace_publishes_nothing(rig: Rig, client: Client, tmp_path: Path) -> None:
    with fifos(tmp_path, "init") as (_, o, e):
        call(client, "Create", pb.CreateTaskRequest(id=CID, bundle=rig.bundle(), stdout=o.path, stderr=e.path))
        call(client, "Start", pb.StartRequest(id=CID))
        call(client, "Kill", pb.KillRequest(id=CID, signal=9))
        call(client, "Wait", pb.WaitRequest(id=CID))
        call(client, "Delete", pb.DeleteRequest(id=CID))
    assert rig.events.got == []


def test_closing_the_engine_publishes_no_exit(rig: Rig, client: Client, tmp_path: Path) -> None:
    """serve stops (the containers live on in the guest): a /tasks/exit would make CRI end them."""
    with fifos(tmp_path, "init") as (_, o, e):
        create(rig, client, o, e)
        call(client, "Start", pb.StartRequest(id=CID))
        rig.engine.close()
    assert rig.events.topics() == ["/tasks/create", "/tasks/start"]
