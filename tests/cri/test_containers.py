"""Containers of a vmsandbox pod run inside its VM, driven through CRI as the kubelet does."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.cri.conftest import Pods
from tests.cri.harness import BUSYBOX_IMAGE, Containerd
from tests.cri.test_pods import guest
from tests.serve import Serve
from vmsandbox.proto.k8s.runtime.v1 import api_pb2 as cri

pytestmark = pytest.mark.integration


def _log_lines(path: Path, want: int, timeout: float = 60) -> list[str]:
    end = time.monotonic() + timeout
    lines: list[str] = []
    while time.monotonic() < end:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= want:
            break
        time.sleep(0.5)
    return lines


def test_a_container_runs_in_the_pods_guest_and_its_output_reaches_cris_log(
        pods: Pods, serve: Serve, containerd: Containerd) -> None:
    cfg = pods.config("ctr")
    pod = pods.run(cfg)
    rt = containerd.runtime()
    ccfg = cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name="hello"), image=cri.ImageSpec(image=BUSYBOX_IMAGE),
        command=["sh", "-c", "uname -r; echo to-stderr >&2; exec sleep 1000"], log_path="hello.log")
    cid = rt.CreateContainer(cri.CreateContainerRequest(pod_sandbox_id=pod, config=ccfg, sandbox_config=cfg),
                             timeout=120).container_id
    rt.StartContainer(cri.StartContainerRequest(container_id=cid), timeout=120)
    status = rt.ContainerStatus(cri.ContainerStatusRequest(container_id=cid), timeout=60).status
    assert status.state == cri.CONTAINER_RUNNING

    lines = _log_lines(Path(cfg.log_directory) / "hello.log", 2)
    streams = {line.split(" ", 3)[1]: line.split(" ", 3)[3] for line in lines}  # "<time> <stream> F <text>"
    kernel = guest(serve, pod, "uname", "-r").strip()
    assert streams == {"stdout": kernel, "stderr": "to-stderr"}, lines
    assert kernel != os.uname().release

    r = rt.ExecSync(cri.ExecSyncRequest(container_id=cid, cmd=["sh", "-c", "echo hi; echo err >&2; exit 3"],
                                        timeout=60), timeout=120)
    assert (r.exit_code, r.stdout, r.stderr) == (3, b"hi\n", b"err\n")
    r = rt.ExecSync(cri.ExecSyncRequest(container_id=cid, cmd=["no-such-binary"], timeout=60), timeout=120)
    assert r.exit_code == 127

    rt.StopContainer(cri.StopContainerRequest(container_id=cid, timeout=2), timeout=120)
    status = rt.ContainerStatus(cri.ContainerStatusRequest(container_id=cid), timeout=60).status
    assert status.state == cri.CONTAINER_EXITED
    assert status.exit_code in (137, 143)  # sleep as PID 1 ignores SIGTERM: killed after the timeout
    assert status.finished_at >= status.started_at > 0
    rt.RemoveContainer(cri.RemoveContainerRequest(container_id=cid), timeout=120)
    share = serve.state_dir / "sandboxes" / pod / "shared"
    assert not share.exists() or list(share.iterdir()) == []
