"""The lifecycle over fakes: create, start, stop, wait, shutdown, their rollbacks and retries.

No libvirtd, no guest: the same orchestration code as in production runs over the in-memory
hypervisor, network and guest agents of tests/unit/rig.py, with failpoints on every step.
Every test asserts what a user of the Controller sees: states, exit statuses, error classes,
and that nothing of a sandbox is left behind (``rig.leftovers``, the fakes' state).
"""

from __future__ import annotations

import json
import os
import stat
import tarfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest

from tests.unit.rig import Rig, command_on_path
from vmsandbox import errors
from vmsandbox.payloads.cgroupsv2 import from_any
from vmsandbox.guest.fake import POWEROFF, ExecCall
from vmsandbox.model import AnyMessage, ExecResult, ExitStatus, Mount, Phase, Platform, Runtime, SandboxMetadata, SandboxState, utcnow
from vmsandbox.proto.k8s.runtime.v1 import api_pb2
from vmsandbox.sandbox.controller import EXIT_CLEAN, EXIT_FAILED, EXIT_KILLED, SandboxController, state_dir_owner
from vmsandbox.sandbox.ports import DomainState, StopReason

READY, NOTREADY = SandboxState.READY.value, SandboxState.NOTREADY.value
MiB = 1024 * 1024


# --------------------------------------------------------------------------- helpers
def pod_options(*, cpu_quota: int = 0, cpu_period: int = 0, memory_bytes: int = 0, cgroup_parent: str = "",
                annotations: dict[str, str] | None = None, overhead_bytes: int = 0) -> AnyMessage:
    """Create's options as containerd's CRI sends them: a runtime.v1.PodSandboxConfig."""
    msg = api_pb2.PodSandboxConfig()
    msg.metadata.name = "web"
    msg.metadata.namespace = "default"
    msg.linux.resources.cpu_quota = cpu_quota
    msg.linux.resources.cpu_period = cpu_period
    msg.linux.resources.memory_limit_in_bytes = memory_bytes
    msg.linux.overhead.memory_limit_in_bytes = overhead_bytes
    msg.linux.cgroup_parent = cgroup_parent
    for k, v in (annotations or {}).items():
        msg.annotations[k] = v
    return AnyMessage("runtime.v1.PodSandboxConfig", msg.SerializeToString())


def spec_with_annotations(**annotations: str) -> AnyMessage:
    """An OCI runtime spec in an Any, as containerd stores Sandbox.spec."""
    return AnyMessage("types.containerd.io/opencontainers/runtime-spec/1/Spec",
               json.dumps({"ociVersion": "1.1.0", "annotations": annotations}).encode())


def created(rig: Rig, sid: str = "a", *, netns: bool = False, **kwargs: object) -> str:
    if netns:
        kwargs["netns_path"] = rig.pod_netns(sid).netns_path
    rig.ctl.create(SandboxMetadata(sid), **kwargs)  # type: ignore[arg-type]
    return sid


def running(rig: Rig, sid: str = "a", *, netns: bool = False, **kwargs: object) -> str:
    created(rig, sid, netns=netns, **kwargs)
    rig.ctl.start(sid)
    return sid


def assert_gone(rig: Rig, sid: str) -> None:
    """Nothing of ``sid`` anywhere: domain, folder, taps, the controller's view; and the pod
    network namespaces have their addresses back."""
    assert rig.leftovers(sid) == []
    assert sid not in [r.id for r in rig.ctl.list()]
    with pytest.raises(errors.NotFound):
        rig.ctl.status(sid)
    assert all(ns.has_addresses for ns in rig.net.netns.values())


def verbose(rig: Rig, sid: str) -> dict[str, str]:
    return rig.ctl.status(sid, verbose=True).info


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    t0 = time.monotonic()
    out = fn()
    return out, time.monotonic() - t0


def rootfs_file(tmp_path: Path, name: str = "rootfs.img") -> Path:
    p = tmp_path / name
    p.write_bytes(b"\0" * 4096)
    return p


