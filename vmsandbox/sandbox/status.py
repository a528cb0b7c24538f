"""What the controller reports without changing anything: status (with the verbose info CRI
parses), platform, metrics, the list of sandboxes and console logs.

Answers come from the records; the hypervisor is asked for live details (and for an exit
whose event was missed), and when it is away the record is still the answer.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any as _Any

from ..payloads.cgroupsv2 import CgroupV2Metrics, to_any
from ..config import VirtType
from ..errors import FailedPrecondition, NotFound, Unavailable, VmSandboxError
from ..image import GuestImage
from ..model import ControllerInstance, ControllerStatus, Metric, Phase, Platform, SandboxState, SandboxSummary, utcnow
from ..network._model import InterfaceCounters
from .exits import Exits
from .metrics import from_domain_stats
from .ports import DomainState, Hypervisor, Network
from .registry import Registry
from .store import SandboxRecord, Store

__all__ = ["StatusView", "instance_of"]

log = logging.getLogger(__name__)


class StatusView:
    def __init__(self, registry: Registry, exits: Exits, hv: Hypervisor, network: Network, virt_type: VirtType) -> None:
        self._registry = registry
        self._exits = exits
        self._hv = hv
        self._net = network
        self._store: Store = registry.store
        self.virt_type = virt_type
        self._manifests: dict[str, dict[str, _Any]] = {}
        self._image_lock = threading.Lock()

    def status(self, sandbox_id: str, *, verbose: bool = False) -> ControllerStatus:
        """State, VMM pid and times of the sandbox (see Controller.status)."""
        e = self._registry.get(sandbox_id)
        try:
            self._exits.check(e)
        except Unavailable as err:  # libvirtd away: the record is still the best answer
            log.warning("sandbox %s: status from the record only: %s", sandbox_id, err)
        rec = e.record
        ready = rec.phase is Phase.RUNNING
        info: dict[str, str] = {"phase": rec.phase.value, "domain": rec.domain, "virt_type": self.virt_type.value}
        if verbose:
            info.update(self._verbose_info(rec))
        return ControllerStatus(
            sandbox_id=rec.id,
            pid=rec.pid if ready else 0,
            state=(SandboxState.READY if ready else SandboxState.NOTREADY).value,
            info=info,
            created_at=rec.started_at or rec.created_at,
            exited_at=rec.exited_at,
        )

    def _verbose_info(self, rec: SandboxRecord) -> dict[str, str]:
        sdir = self._store.dir(rec.id)
        out = {
            "console_log": str(sdir / "console.log"),
            "image": rec.image_dir,
            "kernel_version": self._manifest(rec.image_dir).get("kernel_version", ""),
            "vcpus": str(rec.vcpus),
            "memory_mib": str(rec.memory_mib),
            "netns_path": rec.netns_path,
            "taps": ",".join(rec.taps),
            "labels": json.dumps(rec.sandbox.labels, sort_keys=True),
            "annotations": json.dumps(rec.annotations, sort_keys=True),
            "extensions": ",".join(sorted(rec.sandbox.extensions)),
            "start": rec.start_path,
        }
        if rec.exit_status is not None:
            out["exit_status"] = str(rec.exit_status)
        try:
            info = self._hv.info(rec.domain)
        except Unavailable:
            info = None
            out["libvirt_state"] = "unreachable"
        if info is not None:
            out["libvirt_state"] = info.state.value
            if info.state is DomainState.SHUTOFF:
                out["libvirt_reason"] = info.stop_reason.value
            try:
                out["domain_xml"] = self._hv.xml(rec.domain)
            except (NotFound, Unavailable):
                pass
        # CRI parses info["info"] as JSON (its SandboxInfo shape; unknown keys are ignored).
        out["info"] = json.dumps({"pid": rec.pid, "vmsandbox": {k: v for k, v in out.items() if k != "domain_xml"}})
        return out

    def _manifest(self, image_dir: str) -> dict[str, _Any]:
        with self._image_lock:
            m = self._manifests.get(image_dir)
        if m is None:
            try:
                m = json.loads((Path(image_dir) / "manifest.json").read_text())
            except (OSError, ValueError) as err:
                raise FailedPrecondition(f"guest image manifest in {image_dir} is unreadable: {err}") from err
            with self._image_lock:
                self._manifests[image_dir] = m
        return m

    def platform(self, sandbox_id: str) -> Platform:
        """The guest's OS/architecture in OCI names, recorded at create (a record from before
        that has the image manifest read, once)."""
        rec = self._registry.get(sandbox_id).record
        if rec.platform is not None:
            return rec.platform
        return GuestImage("", Path(rec.image_dir), self._manifest(rec.image_dir)).platform

    def resource_metrics(self, sandbox_id: str) -> CgroupV2Metrics:
        """The sandbox's figures as a typed object (what :meth:`metrics` encodes).

        One libvirt stats call plus netns counters; no guest round trip. A sandbox that is
        not running reports zeros.
        """
        return self.resource_metrics_many([sandbox_id])[sandbox_id]

    def resource_metrics_many(self, sandbox_ids: Iterable[str]) -> dict[str, CgroupV2Metrics]:
        """Figures of many sandboxes with one bulk libvirt stats call. Raises NotFound."""
        recs = [self._registry.get(sid).record for sid in sandbox_ids]
        running = [r.domain for r in recs if r.phase is Phase.RUNNING]
        stats = self._hv.stats(running) if running else {}
        out = {}
        for rec in recs:
            st = stats.get(rec.domain, {})
            limit = rec.memory_mib * 1024 * 1024 if st else 0
            out[rec.id] = from_domain_stats(st, self._tap_counters(rec), limit_bytes=limit)
        return out

    def _tap_counters(self, rec: SandboxRecord) -> list[tuple[str, InterfaceCounters]]:
        if rec.phase is not Phase.RUNNING or not rec.taps or rec.network is None:
            return []
        plan = rec.network
        assert plan is not None
        try:
            counters = self._net.read_counters(rec.netns_path, list(rec.taps))
        except VmSandboxError as err:
            log.warning("sandbox %s: reading interface counters failed: %s", rec.id, err)
            return []
        return [(i.name, counters[t]) for t, i in zip(rec.taps, plan.interfaces) if t in counters]

    def metrics(self, sandbox_id: str) -> Metric:
        """containerd's Metric: an Any of ``io.containerd.cgroups.v2.Metrics`` (bare URL)."""
        return Metric(utcnow(), sandbox_id, to_any(self.resource_metrics(sandbox_id)))

    def list(self) -> list[SandboxSummary]:
        """Every sandbox this controller knows, sorted by id."""
        out = []
        for e in self._registry.visible():
            r = e.record
            out.append(SandboxSummary(
                id=r.id,
                phase=r.phase,
                state=SandboxState.READY if r.phase is Phase.RUNNING else SandboxState.NOTREADY,
                pid=r.pid,
                created_at=r.created_at,
                exited_at=r.exited_at,
            ))
        return out

    def console_log(self, sandbox_id: str) -> Path:
        """The file the guest's console is written to."""
        return self._store.dir(self._registry.get(sandbox_id).record.id) / "console.log"

    def read_console_log(self, sandbox_id: str, max_bytes: int = 0) -> bytes:
        """The console log's last ``max_bytes`` bytes (all when 0; empty before the first boot).

        With the backups virtlogd rotated out (``console.log.N``, the highest N the oldest)
        before the live file, so the boot stays readable after the guest wrote more than
        virtlogd's max_size. A snapshot: output rotated while it reads may be missed.
        """
        return _read_tail(_rotated_files(self.console_log(sandbox_id)), max_bytes)


