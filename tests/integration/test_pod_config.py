"""PodSandboxConfig.linux.cgroup_parent: the VMM lands in the pod's cgroup."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import unique
from vmsandbox import AnyMessage, SandboxMetadata
from vmsandbox.proto.k8s.runtime.v1 import api_pb2 as cri
from vmsandbox.sandbox.cgroups import CGROUP_ROOT

pytestmark = pytest.mark.integration


def _start_in_cgroup(controller, sid: str, cgroup_parent: str) -> int:  # type: ignore[no-untyped-def]
    """Create and start ``sid`` as CRI would for a pod with that cgroup parent; the VMM pid."""
    cfg = cri.PodSandboxConfig(metadata=cri.PodSandboxMetadata(name=sid),
                               linux=cri.LinuxPodSandboxConfig(cgroup_parent=cgroup_parent))
    controller.create(SandboxMetadata(sid), options=AnyMessage("runtime.v1.PodSandboxConfig", cfg.SerializeToString()))
    return int(controller.start(sid).pid)


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
        pid = _start_in_cgroup(controller, sid, f"/{name}")
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
    controller.create(SandboxMetadata(sid), options=AnyMessage("type.googleapis.com/runtime.v1.PodSandboxConfig",
                                                cfg.SerializeToString()))
    st = controller.status(sid, verbose=True)
    assert st.info["vcpus"] == "2" and st.info["memory_mib"] == "300"
    dom = ET.fromstring(st.info["domain_xml"])
    vcpu = dom.find("vcpu")
    assert vcpu is not None and (vcpu.get("current") or vcpu.text) == "2"  # libvirt drops current == max
    assert dom.find("currentMemory").text == str(300 * 1024)  # type: ignore[union-attr]
    import json

    assert json.loads(st.info["annotations"])["team"] == "infra"


def _vmm_cpu_usec(pid: int) -> int:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1_000_000 // os.sysconf("SC_CLK_TCK")


def test_a_vmm_in_the_pods_cgroup_still_reports_its_cpu(controller, sandbox_ids):  # type: ignore[no-untyped-def]
    """Moving QEMU out of libvirt's cgroup froze libvirt's cpu.time: Metrics said the pod used
    no CPU while its guest was busy."""
    from vmsandbox.payloads.cgroupsv2 import from_any

    name = unique("pod")
    v2 = (CGROUP_ROOT / "cgroup.controllers").exists()
    # The pod cgroup in every hierarchy, as the kubelet makes it (hybrid hosts: v1 and unified).
    made = [CGROUP_ROOT / name] if v2 else [h / name for h in sorted(CGROUP_ROOT.iterdir())
                                            if (h / "cgroup.procs").exists()]
    for cg in made:
        cg.mkdir()
        for f in ("cpuset.cpus", "cpuset.mems"):  # an empty cpuset takes no process
            if (cg / f).exists():
                (cg / f).write_text((cg.parent / f).read_text())
    sid = unique("cgcpu")
    sandbox_ids.append(sid)
    try:
        pid = _start_in_cgroup(controller, sid, f"/{name}")
        assert all(str(pid) in (cg / "cgroup.procs").read_text().split() for cg in made)
        before, vmm_before = from_any(controller.metrics(sid).data).cpu.usage_usec, _vmm_cpu_usec(pid)
        r = controller.exec(sid, ["sh", "-c", "i=0; while [ $i -lt 100000 ]; do i=$((i+1)); done"], timeout=120)
        assert r.exit_code == 0
        after, vmm_after = from_any(controller.metrics(sid).data).cpu.usage_usec, _vmm_cpu_usec(pid)
        vmm_used = vmm_after - vmm_before
        assert vmm_used > 200_000, vmm_used  # the busy loop cost QEMU real CPU time under TCG
        # What Metrics reports grew with what the kernel counted for the QEMU process.
        assert after - before >= vmm_used * 0.8, (after - before, vmm_used)
    finally:
        controller.shutdown(sid)
        for cg in made:
            cg.rmdir()
