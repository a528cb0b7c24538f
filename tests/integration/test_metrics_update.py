"""Metrics, Update and verbose Status on a real guest.

Metrics are decoded from the protobuf bytes (as containerd would) and compared with the
VMM's own /proc figures and the guest's own counters.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator

import pytest

from tests.conftest import unique
from vmsandbox import AnyMessage, FailedPrecondition, InvalidArgument, Mount, NotFound, SandboxMetadata
from vmsandbox.proto.cgroups.v2 import metrics_pb2

pytestmark = pytest.mark.integration
CLK_TCK = os.sysconf("SC_CLK_TCK")


def decode(controller, sid: str) -> metrics_pb2.Metrics:  # type: ignore[no-untyped-def]
    m = controller.metrics(sid)
    assert m.id == sid
    assert m.data.type_url == "io.containerd.cgroups.v2.Metrics"
    msg = metrics_pb2.Metrics()
    msg.ParseFromString(m.data.value)
    return msg


def vmm_cpu_usec(pid: int) -> int:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1_000_000 // CLK_TCK


def meminfo_kib(controller, sid: str, key: str = "MemTotal") -> int:  # type: ignore[no-untyped-def]
    text = controller.exec(sid, ["cat", "/proc/meminfo"], timeout=30).stdout.decode()
    return int(next(line.split()[1] for line in text.splitlines() if line.startswith(key + ":")))


@pytest.fixture(scope="module")
def running(controller, rootfs_image, test_root) -> Iterator[str]:  # type: ignore[no-untyped-def]
    import shutil

    sid = unique("metrics")
    img = test_root / f"{sid}.img"
    shutil.copyfile(rootfs_image, img)
    try:
        controller.create(SandboxMetadata(sid), rootfs=[Mount("ext4", str(img))])
        controller.start(sid)
        yield sid
    finally:
        controller.shutdown(sid)
        img.unlink(missing_ok=True)


def test_metrics_follow_cpu_and_disk_work(controller, running):  # type: ignore[no-untyped-def]
    sid = running
    pid = controller.status(sid).pid
    before = decode(controller, sid)
    r = controller.exec(sid, ["sh", "-c", "i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done"])
    assert r.exit_code == 0
    r = controller.exec(sid, ["dd", "if=/dev/zero", "of=/payload", "bs=1M", "count=8", "conv=fsync"])
    assert r.exit_code == 0, r
    proc_before = vmm_cpu_usec(pid)
    after = decode(controller, sid)
    proc_after = vmm_cpu_usec(pid)

    # CPU: it grew, and it is the VMM's own CPU time as /proc reports it.
    assert after.cpu.usage_usec > before.cpu.usage_usec + 100_000
    tick = 1_000_000 // CLK_TCK
    assert proc_before - 2 * tick <= after.cpu.usage_usec <= proc_after + 2 * tick
    assert after.cpu.user_usec + after.cpu.system_usec <= after.cpu.usage_usec + 2 * tick

    # Disk: the rootfs disk (vdb, minor 16) saw our 8 MiB; the guest counted the same writes.
    root = next(e for e in after.io.usage if e.minor == 16)
    root_before = next(e for e in before.io.usage if e.minor == 16)
    assert root.wbytes - root_before.wbytes >= 8 * 1024 * 1024
    assert root.wios > root_before.wios
    guest_sectors = int(controller.exec(sid, ["cat", "/sys/block/vdb/stat"]).stdout.split()[6])
    assert root.wbytes >= guest_sectors * 512 * 0.9

    # The bulk call (one libvirt request for many sandboxes) gives the same figures.
    bulk = controller.resource_metrics_many([sid])[sid]
    assert bulk.memory.usage_limit == after.memory.usage_limit and bulk.cpu.usage_usec >= after.cpu.usage_usec

    # Memory: what the guest uses, within what it has.
    assert 0 < after.memory.usage <= after.memory.usage_limit
    assert after.memory.usage_limit == 256 * 1024 * 1024
    assert after.memory.anon + after.memory.file == after.memory.usage


def test_memory_update_reaches_the_guest(controller, running):  # type: ignore[no-untyped-def]
    sid = running
    total_before = meminfo_kib(controller, sid)
    # Below the boot size: the balloon takes memory back.
    controller.update(sid, SandboxMetadata(sid, labels={"vmsandbox.io/memory-mib": "160"}), "labels")
    deadline = time.monotonic() + 30
    while meminfo_kib(controller, sid) > total_before - 24 * 1024 and time.monotonic() < deadline:
        time.sleep(0.5)
    total = meminfo_kib(controller, sid)
    assert total <= total_before - 24 * 1024 and total <= 160 * 1024, (total, total_before)
    assert decode(controller, sid).memory.usage_limit == 160 * 1024 * 1024

    # CRI's updated-resources extension grows it past the boot size (virtio-mem), in the
    # shape containerd's UpdatePodSandboxResources writes (Go's JSON of UpdatedResources).
    ext = AnyMessage("io.containerd.cri.v1/UpdatedResources",
                     json.dumps({"Overhead": None, "Resources": {"memory_limit_in_bytes": 320 * 1024 * 1024}}).encode())
    controller.update(sid, SandboxMetadata(sid, extensions={"updated-resources": ext}), "extensions")
    # The guest kernel keeps ~40 MiB for itself, so compare growth, not the absolute figure.
    deadline = time.monotonic() + 30
    while meminfo_kib(controller, sid) - total < 150 * 1024 and time.monotonic() < deadline:
        time.sleep(0.5)
    grown = meminfo_kib(controller, sid)
    assert grown - total >= 150 * 1024 and grown <= 320 * 1024, (total, grown)
    st = controller.status(sid, verbose=True)
    assert st.info["memory_mib"] == "320"
    assert "updated-resources" in st.info["extensions"]


def test_the_guest_boots_with_its_size_and_grows_by_plugging_memory(controller, test_root):  # type: ignore[no-untyped-def]
    """A 192 MiB sandbox boots 192 MiB (the guest kernel's own count), not twice that ballooned
    down; growing past it plugs virtio-mem blocks the guest onlines, and shrinking gives them back."""
    sid = unique("memboot")
    try:
        controller.create(SandboxMetadata(sid), annotations={"vmsandbox.io/memory-mib": "192"})
        controller.start(sid)
        dmesg = controller.exec(sid, ["dmesg"]).stdout.decode()
        line = next(x for x in dmesg.splitlines() if "Memory:" in x and "available" in x)
        # "Memory: 150000K/196088K available (...)": the second figure is what the kernel was given.
        booted_kib = int(line.split("/")[1].split("K")[0])
        assert booted_kib <= 192 * 1024, line
        total = meminfo_kib(controller, sid)
        assert total <= 192 * 1024
        free_at_boot = meminfo_kib(controller, sid, "MemAvailable")
        assert free_at_boot < 150 * 1024  # so the 150 MiB buffer below needs the plugged memory

        controller.update(sid, SandboxMetadata(sid, labels={"vmsandbox.io/memory-mib": "320"}), "labels")
        deadline = time.monotonic() + 30
        while meminfo_kib(controller, sid) - total < 120 * 1024 and time.monotonic() < deadline:
            time.sleep(0.5)
        grown = meminfo_kib(controller, sid)
        assert grown - total >= 120 * 1024, (total, grown)
        bound = controller.exec(sid, ["ls", "/sys/bus/virtio/drivers/virtio_mem"]).stdout.decode().split()
        assert any(x.startswith("virtio") for x in bound), bound  # the virtio_mem driver took the device
        # The new memory is usable: one process fills a 150 MiB buffer, more than was free at boot.
        r = controller.exec(sid, ["dd", "if=/dev/zero", "of=/dev/null", "bs=150M", "count=1"], timeout=120)
        assert r.exit_code == 0 and b"1+0 records out" in r.stderr, (r, free_at_boot)

        controller.update(sid, SandboxMetadata(sid, labels={"vmsandbox.io/memory-mib": "192"}), "labels")
        deadline = time.monotonic() + 30
        while meminfo_kib(controller, sid) > total + 8 * 1024 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert meminfo_kib(controller, sid) <= total + 8 * 1024
    finally:
        controller.shutdown(sid)


def test_update_rejects_what_it_cannot_do(controller, running):  # type: ignore[no-untyped-def]
    sid = running
    labels_before = controller.status(sid, verbose=True).info["labels"]
    with pytest.raises(InvalidArgument):
        controller.update(sid, SandboxMetadata(sid, labels={"a": "b"}), "labels", "bogus")
    with pytest.raises(FailedPrecondition):
        controller.update(sid, SandboxMetadata(sid, labels={"vmsandbox.io/vcpus": "2"}), "labels")
    with pytest.raises(FailedPrecondition):
        controller.update(sid, SandboxMetadata(sid, labels={"vmsandbox.io/memory-mib": "4096"}), "labels")
    with pytest.raises(InvalidArgument):
        controller.update(sid, SandboxMetadata(sid, labels={"vmsandbox.io/memory-mib": "lots"}), "labels")
    with pytest.raises(NotFound):
        controller.update(unique("missing"), SandboxMetadata("x"), "labels")
    # Nothing changed by the failed updates.
    assert controller.status(sid, verbose=True).info["labels"] == labels_before


def test_update_stores_metadata_and_verbose_status_parses(controller, running):  # type: ignore[no-untyped-def]
    sid = running
    spec = AnyMessage("types.containerd.io/opencontainers/runtime-spec/1/Spec",
               json.dumps({"ociVersion": "1.1.0", "annotations": {"team": "infra"}}).encode())
    controller.update(sid, SandboxMetadata(sid, labels={"app": "web"}, spec=spec), "labels", "spec")
    st = controller.status(sid, verbose=True)
    assert json.loads(st.info["labels"]) == {"app": "web"}
    assert json.loads(st.info["annotations"])["team"] == "infra"
    info = json.loads(st.info["info"])
    assert info["pid"] == st.pid > 0
    assert info["vmsandbox"]["libvirt_state"] == "running"
    assert st.info["virt_type"] in ("kvm", "qemu")
    assert st.info["kernel_version"]
    assert "<domain" in st.info["domain_xml"]
    assert os.path.exists(st.info["console_log"])
    p = controller.platform(sid)
    assert (p.os, p.architecture) == ("linux", {"x86_64": "amd64", "aarch64": "arm64"}[os.uname().machine])


def _vmm_shmem_kib(pid: int) -> int:
    """The guest RAM (shared memfd) the VMM has resident."""
    text = open(f"/proc/{pid}/smaps_rollup").read()
    return int(next(line.split()[1] for line in text.splitlines() if line.startswith("Pss_Shmem:")))


def test_memory_the_guest_frees_goes_back_to_the_host(controller, sandbox_ids):  # type: ignore[no-untyped-def]
    """Free page reporting, down to single pages: 96 MiB the guest wrote and freed again
    leave the VMM's resident guest RAM within 16 MiB of where it was."""
    sid = unique("pagerep")
    sandbox_ids.append(sid)
    controller.create(SandboxMetadata(sid))  # no rootfs: the guest's own tmpfs /run
    pid = controller.start(sid).pid
    assert controller.exec(sid, ["cat", "/sys/module/page_reporting/parameters/page_reporting_order"],
                           timeout=30).stdout.strip() == b"0"
    before = _vmm_shmem_kib(pid)
    burst = controller.exec(sid, ["sh", "-c", "head -c 100663296 /dev/urandom > /run/burst"], timeout=300)
    assert burst.exit_code == 0, burst.stderr
    peak = _vmm_shmem_kib(pid)
    assert peak > before + 32 * 1024, (before, peak)  # the guest really used it (some was resident already)
    controller.exec(sid, ["rm", "/run/burst"], timeout=30)
    deadline = time.monotonic() + 60
    while (now := _vmm_shmem_kib(pid)) > before + 16 * 1024 and time.monotonic() < deadline:
        time.sleep(1)
    assert now <= before + 16 * 1024, (before, peak, now)
