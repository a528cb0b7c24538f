"""Fixtures of the CRI tier: one private containerd and one `vmsandbox serve` per session.

Tests talk to containerd through CRI exactly as the kubelet does (RunPodSandbox with a
runtime handler, CNI from containerd); nothing calls the controller directly. Every pod a
test starts is stopped and removed at the end, and the session checks that nothing it made
is left behind (domains, state folders, taps, pod namespaces, host-local IP leases).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.conftest import IN_CI, assert_no_domains_left
from tests.cri.harness import BUSYBOX_IMAGE, PAUSE_IMAGE, RUNTIME_HANDLER, Containerd, find_binaries
from tests.serve import Serve
from tests.cri.oci import busybox_image_tar
from vmsandbox.proto.k8s.runtime.v1 import api_pb2 as cri

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def cri_root(test_root: Path) -> Path:
    d = test_root / f"cri-{secrets.token_hex(3)}"
    d.mkdir()
    os.chmod(d, 0o711)
    return d


@pytest.fixture(scope="session")
def serve(cri_root: Path) -> Iterator[Serve]:
    state = cri_root / "state"
    state.mkdir()
    # The sandboxes' task sockets: a short private folder (the socket path limit is 106 bytes).
    run_dir = Path(tempfile.mkdtemp(prefix="vsbxt-run-", dir="/run"))
    # containerd's socket (tests/cri/harness.py Containerd.socket): serve publishes the task
    # events there; containerd starts after serve, so the first ones may find nobody.
    events_to = cri_root / "containerd" / "containerd.sock"
    srv = Serve(state, cri_root / "vmsandbox.sock",
                env={"VMSANDBOX_RUN_DIR": str(run_dir), "VMSANDBOX_CONTAINERD_ADDRESS": str(events_to)})
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
        from vmsandbox import LibvirtController

        with LibvirtController(state_dir=state) as c:
            left = [row.id for row in c.list()]
            for sid in left:
                c.shutdown(sid)
        assert_no_domains_left(state)
        assert not left, f"sandboxes left after the CRI tests: {left}"


@pytest.fixture(scope="session")
def containerd(serve: Serve, cri_root: Path) -> Iterator[Containerd]:
    try:
        bins = find_binaries()
    except RuntimeError as e:
        if IN_CI:
            pytest.fail(f"no containerd to test against in CI: {e}")
        pytest.skip(str(e))
    ctd = Containerd(bins, cri_root / "containerd", serve.socket)
    host_taps_before = host_taps()
    host_paths = {p: os.path.exists(p) for p in HOST_PATHS}
    ctd.prepare()
    try:
        ctd.start()
        tar = busybox_image_tar(cri_root / "busybox.tar", [BUSYBOX_IMAGE, PAUSE_IMAGE])
        ctd.import_image(tar)
        yield ctd
    finally:
        netns_left = os.listdir(ctd.root / "state/io.containerd.grpc.v1.cri/netns") if (
            ctd.root / "state/io.containerd.grpc.v1.cri/netns").is_dir() else []
        cni_left = ctd.cleanup()
        shutil.rmtree(ctd.root, ignore_errors=True)
        assert not cni_left, f"CNI results left (CNI DEL never ran): {cni_left}"
        assert not netns_left, f"pod network namespaces left: {netns_left}"
        assert host_taps() == host_taps_before, "taps left in the host namespace"
        assert {p: os.path.exists(p) for p in HOST_PATHS} == host_paths, "containerd or CNI wrote outside its folder"


# Where a containerd or CNI with default settings would write: the private one must not.
HOST_PATHS = ("/run/containerd", "/var/lib/containerd", "/etc/cni", "/var/lib/cni", "/opt/cni", "/etc/containerd")


def host_taps() -> list[str]:
    from vmsandbox.network import TAP_PREFIX

    out = subprocess.run(["ip", "-o", "link", "show", "type", "tun"], capture_output=True, text=True, check=True).stdout
    return sorted(n for n in (line.split(":")[1].strip() for line in out.splitlines()) if n.startswith(TAP_PREFIX))


class Pods:
    """Runs pods through CRI and removes every one of them at the end."""

    def __init__(self, ctd: Containerd, log_root: Path) -> None:
        self.ctd, self.log_root = ctd, log_root
        self.ids: list[str] = []

    def config(self, name: str, **kw: object) -> cri.PodSandboxConfig:
        uid = secrets.token_hex(8)
        logs = self.log_root / uid
        logs.mkdir(parents=True, exist_ok=True)
        base: dict[str, object] = dict(
            metadata=cri.PodSandboxMetadata(name=name, uid=uid, namespace="vsbxt", attempt=0),
            hostname=name,
            log_directory=str(logs),
            linux=cri.LinuxPodSandboxConfig(),
        )
        base.update(kw)
        return cri.PodSandboxConfig(**base)  # type: ignore[arg-type]

    def run(self, config: cri.PodSandboxConfig, timeout: float = 240) -> str:
        resp = self.ctd.runtime().RunPodSandbox(
            cri.RunPodSandboxRequest(config=config, runtime_handler=RUNTIME_HANDLER), timeout=timeout)
        self.ids.append(resp.pod_sandbox_id)
        return str(resp.pod_sandbox_id)

    def status(self, pod_id: str, verbose: bool = False) -> cri.PodSandboxStatusResponse:
        return self.ctd.runtime().PodSandboxStatus(
            cri.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=verbose), timeout=60)

    def stop(self, pod_id: str) -> None:
        self.ctd.runtime().StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=120)

    def remove(self, pod_id: str) -> None:
        self.ctd.runtime().RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=120)

    def cleanup(self) -> None:
        for pod_id in self.ids:
            try:
                self.stop(pod_id)
                self.remove(pod_id)
            except grpc.RpcError as e:
                if e.code() is not grpc.StatusCode.NOT_FOUND:
                    raise


@pytest.fixture
def pods(containerd: Containerd, cri_root: Path) -> Iterator[Pods]:
    p = Pods(containerd, cri_root / "logs")
    try:
        yield p
    finally:
        p.cleanup()