@pytest.fixture
def fake_mkfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A ``mkfs.ext4`` first on PATH that only notes each call in the returned file."""
    return command_on_path(tmp_path, monkeypatch, "mkfs.ext4", 'echo "$@" >> "$CALLS"')


# =========================================================================== the happy path
def test_create_start_stop_wait_shutdown(rig: Rig) -> None:
    plan = rig.pod_netns()
    rig.ctl.create(SandboxMetadata("a"), netns_path=plan.netns_path)
    assert rig.ctl.status("a").state == NOTREADY
    inst = rig.ctl.start("a")
    assert inst.pid > 0 and rig.ctl.status("a").state == READY
    assert not rig.net.netns[plan.netns_path].has_addresses  # the guest has them now
    rig.ctl.stop("a")
    st = rig.ctl.wait("a", timeout=5)
    assert st.exit_status == 0
    assert rig.net.netns[plan.netns_path].has_addresses  # given back at stop
    rig.ctl.shutdown("a")
    assert rig.leftovers("a") == []
    rig.ctl.shutdown("a")  # idempotent


# =========================================================================== create
def test_create_defines_a_domain_that_does_not_run(rig: Rig) -> None:
    created(rig, netns=True)
    d = rig.domain("a")
    assert d.state is DomainState.SHUTOFF and d.starts == 0
    assert d.metadata == {"id": "a", "state-dir": str(rig.config.state_dir)}
    row, = rig.ctl.list()
    assert (row.id, row.phase, row.state, row.pid, row.exited_at) == ("a", Phase.CREATED, SandboxState.NOTREADY, 0, None)
    assert rig.record("a")["phase"] == "created"
    taps = rig.net.tap_names("a", 1)
    assert rig.net.host_taps == set(taps)  # made, not yet wired into the pod
    assert [el.get("dev") for el in ET.fromstring(d.xml).iter("target") if el.get("managed") == "no"] == taps


def test_create_sizes_the_guest_from_defaults_annotations_and_the_pod(rig: Rig) -> None:
    rig.ctl.create(SandboxMetadata("plain"))
    rig.ctl.create(SandboxMetadata("annotated"), annotations={"vmsandbox.io/vcpus": "3", "vmsandbox.io/memory-mib": "384"})
    rig.ctl.create(SandboxMetadata("pod"), options=pod_options(cpu_quota=150_000, cpu_period=100_000, memory_bytes=300 * MiB))
    rig.ctl.create(SandboxMetadata("tiny"), options=pod_options(memory_bytes=1 * MiB))
    # Explicit annotations win over the pod's own annotations and its limits.
    rig.ctl.create(SandboxMetadata("both"), options=pod_options(cpu_quota=400_000, cpu_period=100_000,
                                                         annotations={"vmsandbox.io/memory-mib": "128"}),
                   annotations={"vmsandbox.io/vcpus": "1"})
    sizes = {sid: (verbose(rig, sid)["vcpus"], verbose(rig, sid)["memory_mib"])
             for sid in ("plain", "annotated", "pod", "tiny", "both")}
    assert sizes == {"plain": ("1", "256"), "annotated": ("3", "384"), "pod": ("2", "300"), "tiny": ("1", "64"),
                     "both": ("1", "128")}
    vcpu = ET.fromstring(rig.domain("annotated").xml).find("vcpu")
    assert vcpu is not None and vcpu.get("current") == "3"
    assert rig.domain("annotated").memory_mib == 384


def _config_disk(rig: Rig, sid: str) -> dict[str, str]:
    with tarfile.open(rig.sandbox_dir(sid) / "config.tar") as tar:
        return {m.name: tar.extractfile(m).read().decode(errors="replace") for m in tar.getmembers()}  # type: ignore[union-attr]


def test_the_guest_is_told_its_hostname_dns_network_and_disks(rig: Rig, tmp_path: Path) -> None:
    plan = rig.pod_netns()
    rig.ctl.create(SandboxMetadata("a", labels={"name": "My_Pod"}), netns_path=plan.netns_path,
                   rootfs=[Mount("ext4", str(rootfs_file(tmp_path)), "", ("ro", "noatime"))],
                   annotations={"vmsandbox.io/dns-servers": "10.96.0.10, fd00::a",
                                "vmsandbox.io/dns-searches": "svc.cluster.local",
                                "vmsandbox.io/dns-options": "ndots:5"})
    files = _config_disk(rig, "a")
    assert files["hostname"] == "my-pod\n"
    assert files["resolv.conf"] == "nameserver 10.96.0.10\nnameserver fd00::a\nsearch svc.cluster.local\noptions ndots:5\n"
    assert files["mounts"] == "vsbx-m0 ext4 ro / noatime\n"
    assert "addr 0a:58:0a:f4:01:05 10.244.1.5/24" in files["network"]
    assert files["authorized_keys"].startswith("ssh-ed25519 ")
    rig.ctl.create(SandboxMetadata("b"), options=pod_options(), annotations={"vmsandbox.io/hostname": "custom"})
    files = _config_disk(rig, "b")
    assert files["hostname"] == "custom\n" and "resolv.conf" not in files and "network" not in files


def _boot_memory_mib(xml: str) -> int:
    """What QEMU boots the guest with: <memory> less the memory devices that hot-plug more."""
    def mib(el: ET.Element | None) -> int:
        if el is None:
            return 0
        unit = el.get("unit", "KiB").lower()
        return int(el.text or 0) * {"kib": 1, "k": 1, "mib": 1024, "m": 1024, "gib": 1024 ** 2, "g": 1024 ** 2}[unit] // 1024

    root = ET.fromstring(xml)
    devices = sum(mib(d.find("target/size")) for d in root.findall("devices/memory"))
    return mib(root.find("memory")) - devices


def test_the_guest_boots_with_exactly_the_requested_memory(rig: Rig) -> None:
    rig.ctl.create(SandboxMetadata("a"), options=pod_options(memory_bytes=192 * MiB))
    xml = rig.domain("a").xml
    assert _boot_memory_mib(xml) == 192
    # What it may grow to is hot-pluggable (virtio-mem), not booted and ballooned away.
    assert [d.get("model") for d in ET.fromstring(xml).findall("devices/memory")] == ["virtio-mem"]
    assert _boot_memory_mib(xml) + sum(int(d.findtext("target/size") or 0) for d in
                                       ET.fromstring(xml).findall("devices/memory")) == 384


@pytest.mark.parametrize("sandbox, kwargs", [
    pytest.param(SandboxMetadata("../etc"), {}, id="id-with-dotdot"),
    pytest.param(SandboxMetadata(""), {}, id="empty-id"),
    pytest.param(SandboxMetadata("-a"), {}, id="id-starting-with-dash"),
    pytest.param(SandboxMetadata("a" * 129), {}, id="id-too-long"),
    pytest.param(SandboxMetadata("a/b"), {}, id="id-with-slash"),
    pytest.param("a", {}, id="not-a-Sandbox"),
    pytest.param(SandboxMetadata("a"), {"annotations": {"vmsandbox.io/vcpus": "0"}}, id="zero-vcpus"),
    pytest.param(SandboxMetadata("a"), {"annotations": {"vmsandbox.io/vcpus": "many"}}, id="vcpus-not-a-number"),
    pytest.param(SandboxMetadata("a"), {"annotations": {"vmsandbox.io/vcpus": "65"}}, id="vcpus-over-max"),
    pytest.param(SandboxMetadata("a"), {"annotations": {"vmsandbox.io/memory-mib": "16"}}, id="memory-too-small"),
    # The fake host has 64 GiB: shared memfd RAM would not be refused by QEMU at start.
    pytest.param(SandboxMetadata("a"), {"annotations": {"vmsandbox.io/memory-mib": str(65 * 1024)}}, id="more-than-the-host"),
    pytest.param(SandboxMetadata("a"), {"annotations": {"vmsandbox.io/dns-servers": "not-an-ip"}}, id="bad-dns-server"),
    pytest.param(SandboxMetadata("a"), {"rootfs": [Mount("ext4", "/nonexistent/rootfs.img")]}, id="missing-mount-source"),
    pytest.param(SandboxMetadata("a"), {"rootfs": ["/rootfs.img"]}, id="mount-not-a-Mount"),
    pytest.param(SandboxMetadata("a"), {"netns_path": "/nonexistent/netns"}, id="missing-netns"),
    pytest.param(SandboxMetadata("a"), {"options": AnyMessage("runtime.v1.PodSandboxConfig", b"\xff\xff\xff")}, id="undecodable-pod"),
    pytest.param(SandboxMetadata("a"), {"options": pod_options(cgroup_parent="/kubepods/../../etc")}, id="unsafe-cgroup"),
])
def test_a_bad_create_is_invalid_argument_and_leaves_nothing(rig: Rig, sandbox: object, kwargs: dict[str, object]) -> None:
    rig.pod_netns()
    with pytest.raises(errors.InvalidArgument):
        rig.ctl.create(sandbox, **kwargs)  # type: ignore[arg-type]
    assert rig.ctl.list() == []
    assert rig.hv.domains == {} and rig.net.all_taps() == set()
    assert list((rig.config.state_dir / "sandboxes").iterdir()) == []


@pytest.mark.parametrize("mount", [
    pytest.param(lambda img: Mount("ext4", str(img), "/data", ("ro",)), id="root-with-a-target"),
    pytest.param(lambda img: Mount("nfs", str(img)), id="unsupported-type"),
    pytest.param(lambda img: Mount("ext4", str(img), "", ("uid=0",)), id="unsupported-option"),
])
def test_a_bad_rootfs_is_invalid_argument(rig: Rig, tmp_path: Path, mount: Callable[[Path], Mount]) -> None:
    with pytest.raises(errors.InvalidArgument):
        rig.ctl.create(SandboxMetadata("a"), rootfs=[mount(rootfs_file(tmp_path))])
    assert_gone(rig, "a")


def test_a_second_mount_with_an_unsafe_target_is_refused(rig: Rig, tmp_path: Path) -> None:
    root, data = rootfs_file(tmp_path), rootfs_file(tmp_path, "data.img")
    with pytest.raises(errors.InvalidArgument):
        rig.ctl.create(SandboxMetadata("a"), rootfs=[Mount("ext4", str(root)), Mount("ext4", str(data), "/da ta")])
    assert_gone(rig, "a")


def test_a_mount_target_that_climbs_out_is_refused(rig: Rig, tmp_path: Path) -> None:
    root, data = rootfs_file(tmp_path), rootfs_file(tmp_path, "data.img")
    with pytest.raises(errors.InvalidArgument):
        rig.ctl.create(SandboxMetadata("a"), rootfs=[Mount("ext4", str(root)), Mount("ext4", str(data), "/data/../../etc")])
    assert_gone(rig, "a")


def test_a_taken_id_is_already_exists_and_the_first_sandbox_is_untouched(rig: Rig) -> None:
    running(rig, netns=True)
    with pytest.raises(errors.AlreadyExists):
        rig.ctl.create(SandboxMetadata("a"))
    assert rig.ctl.status("a").state == READY and rig.domain("a").state is DomainState.RUNNING
    rig.ctl.stop("a")
    with pytest.raises(errors.AlreadyExists):  # a stopped sandbox still holds its id
        rig.ctl.create(SandboxMetadata("a"))
    rig.ctl.shutdown("a")
    created(rig)  # the id is free again once shut down


def test_a_foreign_domain_with_the_same_name_is_already_exists(rig: Rig, tmp_path: Path) -> None:
    plan = rig.pod_netns()
    foreign = rig.tagged_domain("a", tmp_path / "other-state", running=True)
    xml = foreign.xml
    with pytest.raises(errors.AlreadyExists, match="vmsandbox-a"):
        rig.ctl.create(SandboxMetadata("a"), netns_path=plan.netns_path)
    assert rig.leftovers("a") == ["domain vmsandbox-a"]  # only the other state dir's domain
    assert rig.domain("a").xml == xml and rig.domain("a").state is DomainState.RUNNING
    assert rig.ctl.list() == [] and rig.net.all_taps() == set()


def _fail_images(rig: Rig) -> None:
    rig.images.fp.fail("ensure", errors.FailedPrecondition("the guest image cannot be built"))


def _fail_hv(step: str) -> Callable[[Rig], None]:
    return lambda rig: rig.hv.fp.fail(step, errors.Unavailable(f"{step}: libvirtd went away"))


def _fail_net(step: str) -> Callable[[Rig], None]:
    return lambda rig: rig.net.fp.fail(step, errors.Internal(f"{step}: netlink failed"))


@pytest.mark.parametrize("fail, cls", [
    pytest.param(_fail_images, errors.FailedPrecondition, id="image"),
    pytest.param(_fail_net("inspect_netns"), errors.Internal, id="inspect-netns"),
    pytest.param(_fail_hv("info"), errors.Unavailable, id="domain-lookup"),
    pytest.param(_fail_net("create_taps"), errors.Internal, id="create-taps"),
    pytest.param(_fail_hv("define"), errors.Unavailable, id="define"),
])
def test_a_create_step_failing_rolls_everything_back(rig: Rig, fail: Callable[[Rig], None],
                                                     cls: type[errors.VmSandboxError]) -> None:
    plan = rig.pod_netns()
    fail(rig)
    with pytest.raises(cls):
        rig.ctl.create(SandboxMetadata("a"), netns_path=plan.netns_path)
    assert_gone(rig, "a")
    assert rig.net.all_taps() == set() and rig.hv.domains == {}
    # Safe to retry: the failpoint fired once, the same create now succeeds and boots.
    rig.ctl.create(SandboxMetadata("a"), netns_path=plan.netns_path)
    assert rig.ctl.start("a").pid > 0


def test_a_create_whose_tap_name_is_taken_is_refused_and_leaves_that_tap_alone(rig: Rig) -> None:
    plan = rig.pod_netns()
    theirs, = rig.net.tap_names("a", 1)
    rig.net.host_taps.add(theirs)  # not made by this create: another state dir's, or a person's
    with pytest.raises(errors.AlreadyExists, match=theirs):
        rig.ctl.create(SandboxMetadata("a"), netns_path=plan.netns_path)
    assert rig.net.host_taps == {theirs}  # neither adopted nor deleted by the rollback
    assert rig.hv.domains == {} and not rig.sandbox_dir("a").exists()
    assert "a" not in [r.id for r in rig.ctl.list()]


def test_a_sandbox_recorded_with_the_old_tap_names_still_starts_stops_and_is_removed(rig: Rig) -> None:
    plan = rig.pod_netns()
    rig.ctl.create(SandboxMetadata("a"), netns_path=plan.netns_path)
    rig.ctl.close()
    # What an earlier version left: its record and its host tap carry the old name.
    legacy = "vsbx0ca5d9140"
    record = rig.record("a")
    rig.net.host_taps.difference_update(record["taps"])
    rig.net.host_taps.add(legacy)
    record["taps"] = [legacy]
    (rig.sandbox_dir("a") / "record.json").write_text(json.dumps(record))
    rig.restart()
    rig.ctl.start("a")
    assert rig.netns().taps == {legacy} and not rig.netns().has_addresses
    rig.ctl.stop("a")
    assert rig.netns().has_addresses
    rig.ctl.shutdown("a")
    assert rig.net.all_taps() == set() and rig.leftovers("a") == []


def test_a_failing_record_save_undefines_the_new_domain(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    from vmsandbox.sandbox.store import Store

    def full_disk(self: Store, record: object) -> None:
        raise errors.Internal("no space left on device")

    plan = rig.pod_netns()
    monkeypatch.setattr(Store, "save", full_disk)
    with pytest.raises(errors.Internal):
        rig.ctl.create(SandboxMetadata("a"), netns_path=plan.netns_path)
    monkeypatch.undo()
    assert_gone(rig, "a")


def test_a_failing_create_rollback_keeps_the_original_error(rig: Rig) -> None:
    plan = rig.pod_netns()
    rig.hv.fp.fail("define", errors.Unavailable("libvirtd went away"))
    rig.net.fp.fail("detach", errors.Internal("netlink failed while undoing"))
    with pytest.raises(errors.VmSandboxError) as ei:
        rig.ctl.create(SandboxMetadata("a"), netns_path=plan.netns_path)
    assert type(ei.value) is errors.Unavailable


def test_directory_mounts_become_private_disk_images(rig: Rig, tmp_path: Path, fake_mkfs: Path) -> None:
    root = rootfs_file(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    (data / "f").write_text("x")
    rig.ctl.create(SandboxMetadata("a"), rootfs=[Mount("ext4", str(root)), Mount("bind", str(data), "/data", ("ro",))])
    image = rig.sandbox_dir("a") / "disks" / "m1.img"
    assert image.is_file() and str(data) in fake_mkfs.read_text()
    rig.ctl.shutdown("a")
    assert_gone(rig, "a")


def test_a_failing_mkfs_is_internal_with_its_message_and_leaves_nothing(rig: Rig, tmp_path: Path,
                                                                      fake_mkfs: Path) -> None:
    script = next(p for p in (tmp_path / "bin").iterdir())
    script.write_text("#!/bin/sh\necho 'mkfs.ext4: Could not allocate block group' >&2\nexit 1\n")
    data = tmp_path / "data"
    data.mkdir()
    with pytest.raises(errors.Internal, match="Could not allocate block group"):
        rig.ctl.create(SandboxMetadata("a"), rootfs=[Mount("bind", str(data))])
    assert_gone(rig, "a")


def test_no_state_artefact_is_readable_by_other_users(rig: Rig, tmp_path: Path, fake_mkfs: Path) -> None:
    old = os.umask(0o022)  # the usual umask of a service; the modes must not depend on it
    try:
        data = tmp_path / "secret-volume"
        data.mkdir()
        (data / "token").write_text("s3cr3t")
        rig.ctl.create(SandboxMetadata("a"), rootfs=[Mount("ext4", str(rootfs_file(tmp_path))),
                                             Mount("bind", str(data), "/var/run/secrets", ("ro",))])
    finally:
        os.umask(old)
    loose = []
    for dirpath, dirnames, filenames in os.walk(rig.config.state_dir):
        for name in [*dirnames, *filenames]:
            p = Path(dirpath) / name
            mode = stat.S_IMODE(p.lstat().st_mode)
            if mode & 0o044:  # readable by group or others (0711 folders are fine: no listing)
                loose.append(f"{p.relative_to(rig.config.state_dir)} {mode:o}")
    assert loose == []


def test_a_clashing_create_copies_no_directory(rig: Rig, tmp_path: Path, fake_mkfs: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    rig.tagged_domain("a", tmp_path / "other-state")
    with pytest.raises(errors.AlreadyExists):
        rig.ctl.create(SandboxMetadata("a"), rootfs=[Mount("bind", str(data))])
    assert not fake_mkfs.exists()


def test_a_missing_mkfs_is_a_clear_error_and_leaves_nothing(rig: Rig, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    data.mkdir()
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    try:
        with pytest.raises(errors.VmSandboxError, match="mkfs.ext4"):
            rig.ctl.create(SandboxMetadata("a"), rootfs=[Mount("bind", str(data))])
    finally:
        assert_gone(rig, "a")


def test_an_unwritable_state_dir_is_a_clear_error(rig: Rig) -> None:
    sandboxes = rig.config.state_dir / "sandboxes"
    sandboxes.rmdir()
    sandboxes.write_text("not a folder")  # as a read-only or full filesystem would refuse it
    with pytest.raises(errors.VmSandboxError, match="sandboxes"):
        rig.ctl.create(SandboxMetadata("a"))


def test_a_writable_image_another_sandbox_holds_is_refused_naming_the_holder(rig: Rig, tmp_path: Path) -> None:
    img = rootfs_file(tmp_path)
    running(rig, "holder-1", rootfs=[Mount("ext4", str(img))])
    with pytest.raises((errors.FailedPrecondition, errors.AlreadyExists, errors.InvalidArgument), match="holder-1"):
        rig.ctl.create(SandboxMetadata("second-2"), rootfs=[Mount("ext4", str(img))])
    assert_gone(rig, "second-2")


def test_two_sandboxes_may_share_a_read_only_image(rig: Rig, tmp_path: Path) -> None:
    img = rootfs_file(tmp_path)
    running(rig, "a", rootfs=[Mount("ext4", str(img), "", ("ro",))])
    running(rig, "b", rootfs=[Mount("ext4", str(img), "", ("ro",))])
    assert [r.state for r in rig.ctl.list()] == [SandboxState.READY, SandboxState.READY]


# =========================================================================== start
def test_start_boots_wires_the_pod_and_connects(rig: Rig) -> None:
    sid = created(rig, netns=True)
    inst = rig.ctl.start(sid)
    d = rig.domain(sid)
    assert d.state is DomainState.RUNNING and d.starts == 1 and inst.pid == d.pid
    assert inst.labels == {"vmsandbox.io/domain": "vmsandbox-a"}
    ns, = rig.net.netns.values()
    assert ns.taps == set(rig.net.tap_names(sid, 1)) and rig.net.host_taps == set()
    assert [c.socket_path for c in rig.guests.open_channels()] == [d.agent_socket]
    st = rig.ctl.status(sid)
    assert (st.state, st.pid, st.created_at) == (READY, d.pid, inst.created_at)
    assert rig.record(sid)["phase"] == "running" and rig.record(sid)["pid"] == d.pid


def test_start_is_idempotent_on_a_running_sandbox(rig: Rig) -> None:
    sid = created(rig)
    first = rig.ctl.start(sid)
    assert rig.ctl.start(sid) == first
    assert rig.domain(sid).starts == 1


def test_start_of_a_stopped_sandbox_is_failed_precondition(rig: Rig) -> None:
    sid = running(rig)
    rig.ctl.stop(sid)
    with pytest.raises(errors.FailedPrecondition):
        rig.ctl.start(sid)
    assert rig.ctl.wait(sid, timeout=1).exit_status == EXIT_CLEAN  # still there, still stopped


def test_start_of_an_unknown_sandbox_is_not_found(rig: Rig) -> None:
    with pytest.raises(errors.NotFound):
        rig.ctl.start("nope")
    with pytest.raises(errors.InvalidArgument):
        rig.ctl.start("../nope")


def test_start_adopts_a_domain_that_is_already_running(rig: Rig) -> None:
    sid = created(rig)
    rig.hv.start("vmsandbox-a")  # e.g. started by hand with virsh
    assert rig.ctl.start(sid).pid == rig.domain(sid).pid
    assert rig.domain(sid).starts == 1


def test_start_removes_a_stale_agent_socket_before_booting(rig: Rig) -> None:
    sid = created(rig)
    sock = Path(rig.domain(sid).agent_socket)
    sock.write_text("left by a QEMU that died")
    rig.ctl.start(sid)
    assert not sock.exists()


def test_start_with_a_pod_cgroup_that_does_not_exist_here_still_runs(rig: Rig) -> None:
    sid = created(rig, options=pod_options(cgroup_parent="/vsbx-unit-test-no-such-cgroup/pod1"))
    assert rig.ctl.start(sid).pid > 0


def test_on_a_systemd_host_a_pod_slice_is_the_domains_libvirt_partition(rig: Rig, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from vmsandbox.sandbox import cgroups, controller

    (tmp_path / "run-systemd").mkdir()
    monkeypatch.setattr(cgroups, "SYSTEMD_RUN", tmp_path / "run-systemd")
    moved: list[tuple[int, str]] = []
    monkeypatch.setattr(controller, "place_process", lambda pid, parent: moved.append((pid, parent)))
    sid = created(rig, options=pod_options(cgroup_parent="kubepods-burstable-pod12_34.slice"))
    assert ET.fromstring(rig.domain(sid).xml).findtext("resource/partition") == "/kubepods/burstable/pod12_34"
    rig.ctl.start(sid)
    assert moved == []  # libvirt (machined) placed it; nothing is moved behind its back


def test_without_systemd_the_vmm_is_moved_into_the_pod_cgroup(rig: Rig, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from vmsandbox.sandbox import cgroups, controller

    monkeypatch.setattr(cgroups, "SYSTEMD_RUN", tmp_path / "no-systemd")
    moved: list[tuple[int, str]] = []
    monkeypatch.setattr(controller, "place_process", lambda pid, parent: moved.append((pid, parent)))
    sid = created(rig, options=pod_options(cgroup_parent="kubepods-burstable-pod12_34.slice"))
    assert ET.fromstring(rig.domain(sid).xml).find("resource") is None
    pid = rig.ctl.start(sid).pid
    assert moved == [(pid, "kubepods-burstable-pod12_34.slice")]


def _die_during_boot(rig: Rig) -> None:
    rig.guests.vm_running = lambda socket_path: False  # the agent never answers
    threading.Timer(0.1, rig.hv.crash, ["vmsandbox-a"]).start()


def _mount_errors(rig: Rig) -> None:
    def handler(call: ExecCall) -> ExecResult:
        if call.argv == ("cat", "/run/vsbx/mount-errors"):
            return ExecResult(0, b"vsbx-m0\n", b"")
        return ExecResult(0, b"", b"")
    rig.guests.handler = handler


@pytest.mark.parametrize("fail, cls", [
    pytest.param(_fail_hv("info"), errors.Unavailable, id="domain-lookup"),
    pytest.param(lambda rig: rig.hv.fp.fail("start", errors.FailedPrecondition("QEMU: could not open disk")),
                 errors.FailedPrecondition, id="hypervisor-start"),
    pytest.param(_fail_net("attach"), errors.Internal, id="network-attach"),
    pytest.param(lambda rig: rig.guests.fp.fail("connect", errors.DeadlineExceeded("guest agent did not answer")),
                 errors.DeadlineExceeded, id="agent-connect"),
    pytest.param(lambda rig: rig.guests.fp.fail("connect", errors.Unavailable("guest agent refused the connection")),
                 errors.Unavailable, id="agent-refused"),
    pytest.param(_die_during_boot, errors.FailedPrecondition, id="vm-died-while-booting"),
    pytest.param(_fail_hv("pid"), errors.Unavailable, id="pid"),
    pytest.param(_mount_errors, errors.FailedPrecondition, id="guest-cannot-mount"),
])
def test_a_start_step_failing_removes_everything_and_keeps_its_error(
        rig: Rig, tmp_path: Path, fail: Callable[[Rig], None], cls: type[errors.VmSandboxError]) -> None:
    plan = rig.pod_netns()
    rig.ctl.create(SandboxMetadata("a"), netns_path=plan.netns_path, rootfs=[Mount("ext4", str(rootfs_file(tmp_path)))])
    sock = Path(rig.domain("a").agent_socket)
    fail(rig)
    with pytest.raises(cls):
        rig.ctl.start("a")
    assert_gone(rig, "a")
    assert rig.net.all_taps() == set() and not sock.exists()
    assert rig.guests.open_channels() == []
    # containerd retries with a new create: that works.
    rig.guests.handler = lambda call: ExecResult(0, b"", b"")
    rig.guests.vm_running = rig._vm_running
    rig.ctl.create(SandboxMetadata("a"), netns_path=plan.netns_path)
    assert rig.ctl.start("a").pid > 0


def test_a_guest_that_cannot_mount_its_disks_says_which_and_shows_the_console(rig: Rig, tmp_path: Path) -> None:
    rig.ctl.create(SandboxMetadata("a"), rootfs=[Mount("ext4", str(rootfs_file(tmp_path)))])
    (rig.sandbox_dir("a") / "console.log").write_text("booting\nEXT4-fs (vda): bad geometry\n\n")
    _mount_errors(rig)
    with pytest.raises(errors.FailedPrecondition, match=r"vsbx-m0.*bad geometry"):
        rig.ctl.start("a")
    assert_gone(rig, "a")


def test_a_boot_that_never_answers_is_deadline_exceeded_within_the_boot_timeout(quick_rig: Rig) -> None:
    rig = quick_rig
    sid = created(rig, netns=True)
    rig.guests.vm_running = lambda socket_path: False
    t0 = time.monotonic()
    with pytest.raises(errors.DeadlineExceeded):
        rig.ctl.start(sid)
    assert time.monotonic() - t0 < 1.5
    assert_gone(rig, sid)


def test_a_domain_gone_before_start_is_not_found_and_removed(rig: Rig) -> None:
    sid = created(rig, netns=True)
    del rig.hv.domains["vmsandbox-a"]  # undefined behind our back
    with pytest.raises(errors.NotFound):
        rig.ctl.start(sid)
    assert_gone(rig, sid)


def test_a_failing_rollback_keeps_the_start_error_and_shutdown_finishes_the_job(rig: Rig) -> None:
    sid = created(rig, netns=True)
    rig.guests.fp.fail("connect", errors.DeadlineExceeded("guest agent did not answer"))
    rig.hv.fp.fail("destroy", errors.Unavailable("libvirtd went away"))
    with pytest.raises(errors.DeadlineExceeded):
        rig.ctl.start(sid)
    assert rig.leftovers(sid) != []  # the removal could not finish: the record is kept
    rig.ctl.shutdown(sid)
    assert_gone(rig, sid)


# =========================================================================== stop
def test_stop_powers_the_guest_off_cleanly(rig: Rig) -> None:
    sid = running(rig, netns=True)
    _, took = timed(lambda: rig.ctl.stop(sid))
    assert took < 1.0
    assert POWEROFF in [c.argv[0] for c in rig.guests.execs]
    st = rig.ctl.status(sid)
    assert (st.state, st.pid) == (NOTREADY, 0) and st.exited_at is not None
    assert rig.ctl.wait(sid, timeout=1).exit_status == EXIT_CLEAN
    assert rig.domain(sid).state is DomainState.SHUTOFF
    assert rig.record(sid)["phase"] == "stopped" and rig.record(sid)["exit_status"] == EXIT_CLEAN
    ns, = rig.net.netns.values()
    assert ns.has_addresses and rig.guests.open_channels() == []


def test_a_guest_ignoring_power_off_is_forced_after_the_grace_period(rig: Rig) -> None:
    sid = running(rig)
    rig.guests.on_poweroff = lambda socket_path: None
    _, took = timed(lambda: rig.ctl.stop(sid, timeout=0.3))
    assert 0.3 <= took < 1.5
    assert rig.ctl.wait(sid, timeout=1).exit_status == EXIT_KILLED
    assert rig.domain(sid).stop_reason is StopReason.DESTROYED


def test_stop_with_timeout_zero_forces_at_once(rig: Rig) -> None:
    sid = running(rig)
    _, took = timed(lambda: rig.ctl.stop(sid, timeout=0))
    assert took < 0.5
    assert rig.ctl.wait(sid, timeout=1).exit_status == EXIT_KILLED
    assert POWEROFF not in [c.argv[0] for c in rig.guests.execs]


def test_a_hanging_power_off_request_does_not_hold_stop_past_its_grace(rig: Rig) -> None:
    sid = running(rig)
    release = threading.Event()
    rig.guests.fp.hang("exec", release)
    try:
        _, took = timed(lambda: rig.ctl.stop(sid, timeout=0.3))
    finally:
        release.set()
    assert took < 1.5
    assert rig.ctl.wait(sid, timeout=1).exit_status == EXIT_KILLED


def test_stop_notices_a_power_off_whose_event_was_lost(rig: Rig) -> None:
    sid = running(rig)
    rig.hv.events = "never"
    _, took = timed(lambda: rig.ctl.stop(sid, timeout=1.5))
    assert took < 1.0  # polled, not waited out
    assert rig.ctl.wait(sid, timeout=1).exit_status == EXIT_CLEAN


def test_stop_of_a_guest_that_already_powered_off_unnoticed(rig: Rig) -> None:
    sid = running(rig)
    rig.hv.events = "never"
    rig.hv.guest_poweroff("vmsandbox-a")
    rig.ctl.stop(sid, timeout=1)
    assert rig.ctl.wait(sid, timeout=1).exit_status == EXIT_CLEAN


def test_stop_succeeds_on_unknown_created_and_stopped_sandboxes(rig: Rig) -> None:
    rig.ctl.stop("nope")
    sid = created(rig, netns=True)
    rig.ctl.stop(sid)
    st = rig.ctl.status(sid)
    assert st.state == NOTREADY and rig.ctl.wait(sid, timeout=1).exit_status == EXIT_CLEAN
    with pytest.raises(errors.FailedPrecondition):
        rig.ctl.start(sid)
    running(rig, "b")
    rig.ctl.stop("b", timeout=0)
    first = rig.ctl.wait("b", timeout=1)
    rig.ctl.stop("b")
    assert rig.ctl.wait("b", timeout=1) == first


def test_stop_with_a_negative_timeout_is_invalid_argument(rig: Rig) -> None:
    sid = running(rig)
    with pytest.raises(errors.InvalidArgument):
        rig.ctl.stop(sid, timeout=-1)
    with pytest.raises(errors.InvalidArgument):
        rig.ctl.stop("nope", timeout=-1)
    assert rig.ctl.status(sid).state == READY


def test_stop_over_a_half_dead_agent_connection_still_powers_off_cleanly(rig: Rig) -> None:
    sid = running(rig)
    rig.guests.break_transport(rig.domain(sid).agent_socket)
    rig.ctl.stop(sid, timeout=0.5)
    assert rig.ctl.wait(sid, timeout=1).exit_status == EXIT_CLEAN


# =========================================================================== wait
def test_wait_returns_when_the_guest_powers_itself_off(rig: Rig) -> None:
    sid = running(rig)
    before = utcnow()
    threading.Timer(0.1, rig.hv.guest_poweroff, ["vmsandbox-a"]).start()
    st = rig.ctl.wait(sid, timeout=3)
    assert st.exit_status == EXIT_CLEAN and before <= st.exited_at <= utcnow()


@pytest.mark.parametrize("end, code", [
    pytest.param(lambda rig: rig.hv.crash("vmsandbox-a"), EXIT_FAILED, id="crash"),
    pytest.param(lambda rig: rig.hv.destroy("vmsandbox-a"), EXIT_KILLED, id="destroyed-from-outside"),
])
def test_wait_reports_how_the_guest_ended(rig: Rig, end: Callable[[Rig], None], code: int) -> None:
    sid = running(rig)
    end(rig)
    assert rig.ctl.wait(sid, timeout=1).exit_status == code
    assert rig.ctl.status(sid).state == NOTREADY


def test_wait_times_out_with_deadline_exceeded(rig: Rig) -> None:
    sid = running(rig)
    t0 = time.monotonic()
    with pytest.raises(errors.DeadlineExceeded):
        rig.ctl.wait(sid, timeout=0.2)
    assert 0.2 <= time.monotonic() - t0 < 1.0
    assert rig.ctl.status(sid).state == READY
    with pytest.raises(errors.NotFound):
        rig.ctl.wait("nope", timeout=0.1)


def test_many_concurrent_waiters_are_all_released_with_the_same_status(rig: Rig) -> None:
    sid = running(rig)
    results: list[ExitStatus | BaseException] = []

    def waiter() -> None:
        try:
            results.append(rig.ctl.wait(sid, timeout=5))
        except BaseException as e:  # noqa: BLE001 - reported below
            results.append(e)

    threads = [threading.Thread(target=waiter) for _ in range(20)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    rig.hv.guest_poweroff("vmsandbox-a")
    for t in threads:
        t.join(2)
    assert len(results) == 20 and len({repr(r) for r in results}) == 1
    assert isinstance(results[0], ExitStatus) and results[0].exit_status == EXIT_CLEAN


def test_an_exit_whose_event_is_lost_is_found_by_polling(rig: Rig) -> None:
    sid = running(rig)
    rig.hv.events = "never"
    rig.hv.guest_poweroff("vmsandbox-a")
    st, took = timed(lambda: rig.ctl.wait(sid, timeout=3))
    assert isinstance(st, ExitStatus) and st.exit_status == EXIT_CLEAN and took < 2.5


def test_an_exit_found_by_polling_is_dated_when_it_was_observed(rig: Rig) -> None:
    sid = running(rig)
    console = rig.sandbox_dir(sid) / "console.log"
    console.write_text("[    0.9] vsbx-init: ready\n")
    an_hour_ago = time.time() - 3600
    os.utime(console, (an_hour_ago, an_hour_ago))  # the guest was quiet for an hour
    rig.hv.events = "never"
    before = utcnow()
    rig.hv.guest_poweroff("vmsandbox-a")
    st = rig.ctl.wait(sid, timeout=3)
    assert st.exited_at >= before - timedelta(seconds=1)


def test_a_late_event_after_the_exit_was_polled_changes_nothing(rig: Rig) -> None:
    sid = running(rig)
    rig.hv.events = "manual"
    rig.hv.guest_poweroff("vmsandbox-a")
    first = rig.ctl.wait(sid, timeout=3)  # found by polling; the event is still held back
    assert rig.hv.pending and first.exit_status == EXIT_CLEAN
    rig.hv.deliver_pending()
    rig.hv.on_stop("vmsandbox-a", StopReason.CRASHED)  # and a late one that disagrees
    assert rig.ctl.wait(sid, timeout=1) == first
    assert rig.record(sid)["exit_status"] == EXIT_CLEAN


def test_a_doubled_event_gives_one_exit(rig: Rig) -> None:
    sid = running(rig)
    rig.hv.events = "twice"
    rig.hv.guest_poweroff("vmsandbox-a")
    first = rig.ctl.wait(sid, timeout=1)
    rig.hv.on_stop("vmsandbox-a", StopReason.DESTROYED)
    assert rig.ctl.wait(sid, timeout=1) == first and first.exit_status == EXIT_CLEAN


def test_events_of_other_domains_are_ignored(rig: Rig) -> None:
    sid = running(rig)
    rig.hv.on_stop("some-other-vm", StopReason.CRASHED)
    rig.hv.on_stop("vmsandbox-unknown", StopReason.CRASHED)
    assert rig.ctl.status(sid).state == READY


def test_a_waiter_on_a_created_sandbox_is_released_by_shutdown(rig: Rig) -> None:
    sid = created(rig)
    out: list[ExitStatus] = []
    t = threading.Thread(target=lambda: out.append(rig.ctl.wait(sid, timeout=3)))
    t.start()
    time.sleep(0.05)
    rig.ctl.shutdown(sid)
    t.join(2)
    assert out and out[0].exit_status == EXIT_CLEAN


def test_a_waiter_is_released_when_a_failed_start_removes_the_sandbox(rig: Rig) -> None:
    sid = created(rig)
    out: list[object] = []

    def waiter() -> None:
        try:
            out.append(rig.ctl.wait(sid, timeout=1.0))
        except errors.VmSandboxError as e:
            out.append(e)

    t = threading.Thread(target=waiter)
    t.start()
    time.sleep(0.05)
    rig.guests.fp.fail("connect", errors.DeadlineExceeded("guest agent did not answer"))
    with pytest.raises(errors.DeadlineExceeded):
        rig.ctl.start(sid)
    t0 = time.monotonic()
    t.join(2)
    assert time.monotonic() - t0 < 0.5, "the waiter still waits for a sandbox that is gone"
    assert out and not isinstance(out[0], errors.DeadlineExceeded)


# =========================================================================== shutdown
@pytest.mark.parametrize("phase", ["created", "running", "stopped"])
def test_shutdown_removes_everything_from_every_phase(rig: Rig, phase: str) -> None:
    sid = created(rig, netns=True)
    if phase != "created":
        rig.ctl.start(sid)
    if phase == "stopped":
        rig.ctl.stop(sid)
    sock = Path(rig.domain(sid).agent_socket)
    sock.write_text("")
    rig.ctl.shutdown(sid)
    assert_gone(rig, sid)
    assert rig.net.all_taps() == set() and not sock.exists() and rig.guests.open_channels() == []
    rig.ctl.shutdown(sid)  # idempotent
    created(rig, sid)  # and the id is free


def test_shutdown_of_an_unknown_sandbox_succeeds(rig: Rig) -> None:
    rig.ctl.shutdown("nope")
    with pytest.raises(errors.InvalidArgument):
        rig.ctl.shutdown("../nope")


def test_shutdown_forces_a_guest_that_ignores_power_off(quick_rig: Rig) -> None:
    rig = quick_rig
    sid = running(rig)
    rig.guests.on_poweroff = lambda socket_path: None
    _, took = timed(lambda: rig.ctl.shutdown(sid))
    assert took < 1.5
    assert_gone(rig, sid)


def test_a_shutdown_that_fails_half_way_can_be_retried(rig: Rig) -> None:
    sid = running(rig, netns=True)
    rig.net.fp.fail("detach", errors.Internal("netlink failed"), times=-1)
    with pytest.raises(errors.Internal):
        rig.ctl.shutdown(sid)
    rig.net.fp.clear()
    rig.ctl.shutdown(sid)
    assert_gone(rig, sid)


def test_an_operation_queued_behind_a_shutdown_finds_the_sandbox_gone(quick_rig: Rig) -> None:
    rig = quick_rig
    sid = running(rig)
    rig.guests.on_poweroff = lambda socket_path: None  # shutdown holds the sandbox for its grace period
    t = threading.Thread(target=rig.ctl.shutdown, args=(sid,))
    t.start()
    time.sleep(0.05)
    with pytest.raises(errors.NotFound):
        rig.ctl.start(sid)
    with pytest.raises(errors.NotFound):
        rig.ctl.update(sid, SandboxMetadata(sid, labels={"x": "y"}), "labels")
    t.join(2)
    assert_gone(rig, sid)


def test_concurrent_shutdowns_and_a_stop_all_succeed(rig: Rig) -> None:
    sid = running(rig)
    errs: list[BaseException] = []

    def call(fn: Callable[[], None]) -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - reported below
            errs.append(e)

    ts = [threading.Thread(target=call, args=(lambda: rig.ctl.shutdown(sid),)),
          threading.Thread(target=call, args=(lambda: rig.ctl.shutdown(sid),)),
          threading.Thread(target=call, args=(lambda: rig.ctl.stop(sid),))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(3)
    assert errs == []
    assert_gone(rig, sid)


# =========================================================================== exec
def test_exec_runs_in_the_guest_and_returns_its_result(rig: Rig) -> None:
    sid = running(rig)
    rig.guests.handler = lambda call: ExecResult(3, b"out:" + (call.stdin or b""), b"err")
    res = rig.ctl.exec(sid, ["sh", "-c", "x"], env={"K": "V"}, cwd="/tmp", stdin=b"in", timeout=7.5)
    assert res == ExecResult(3, b"out:in", b"err")
    call = rig.guests.execs[-1]
    assert (call.argv, call.env, call.cwd, call.stdin, call.timeout, call.in_guest_root) == (
        ("sh", "-c", "x"), {"K": "V"}, "/tmp", b"in", 7.5, False)


def test_exec_needs_a_running_sandbox(rig: Rig) -> None:
    created(rig)
    with pytest.raises(errors.FailedPrecondition):
        rig.ctl.exec("a", ["true"])
    rig.ctl.start("a")
    rig.ctl.stop("a")
    with pytest.raises(errors.FailedPrecondition):
        rig.ctl.exec("a", ["true"])
    with pytest.raises(errors.NotFound):
        rig.ctl.exec("nope", ["true"])


def test_exec_of_one_string_is_invalid_argument(rig: Rig) -> None:
    sid = running(rig)
    with pytest.raises(errors.InvalidArgument):
        rig.ctl.exec(sid, "ls -l")


def test_exec_reconnects_a_dropped_agent_connection(rig: Rig) -> None:
    sid = running(rig)
    for c in rig.guests.channels:
        c.close()  # the agent connection dropped (guest agent restarted)
    assert rig.ctl.exec(sid, ["true"]).exit_code == 0
    assert len(rig.guests.open_channels()) == 1


def test_exec_reports_an_agent_that_cannot_be_reached(rig: Rig) -> None:
    sid = running(rig)
    for c in rig.guests.channels:
        c.close()
    rig.guests.fp.fail("connect", errors.DeadlineExceeded("guest agent did not answer"))
    with pytest.raises(errors.DeadlineExceeded):
        rig.ctl.exec(sid, ["true"])
    assert rig.ctl.exec(sid, ["true"]).exit_code == 0  # and the next one reconnects


def test_exec_recovers_from_a_half_dead_agent_connection(rig: Rig) -> None:
    sid = running(rig)
    rig.guests.break_transport(rig.domain(sid).agent_socket)
    try:
        rig.ctl.exec(sid, ["true"])
    except errors.Unavailable:
        pass  # the call that meets the dead channel may fail; the next ones must not
    assert rig.ctl.exec(sid, ["true"]).exit_code == 0


# =========================================================================== update
def test_update_stores_the_named_fields(rig: Rig) -> None:
    sid = running(rig)
    ext = AnyMessage("example.com/Thing", b"\x01")
    rig.ctl.update(sid, SandboxMetadata(sid, labels={"team": "x"}, extensions={"thing": ext}, runtime=Runtime("io.vm"),
                                sandboxer="vmsandbox"), "labels", "extensions")
    info = verbose(rig, sid)
    assert json.loads(info["labels"]) == {"team": "x"} and info["extensions"] == "thing"
    assert rig.record(sid)["sandbox"]["runtime"]["name"] == ""  # not named: unchanged
    rig.ctl.update(sid, SandboxMetadata(sid, runtime=Runtime("io.vm"), labels={"team": "y"}), "runtime")
    rec = rig.record(sid)
    assert rec["sandbox"]["runtime"]["name"] == "io.vm" and rec["sandbox"]["labels"] == {"team": "x"}
    assert rec["sandbox"]["updated_at"] is not None


def test_update_with_no_fields_applies_every_updatable_one(rig: Rig) -> None:
    sid = created(rig)
    rig.ctl.update(sid, SandboxMetadata(sid, labels={"a": "1"}, sandboxer="other", spec=spec_with_annotations(k="v")))
    info = verbose(rig, sid)
    assert json.loads(info["labels"]) == {"a": "1"} and json.loads(info["annotations"]) == {"k": "v"}
    assert rig.record(sid)["sandbox"]["sandboxer"] == "other"


def test_update_takes_annotations_from_the_oci_spec(rig: Rig) -> None:
    sid = created(rig, annotations={"old": "1"})
    rig.ctl.update(sid, SandboxMetadata(sid, spec=spec_with_annotations(new="2")), "spec")
    assert json.loads(verbose(rig, sid)["annotations"]) == {"old": "1", "new": "2"}
    rig.ctl.update(sid, SandboxMetadata(sid, spec=AnyMessage("x", b"not json")), "spec")  # not JSON: no annotations in it
    assert json.loads(verbose(rig, sid)["annotations"]) == {"old": "1", "new": "2"}


def test_update_grows_and_shrinks_memory_within_the_boot_maximum(rig: Rig) -> None:
    sid = running(rig)  # 256 MiB, may grow to twice that
    rig.ctl.update(sid, SandboxMetadata(sid, spec=spec_with_annotations(**{"vmsandbox.io/memory-mib": "384"})), "spec")
    assert rig.domain(sid).memory_mib == 384 and verbose(rig, sid)["memory_mib"] == "384"
    assert from_any(rig.ctl.metrics(sid).data).memory.usage_limit == 384 * MiB
    rig.ctl.update(sid, SandboxMetadata(sid, labels={"vmsandbox.io/memory-mib": "192"}), "labels")
    assert rig.domain(sid).memory_mib == 192 and rig.record(sid)["memory_mib"] == 192


def test_update_through_cri_updated_resources(rig: Rig) -> None:
    sid = running(rig, options=pod_options(memory_bytes=200 * MiB))
    # What containerd's UpdatePodSandboxResources stores: Go's JSON of UpdatedResources.
    doc = {"Overhead": None, "Resources": {"memory_limit_in_bytes": 300 * MiB, "cpu_shares": 2}}
    rig.ctl.update(sid, SandboxMetadata(sid, extensions={"updated-resources": AnyMessage("x", json.dumps(doc).encode())}), "extensions")
    assert rig.domain(sid).memory_mib == 300 and verbose(rig, sid)["memory_mib"] == "300"


def cri_memory(sid: str, memory_bytes: int) -> SandboxMetadata:
    """An update as containerd's UpdatePodSandboxResources makes it (no overhead carried)."""
    doc = {"Overhead": None, "Resources": {"memory_limit_in_bytes": memory_bytes}}
    return SandboxMetadata(sid, extensions={"updated-resources": AnyMessage("io.containerd.cri.v1/UpdatedResources",
                                                                   json.dumps(doc).encode())})


