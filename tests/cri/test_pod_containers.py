"""A pod's containers as a user of the node sees them through CRI: two containers in one
guest, their logs, localhost and pod-IP traffic, ExecSync timeouts, pids, graceful and forced
stops, a guest that dies under them, and nothing left once they and the pod are removed.

Two pods in all (a pod boot costs ~6-10 s under TCG): one for the life of two healthy
containers, one whose QEMU is killed.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from tests.cri.conftest import Pods
from tests.cri.harness import BUSYBOX_IMAGE, Containerd
from tests.cri.test_containers import _log_lines
from tests.cri.test_pods import assert_gone, guest, verbose_info
from tests.serve import Serve
from vmsandbox.proto.k8s.runtime.v1 import api_pb2 as cri
from vmsandbox.proto.k8s.runtime.v1 import api_pb2_grpc as cri_grpc

pytestmark = pytest.mark.integration
RUNNING, EXITED = cri.CONTAINER_RUNNING, cri.CONTAINER_EXITED

# The web container: serves a page on 8080, says so on stdout and stderr, and on SIGTERM
# writes "got TERM" and exits 0. ``wait`` returns at once when a trapped signal arrives.
WEB = ("mkdir -p /www && echo hello-from-web > /www/index.html; echo web-out; echo web-err >&2; "
       "trap 'echo got TERM; exit 0' TERM; httpd -f -p 8080 -h /www & while true; do sleep 1 & wait $!; done")
# The client container ignores SIGTERM (its children inherit SIG_IGN): only SIGKILL ends it.
CLIENT = "echo client-out; echo client-err >&2; trap '' TERM; while true; do sleep 1; done"


def create_started(rt: cri_grpc.RuntimeServiceStub, pod: str, cfg: cri.PodSandboxConfig, name: str, script: str) -> str:
    ccfg = cri.ContainerConfig(metadata=cri.ContainerMetadata(name=name), image=cri.ImageSpec(image=BUSYBOX_IMAGE),
                               command=["sh", "-c", script], log_path=f"{name}.log")
    cid = str(rt.CreateContainer(cri.CreateContainerRequest(pod_sandbox_id=pod, config=ccfg, sandbox_config=cfg),
                                 timeout=120).container_id)
    rt.StartContainer(cri.StartContainerRequest(container_id=cid), timeout=120)
    return cid


def status_of(ctd: Containerd, cid: str) -> cri.ContainerStatus:
    return ctd.runtime().ContainerStatus(cri.ContainerStatusRequest(container_id=cid), timeout=60).status


def container_pid(ctd: Containerd, cid: str) -> int:
    info = ctd.runtime().ContainerStatus(cri.ContainerStatusRequest(container_id=cid, verbose=True), timeout=60).info
    return int(json.loads(info["info"])["pid"])


def streams(path: Path, want: int) -> list[tuple[str, str]]:
    """(stream, text) of each line of a CRI log ("<time> <stream> <P|F> <text>")."""
    return [(f[1], f[3]) for f in (line.split(" ", 3) for line in _log_lines(path, want))]


def guest_ps(serve: Serve, pod: str) -> list[str]:
    """The guest's process list, one "<pid> <args>" per process (busybox ps)."""
    return [line.strip() for line in guest(serve, pod, "ps", "-o", "pid,args").splitlines()[1:]]


def fds_of(pid: int) -> list[str]:
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return out


def mounts_under(root: Path) -> list[str]:
    prefix = str(root.resolve())
    with open("/proc/self/mountinfo") as f:
        return [p for p in (line.split()[4] for line in f) if p == prefix or p.startswith(prefix + "/")]


def until(what: str, check: Callable[[], bool], timeout: float) -> None:
    end = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < end, f"{what}: not within {timeout}s"
        time.sleep(0.5)


