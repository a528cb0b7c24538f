"""A sandbox's host processes (QEMU, virtiofsd): CPU seconds and PSS, read from /proc."""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterable
from pathlib import Path

from .host import read_text
from .stats import kib_field

__all__ = ["cpu_seconds", "process_cpu_seconds", "pss_kib", "domain_short_name", "children", "virtiofsd_pids"]

# libvirt's per-domain folder (``priv->libDir``: ``domain-<short name>``), named on QEMU's
# command line (its master key); the short name is ``<domain id>-<first 20 characters of the name>``.
_LIB_DIR = re.compile(r"/var/lib/libvirt/qemu/domain-([^/\x00,]+)/")
# libvirt (9.0) keeps each virtiofsd's pid in ``<state dir>/<short name>-<fs alias>-fs.pid``
# and hands it its socket as an fd, so its command line names no domain.
LIBVIRT_RUN = Path("/run/libvirt/qemu")


def cpu_seconds(stat: str, ticks: int) -> float | None:
    """utime + stime of a ``/proc/<pid>/stat`` text, in seconds (None if it is not one)."""
    _comm, sep, rest = stat.rpartition(")")  # comm may hold spaces and parentheses
    fields = rest.split()
    if not sep or len(fields) < 13:
        return None
    try:
        return (int(fields[11]) + int(fields[12])) / ticks  # fields 14 and 15 of proc(5)
    except ValueError:
        return None


def process_cpu_seconds(pid: int) -> float | None:
    """A running process's CPU seconds so far (user + system, all its threads)."""
    if pid <= 0:
        return None
    return cpu_seconds(read_text(f"/proc/{pid}/stat"), os.sysconf("SC_CLK_TCK"))


def pss_kib(pids: Iterable[int]) -> int | None:
    """The PSS of these processes together (``smaps_rollup``), KiB; None if none could be read."""
    values = [kib_field(read_text(f"/proc/{pid}/smaps_rollup"), "Pss") for pid in pids if pid > 0]
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def domain_short_name(cmdline: str) -> str | None:
    """libvirt's short name of the domain, from QEMU's ``/proc/<pid>/cmdline`` (NUL-separated)."""
    m = _LIB_DIR.search(cmdline)
    return m.group(1) if m else None


def children(pid: int, proc: Path = Path("/proc")) -> list[int]:
    """The pids of a process's children (``/proc/<pid>/task/*/children``)."""
    out: list[int] = []
    try:
        tasks = list((proc / str(pid) / "task").iterdir())
    except OSError:
        return out
    for t in tasks:
        out.extend(int(x) for x in read_text(t / "children").split() if x.isdigit())
    return sorted(set(out))


def virtiofsd_pids(qemu_pid: int, proc: Path = Path("/proc"), run_dir: Path = LIBVIRT_RUN) -> list[int]:
    """The virtiofsd processes libvirt started for the domain whose QEMU is ``qemu_pid``
    (from their pid files), with their children (virtiofsd forks one for its namespace
    sandbox, and that one does the work)."""
    short = domain_short_name(read_text(proc / str(qemu_pid) / "cmdline")) if qemu_pid > 0 else None
    if short is None:
        return []
    out: set[int] = set()
    for pidfile in sorted(run_dir.glob(f"{glob.escape(short)}-*-fs.pid")):
        text = read_text(pidfile).strip()
        if text.isdigit() and (proc / text).is_dir():
            out.add(int(text))
            out.update(children(int(text), proc))
    return sorted(out)