def edit_record(rig: Rig, sid: str, edit: Callable[[dict[str, object]], None]) -> None:
    path = rig.sandbox_dir(sid) / "record.json"
    d = json.loads(path.read_text())
    edit(d)
    path.write_text(json.dumps(d))


def test_start_and_update_use_the_pod_config_recorded_at_create(rig: Rig) -> None:
    """Create decodes the PodSandboxConfig once into the record; the raw options are only kept
    (containerd may want them back), so later calls work even when they could not be decoded."""
    sid = created(rig, options=pod_options(memory_bytes=200 * MiB, overhead_bytes=56 * MiB))
    pod = rig.record(sid)["pod"]
    assert (pod["name"], pod["memory_limit_bytes"], pod["overhead_memory_limit_bytes"]) == ("web", 200 * MiB, 56 * MiB)
    edit_record(rig, sid, lambda d: d["options"].update(value="CgP///8="))  # type: ignore[attr-defined]
    rig.restart()
    rig.ctl.start(sid)
    rig.ctl.update(sid, cri_memory(sid, 300 * MiB), "extensions")
    assert rig.domain(sid).memory_mib == 356  # the pod's 300 MiB plus create's overhead
    assert rig.record(sid)["options"]["value"] == "CgP///8="


def test_a_record_from_before_the_typed_pod_config_is_sized_from_its_options(rig: Rig) -> None:
    sid = running(rig, options=pod_options(memory_bytes=200 * MiB, overhead_bytes=56 * MiB))
    edit_record(rig, sid, lambda d: [d.pop("pod"), d.pop("platform")])
    rig.restart()
    rig.ctl.update(sid, cri_memory(sid, 300 * MiB), "extensions")
    assert rig.domain(sid).memory_mib == 356
    assert rig.record(sid)["pod"]["overhead_memory_limit_bytes"] == 56 * MiB  # written typed from now on
    assert rig.ctl.platform(sid) == Platform("linux", "amd64")  # from the image manifest, as before


