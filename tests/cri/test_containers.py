"""Containers of a vmsandbox pod run inside its VM, driven through CRI as the kubelet does."""

from __future__ import annotations

import fcntl
import os
import select
import struct
import subprocess
import termios
import time
from pathlib import Path

import pytest

from tests.cri.conftest import Pods
from tests.cri.harness import BUSYBOX_IMAGE, Containerd
from tests.cri.test_pods import _status_once_reconnected, guest
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


def _started(pods: Pods, containerd: Containerd, name: str, command: list[str],
             **kw: bool) -> tuple[cri.PodSandboxConfig, str, str]:
    """A new pod with one started busybox container logging to ``<name>.log``: (config, pod, container)."""
    cfg = pods.config(name)
    pod = pods.run(cfg)
    rt = containerd.runtime()
    ccfg = cri.ContainerConfig(metadata=cri.ContainerMetadata(name=name), image=cri.ImageSpec(image=BUSYBOX_IMAGE),
                               command=command, log_path=f"{name}.log", **kw)
    cid = rt.CreateContainer(cri.CreateContainerRequest(pod_sandbox_id=pod, config=ccfg, sandbox_config=cfg),
                             timeout=120).container_id
    rt.StartContainer(cri.StartContainerRequest(container_id=cid), timeout=120)
    return cfg, pod, cid


def test_a_container_runs_in_the_pods_guest_and_its_output_reaches_cris_log(
        pods: Pods, serve: Serve, containerd: Containerd) -> None:
    cfg, pod, cid = _started(pods, containerd, "hello", ["sh", "-c", "uname -r; echo to-stderr >&2; exec sleep 1000"])
    rt = containerd.runtime()
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


def test_a_running_container_survives_restarts_of_serve_and_of_containerd(
        pods: Pods, serve: Serve, containerd: Containerd) -> None:
    cfg = pods.config("keep")
    pod = pods.run(cfg)
    ccfg = cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name="ticker"), image=cri.ImageSpec(image=BUSYBOX_IMAGE),
        command=["sh", "-c", "i=0; while true; do echo tick$i; i=$((i+1)); sleep 0.5; done"], log_path="ticker.log")
    cid = containerd.runtime().CreateContainer(cri.CreateContainerRequest(pod_sandbox_id=pod, config=ccfg, sandbox_config=cfg),
                             timeout=120).container_id
    containerd.runtime().StartContainer(cri.StartContainerRequest(container_id=cid), timeout=120)
    log = Path(cfg.log_directory) / "ticker.log"

    def ticks_after(restart: object) -> None:
        before = len(_log_lines(log, 2))
        restart()  # type: ignore[operator]
        assert _status_once_reconnected(pods, pod).status.state == cri.SANDBOX_READY
        state = containerd.runtime().ContainerStatus(cri.ContainerStatusRequest(container_id=cid), timeout=60).status.state
        assert state == cri.CONTAINER_RUNNING
        lines = _log_lines(log, before + 6)
        assert len(lines) >= before + 6, lines[-3:]  # the log gets what it wrote after the restart
        texts = [line.split(" ", 3)[3] for line in lines]
        assert texts == [f"tick{i}" for i in range(len(texts))]  # no tick lost or twice

    def restart_serve() -> None:
        serve.stop()
        serve.start()

    ticks_after(restart_serve)
    ticks_after(containerd.restart)
    containerd.runtime().StopContainer(cri.StopContainerRequest(container_id=cid, timeout=2), timeout=120)
    status = containerd.runtime().ContainerStatus(cri.ContainerStatusRequest(container_id=cid), timeout=60).status
    assert (status.state, status.exit_code in (137, 143)) == (cri.CONTAINER_EXITED, True)
    containerd.runtime().RemoveContainer(cri.RemoveContainerRequest(container_id=cid), timeout=120)
    sdir = serve.state_dir / "sandboxes" / pod
    assert not (sdir / "shared").exists() or list((sdir / "shared").iterdir()) == []
    assert not (sdir / "tasks").exists() or list((sdir / "tasks").iterdir()) == []
    assert not _processes_named(f"vsbx-hold-{cid}")  # the FIFO holder went with the container
    pods.stop(pod)
    pods.remove(pod)
    assert not sdir.exists()
    assert not _processes_named("relay.py", pod)  # and the task socket's relay with the pod


def _processes_named(*words: str) -> list[int]:
    found = []
    for d in os.listdir("/proc"):
        try:
            argv = Path("/proc", d, "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if d.isdigit() and all(w in argv for w in words):
            found.append(int(d))
    return found


def _on_a_pty(argv: list[str], rows: int, cols: int, typed: bytes = b"", timeout: float = 180) -> tuple[int, bytes]:
    """Run argv with a pty of the given size as its controlling terminal (a user's shell);
    ``typed`` is typed once the output shows a prompt (``# ``)."""
    master, slave = os.openpty()
    fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    p = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                         preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
    os.close(slave)
    out = bytearray()
    end = time.monotonic() + timeout
    try:
        while time.monotonic() < end:
            r, _, _ = select.select([master], [], [], 0.5)
            if r:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: every slave end closed
                    break
                if not chunk:
                    break
                out += chunk
                if typed and b"# " in out:
                    os.write(master, typed)
                    typed = b""
            elif p.poll() is not None:
                break
        return p.wait(30), bytes(out)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
        os.close(master)


def test_a_tty_container_logs_its_terminal_and_a_tty_exec_sees_the_users_terminal_size(
        pods: Pods, serve: Serve, containerd: Containerd) -> None:
    cfg, _, cid = _started(pods, containerd, "term", ["sh", "-c", "tty; echo on-the-terminal >&2; exec sleep 1000"],
                           tty=True, stdin=True)
    rt = containerd.runtime()
    lines = _log_lines(Path(cfg.log_directory) / "term.log", 2)
    streams = [(line.split(" ", 3)[1], line.split(" ", 3)[3].rstrip("\r")) for line in lines]
    assert streams[:2] == [("stdout", "/dev/pts/0"), ("stdout", "on-the-terminal")], lines  # one stream

    code, out = _on_a_pty([str(containerd.bins.ctr), "--address", str(containerd.socket), "-n", "k8s.io", "tasks",
                           "exec", "--tty", "--fifo-dir", str(containerd.root / "fifo"), "--exec-id", "tty-exec", cid,
                           "sh", "-c", "tty; stty size; exit 4"], rows=33, cols=111)
    assert code == 4, out
    assert b"/dev/pts/" in out and b"33 111" in out, out
    code, out = _on_a_pty([str(containerd.bins.ctr), "--address", str(containerd.socket), "-n", "k8s.io", "tasks",
                           "exec", "--tty", "--fifo-dir", str(containerd.root / "fifo"), "--exec-id", "tty-sh", cid,
                           "sh"], rows=24, cols=80, typed=b"echo typed-$((6*7)); exit 6\r")
    assert code == 6 and b"typed-42" in out, out  # the user's keys reach an interactive shell through containerd

    r = rt.ExecSync(cri.ExecSyncRequest(container_id=cid, cmd=["sh", "-c", "echo no-tty; tty"],
                                        timeout=60), timeout=120)
    assert (r.exit_code, r.stdout) == (1, b"no-tty\nnot a tty\n"), r  # ExecSync has no terminal
    rt.StopContainer(cri.StopContainerRequest(container_id=cid, timeout=2), timeout=120)
    rt.RemoveContainer(cri.RemoveContainerRequest(container_id=cid), timeout=120)
