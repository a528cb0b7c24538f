"""A container's cgroup in the pod's guest, through CRI: ContainerStats, UpdateContainerResources,
OOMKilled, and the /tasks/* events `ctr events` consumers see.

One pod for the module (a VM boot is the slow part under TCG); every container is removed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.cri.conftest import Pods
from tests.cri.harness import BUSYBOX_IMAGE, Containerd
from tests.cri.test_containers import _log_lines
from tests.cri.test_pods import guest
from tests.serve import Serve
from vmsandbox.proto.containerd.events import task_pb2 as ev
from vmsandbox.proto.containerd.services.events.v1 import events_pb2, events_pb2_grpc
from vmsandbox.proto.k8s.runtime.v1 import api_pb2 as cri

pytestmark = pytest.mark.integration
MIB = 1 << 20
PAYLOADS = {"/tasks/create": ev.TaskCreate, "/tasks/start": ev.TaskStart, "/tasks/exit": ev.TaskExit,
            "/tasks/oom": ev.TaskOOM, "/tasks/delete": ev.TaskDelete, "/tasks/exec-added": ev.TaskExecAdded,
            "/tasks/exec-started": ev.TaskExecStarted}


class EventStream:
    """containerd's events (Subscribe, as `ctr events` does), collected in a thread."""

    def __init__(self, ctd: Containerd) -> None:
        self.got: list[tuple[str, str, object]] = []  # namespace, topic, payload
        self._call = events_pb2_grpc.EventsStub(ctd.channel()).Subscribe(  # type: ignore[no-untyped-call]
            events_pb2.SubscribeRequest(filters=['topic~="^/tasks/"']))
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for env in self._call:
                kind = PAYLOADS.get(env.topic)
                self.got.append((env.namespace, env.topic, kind.FromString(env.event.value) if kind else None))
        except grpc.RpcError:
            pass  # cancelled

    def of(self, cid: str) -> list[str]:
        return [t for _, t, m in self.got if getattr(m, "container_id", None) == cid]

    def wait_for(self, cid: str, topic: str, timeout: float = 30) -> list[str]:
        end = time.monotonic() + timeout
        while topic not in self.of(cid) and time.monotonic() < end:
            time.sleep(0.2)
        return self.of(cid)

    def close(self) -> None:
        self._call.cancel()
        self._thread.join(10)


@pytest.fixture(scope="module")
def pod(containerd: Containerd, cri_root: Path) -> Iterator[tuple[Pods, cri.PodSandboxConfig, str]]:
    pods = Pods(containerd, cri_root / "logs")
    try:
        cfg = pods.config("stats")
        yield pods, cfg, pods.run(cfg)
    finally:
        pods.cleanup()


@pytest.fixture
def events(containerd: Containerd) -> Iterator[EventStream]:
    s = EventStream(containerd)
    yield s
    s.close()


def run(rt: object, pod: str, cfg: cri.PodSandboxConfig, name: str, cmd: list[str], memory: int) -> str:
    ccfg = cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name=name), image=cri.ImageSpec(image=BUSYBOX_IMAGE), command=cmd,
        log_path=f"{name}.log", linux=cri.LinuxContainerConfig(
            resources=cri.LinuxContainerResources(memory_limit_in_bytes=memory)))
    cid = rt.CreateContainer(cri.CreateContainerRequest(  # type: ignore[attr-defined]
        pod_sandbox_id=pod, config=ccfg, sandbox_config=cfg), timeout=120).container_id
    rt.StartContainer(cri.StartContainerRequest(container_id=cid), timeout=120)  # type: ignore[attr-defined]
    return str(cid)


def test_stats_and_update_of_a_container_in_the_guest(
        pod: tuple[Pods, cri.PodSandboxConfig, str], serve: Serve, containerd: Containerd,
        events: EventStream) -> None:
    _, cfg, pod_id = pod
    rt = containerd.runtime()
    # The shell keeps an 8 MB string while it sleeps.
    cid = run(rt, pod_id, cfg, "busy", ["sh", "-c", 'x=$(head -c 8000000 /dev/zero | tr "\\0" a); echo ready; '
                                        "sleep 1000; echo ${#x}"], 64 * MIB)
    assert _log_lines(Path(cfg.log_directory) / "busy.log", 1, timeout=120), "the container never got ready"
    st = rt.ContainerStats(cri.ContainerStatsRequest(container_id=cid), timeout=60).stats
    assert st.attributes.id == cid
    assert st.cpu.usage_core_nano_seconds.value > 0
    assert 8_000_000 <= st.memory.working_set_bytes.value <= 64 * MIB, st.memory
    assert st.memory.usage_bytes.value >= st.memory.working_set_bytes.value
    listed = rt.ListContainerStats(cri.ListContainerStatsRequest(
        filter=cri.ContainerStatsFilter(pod_sandbox_id=pod_id)), timeout=60).stats
    assert [s.attributes.id for s in listed] == [cid]

    memory_max = f"/sys/fs/cgroup/vsbx/{cid}/memory.max"
    assert guest(serve, pod_id, "cat", memory_max).strip() == str(64 * MIB)
    rt.UpdateContainerResources(cri.UpdateContainerResourcesRequest(
        container_id=cid, linux=cri.LinuxContainerResources(memory_limit_in_bytes=96 * MIB)), timeout=60)
    assert guest(serve, pod_id, "cat", memory_max).strip() == str(96 * MIB)

    rt.StopContainer(cri.StopContainerRequest(container_id=cid, timeout=0), timeout=120)  # SIGKILL
    status = rt.ContainerStatus(cri.ContainerStatusRequest(container_id=cid), timeout=60).status
    assert (status.exit_code, status.reason) == (137, "Error")  # Stats said oom_kill 0: no OOMKilled
    rt.RemoveContainer(cri.RemoveContainerRequest(container_id=cid), timeout=120)
    seen = events.wait_for(cid, "/tasks/delete")
    assert [t for t in seen if t in ("/tasks/start", "/tasks/exit", "/tasks/delete")] == [
        "/tasks/start", "/tasks/exit", "/tasks/delete"], seen
    assert "/tasks/oom" not in seen
    assert {ns for ns, _, m in events.got if getattr(m, "container_id", None) == cid} == {"k8s.io"}


def test_a_container_over_its_memory_limit_is_oom_killed(
        pod: tuple[Pods, cri.PodSandboxConfig, str], containerd: Containerd, events: EventStream) -> None:
    _, cfg, pod_id = pod
    rt = containerd.runtime()
    cid = run(rt, pod_id, cfg, "hog", ["sh", "-c", 'x=$(head -c 100000000 /dev/zero | tr "\\0" a)'], 32 * MIB)
    end = time.monotonic() + 180
    while (status := rt.ContainerStatus(cri.ContainerStatusRequest(container_id=cid), timeout=60).status).state \
            != cri.CONTAINER_EXITED:
        assert time.monotonic() < end, status
        time.sleep(1)
    assert (status.exit_code, status.reason) == (137, "OOMKilled")
    seen = events.wait_for(cid, "/tasks/exit")
    assert "/tasks/oom" in seen and seen.index("/tasks/oom") < seen.index("/tasks/exit"), seen
    rt.RemoveContainer(cri.RemoveContainerRequest(container_id=cid), timeout=120)
