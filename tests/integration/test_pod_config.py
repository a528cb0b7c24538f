"""PodSandboxConfig.linux.cgroup_parent: the VMM lands in the pod's cgroup."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import unique
from vmsandbox import AnyMessage, Sandbox
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
        controller.create(Sandbox(sid), options=AnyMessage("runtime.v1.PodSandboxConfig", cfg.SerializeToString()))
        pid = controller.start(sid).pid
        assert str(pid) in (cg / "cgroup.procs").read_text().split()
        controller.shutdown(sid)
        assert (cg / "cgroup.procs").read_text().strip() == ""
    finally:
        controller.shutdown(sid)
        Path(cg).rmdir()


def test_pod_annotations_and_resources_size_the_guest(controller, sandbox_ids):  # type: ignore[no-untyped-def]
    """CRI passes pod annotations inside the PodSandboxConfig; ours size the VM there too."""
    import xml.etree.ElementTree as ET

    sid = unique("podann")
    sandbox_ids.append(sid)
    cfg = cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name=sid),
        annotations={"vmsandbox.io/vcpus": "2", "team": "infra"},
        linux=cri.LinuxPodSandboxConfig(resources=cri.LinuxContainerResources(memory_limit_in_bytes=300 << 20)),
    )
    controller.create(Sandbox(sid), options=AnyMessage("type.googleapis.com/runtime.v1.PodSandboxConfig",
                                                cfg.SerializeToString()))
    st = controller.status(sid, verbose=True)
    assert st.info["vcpus"] == "2" and st.info["memory_mib"] == "300"
    dom = ET.fromstring(st.info["domain_xml"])
    vcpu = dom.find("vcpu")
    assert vcpu is not None and (vcpu.get("current") or vcpu.text) == "2"  # libvirt drops current == max
    assert dom.find("currentMemory").text == str(300 * 1024)  # type: ignore[union-attr]
    import json

    assert json.loads(st.info["annotations"])["team"] == "infra"