def test_update_ignores_what_it_does_not_size(rig: Rig) -> None:
    sid = running(rig)
    rig.ctl.update(sid, SandboxMetadata(sid, extensions={"updated-resources": AnyMessage("x", b'{"windows": {}}')}), "extensions")
    rig.ctl.update(sid, SandboxMetadata(sid), "spec")  # no spec at all: no annotations from it
    assert rig.domain(sid).memory_mib == 256 and verbose(rig, sid)["memory_mib"] == "256"


def test_update_beyond_the_boot_maximum_is_failed_precondition_and_changes_nothing(rig: Rig) -> None:
    sid = running(rig)
    before = rig.record(sid)
    with pytest.raises(errors.FailedPrecondition, match="512"):
        rig.ctl.update(sid, SandboxMetadata(sid, labels={"vmsandbox.io/memory-mib": "1024"}), "labels")
    assert rig.domain(sid).memory_mib == 256 and rig.record(sid) == before


def test_update_of_memory_while_not_running_is_failed_precondition(rig: Rig) -> None:
    sid = created(rig)
    with pytest.raises(errors.FailedPrecondition):
        rig.ctl.update(sid, SandboxMetadata(sid, labels={"vmsandbox.io/memory-mib": "300"}), "labels")
    assert verbose(rig, sid)["memory_mib"] == "256"


