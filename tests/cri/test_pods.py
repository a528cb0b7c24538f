"""Kubernetes' pod path through a real containerd: CRI RunPodSandbox with the ``vmsandbox``
runtime handler, CNI from containerd, `vmsandbox serve` as containerd's sandbox proxy plugin.

What a user of the node would check: the pod is READY with its CNI address, the guest holds
that address and answers ICMP and TCP from the node, hostname and DNS are the pod's, the CLI
on the node can look inside the pod, and removing the pod leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from tests.cri.conftest import Pods
from tests.cri.harness import RUNTIME_HANDLER, Containerd
from tests.serve import Serve
from vmsandbox.network import TAP_PREFIX
from vmsandbox.proto.k8s.runtime.v1 import api_pb2 as cri

pytestmark = pytest.mark.integration
READY, NOTREADY = cri.SANDBOX_READY, cri.SANDBOX_NOTREADY


def verbose_info(pods: Pods, pod_id: str) -> dict[str, object]:
    info = pods.status(pod_id, verbose=True).info
    assert "info" in info, info
    doc: dict[str, object] = json.loads(info["info"])  # CRI itself must have parsed it too
    return doc


def guest(serve: Serve, pod_id: str, *argv: str) -> str:
    """`vmsandbox exec POD -- ARGV` on the node, through the server that owns the state dir."""
    done = serve.cli("exec", pod_id, "--", *argv)
    assert done.returncode == 0, (argv, done.stdout, done.stderr)
    return done.stdout


def links_named(ctd: Containerd, prefix: str) -> list[str]:
    out = []
    for args in (["ip", "-j", "link", "show"], ["ip", "-n", ctd.node_ns, "-j", "link", "show"]):
        done = subprocess.run(args, capture_output=True, text=True, check=True)
        out += [link["ifname"] for link in json.loads(done.stdout) if link["ifname"].startswith(prefix)]
    return out


def ip_leases(ctd: Containerd) -> list[str]:
    store = ctd.root / "cni" / "ipam"
    return sorted(p.name for p in store.rglob("*") if p.is_file() and p.name[0].isdigit())


def assert_gone(pods: Pods, serve: Serve, pod_id: str, *, netns: str, taps: list[str]) -> None:
    """Nothing of the pod is left: no sandbox, domain, state folder, netns, tap or lease."""
    from vmsandbox.sandbox.controller import DOMAIN_PREFIX

    listed = pods.ctd.runtime().ListPodSandbox(cri.ListPodSandboxRequest(), timeout=30).items
    assert pod_id not in [p.id for p in listed]
    assert not (serve.state_dir / "sandboxes" / pod_id).exists()
    virsh = subprocess.run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"],
                                         capture_output=True, text=True, check=True).stdout.split()
    assert DOMAIN_PREFIX + pod_id not in virsh
    assert not os.path.exists(netns)
    assert not [t for t in links_named(pods.ctd, TAP_PREFIX) if t in taps]


def test_a_pod_runs_in_a_vm_with_its_network_hostname_and_dns(pods: Pods, serve: Serve, containerd: Containerd) -> None:
    config = pods.config(
        "web",
        hostname="web-0",
        dns_config=cri.DNSConfig(servers=["10.96.0.10"], searches=["vsbxt.svc.cluster.local"], options=["ndots:5"]),
        labels={"app": "web", "tier": "front"},
        annotations={"example.com/owner": "vsbxt"},
    )
    pod_id = pods.run(config)
    status = pods.status(pod_id, verbose=True).status
    assert status.state == READY
    assert status.runtime_handler == RUNTIME_HANDLER
    assert status.metadata.name == "web" and status.labels["app"] == "web"
    assert status.annotations["example.com/owner"] == "vsbxt"
    ip = status.network.ip
    assert ip.startswith(containerd.subnet + "."), status
    info = verbose_info(pods, pod_id)
    vm = info["vmsandbox"]
    assert isinstance(vm, dict) and vm["libvirt_state"] == "running" and int(str(info["pid"])) > 0

    # The guest holds the pod's address; the node reaches it (ICMP, TCP) and it reaches back.
    assert f"inet {ip}/24" in guest(serve, pod_id, "ip", "-4", "addr", "show")
    assert containerd.in_node("busybox", "ping", "-c", "3", "-W", "5", ip).returncode == 0
    assert guest(serve, pod_id, "ping", "-c", "2", "-W", "5", f"{containerd.subnet}.1") is not None
    guest(serve, pod_id, "sh", "-c", "mkdir -p /tmp/www && echo hello-from-the-pod > /tmp/www/index.html")
    guest(serve, pod_id, "httpd", "-p", "8080", "-h", "/tmp/www")
    got = containerd.in_node(sys.executable, "-c", "import urllib.request; print(urllib.request.urlopen("
                             f"'http://{ip}:8080/index.html', timeout=20).read().decode())")
    assert got.stdout.strip() == "hello-from-the-pod"

    # Hostname and resolv.conf are the pod's.
    assert guest(serve, pod_id, "hostname").strip() == "web-0"
    resolv = guest(serve, pod_id, "cat", "/etc/resolv.conf")
    assert "nameserver 10.96.0.10" in resolv and "search vsbxt.svc.cluster.local" in resolv
    assert "options ndots:5" in resolv

    # The CLI on the node sees the pod through the server.
    listed = json.loads(serve.cli("--json", "list").stdout)
    assert pod_id in [row["id"] for row in listed]
    logs = serve.cli("logs", pod_id)
    assert logs.returncode == 0 and logs.stdout == (serve.state_dir / "sandboxes" / pod_id / "console.log").read_text()


def test_list_pod_sandbox_filters(pods: Pods) -> None:
    a = pods.run(pods.config("filt-a", labels={"group": "vsbxt-filters", "pick": "yes"}))
    b = pods.run(pods.config("filt-b", labels={"group": "vsbxt-filters", "pick": "no"}))
    rt = pods.ctd.runtime()

    def ids(**filt: object) -> set[str]:
        req = cri.ListPodSandboxRequest(filter=cri.PodSandboxFilter(**filt))  # type: ignore[arg-type]
        return {p.id for p in rt.ListPodSandbox(req, timeout=30).items}

    assert ids(label_selector={"group": "vsbxt-filters"}) == {a, b}
    assert ids(label_selector={"group": "vsbxt-filters", "pick": "yes"}) == {a}
    assert ids(id=b) == {b}
    pods.stop(b)
    ready = ids(label_selector={"group": "vsbxt-filters"}, state=cri.PodSandboxStateValue(state=READY))
    notready = ids(label_selector={"group": "vsbxt-filters"}, state=cri.PodSandboxStateValue(state=NOTREADY))
    assert ready == {a} and notready == {b}


def test_stats_as_far_as_this_containerd_gives_them(pods: Pods, serve: Serve) -> None:
    pod_id = pods.run(pods.config("stats"))
    rt = pods.ctd.runtime()
    major_minor = tuple(int(x) for x in pods.ctd.bins.version.split("+")[0].split(".")[:2])
    if major_minor >= (2, 4):
        st = rt.PodSandboxStats(cri.PodSandboxStatsRequest(pod_sandbox_id=pod_id), timeout=60).stats
        assert st.attributes.id == pod_id
        assert st.linux.cpu.usage_core_nano_seconds.value > 0
        assert st.linux.memory.working_set_bytes.value > 0
    else:
        # containerd 2.1-2.3 read pod stats from a task (there is none yet), not the controller.
        with pytest.raises(grpc.RpcError) as err:
            rt.PodSandboxStats(cri.PodSandboxStatsRequest(pod_sandbox_id=pod_id), timeout=60)
        assert err.value.code() in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INTERNAL)
    # The controller's own figures are there for any version, through the CLI.
    done = serve.cli("metrics", pod_id)
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout)
    assert figures["cpu"]["usage_usec"] > 0 and figures["memory"]["usage"] > 0


def test_stop_and_remove_leave_nothing_behind(pods: Pods, serve: Serve, containerd: Containerd) -> None:
    leases_before = ip_leases(containerd)
    pod_id = pods.run(pods.config("gone"))
    vm = verbose_info(pods, pod_id)["vmsandbox"]
    assert isinstance(vm, dict)
    netns, taps = str(vm["netns_path"]), str(vm["taps"]).split(",")
    assert os.path.exists(netns) and taps and len(ip_leases(containerd)) == len(leases_before) + 1
    pods.stop(pod_id)
    assert pods.status(pod_id).status.state == NOTREADY
    pods.stop(pod_id)  # twice is fine
    pods.remove(pod_id)
    pods.remove(pod_id)  # and so is removing twice
    assert_gone(pods, serve, pod_id, netns=netns, taps=taps)
    assert ip_leases(containerd) == leases_before


def test_a_pod_too_big_for_the_host_is_refused_and_leaves_nothing(pods: Pods, serve: Serve,
                                                                  containerd: Containerd) -> None:
    """512 GiB is refused at Create: QEMU would start it (shared memfd RAM is not refused by
    the kernel's overcommit heuristic) and the host would OOM later. A failed Start's own
    clean-up is tested at the controller (tests/integration/test_network_guest.py)."""
    leases_before = ip_leases(containerd)
    sandboxes_before = set(os.listdir(serve.state_dir / "sandboxes"))
    taps_before = links_named(containerd, TAP_PREFIX)
    config = pods.config("toobig", annotations={"vmsandbox.io/memory-mib": str(512 * 1024)})
    with pytest.raises(grpc.RpcError) as err:
        pods.run(config)
    details = err.value.details() or ""
    assert "memory of 524288 MiB is more than this host's" in details, details
    assert set(os.listdir(serve.state_dir / "sandboxes")) == sandboxes_before
    listed = containerd.runtime().ListPodSandbox(cri.ListPodSandboxRequest(), timeout=30).items
    assert "toobig" not in [p.metadata.name for p in listed]
    assert {row["id"] for row in json.loads(serve.cli("--json", "list").stdout)} <= sandboxes_before
    assert ip_leases(containerd) == leases_before
    assert links_named(containerd, TAP_PREFIX) == taps_before
    assert [n for n in os.listdir(containerd.root / "state/io.containerd.grpc.v1.cri/netns")] == []


def test_the_cli_on_the_node_goes_through_the_server(pods: Pods, serve: Serve) -> None:
    pod_id = pods.run(pods.config("admin"))
    done = serve.cli("exec", pod_id, "--", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert (done.returncode, done.stdout, done.stderr) == (3, "out\n", "err\n")
    assert serve.cli("exec", "--stdin", pod_id, "--", "cat", stdin=b"piped").stdout == "piped"
    st = json.loads(serve.cli("--json", "status", pod_id).stdout)
    assert st["state"] == "SANDBOX_READY" and st["pid"] > 0
    assert json.loads(serve.cli("--json", "platform", pod_id).stdout)["os"] == "linux"
    refused = serve.cli("create", "vsbxt-cli-refused")
    assert refused.returncode == 1 and "owned by process" in refused.stderr
    assert not (serve.state_dir / "sandboxes" / "vsbxt-cli-refused").exists()
    missing = serve.cli("exec", "vsbxt-no-such-pod", "--", "true")
    assert missing.returncode == 1 and "NotFound" in missing.stderr
    # Stop from the CLI: CRI sees the pod NOTREADY, and the admin's wait returns.
    assert serve.cli("stop", "--timeout", "5", pod_id).returncode == 0
    assert json.loads(serve.cli("--json", "wait", pod_id).stdout)["exit_status"] in (0, 137)
    assert pods.status(pod_id).status.state == NOTREADY


def _status_once_reconnected(pods: Pods, pod_id: str, within: float = 90.0) -> cri.PodSandboxStatusResponse:
    """PodSandboxStatus after serve came back. containerd's dialer retries a missing socket
    until its timeout and gRPC then backs off, so calls made while serve was away leave the
    proxy connection failing fast ("dial ...: timeout") for a while after serve is back."""
    deadline = time.monotonic() + within
    while True:
        try:
            return pods.status(pod_id)
        except grpc.RpcError as err:
            if err.code() is not grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def test_a_pod_survives_restarts_of_containerd_and_of_serve(pods: Pods, serve: Serve, containerd: Containerd) -> None:
    pod_id = pods.run(pods.config("survivor"))
    pid = verbose_info(pods, pod_id)["pid"]
    containerd.restart()
    assert pods.status(pod_id).status.state == READY
    serve.stop()
    serve.start()
    assert _status_once_reconnected(pods, pod_id).status.state == READY
    assert verbose_info(pods, pod_id)["pid"] == pid  # the same VM, not a new one
    assert guest(serve, pod_id, "true") == ""
    vm = verbose_info(pods, pod_id)["vmsandbox"]
    assert isinstance(vm, dict)
    pods.stop(pod_id)
    pods.remove(pod_id)
    assert_gone(pods, serve, pod_id, netns=str(vm["netns_path"]), taps=str(vm["taps"]).split(","))


def test_fifty_pods_in_a_row_and_five_at_once(pods: Pods, serve: Serve, containerd: Containerd) -> None:
    """Half of these failed before (pyroute2's forked netns child died in the threaded server)."""
    leases_before = ip_leases(containerd)
    t0 = time.monotonic()
    for i in range(50):
        pod_id = pods.run(pods.config(f"seq-{i}"))
        assert pods.status(pod_id).status.state == READY, i
        pods.stop(pod_id)
        pods.remove(pod_id)
    serial = time.monotonic() - t0
    with ThreadPoolExecutor(max_workers=5) as pool:
        ids = list(pool.map(lambda i: pods.run(pods.config(f"par-{i}")), range(5)))
    assert [pods.status(p).status.state for p in ids] == [READY] * 5
    ips = {pods.status(p).status.network.ip for p in ids}
    assert len(ips) == 5
    for p in ids:
        assert guest(serve, p, "true") == ""
    with ThreadPoolExecutor(max_workers=5) as pool:
        list(pool.map(lambda p: (pods.stop(p), pods.remove(p)), ids))
    assert ip_leases(containerd) == leases_before
    assert not [d for d in os.listdir(serve.state_dir / "sandboxes") if d in ids]
    print(f"50 pods in a row: {serial:.0f}s ({serial / 50:.1f}s each: run, status, stop, remove)")


def test_doctor_checks_the_containerd_side(serve: Serve, containerd: Containerd) -> None:
    from tests.cri.harness import PAUSE_IMAGE

    def doctor(*extra: str) -> tuple[int, dict[str, dict[str, object]]]:
        done = serve.cli("--json", "doctor", "--containerd", str(containerd.socket), *extra)
        return done.returncode, {c["name"]: c for c in json.loads(done.stdout)["checks"]}

    code, checks = doctor("--pause-image", PAUSE_IMAGE)
    assert checks["containerd"]["ok"] and containerd.bins.version.split("+")[0] in str(checks["containerd"]["detail"])
    assert checks["proxy plugin"]["ok"], checks["proxy plugin"]
    assert checks["runtime handler"]["ok"] and RUNTIME_HANDLER in str(checks["runtime handler"]["detail"])
    assert checks["pause image"]["ok"] and "present" in str(checks["pause image"]["detail"])
    code, checks = doctor("--sandboxer", "nosuch", "--pause-image", "localhost/vsbxt/none:0")
    assert code == 1
    assert not checks["proxy plugin"]["ok"] and "vmsandbox" in str(checks["proxy plugin"]["detail"])
    assert not checks["runtime handler"]["ok"]
    assert "missing" in str(checks["pause image"]["detail"])
    # Nothing listens there: one clear failure, no traceback.
    done = serve.cli("--json", "doctor", "--containerd", str(containerd.root / "no-such.sock"))
    checks = {c["name"]: c for c in json.loads(done.stdout)["checks"]}
    assert done.returncode == 1 and not checks["containerd"]["ok"]
    assert "no CRI answer" in str(checks["containerd"]["detail"])
