"""`vmsandbox serve` on a real libvirtd, driven over gRPC as containerd would drive it.

The client is built from our protos; the server is the real CLI in a subprocess (ended by
its own PID). Covers every rpc, error codes, 20 concurrent Waits, and a SIGTERM that leaves
the sandbox running for the next server to recover.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.conftest import unique
from tests.serve import Serve as Server
from vmsandbox.proto.cgroups.v2 import metrics_pb2
from vmsandbox.proto.containerd.services.sandbox.v1 import sandbox_pb2 as api
from vmsandbox.proto.containerd.services.sandbox.v1 import sandbox_pb2_grpc as api_grpc
from vmsandbox.proto.containerd.types import sandbox_pb2 as types
from vmsandbox.proto.k8s.runtime.v1 import api_pb2 as cri

pytestmark = pytest.mark.integration
SANDBOXER = "vmsandbox"


@pytest.fixture
def server(test_root: Path) -> Iterator[Server]:
    d = test_root / unique("serve")
    d.mkdir()
    os.chmod(d, 0o711)
    srv = Server(d / "state", d / "vmsandbox.sock")
    (d / "state").mkdir()
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
        # Whatever a test left, remove it through a fresh controller on the same state dir.
        from vmsandbox import LibvirtController

        with LibvirtController(state_dir=srv.state_dir) as c:
            for row in c.list():
                c.shutdown(row.id)
        from tests.conftest import assert_no_domains_left

        assert_no_domains_left(srv.state_dir)


def stub(srv: Server) -> api_grpc.ControllerStub:
    channel = grpc.insecure_channel(f"unix://{srv.socket}")
    return api_grpc.ControllerStub(channel)


def pod_config_any(name: str):  # type: ignore[no-untyped-def]
    from google.protobuf import any_pb2

    cfg = cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name=name, uid="uid-1", namespace="default", attempt=0),
        hostname="grpc-pod",
        dns_config=cri.DNSConfig(servers=["10.96.0.10"], searches=["default.svc.cluster.local"], options=["ndots:5"]),
        labels={"app": "demo"},
        linux=cri.LinuxPodSandboxConfig(
            resources=cri.LinuxContainerResources(memory_limit_in_bytes=192 * 1024 * 1024),
        ),
    )
    return any_pb2.Any(type_url="runtime.v1.PodSandboxConfig", value=cfg.SerializeToString())


def code_of(call, *args) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as exc:
        call(*args, timeout=60)
    return exc.value.code()  # type: ignore[no-any-return]


def test_every_rpc_against_a_real_guest(server: Server) -> None:
    c = stub(server)
    sid = unique("grpc")
    sandbox = types.Sandbox(sandbox_id=sid, runtime=types.Sandbox.Runtime(name="io.containerd.vmsandbox.v1"),
                            labels={"name": sid}, sandboxer=SANDBOXER)
    c.Create(api.ControllerCreateRequest(sandbox_id=sid, options=pod_config_any(sid), sandbox=sandbox,
                                         sandboxer=SANDBOXER), timeout=120)
    assert code_of(c.Create, api.ControllerCreateRequest(sandbox_id=sid, sandboxer=SANDBOXER)) == grpc.StatusCode.ALREADY_EXISTS

    st = c.Status(api.ControllerStatusRequest(sandbox_id=sid, sandboxer=SANDBOXER), timeout=30)
    assert st.state == "SANDBOX_NOTREADY"

    started = c.Start(api.ControllerStartRequest(sandbox_id=sid, sandboxer=SANDBOXER), timeout=180)
    assert started.pid > 0 and started.created_at.seconds > 0
    st = c.Status(api.ControllerStatusRequest(sandbox_id=sid, verbose=True, sandboxer=SANDBOXER), timeout=30)
    assert st.state == "SANDBOX_READY" and st.pid == started.pid
    assert "guest=vmsandbox-" + sid in open(f"/proc/{st.pid}/cmdline").read().replace("\0", " ")
    import json

    assert json.loads(st.info["info"])["pid"] == st.pid
    assert st.info["memory_mib"] == "192"  # from the PodSandboxConfig's linux.resources

    plat = c.Platform(api.ControllerPlatformRequest(sandbox_id=sid, sandboxer=SANDBOXER), timeout=30).platform
    assert plat.os == "linux" and plat.architecture in ("amd64", "arm64")

    m = c.Metrics(api.ControllerMetricsRequest(sandbox_id=sid, sandboxer=SANDBOXER), timeout=30).metrics
    assert m.data.type_url == "io.containerd.cgroups.v2.Metrics"
    decoded = metrics_pb2.Metrics()
    decoded.ParseFromString(m.data.value)
    assert decoded.cpu.usage_usec > 0 and decoded.memory.usage_limit == 192 * 1024 * 1024

    # The guest got the pod's hostname and DNS. The guest's agent channel takes one host
    # connection at a time, so look with our Python API while the server is down.
    from vmsandbox import LibvirtController

    assert server.stop() == 0
    with LibvirtController(state_dir=server.state_dir) as direct:
        assert direct.exec(sid, ["hostname"]).stdout.decode().strip() == "grpc-pod"
        resolv = direct.exec(sid, ["cat", "/etc/resolv.conf"]).stdout.decode()
        assert "nameserver 10.96.0.10" in resolv and "ndots:5" in resolv
    server.start()
    c = stub(server)

    c.Update(api.ControllerUpdateRequest(sandbox_id=sid, sandbox=types.Sandbox(sandbox_id=sid, labels={"tier": "x"}),
                                         fields=["labels"]), timeout=30)
    st = c.Status(api.ControllerStatusRequest(sandbox_id=sid, verbose=True, sandboxer=SANDBOXER), timeout=30)
    assert json.loads(st.info["labels"]) == {"tier": "x"}
    assert code_of(c.Update, api.ControllerUpdateRequest(sandbox_id=sid, fields=["nope"])) == grpc.StatusCode.INVALID_ARGUMENT

    before = time.time()
    c.Stop(api.ControllerStopRequest(sandbox_id=sid, timeout_secs=0, sandboxer=SANDBOXER), timeout=60)
    w = c.Wait(api.ControllerWaitRequest(sandbox_id=sid, sandboxer=SANDBOXER), timeout=60)
    assert w.exit_status == 0
    assert before - 1 <= w.exited_at.seconds <= time.time() + 1
    c.Shutdown(api.ControllerShutdownRequest(sandbox_id=sid, sandboxer=SANDBOXER), timeout=60)
    c.Shutdown(api.ControllerShutdownRequest(sandbox_id=sid, sandboxer=SANDBOXER), timeout=60)
    c.Stop(api.ControllerStopRequest(sandbox_id=sid, sandboxer=SANDBOXER), timeout=60)
    assert code_of(c.Status, api.ControllerStatusRequest(sandbox_id=sid)) == grpc.StatusCode.NOT_FOUND
    assert code_of(c.Wait, api.ControllerWaitRequest(sandbox_id=sid)) == grpc.StatusCode.NOT_FOUND
    assert code_of(c.Create, api.ControllerCreateRequest(sandbox_id="../etc")) == grpc.StatusCode.INVALID_ARGUMENT
    bad_mount = api.ControllerCreateRequest(sandbox_id=unique("badmount"))
    bad_mount.rootfs.add(type="ext4", source="/nonexistent/disk.img")
    assert code_of(c.Create, bad_mount) == grpc.StatusCode.INVALID_ARGUMENT
    assert not (server.state_dir / "sandboxes" / sid).exists()


def test_twenty_waiters_released_and_sigterm_keeps_sandboxes(server: Server) -> None:
    c = stub(server)
    sid = unique("wait")
    c.Create(api.ControllerCreateRequest(sandbox_id=sid, sandboxer=SANDBOXER), timeout=120)
    c.Start(api.ControllerStartRequest(sandbox_id=sid, sandboxer=SANDBOXER), timeout=180)

    # SIGTERM: the server goes, its socket goes, the guest keeps running.
    assert server.stop() == 0
    assert not server.socket.exists()
    out = subprocess.run(["virsh", "-c", "qemu:///system", "domstate", f"vmsandbox-{sid}"],
                         capture_output=True, text=True)
    assert out.stdout.strip() == "running"

    # A new server recovers it.
    server.start()
    c = stub(server)
    st = c.Status(api.ControllerStatusRequest(sandbox_id=sid, sandboxer=SANDBOXER), timeout=30)
    assert st.state == "SANDBOX_READY"

    results: list[object] = []
    lock = threading.Lock()

    def waiter() -> None:
        try:
            r = c.Wait(api.ControllerWaitRequest(sandbox_id=sid, sandboxer=SANDBOXER), timeout=120)
            with lock:
                results.append(r.exit_status)
        except grpc.RpcError as e:
            with lock:
                results.append(e)

    threads = [threading.Thread(target=waiter) for _ in range(20)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    assert results == []  # all still waiting
    c.Stop(api.ControllerStopRequest(sandbox_id=sid, timeout_secs=5, sandboxer=SANDBOXER), timeout=60)
    for t in threads:
        t.join(timeout=30)
    assert results == [0] * 20
    c.Shutdown(api.ControllerShutdownRequest(sandbox_id=sid, sandboxer=SANDBOXER), timeout=60)
