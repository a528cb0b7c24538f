"""Container start latency through CRI: a private containerd (:mod:`.node`) whose runtime
handler ``vmsandbox`` is a `vmsandbox serve` process, driven as the kubelet drives it.

Per sample (one pod each, after ``warmup`` discarded ones), host ``time.monotonic()``:

* ``pod_to_running``: RunPodSandbox sent -> the first container's StartContainer returned
  (CreateContainer + StartContainer right after the pod is READY; CRI's StartContainer
  returns once the task API's Start answered, the container RUNNING). Split into
  ``run_pod`` (RunPodSandbox alone) and ``first_create``/``first_start``.
* ``create_start``: a second container in the same, warm pod: CreateContainer +
  StartContainer alone (no VM boot in it).
* ``exec_sync``: ``ExecSync(["true"])`` in the first container, ``execs`` times per pod.
* ``stop_remove``: StopPodSandbox + RemovePodSandbox (containers are stopped by CRI).

Everything is named with the bench's prefix and removed at the end; containerd and serve
keep all their state under one temp folder (see :mod:`.node`).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vmsandbox.proto.k8s.runtime.v1 import api_pb2 as cri

from .host import say
from .node import BUSYBOX_IMAGE, PAUSE_IMAGE, RUNTIME_HANDLER, Containerd, Serve, find_binaries
from .oci import busybox_image_tar
from .stats import summarize

__all__ = ["CriSection", "CRI_FIGURES"]

#: The figures of a sample, in the order the report and the plot show them.
CRI_FIGURES = ("pod_to_running", "run_pod", "first_create", "first_start", "create_start", "exec_sync",
               "stop_remove")
_TIMEOUT = 300.0


class CriSection:
    """Owns the private containerd and serve of the CRI section; :meth:`cleanup` always."""

    def __init__(self, prefix: str, provision: Callable[[Path], None]) -> None:
        self.prefix = prefix
        self.root = Path(tempfile.mkdtemp(prefix=f"{prefix}-cri-", dir="/var/tmp"))
        self.root.chmod(0o711)
        self.run_dir = Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir="/run"))  # short: task sockets
        state = self.root / "state"
        state.mkdir()
        provision(state)
        # serve publishes task events to our containerd (Containerd.socket), never the host's.
        events_to = self.root / "containerd" / "containerd.sock"
        self.serve = Serve(state, self.root / "vmsandbox.sock",
                           env={"VMSANDBOX_RUN_DIR": str(self.run_dir), "VMSANDBOX_CONTAINERD_ADDRESS": str(events_to)})
        self.ctd: Containerd | None = None
        self.pods: list[str] = []

    def start(self) -> str:
        """Start serve and containerd, import the busybox image; containerd's version."""
        self.serve.start()
        self.ctd = Containerd(find_binaries(), self.root / "containerd", self.serve.socket, prefix=self.prefix)
        self.ctd.prepare()
        self.ctd.start()
        self.ctd.import_image(busybox_image_tar(self.root / "busybox.tar", [BUSYBOX_IMAGE, PAUSE_IMAGE]))
        return self.ctd.bins.version

    def _pod_config(self, i: int) -> cri.PodSandboxConfig:
        logs = self.root / "logs" / str(i)
        logs.mkdir(parents=True, exist_ok=True)
        return cri.PodSandboxConfig(
            metadata=cri.PodSandboxMetadata(name=f"{self.prefix}-{i}", uid=f"{self.prefix}-{i}", namespace=self.prefix),
            hostname=f"bench-{i}", log_directory=str(logs), linux=cri.LinuxPodSandboxConfig())

    def sample(self, i: int, execs: int) -> dict[str, Any]:
        """One pod: run it, start two containers, ExecSync ``execs`` times, stop and remove it."""
        assert self.ctd is not None
        rt = self.ctd.runtime()
        cfg = self._pod_config(i)
        t0 = time.monotonic()
        pod = str(rt.RunPodSandbox(cri.RunPodSandboxRequest(config=cfg, runtime_handler=RUNTIME_HANDLER),
                                   timeout=_TIMEOUT).pod_sandbox_id)
        self.pods.append(pod)
        t_pod = time.monotonic()

        def container(name: str) -> tuple[str, float, float]:
            ccfg = cri.ContainerConfig(metadata=cri.ContainerMetadata(name=name), image=cri.ImageSpec(image=BUSYBOX_IMAGE),
                                       command=["sleep", "1000000"], log_path=f"{name}.log")
            a = time.monotonic()
            cid = str(rt.CreateContainer(cri.CreateContainerRequest(pod_sandbox_id=pod, config=ccfg, sandbox_config=cfg),
                                         timeout=_TIMEOUT).container_id)
            b = time.monotonic()
            rt.StartContainer(cri.StartContainerRequest(container_id=cid), timeout=_TIMEOUT)
            return cid, (b - a) * 1000, (time.monotonic() - b) * 1000

        first, create_ms, start_ms = container("first")
        t_running = time.monotonic()
        state = rt.ContainerStatus(cri.ContainerStatusRequest(container_id=first), timeout=60).status.state
        if state != cri.CONTAINER_RUNNING:
            raise RuntimeError(f"the first container of pod {pod} is {cri.ContainerState.Name(state)}, not RUNNING")
        _, c2, s2 = container("second")
        exec_ms = []
        for _ in range(execs):
            a = time.monotonic()
            r = rt.ExecSync(cri.ExecSyncRequest(container_id=first, cmd=["true"], timeout=60), timeout=_TIMEOUT)
            exec_ms.append((time.monotonic() - a) * 1000)
            if r.exit_code != 0:
                raise RuntimeError(f"ExecSync true exited {r.exit_code}: {r.stderr!r}")
        a = time.monotonic()
        rt.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=_TIMEOUT)
        rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=_TIMEOUT)
        self.pods.remove(pod)
        return {"pod_to_running": (t_running - t0) * 1000, "run_pod": (t_pod - t0) * 1000,
                "first_create": create_ms, "first_start": start_ms, "create_start": c2 + s2,
                "exec_sync_ms": exec_ms, "stop_remove": (time.monotonic() - a) * 1000}

    def run(self, samples: int, warmup: int, execs: int) -> dict[str, Any]:
        version = self.start()
        kept = []
        for i in range(warmup + samples):
            s = self.sample(i, execs)
            say(f"cri pod {i + 1}/{warmup + samples}: first container RUNNING after {s['pod_to_running']:.0f} ms"
                f"{' (warm-up)' if i < warmup else ''}")
            if i >= warmup:
                kept.append(s)
        figures = {k: summarize(s[k] for s in kept) for k in CRI_FIGURES if k != "exec_sync"}
        figures["exec_sync"] = summarize(x for s in kept for x in s["exec_sync_ms"])
        return {"n": samples, "warmup": warmup, "execs_per_pod": execs, "containerd": version,
                "figures_ms": figures, "samples": kept}

    def cleanup(self) -> list[str]:
        """Stop and remove what is left, stop containerd and serve; problems found."""
        problems: list[str] = []
        if self.ctd is not None:
            rt = self.ctd.runtime()
            for pod in list(self.pods):
                try:
                    rt.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=_TIMEOUT)
                    rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=_TIMEOUT)
                except Exception as e:  # noqa: BLE001 - keep cleaning
                    problems.append(f"pod {pod}: {e}")
            left = self.ctd.cleanup()
            if left:
                problems.append(f"CNI results left: {left}")
        if self.serve.proc is not None:
            self.serve.stop()
        from vmsandbox import LibvirtController

        with LibvirtController(state_dir=self.serve.state_dir) as c:
            for row in c.list():
                problems.append(f"sandbox {row.id} left; shutting it down")
                c.shutdown(row.id)
        shutil.rmtree(self.run_dir, ignore_errors=True)
        shutil.rmtree(self.root, ignore_errors=True)
        return problems
