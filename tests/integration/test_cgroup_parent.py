"""PodSandboxConfig.linux.cgroup_parent: the VMM lands in the pod's cgroup."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import unique
from vmsandbox import Any, Sandbox
from vmsandbox.proto.k8s.runtime.v1 import api_pb2 as cri
from vmsandbox.sandbox.cgroups import CGROUP_ROOT

pytestmark = pytest.mark.integration


def test_vmm_is_placed_in_the_pods_cgroup(controller, sandbox_ids):  # type: ignore[no-untyped-def]
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        hierarchy = CGROUP_ROOT
    else:
        hierarchy = CGROUP_ROOT / "pids"
    assert (hierarchy / "cgroup.procs").exists(), f"no writable cgroup hierarchy at {hierarchy}"
    name = unique("pod")
    cg = hierarchy / name
    cg.mkdir()
    sid = unique("cg")
    sandbox_ids.append(sid)
    try:
        cfg = cri.PodSandboxConfig(metadata=cri.PodSandboxMetadata(name=sid),
                                   linux=cri.LinuxPodSandboxConfig(cgroup_parent=f"/{name}"))
        controller.create(Sandbox(sid), options=Any("runtime.v1.PodSandboxConfig", cfg.SerializeToString()))
        pid = controller.start(sid).pid
        assert str(pid) in (cg / "cgroup.procs").read_text().split()
        controller.shutdown(sid)
        assert (cg / "cgroup.procs").read_text().strip() == ""
    finally:
        controller.shutdown(sid)
        Path(cg).rmdir()