def _rotated_files(log: Path) -> list[Path]:
    """``log``'s rotated backups, oldest first, then ``log`` itself."""
    try:
        names = os.listdir(log.parent)
    except FileNotFoundError:
        return [log]
    prefix = log.name + "."
    backups = sorted((int(n[len(prefix):]), n) for n in names if n.startswith(prefix) and n[len(prefix):].isdigit())
    return [log.parent / n for _, n in reversed(backups)] + [log]


def _read_tail(files: list[Path], max_bytes: int) -> bytes:
    parts: list[bytes] = []
    left = max_bytes if max_bytes > 0 else -1
    for path in reversed(files):  # newest first, until max_bytes are collected
        try:
            with open(path, "rb") as f:
                if left >= 0:
                    f.seek(max(0, f.seek(0, os.SEEK_END) - left))
                data = f.read()
        except FileNotFoundError:
            continue  # rotated away meanwhile, or no boot yet
        parts.append(data)
        if left >= 0:
            left -= len(data)
            if left <= 0:
                break
    return b"".join(reversed(parts))


def instance_of(rec: SandboxRecord) -> ControllerInstance:
    """What Start returns for a running sandbox (no task API endpoint yet)."""
    return ControllerInstance(
        sandbox_id=rec.id,
        pid=rec.pid,
        created_at=rec.started_at or rec.created_at,
        address="",
        version=0,
        labels={"vmsandbox.io/domain": rec.domain},
    )
