"""cgroups v2 metrics as containerd's CRI decodes them: typed values <-> ``io.containerd.cgroups.v2.Metrics``.

``Controller.metrics`` returns a :class:`vmsandbox.model.Metric` whose ``data`` is
``to_any(CgroupV2Metrics(...))``; CRI's ``PodSandboxStats`` unmarshals it with typeurl and reads
cpu.usage_usec, memory.usage / inactive_file / usage_limit / anon / pgfault / pgmajfault.
Only that subset (plus io and network counters) is modelled; the rest of the message stays 0.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.message import DecodeError

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
    "CgroupV2Metrics",
    "to_any",
    "from_any",
]

#: containerd's typeurl writes the bare proto full name (no ``type.googleapis.com/`` prefix).
TYPE_URL = "io.containerd.cgroups.v2.Metrics"


@dataclass(frozen=True)
class CPUStat:
    """CPU time in microseconds (``cpu.stat``)."""

    usage_usec: int = 0
    user_usec: int = 0
    system_usec: int = 0


@dataclass(frozen=True)
class MemoryStat:
    """Memory figures in bytes (``memory.current``/``memory.max``/``memory.stat``).

    ``usage_limit`` is the limit; CRI reports "unlimited" above 2**62. ``pgfault`` and
    ``pgmajfault`` are event counts.
    """

    usage: int = 0
    usage_limit: int = 0
    anon: int = 0
    inactive_file: int = 0
    file: int = 0
    pgfault: int = 0
    pgmajfault: int = 0


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


def to_proto(m: CgroupV2Metrics) -> metrics_pb2.Metrics:
    """Build the generated ``Metrics`` message (fields we do not model stay unset)."""
    msg = metrics_pb2.Metrics(
        cpu=metrics_pb2.CPUStat(
            usage_usec=m.cpu.usage_usec, user_usec=m.cpu.user_usec, system_usec=m.cpu.system_usec
        ),
        memory=metrics_pb2.MemoryStat(
            usage=m.memory.usage,
            usage_limit=m.memory.usage_limit,
            anon=m.memory.anon,
            inactive_file=m.memory.inactive_file,
            file=m.memory.file,
            pgfault=m.memory.pgfault,
            pgmajfault=m.memory.pgmajfault,
        ),
        io=metrics_pb2.IOStat(
            usage=[
                metrics_pb2.IOEntry(
                    major=e.major, minor=e.minor, rbytes=e.rbytes, wbytes=e.wbytes, rios=e.rios, wios=e.wios
                )
                for e in m.io
            ]
        ),
        network=[
            metrics_pb2.NetworkStat(
                name=n.name,
                rx_bytes=n.rx_bytes,
                rx_packets=n.rx_packets,
                rx_errors=n.rx_errors,
                rx_dropped=n.rx_dropped,
                tx_bytes=n.tx_bytes,
                tx_packets=n.tx_packets,
                tx_errors=n.tx_errors,
                tx_dropped=n.tx_dropped,
            )
            for n in m.network
        ],
    )
    if m.pids is not None:
        msg.pids.CopyFrom(metrics_pb2.PidsStat(current=m.pids.current, limit=m.pids.limit))
    return msg


def from_proto(msg: metrics_pb2.Metrics) -> CgroupV2Metrics:
    """The modelled subset of a generated ``Metrics`` message."""
    return CgroupV2Metrics(
        cpu=CPUStat(usage_usec=msg.cpu.usage_usec, user_usec=msg.cpu.user_usec, system_usec=msg.cpu.system_usec),
        memory=MemoryStat(
            usage=msg.memory.usage,
            usage_limit=msg.memory.usage_limit,
            anon=msg.memory.anon,
            inactive_file=msg.memory.inactive_file,
            file=msg.memory.file,
            pgfault=msg.memory.pgfault,
            pgmajfault=msg.memory.pgmajfault,
        ),
        io=tuple(
            IOEntry(major=e.major, minor=e.minor, rbytes=e.rbytes, wbytes=e.wbytes, rios=e.rios, wios=e.wios)
            for e in msg.io.usage
        ),
        network=tuple(
            NetworkStat(
                name=n.name,
                rx_bytes=n.rx_bytes,
                rx_packets=n.rx_packets,
                rx_errors=n.rx_errors,
                rx_dropped=n.rx_dropped,
                tx_bytes=n.tx_bytes,
                tx_packets=n.tx_packets,
                tx_errors=n.tx_errors,
                tx_dropped=n.tx_dropped,
            )
            for n in msg.network
        ),
        pids=PidsStat(current=msg.pids.current, limit=msg.pids.limit) if msg.HasField("pids") else None,
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
