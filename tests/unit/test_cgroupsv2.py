"""vmsandbox.payloads.cgroupsv2: typed metrics <-> io.containerd.cgroups.v2.Metrics in an Any."""

from __future__ import annotations

import pytest

from vmsandbox.payloads import cgroupsv2
from vmsandbox.payloads.cgroupsv2 import CgroupV2Metrics, CPUStat, IOEntry, MemoryStat, NetworkStat, PidsStat
from vmsandbox.errors import InvalidArgument
from vmsandbox.model import AnyMessage
from vmsandbox.proto.cgroups.v2 import metrics_pb2

SAMPLE = CgroupV2Metrics(
    cpu=CPUStat(usage_usec=1_500_000, user_usec=1_000_000, system_usec=500_000),
    memory=MemoryStat(
        usage=300 << 20,
        usage_limit=512 << 20,
        anon=120 << 20,
        inactive_file=40 << 20,
        file=100 << 20,
        pgfault=12345,
        pgmajfault=67,
    ),
    io=(IOEntry(major=253, minor=0, rbytes=4096, wbytes=8192, rios=1, wios=2), IOEntry(major=253, minor=16)),
    network=(
        NetworkStat(
            name="eth0",
            rx_bytes=1000,
            rx_packets=10,
            rx_errors=1,
            rx_dropped=2,
            tx_bytes=2000,
            tx_packets=20,
            tx_errors=3,
            tx_dropped=4,
        ),
    ),
    pids=PidsStat(current=17, limit=4096),
)


def test_round_trip() -> None:
    a = cgroupsv2.to_any(SAMPLE)
    assert a.type_url == "io.containerd.cgroups.v2.Metrics" == cgroupsv2.TYPE_URL
    assert cgroupsv2.from_any(a) == SAMPLE


def test_round_trip_defaults_and_no_pids() -> None:
    m = CgroupV2Metrics()
    assert cgroupsv2.from_any(cgroupsv2.to_any(m)) == m
    assert cgroupsv2.from_any(cgroupsv2.to_any(m)).pids is None


def test_bytes_decode_with_generated_message() -> None:
    """What containerd's CRI sees: the fields it reads, at cgroups' field numbers."""
    msg = metrics_pb2.Metrics.FromString(cgroupsv2.to_any(SAMPLE).value)
    assert msg.cpu.usage_usec == 1_500_000
    assert msg.memory.usage == 300 << 20
    assert msg.memory.inactive_file == 40 << 20
    assert msg.memory.usage_limit == 512 << 20
    assert msg.memory.anon == 120 << 20
    assert (msg.memory.pgfault, msg.memory.pgmajfault) == (12345, 67)
    assert [(e.major, e.minor, e.rbytes, e.wbytes) for e in msg.io.usage] == [(253, 0, 4096, 8192), (253, 16, 0, 0)]
    assert [n.name for n in msg.network] == ["eth0"] and msg.network[0].tx_dropped == 4
    assert msg.pids.current == 17 and msg.HasField("pids")
    # field numbers of the wire contract (containerd/cgroups cgroup2/stats/metrics.proto)
    fields = metrics_pb2.Metrics.DESCRIPTOR.fields_by_name
    assert {n: fields[n].number for n in ("pids", "cpu", "memory", "io", "network")} == {
        "pids": 1,
        "cpu": 2,
        "memory": 4,
        "io": 6,
        "network": 9,
    }
    mem = metrics_pb2.MemoryStat.DESCRIPTOR.fields_by_name
    assert (mem["usage"].number, mem["usage_limit"].number, mem["inactive_file"].number) == (32, 33, 13)


def test_decodes_message_built_by_someone_else() -> None:
    msg = metrics_pb2.Metrics()
    msg.cpu.usage_usec = 42
    msg.memory.usage = 7
    msg.memory.swap_usage = 99  # not modelled: ignored
    got = cgroupsv2.from_any(AnyMessage(cgroupsv2.TYPE_URL, msg.SerializeToString()))
    assert got.cpu.usage_usec == 42 and got.memory.usage == 7


@pytest.mark.parametrize(
    "url", ["io.containerd.cgroups.v2.Metrics", "type.googleapis.com/io.containerd.cgroups.v2.Metrics"]
)
def test_both_type_url_styles(url: str) -> None:
    assert cgroupsv2.from_any(AnyMessage(url, cgroupsv2.to_any(SAMPLE).value)) == SAMPLE


@pytest.mark.parametrize(
    "url", ["io.containerd.cgroups.v1.Metrics", "runtime.v1.PodSandboxConfig", "", "Metrics"]
)
def test_other_types_rejected(url: str) -> None:
    with pytest.raises(InvalidArgument):
        cgroupsv2.from_any(AnyMessage(url, b""))


def test_garbage_bytes_rejected() -> None:
    with pytest.raises(InvalidArgument):
        cgroupsv2.from_any(AnyMessage(cgroupsv2.TYPE_URL, b"\xff\xff\xff"))
