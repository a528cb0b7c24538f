"""Put a sandbox's VMM into the pod's cgroup (PodSandboxConfig.linux.cgroup_parent).

Both kubelet cgroup drivers are understood: a cgroupfs path (``/kubepods/burstable/pod1``)
and a systemd slice name (``kubepods-burstable-pod1.slice``, which lives at
``kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice``). The process is
moved into every mounted hierarchy (cgroup v1 controllers, or the v2 unified tree) where that
cgroup already exists; we never create cgroups, that is the kubelet's job.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import InvalidArgument

__all__ = ["cgroup_relpath", "place_process", "libvirt_partition", "CGROUP_ROOT", "SYSTEMD_RUN"]

log = logging.getLogger(__name__)
CGROUP_ROOT = Path("/sys/fs/cgroup")
SYSTEMD_RUN = Path("/run/systemd/system")  # exists when systemd is init (sd_booted)


def cgroup_relpath(parent: str) -> str:
    """The path of ``parent`` below a hierarchy's root; InvalidArgument if it is unsafe."""
    if any(part == ".." for part in parent.split("/")) or "\0" in parent or "\n" in parent:
        raise InvalidArgument(f"cgroup parent {parent!r} is not a safe cgroup path")
    if "/" not in parent and parent.endswith(".slice"):
        name = parent[: -len(".slice")]
        parts = name.split("-")
        return "/".join("-".join(parts[: i + 1]) + ".slice" for i in range(len(parts)))
    return parent.strip("/")


def libvirt_partition(parent: str, *, systemd_run: Path | None = None) -> str:
    """The libvirt ``<resource><partition>`` that puts the VM in the pod's cgroup, or "".

    It fits only a kubelet with the systemd cgroup driver on a systemd host: libvirt asks
    machined for a scope in slice ``a-b-c.slice`` for partition ``/a/b/c``, which is where
    the kubelet made the pod's slice, and libvirt keeps its own cgroup (its CPU figures, its
    limits) below it. Without systemd, libvirt names partition ``/a/b`` ``a.partition/b.partition``
    (measured: libvirt 9.0 failed to start with ``/kubepods/burstable/pod1``), which is not the
    kubelet's cgroupfs layout, so there the VMM is moved by :func:`place_process` instead.
    """
    if "/" in parent or not parent.endswith(".slice") or not (systemd_run or SYSTEMD_RUN).is_dir():
        return ""
    name = parent[: -len(".slice")]
    parts = name.split("-")
    return "/" + "/".join(parts) if all(parts) else ""


def _hierarchies(root: Path) -> list[Path]:
    if (root / "cgroup.controllers").exists():  # a pure v2 mount
        return [root]
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink()) if root.is_dir() else []


def place_process(pid: int, parent: str, *, root: Path = CGROUP_ROOT) -> list[Path]:
    """Move ``pid`` into ``parent`` in every hierarchy where it exists; the cgroups used.

    Failures are logged, not raised: the sandbox runs without the placement.
    """
    rel = cgroup_relpath(parent)
    placed = []
    for hierarchy in _hierarchies(root):
        target = hierarchy / rel
        procs = target / "cgroup.procs"
        if not rel or not procs.exists():
            continue
        try:
            procs.write_text(f"{pid}\n")
            placed.append(target)
        except OSError as e:
            log.warning("cannot move pid %d into %s: %s", pid, target, e.strerror)
    if not placed:
        log.info("cgroup parent %s does not exist on this host; VMM pid %d stays where it is", parent, pid)
    return placed