def test_update_of_vcpus_is_failed_precondition_unless_unchanged(rig: Rig) -> None:
    sid = running(rig, annotations={"vmsandbox.io/vcpus": "2"})
    with pytest.raises(errors.FailedPrecondition):
        rig.ctl.update(sid, SandboxMetadata(sid, labels={"vmsandbox.io/vcpus": "4"}), "labels")
    rig.ctl.update(sid, SandboxMetadata(sid, labels={"vmsandbox.io/vcpus": "2", "x": "y"}), "labels")
    assert json.loads(verbose(rig, sid)["labels"]) == {"vmsandbox.io/vcpus": "2", "x": "y"}


@pytest.mark.parametrize("sandbox, fields, cls", [
    pytest.param(SandboxMetadata("a"), ("id",), errors.InvalidArgument, id="unknown-field"),
    pytest.param(SandboxMetadata("a"), ("labels", "created_at"), errors.InvalidArgument, id="one-unknown-field"),
    pytest.param("a", ("labels",), errors.InvalidArgument, id="not-a-Sandbox"),
    pytest.param(SandboxMetadata("a", labels={"vmsandbox.io/memory-mib": "lots"}), ("labels",), errors.InvalidArgument,
                 id="bad-memory-label"),
    pytest.param(SandboxMetadata("a", extensions={"updated-resources": AnyMessage("x", b"{oops")}), ("extensions",),
                 errors.InvalidArgument, id="updated-resources-not-json"),
])
def test_a_bad_update_is_refused_and_changes_nothing(rig: Rig, sandbox: object, fields: tuple[str, ...],
                                                     cls: type[errors.VmSandboxError]) -> None:
    sid = running(rig)
    before = rig.record(sid)
    with pytest.raises(cls):
        rig.ctl.update(sid, sandbox, *fields)  # type: ignore[arg-type]
    assert rig.record(sid) == before
    with pytest.raises(errors.NotFound):
        rig.ctl.update("nope", SandboxMetadata("nope"))


