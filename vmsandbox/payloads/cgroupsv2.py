"""cgroups v2 metrics as containerd's CRI decodes them: typed values <-> ``io.containerd.cgroups.v2.Metrics``.

``Controller.metrics`` returns a :class:`vmsandbox.model.Metric` whose ``data`` is
``to_any(CgroupV2Metrics(...))``; CRI's ``PodSandboxStats`` unmarshals it with typeurl and reads
cpu.usage_usec, memory.usage / inactive_file / usage_limit / anon / pgfault / pgmajfault. The
task API's Stats (a container's guest cgroup) fills in more: CPU throttling, memory.stat,
memory_events (oom_kill: CRI's OOMKilled check) and pids. Field names are the proto's, so
each value type maps onto its message by name; PSI, RDMA and hugetlb stay unset.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any as _Any
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from ..errors import InvalidArgument
from ..model import AnyMessage
from ..proto.cgroups.v2 import metrics_pb2

__all__ = [
    "TYPE_URL",
    "CPUStat",
    "MemoryStat",
    "IOEntry",
    "NetworkStat",
    "PidsStat",
    "MemoryEvents",
    "CgroupV2Metrics",
    "to_any",
    "from_any",
]

#: containerd's typeurl writes the bare proto full name (no ``type.googleapis.com/`` prefix).
TYPE_URL = "io.containerd.cgroups.v2.Metrics"


@dataclass(frozen=True)
class CPUStat:
    """CPU time in microseconds and CFS throttling (``cpu.stat``)."""

    usage_usec: int = 0
    user_usec: int = 0
    system_usec: int = 0
    nr_periods: int = 0
    nr_throttled: int = 0
    throttled_usec: int = 0


@dataclass(frozen=True)
class MemoryStat:
    """Memory figures in bytes (``memory.current``/``memory.max``/``memory.swap.*``/``memory.peak``
    and the keys of ``memory.stat`` of the same names).

    ``usage_limit`` is the limit (2**64-1 for "max", as containerd's cgroups reads it); CRI
    reports "unlimited" above 2**62. ``pgfault`` and the other ``pg*`` fields are event counts.
    """

    usage: int = 0
    usage_limit: int = 0
    swap_usage: int = 0
    swap_limit: int = 0
    max_usage: int = 0
    anon: int = 0
    file: int = 0
    kernel_stack: int = 0
    slab: int = 0
    sock: int = 0
    shmem: int = 0
    file_mapped: int = 0
    file_dirty: int = 0
    file_writeback: int = 0
    anon_thp: int = 0
    inactive_anon: int = 0
    active_anon: int = 0
    inactive_file: int = 0
    active_file: int = 0
    unevictable: int = 0
    slab_reclaimable: int = 0
    slab_unreclaimable: int = 0
    pgfault: int = 0
    pgmajfault: int = 0


@dataclass(frozen=True)
class MemoryEvents:
    """``memory.events`` counters; ``oom_kill`` > 0 is how CRI tells an OOM kill from a SIGKILL."""

    low: int = 0
    high: int = 0
    max: int = 0
    oom: int = 0
    oom_kill: int = 0
    oom_group_kill: int = 0


@dataclass(frozen=True)
class IOEntry:
    """Block I/O of one device (``io.stat``): bytes and operations read and written."""

    major: int
    minor: int
    rbytes: int = 0
    wbytes: int = 0
    rios: int = 0
    wios: int = 0


@dataclass(frozen=True)
class NetworkStat:
    """Counters of one network interface."""

    name: str
    rx_bytes: int = 0
    rx_packets: int = 0
    rx_errors: int = 0
    rx_dropped: int = 0
    tx_bytes: int = 0
    tx_packets: int = 0
    tx_errors: int = 0
    tx_dropped: int = 0


@dataclass(frozen=True)
class PidsStat:
    """Number of tasks and their limit (0: none)."""

    current: int = 0
    limit: int = 0


@dataclass(frozen=True)
class CgroupV2Metrics:
    """The subset of ``io.containerd.cgroups.v2.Metrics`` vmsandbox fills in."""

    cpu: CPUStat = CPUStat()
    memory: MemoryStat = MemoryStat()
    io: tuple[IOEntry, ...] = ()
    network: tuple[NetworkStat, ...] = ()
    pids: PidsStat | None = None
    memory_events: MemoryEvents | None = None


_T = TypeVar("_T")


def _values(obj: object) -> dict[str, _Any]:
    """A value type's fields by name: they are named as the proto's fields."""
    return {f.name: getattr(obj, f.name) for f in fields(obj)}  # type: ignore[arg-type]


def _load(cls: type[_T], msg: Message) -> _T:
    return cls(**{f.name: getattr(msg, f.name) for f in fields(cls)})  # type: ignore[arg-type]


def to_proto(m: CgroupV2Metrics) -> metrics_pb2.Metrics:
    """Build the generated ``Metrics`` message (fields we do not model stay unset)."""
    msg = metrics_pb2.Metrics(
        cpu=metrics_pb2.CPUStat(**_values(m.cpu)),
        memory=metrics_pb2.MemoryStat(**_values(m.memory)),
        io=metrics_pb2.IOStat(usage=[metrics_pb2.IOEntry(**_values(e)) for e in m.io]),
        network=[metrics_pb2.NetworkStat(**_values(n)) for n in m.network],
    )
    if m.pids is not None:
        msg.pids.CopyFrom(metrics_pb2.PidsStat(**_values(m.pids)))
    if m.memory_events is not None:
        msg.memory_events.CopyFrom(metrics_pb2.MemoryEvents(**_values(m.memory_events)))
    return msg


def from_proto(msg: metrics_pb2.Metrics) -> CgroupV2Metrics:
    """The modelled subset of a generated ``Metrics`` message."""
    return CgroupV2Metrics(
        cpu=_load(CPUStat, msg.cpu),
        memory=_load(MemoryStat, msg.memory),
        io=tuple(_load(IOEntry, e) for e in msg.io.usage),
        network=tuple(_load(NetworkStat, n) for n in msg.network),
        pids=_load(PidsStat, msg.pids) if msg.HasField("pids") else None,
        memory_events=_load(MemoryEvents, msg.memory_events) if msg.HasField("memory_events") else None,
    )


def to_any(m: CgroupV2Metrics) -> AnyMessage:
    """``m`` as an Any with containerd's bare type URL and proto bytes (for ``Metric.data``)."""
    return AnyMessage(type_url=TYPE_URL, value=to_proto(m).SerializeToString(deterministic=True))


def from_any(a: AnyMessage) -> CgroupV2Metrics:
    """Decode an Any holding ``io.containerd.cgroups.v2.Metrics`` (bare or prefixed type URL).

    Raises InvalidArgument for another type or undecodable bytes.
    """
    if a.type_name != TYPE_URL:
        raise InvalidArgument(f"metrics payload has type {a.type_url!r}, want {TYPE_URL!r}")
    msg = metrics_pb2.Metrics()
    try:
        msg.ParseFromString(a.value)
    except DecodeError as e:
        raise InvalidArgument(f"cannot decode {TYPE_URL}: {e}") from e
    return from_proto(msg)