def test_two_containers_in_one_pod_network_exec_stop_and_remove(pods: Pods, serve: Serve,
                                                                 containerd: Containerd) -> None:
    cfg = pods.config("duo", hostname="duo-0",
                      dns_config=cri.DNSConfig(servers=["10.96.0.10"], searches=["vsbxt.svc.cluster.local"]))
    pod = pods.run(cfg)
    rt = containerd.runtime()
    web = create_started(rt, pod, cfg, "web", WEB)
    client = create_started(rt, pod, cfg, "client", CLIENT)

    # Both RUNNING, listed as such in the pod, each one's log holds what it wrote.
    listed = rt.ListContainers(cri.ListContainersRequest(filter=cri.ContainerFilter(pod_sandbox_id=pod)), timeout=60)
    assert {(c.id, c.state) for c in listed.containers} == {(web, RUNNING), (client, RUNNING)}
    logs = Path(cfg.log_directory)
    assert sorted(streams(logs / "web.log", 2)) == [("stderr", "web-err"), ("stdout", "web-out")]
    assert sorted(streams(logs / "client.log", 2)) == [("stderr", "client-err"), ("stdout", "client-out")]

    # Pids: containerd's task Pids (ctr tasks ps -> our Pids rpc) name the container's guest
    # init, and in the guest that pid is the container's shell.
    for cid, marker in ((web, "hello-from-web"), (client, "client-out")):
        pid = container_pid(containerd, cid)
        ps = containerd.ctr("tasks", "ps", cid).split()
        assert ps[:2] == ["PID", "INFO"] and int(ps[2]) == pid, ps
        cmdline = guest(serve, pod, "cat", f"/proc/{pid}/cmdline").split("\0")
        assert cmdline[:2] == ["sh", "-c"] and marker in cmdline[2], cmdline
    cgroups = guest(serve, pod, "find", "/sys/fs/cgroup", "-type", "d")
    assert web in cgroups and client in cgroups  # so that their absence below means something
    assert serve.proc is not None
    assert [f for f in fds_of(serve.proc.pid) if web in f and f.endswith("-stdout")]  # CRI's FIFO, held by serve

    # The pod's hostname, hosts and DNS settings are what its containers see.
    r = rt.ExecSync(cri.ExecSyncRequest(container_id=client, cmd=[
        "sh", "-c", "hostname; cat /etc/hosts /etc/resolv.conf"], timeout=60), timeout=120)
    out = r.stdout.decode()
    assert r.exit_code == 0 and out.startswith("duo-0\n"), (r.exit_code, out, r.stderr)
    assert "127.0.0.1 localhost" in out and " duo-0" in out, out
    assert "nameserver 10.96.0.10" in out and "search vsbxt.svc.cluster.local" in out, out

    # The web server is reached from the other container over localhost...
    def fetch_in_client(host: str) -> cri.ExecSyncResponse:
        return rt.ExecSync(cri.ExecSyncRequest(container_id=client, cmd=[
            "wget", "-O", "-", f"http://{host}:8080/index.html"], timeout=60), timeout=120)

    end = time.monotonic() + 30
    while (r := fetch_in_client("127.0.0.1")).exit_code != 0 and time.monotonic() < end:
        time.sleep(0.5)
    assert (r.exit_code, r.stdout) == (0, b"hello-from-web\n"), (r, (logs / "web.log").read_text(),
                                                                 guest_ps(serve, pod))
    # ...and from a peer on the node's side of the CNI bridge, at the pod IP.
    ip = pods.status(pod).status.network.ip
    assert ip.startswith(containerd.subnet + ".")
    got = containerd.in_node(sys.executable, "-c", "import urllib.request; print(urllib.request.urlopen("
                             f"'http://{ip}:8080/index.html', timeout=20).read().decode(), end='')")
    assert got.stdout == "hello-from-web\n"

    # ExecSync that outlives its timeout: an error (not an exit code) soon after 2 s; the
    # exec's guest process is gone, the container still RUNNING and the next exec works.
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        rt.ExecSync(cri.ExecSyncRequest(container_id=client, cmd=["sleep", "61"], timeout=2), timeout=120)
    took = time.monotonic() - t0
    assert err.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED, (err.value.code(), err.value.details())
    assert 2 <= took < 20, took
    assert not [p for p in guest_ps(serve, pod) if "sleep 61" in p]
    assert status_of(containerd, client).state == RUNNING
    r = rt.ExecSync(cri.ExecSyncRequest(container_id=client, cmd=["sh", "-c", "echo again"], timeout=30), timeout=120)
    assert (r.exit_code, r.stdout) == (0, b"again\n")

    # StopContainer: SIGTERM first (web traps it: "got TERM", exit 0, well before the grace
    # period), SIGKILL after the grace period for the client, which ignores SIGTERM.
    log_from = containerd.log.stat().st_size
    t0 = time.monotonic()
    rt.StopContainer(cri.StopContainerRequest(container_id=web, timeout=30), timeout=120)
    assert time.monotonic() - t0 < 20
    st = status_of(containerd, web)
    assert (st.state, st.exit_code) == (EXITED, 0), st
    assert ("stdout", "got TERM") in streams(logs / "web.log", 3)
    t0 = time.monotonic()
    rt.StopContainer(cri.StopContainerRequest(container_id=client, timeout=3), timeout=120)
    took = time.monotonic() - t0
    st = status_of(containerd, client)
    assert (st.state, st.exit_code) == (EXITED, 137), st
    assert took >= 3, took
    assert st.finished_at >= st.started_at > 0

    # Kill once the process is gone: NotFound. containerd's exit handling already sent one
    # (Kill(9, all) before Delete) and took it in its stride: no error about either container.
    with pytest.raises(AssertionError, match="not found"):
        containerd.ctr("tasks", "kill", "-s", "SIGKILL", client)
    assert status_of(containerd, client).state == EXITED
    errors = [line for line in containerd.log.read_bytes()[log_from:].decode(errors="replace").splitlines()
              if "level=error" in line and (web in line or client in line)]
    assert not errors, errors

    # RemoveContainer: nothing of either container stays in the guest, on the host's
    # mounts, or open in serve (its FIFOs).
    vm = verbose_info(pods, pod)["vmsandbox"]
    assert isinstance(vm, dict)
    for cid in (web, client):
        rt.RemoveContainer(cri.RemoveContainerRequest(container_id=cid), timeout=120)
    # A process on its way out is no leak: allow it 5 s (once seen: a `crun delete --force`
    # of one of them still listed right after RemoveContainer, not reproduced since).
    end = time.monotonic() + 5
    while (left := [p for p in guest_ps(serve, pod) if any(w in p for w in ("httpd", "sleep", "crun", "wait"))]) \
            and time.monotonic() < end:
        time.sleep(0.5)
    assert not left, (left, guest(serve, pod, "ps", "-o", "pid,ppid,stat,args"))
    sandbox_dir = serve.state_dir / "sandboxes" / pod
    assert not [m for m in mounts_under(sandbox_dir) if web in m or client in m]
    assert not [f for f in fds_of(serve.proc.pid) if web in f or client in f]
    cgroups = guest(serve, pod, "find", "/sys/fs/cgroup", "-type", "d")
    assert web not in cgroups and client not in cgroups

    # RemovePodSandbox: no mount, socket, domain, tap, netns or state folder.
    run_dir = Path(serve.env["VMSANDBOX_RUN_DIR"])
    assert (run_dir / pod / "task.sock").exists()
    pods.stop(pod)
    pods.remove(pod)
    assert_gone(pods, serve, pod, netns=str(vm["netns_path"]), taps=str(vm["taps"]).split(","))
    assert not mounts_under(sandbox_dir)
    assert not (run_dir / pod).exists()
    assert not [f for f in fds_of(serve.proc.pid) if pod in f]


