"""From libvirt domain stats (and netns interface counters) to cgroups v2 figures.

Pure code. The guest is the sandbox's "cgroup": CPU is the VMM's guest CPU time; memory
comes from the virtio balloon's guest statistics (usage = available - unused, file = the
guest's page cache, limit = the guest's current memory); io is per virtio disk; network is
the guest's view of each tap (a tap's rx is the guest's tx).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any as _Any

from ..payloads.cgroupsv2 import CgroupV2Metrics, CPUStat, IOEntry, MemoryStat, NetworkStat
from ..network._model import InterfaceCounters

__all__ = ["from_domain_stats", "VIRTIO_BLK_MAJOR"]

# The guest's virtio-blk major number; minors step by 16 per disk (vda=0, vdb=16, ...).
VIRTIO_BLK_MAJOR = 254
KIB = 1024


def _int(stats: Mapping[str, _Any], key: str) -> int:
    v = stats.get(key, 0)
    return int(v) if isinstance(v, (int, float)) else 0


def from_domain_stats(
    stats: Mapping[str, _Any],
    counters: Sequence[tuple[str, InterfaceCounters]] = (),
    *,
    limit_bytes: int = 0,
) -> CgroupV2Metrics:
    """Build the metrics of one sandbox. ``counters``: (netns interface name, tap counters);
    ``limit_bytes``: the memory target set for the guest (libvirt's balloon.current lags it)."""
    cpu = CPUStat(
        usage_usec=_int(stats, "cpu.time") // 1000,
        user_usec=_int(stats, "cpu.user") // 1000,
        system_usec=_int(stats, "cpu.system") // 1000,
    )
    available = _int(stats, "balloon.available")
    unused = _int(stats, "balloon.unused")
    caches = _int(stats, "balloon.disk_caches")
    usage = max(0, available - unused) * KIB
    file = min(caches * KIB, usage)
    memory = MemoryStat(
        usage=usage,
        usage_limit=limit_bytes or _int(stats, "balloon.current") * KIB,
        anon=usage - file,
        inactive_file=file,
        file=file,
        pgfault=_int(stats, "balloon.minor_fault") + _int(stats, "balloon.major_fault"),
        pgmajfault=_int(stats, "balloon.major_fault"),
    )
    io = []
    for i in range(_int(stats, "block.count")):
        p = f"block.{i}."
        name = str(stats.get(p + "name", ""))
        index = ord(name[2]) - ord("a") if name.startswith("vd") and len(name) == 3 else i
        io.append(IOEntry(
            major=VIRTIO_BLK_MAJOR, minor=16 * index,
            rbytes=_int(stats, p + "rd.bytes"), wbytes=_int(stats, p + "wr.bytes"),
            rios=_int(stats, p + "rd.reqs"), wios=_int(stats, p + "wr.reqs"),
        ))
    network = []
    for name, tap in counters:
        g = tap.swapped()
        network.append(NetworkStat(
            name=name, rx_bytes=g.rx_bytes, rx_packets=g.rx_packets, rx_errors=g.rx_errors,
            rx_dropped=g.rx_dropped, tx_bytes=g.tx_bytes, tx_packets=g.tx_packets,
            tx_errors=g.tx_errors, tx_dropped=g.tx_dropped,
        ))
    return CgroupV2Metrics(cpu=cpu, memory=memory, io=tuple(io), network=tuple(network))
