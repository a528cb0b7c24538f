"""A container's guest cgroup v2 files -> ``io.containerd.cgroups.v2.Metrics``, read with one guest exec.

:func:`stats_argv` is one busybox ``grep -H ''`` over every file Stats needs (one process, no
shell, so it costs one fork under TCG): each output line is ``<path>:<line>``.
:func:`parse_stats` turns that into :class:`CgroupV2Metrics` the way containerd's cgroups
library reads the same files: "max" is 2**64-1, a missing file is 0.
"""

from __future__ import annotations

import posixpath
from collections import defaultdict
from dataclasses import fields

from ..payloads.cgroupsv2 import CgroupV2Metrics, CPUStat, IOEntry, MemoryEvents, MemoryStat, PidsStat
from .spec import guest_cgroups_path

__all__ = ["CGROUP_ROOT", "STAT_FILES", "MAX", "stats_argv", "parse_stats", "guest_cgroup_dir"]

CGROUP_ROOT = "/sys/fs/cgroup"
MAX = 2**64 - 1
"""What "max" (no limit) reads as, as in containerd's cgroups (math.MaxUint64)."""
STAT_FILES = ("cpu.stat", "memory.current", "memory.max", "memory.peak", "memory.swap.current",
              "memory.swap.max", "memory.stat", "memory.events", "pids.current", "pids.max", "io.stat")


def guest_cgroup_dir(container_id: str) -> str:
    return CGROUP_ROOT + guest_cgroups_path(container_id)


def stats_argv(container_id: str) -> list[str]:
    """The guest command that prints every stat file of the container's cgroup (``-s``: a
    file the kernel lacks is skipped; all missing: the cgroup is gone)."""
    d = guest_cgroup_dir(container_id)
    return ["grep", "-s", "-H", "", *(f"{d}/{name}" for name in STAT_FILES)]


def _files(output: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = defaultdict(list)
    for line in output.splitlines():
        path, sep, text = line.partition(":")
        if sep:
            out[posixpath.basename(path)].append(text)
    return out


def _num(word: str) -> int:
    if word == "max":
        return MAX
    try:
        return max(0, int(word))
    except ValueError:
        return 0


def _flat(lines: list[str]) -> dict[str, int]:
    """A flat-keyed file (``key value`` per line)."""
    return {k: _num(v) for k, _, v in (line.partition(" ") for line in lines) if k}


def _single(files: dict[str, list[str]], name: str) -> int:
    lines = files.get(name)
    return _num(lines[0].strip()) if lines else 0


def _io(lines: list[str]) -> tuple[IOEntry, ...]:
    """``io.stat``: ``MAJ:MIN rbytes=.. wbytes=.. rios=.. wios=.. dbytes=.. dios=..``."""
    out = []
    for line in lines:
        dev, *kvs = line.split()
        major, _, minor = dev.partition(":")
        vals = {k: _num(v) for k, _, v in (kv.partition("=") for kv in kvs)}
        out.append(IOEntry(_num(major), _num(minor), rbytes=vals.get("rbytes", 0), wbytes=vals.get("wbytes", 0),
                           rios=vals.get("rios", 0), wios=vals.get("wios", 0)))
    return tuple(out)


def _pick(cls: type, values: dict[str, int]) -> dict[str, int]:
    return {f.name: values[f.name] for f in fields(cls) if f.name in values}


def parse_stats(output: str) -> CgroupV2Metrics | None:
    """The metrics in :func:`stats_argv`'s output; None when it holds no cgroup (gone)."""
    files = _files(output)
    if "cpu.stat" not in files and "memory.current" not in files:
        return None
    memory = MemoryStat(
        usage=_single(files, "memory.current"),
        usage_limit=_single(files, "memory.max"),
        max_usage=_single(files, "memory.peak"),
        swap_usage=_single(files, "memory.swap.current"),
        swap_limit=_single(files, "memory.swap.max"),
        **_pick(MemoryStat, _flat(files.get("memory.stat", []))),
    )
    return CgroupV2Metrics(
        cpu=CPUStat(**_pick(CPUStat, _flat(files.get("cpu.stat", [])))),
        memory=memory,
        memory_events=MemoryEvents(**_pick(MemoryEvents, _flat(files.get("memory.events", [])))),
        pids=PidsStat(current=_single(files, "pids.current"), limit=_single(files, "pids.max")),
        io=_io(files.get("io.stat", [])),
    )