def test_a_failing_memory_change_leaves_the_record_as_it_was(rig: Rig) -> None:
    sid = running(rig)
    before = rig.record(sid)
    rig.hv.fp.fail("set_memory", errors.Unavailable("libvirtd went away"))
    with pytest.raises(errors.Unavailable):
        rig.ctl.update(sid, SandboxMetadata(sid, labels={"vmsandbox.io/memory-mib": "300"}), "labels")
    assert rig.record(sid) == before


def test_a_failing_record_save_leaves_live_memory_as_it_was(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    from vmsandbox.sandbox.store import Store

    sid = running(rig)

    def full_disk(self: Store, record: object) -> None:
        raise errors.Internal("no space left on device")

    monkeypatch.setattr(Store, "save", full_disk)
    with pytest.raises(errors.Internal):
        rig.ctl.update(sid, SandboxMetadata(sid, labels={"vmsandbox.io/memory-mib": "300"}), "labels")
    monkeypatch.undo()
    assert rig.domain(sid).memory_mib == 256


# =========================================================================== status, metrics, list, platform
def test_status_of_a_created_sandbox(rig: Rig) -> None:
    sid = created(rig)
    st = rig.ctl.status(sid)
    assert (st.sandbox_id, st.state, st.pid, st.exited_at) == (sid, NOTREADY, 0, None)
    assert st.info == {"phase": "created", "domain": "vmsandbox-a", "virt_type": "qemu"}
    with pytest.raises(errors.NotFound):
        rig.ctl.status("nope")


def test_verbose_status_carries_the_details_and_cri_info_json(rig: Rig) -> None:
    sid = running(rig, netns=True, annotations={"k": "v"})
    info = verbose(rig, sid)
    assert info["libvirt_state"] == "running" and info["kernel_version"] == "6.1.0-fake"
    assert info["taps"] == ",".join(rig.net.tap_names(sid, 1)) and info["netns_path"] == rig.record(sid)["netns_path"]
    assert ET.fromstring(info["domain_xml"]).findtext("name") == "vmsandbox-a"
    cri = json.loads(info["info"])
    assert cri["pid"] == rig.domain(sid).pid and cri["vmsandbox"]["annotations"] == json.dumps({"k": "v"})
    assert "domain_xml" not in cri["vmsandbox"]
    rig.ctl.stop(sid)
    info = verbose(rig, sid)
    assert (info["exit_status"], info["libvirt_state"], info["libvirt_reason"]) == ("0", "shutoff", "shutdown")
    assert json.loads(info["info"])["vmsandbox"]["exit_status"] == "0"


def test_status_answers_from_the_record_while_libvirt_is_unreachable(rig: Rig) -> None:
    sid = running(rig)
    rig.hv.unreachable = True
    st = rig.ctl.status(sid, verbose=True)
    assert st.state == READY and st.info["phase"] == "running" and st.info["libvirt_state"] == "unreachable"
    assert "domain_xml" not in st.info and json.loads(st.info["info"])["pid"] == st.pid
    assert [r.id for r in rig.ctl.list()] == [sid]


def test_status_notices_an_exit_whose_event_was_lost(rig: Rig) -> None:
    sid = running(rig)
    rig.hv.events = "never"
    rig.hv.crash("vmsandbox-a")
    st = rig.ctl.status(sid)
    assert st.state == NOTREADY and st.exited_at is not None
    assert rig.ctl.wait(sid, timeout=0.1).exit_status == EXIT_FAILED


def test_status_survives_a_domain_xml_that_cannot_be_read(rig: Rig) -> None:
    sid = running(rig)
    rig.hv.fp.fail("xml", errors.NotFound("domain vanished"))
    info = verbose(rig, sid)
    assert info["libvirt_state"] == "running" and "domain_xml" not in info


def test_metrics_of_a_running_sandbox(rig: Rig) -> None:
    sid = running(rig, netns=True)
    m = rig.ctl.metrics(sid)
    assert m.id == sid and m.data.type_name == "io.containerd.cgroups.v2.Metrics"
    figures = from_any(m.data)
    assert figures.cpu.usage_usec == 5_000_000 and figures.memory.usage_limit == 256 * MiB
    net, = figures.network
    assert (net.name, net.rx_bytes, net.tx_bytes) == ("eth0", 2000, 1000)  # the guest's side of the tap
    # One entry per virtio disk (the config disk is vda), as the guest numbers them.
    assert [(d.major, d.minor, d.rbytes, d.wbytes) for d in figures.io] == [(254, 0, 4096, 8192)]


def test_metrics_of_a_sandbox_that_does_not_run_are_zero(rig: Rig) -> None:
    sid = created(rig, netns=True)
    figures = rig.ctl.resource_metrics(sid)
    assert (figures.cpu.usage_usec, figures.memory.usage_limit, figures.network) == (0, 0, ())
    with pytest.raises(errors.NotFound):
        rig.ctl.metrics("nope")


def test_metrics_of_many_sandboxes_at_once(rig: Rig) -> None:
    running(rig, "a")
    created(rig, "b")
    out = rig.ctl.resource_metrics_many(["a", "b"])
    assert out["a"].cpu.usage_usec == 5_000_000 and out["b"].cpu.usage_usec == 0
    assert rig.hv.fp.calls["stats"] == 1
    with pytest.raises(errors.NotFound):
        rig.ctl.resource_metrics_many(["a", "nope"])


def test_metrics_without_interface_counters_still_answer(rig: Rig) -> None:
    sid = running(rig, netns=True)
    rig.net.fp.fail("read_counters", errors.Unavailable("netns gone"))
    figures = rig.ctl.resource_metrics(sid)
    assert figures.network == () and figures.cpu.usage_usec == 5_000_000


def test_list_is_sorted_and_shows_each_phase(rig: Rig) -> None:
    running(rig, "c")
    created(rig, "a")
    running(rig, "b")
    rig.ctl.stop("b")
    rows = rig.ctl.list()
    assert [(r.id, r.phase, r.state) for r in rows] == [
        ("a", Phase.CREATED, SandboxState.NOTREADY), ("b", Phase.STOPPED, SandboxState.NOTREADY),
        ("c", Phase.RUNNING, SandboxState.READY)]
    assert rows[2].pid == rig.domain("c").pid and rows[1].exited_at is not None


def test_platform_comes_from_the_guest_image(rig: Rig) -> None:
    sid = created(rig)
    assert rig.ctl.platform(sid) == Platform("linux", "amd64")
    with pytest.raises(errors.NotFound):
        rig.ctl.platform("nope")


def test_the_platform_is_the_one_recorded_at_create(rig: Rig) -> None:
    sid = created(rig)
    assert rig.record(sid)["platform"] == {"os": "linux", "architecture": "amd64", "variant": "", "os_version": ""}
    (rig.images.dir / "manifest.json").write_text("{not json")
    rig.restart()
    assert rig.ctl.platform(sid) == Platform("linux", "amd64")


def test_an_unreadable_image_manifest_is_failed_precondition(rig: Rig) -> None:
    sid = created(rig)
    edit_record(rig, sid, lambda d: d.pop("platform"))  # a record from before the platform was kept
    (rig.images.dir / "manifest.json").write_text("{not json")
    rig.restart()
    with pytest.raises(errors.FailedPrecondition, match="manifest"):
        rig.ctl.platform(sid)


def test_the_console_log_is_read_whole_or_its_tail(rig: Rig) -> None:
    sid = created(rig)
    assert rig.ctl.read_console_log(sid) == b""  # before the first boot
    rig.ctl.console_log(sid).write_bytes(b"line one\nline two\n")
    assert rig.ctl.read_console_log(sid) == b"line one\nline two\n"
    assert rig.ctl.read_console_log(sid, 9) == b"line two\n"
    with pytest.raises(errors.NotFound):
        rig.ctl.read_console_log("nope")


def test_the_console_log_rotated_by_virtlogd_is_read_in_order_with_its_backups(rig: Rig) -> None:
    sid = created(rig)
    log = rig.ctl.console_log(sid)
    # virtlogd's rollover: console.log -> .0 -> .1 -> ... (the highest number is the oldest).
    Path(f"{log}.2").write_bytes(b"boot: Linux version\n")
    Path(f"{log}.1").write_bytes(b"boot: init started\n")
    Path(f"{log}.0").write_bytes(b"boot: agent ready\n")
    log.write_bytes(b"later\n")
    Path(f"{log}.old").write_bytes(b"not a backup\n")
    assert rig.ctl.read_console_log(sid) == (b"boot: Linux version\nboot: init started\nboot: agent ready\n"
                                             b"later\n")
    assert rig.ctl.read_console_log(sid, 10) == b"t ready\nlater\n"[-10:]  # a tail across a rotation
    assert rig.ctl.read_console_log(sid, 6) == b"later\n"
    assert rig.ctl.read_console_log(sid, 10_000) == rig.ctl.read_console_log(sid)


def test_the_guest_image_is_built_once(rig: Rig) -> None:
    created(rig, "a")
    created(rig, "b")
    assert rig.ctl.image() is rig.ctl.image() and rig.images.builds == 1


# =========================================================================== the controller itself
def test_close_keeps_sandboxes_running_and_is_idempotent(rig: Rig) -> None:
    sid = running(rig)
    rig.ctl.close()
    rig.ctl.close()
    assert rig.domain(sid).state is DomainState.RUNNING
    assert rig.guests.open_channels() == [] and rig.hv.closed
    assert state_dir_owner(rig.config.state_dir) is None  # ownership released


def test_the_first_controller_owns_the_state_dir(rig: Rig) -> None:
    assert rig.ctl.owner and state_dir_owner(rig.config.state_dir) == os.getpid()
    other = rig.new_controller()
    assert not other.owner
    other.close()
    assert state_dir_owner(rig.config.state_dir) == os.getpid()


def test_a_state_dir_without_a_lock_file_has_no_owner(tmp_path: Path) -> None:
    assert state_dir_owner(tmp_path) is None


def test_a_hypervisor_that_cannot_be_reached_at_start_up_releases_the_state_dir(rig: Rig) -> None:
    rig.ctl.close()

    def unreachable(on_stop: object, on_reconnect: object) -> object:
        raise errors.Unavailable("libvirtd does not answer")

    with pytest.raises(errors.Unavailable):
        SandboxController(rig.config, virt_type=rig.ctl.virt_type, hypervisor=unreachable,  # type: ignore[arg-type]
                          network=rig.net, guest=rig.guests, images=rig.images, mounts=rig.mounts)
    assert state_dir_owner(rig.config.state_dir) is None


def test_a_recovery_that_fails_releases_the_state_dir_and_the_connection(rig: Rig) -> None:
    rig.ctl.close()
    rig.hv.fp.fail("list_tagged", errors.Unavailable("libvirtd went away"))
    with pytest.raises(errors.Unavailable):
        rig.new_controller()
    assert state_dir_owner(rig.config.state_dir) is None and rig.hv.closed


def test_a_state_dir_qemu_cannot_traverse_is_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    with caplog.at_level("WARNING", logger="vmsandbox.sandbox"):
        r = Rig(private)
        r.close()
    assert "cannot traverse" in caplog.text and str(private) in caplog.text


def test_a_state_dir_that_already_exists_keeps_its_mode(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    r = Rig(tmp_path, state_dir=shared)
    r.close()
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777


def test_a_sandbox_being_created_is_not_visible_yet(rig: Rig) -> None:
    release = threading.Event()
    rig.hv.fp.hang("define", release)
    t = threading.Thread(target=lambda: rig.ctl.create(SandboxMetadata("a")))
    t.start()
    try:
        deadline = time.monotonic() + 2
        while rig.hv.fp.calls["define"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert rig.ctl.list() == []
        with pytest.raises(errors.NotFound):
            rig.ctl.status("a")
        with pytest.raises(errors.AlreadyExists):
            rig.ctl.create(SandboxMetadata("a"))
        rig.ctl.shutdown("a")  # nothing to do yet: succeeds
    finally:
        release.set()
        t.join(2)
    assert rig.ctl.status("a").state == NOTREADY


def test_sandboxes_do_not_wait_for_each_other(rig: Rig) -> None:
    running(rig, "slow")
    running(rig, "fast")
    release = threading.Event()
    rig.guests.fp.hang("exec", release)
    t = threading.Thread(target=lambda: rig.ctl.exec("slow", ["sleep", "1"]))
    t.start()
    try:
        time.sleep(0.05)
        _, took = timed(lambda: rig.ctl.stop("fast", timeout=0))
        assert took < 1.0 and rig.ctl.status("slow").state == READY
    finally:
        release.set()
        t.join(2)


def test_a_guest_with_another_host_key_fails_the_start_without_retries(rig: Rig) -> None:
    """A possible man in the middle: FailedPrecondition (containerd retries Unavailable)."""
    sid = created(rig)
    socket_path = rig.domain(sid).agent_socket
    rig.guests.host_keys[socket_path] = "ssh-ed25519 AAAAnotthepinnedkey"
    with pytest.raises(errors.FailedPrecondition, match="host key"):
        rig.ctl.start(sid)
    assert rig.leftovers(sid) == []