def qemu_pid_of(pod: str) -> int:
    from vmsandbox.hypervisor.pidfile import qemu_pid
    from vmsandbox.sandbox.exits import DOMAIN_PREFIX

    pid = qemu_pid("qemu:///system", DOMAIN_PREFIX + pod)
    assert pid > 0, f"no QEMU pid for the domain of {pod}"
    return pid


def test_a_guest_that_dies_ends_every_container_and_the_pod_still_goes(pods: Pods, serve: Serve,
                                                                       containerd: Containerd) -> None:
    cfg = pods.config("doomed")
    pod = pods.run(cfg)
    rt = containerd.runtime()
    cids = [create_started(rt, pod, cfg, f"c{i}", f"echo c{i}; exec sleep 1000") for i in range(2)]
    assert [status_of(containerd, c).state for c in cids] == [RUNNING, RUNNING]
    vm = verbose_info(pods, pod)["vmsandbox"]
    assert isinstance(vm, dict)

    pid = qemu_pid_of(pod)
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    until("every container EXITED after QEMU died",
          lambda: all(status_of(containerd, c).state == EXITED for c in cids), 60)
    print(f"containers EXITED {time.monotonic() - t0:.1f}s after QEMU was killed")
    for c in cids:
        st = status_of(containerd, c)
        assert st.exit_code == 255 and st.finished_at > 0, st
    assert pods.status(pod).status.state == cri.SANDBOX_NOTREADY

    for c in cids:
        rt.RemoveContainer(cri.RemoveContainerRequest(container_id=c), timeout=120)
    pods.stop(pod)
    pods.remove(pod)
    assert_gone(pods, serve, pod, netns=str(vm["netns_path"]), taps=str(vm["taps"]).split(","))
    assert not mounts_under(serve.state_dir / "sandboxes" / pod)
    assert not (Path(serve.env["VMSANDBOX_RUN_DIR"]) / pod).exists()
    assert serve.proc is not None
    assert not [f for f in fds_of(serve.proc.pid) if any(c in f for c in cids)]
