"""A container's guest cgroup files -> io.containerd.cgroups.v2.Metrics, and the Update payload."""

from __future__ import annotations

import json

import pytest

from tests.unit.task_rig import CGROUP_FILES
from vmsandbox.errors import InvalidArgument
from vmsandbox.model import AnyMessage
from vmsandbox.payloads import cgroupsv2
from vmsandbox.payloads.linux_resources import TYPE_URL, parse_linux_resources
from vmsandbox.proto.cgroups.v2 import metrics_pb2
from vmsandbox.task.cgroups import MAX, STAT_FILES, parse_stats, stats_argv
from vmsandbox.task.spec import guest_resources

DIR = "/sys/fs/cgroup/vsbx/c1"


def grep_output(files: dict[str, str]) -> str:
    """What busybox ``grep -s -H '' <files>`` prints."""
    return "".join(f"{DIR}/{name}:{line}\n" for name, text in files.items() for line in text.splitlines())


def test_one_guest_command_reads_every_file() -> None:
    argv = stats_argv("c1")
    assert argv[:4] == ["grep", "-s", "-H", ""]
    assert argv[4:] == [f"{DIR}/{name}" for name in STAT_FILES]


def test_the_files_become_the_metrics_containerd_decodes() -> None:
    m = parse_stats(grep_output(CGROUP_FILES))
    assert m is not None
    msg = metrics_pb2.Metrics()
    msg.ParseFromString(cgroupsv2.to_any(m).value)
    assert cgroupsv2.to_any(m).type_url == "io.containerd.cgroups.v2.Metrics"
    assert (msg.cpu.usage_usec, msg.cpu.user_usec, msg.cpu.system_usec) == (53850270, 18742110, 35108160)
    assert (msg.cpu.nr_periods, msg.cpu.nr_throttled, msg.cpu.throttled_usec) == (1088, 1057, 53063542)
    assert (msg.memory.usage, msg.memory.usage_limit, msg.memory.max_usage) == (159744, 33554432, 33554432)
    assert (msg.memory.swap_usage, msg.memory.swap_limit) == (0, MAX)
    assert (msg.memory.anon, msg.memory.file, msg.memory.kernel_stack, msg.memory.slab) == (40960, 8192, 16384, 94208)
    assert (msg.memory.inactive_file, msg.memory.active_anon, msg.memory.pgfault, msg.memory.pgmajfault) == (
        8192, 4096, 25219, 3)
    assert msg.HasField("memory_events")
    assert (msg.memory_events.max, msg.memory_events.oom, msg.memory_events.oom_kill) == (4967, 291, 0)
    assert (msg.pids.current, msg.pids.limit) == (1, MAX)
    assert [(e.major, e.minor, e.rbytes, e.wbytes, e.rios, e.wios) for e in msg.io.usage] == [
        (254, 0, 1048576, 4096, 12, 1)]
    assert cgroupsv2.from_any(cgroupsv2.to_any(m)) == m


def test_an_oom_kill_and_missing_files() -> None:
    files = {"memory.current": "0\n", "memory.events": "low 0\nhigh 0\nmax 12\noom 3\noom_kill 1\n",
             "pids.max": "100\n", "io.stat": ""}
    m = parse_stats(grep_output(files))
    assert m is not None and m.memory_events is not None
    assert m.memory_events.oom_kill == 1 and m.memory_events.oom_group_kill == 0
    assert m.cpu == cgroupsv2.CPUStat() and m.memory.usage_limit == 0 and m.pids == cgroupsv2.PidsStat(0, 100)
    assert m.io == ()


def test_no_cgroup_reads_as_none() -> None:
    assert parse_stats("") is None
    assert parse_stats("grep: /sys/fs/cgroup/vsbx/c1/cpu.stat: No such file or directory\n") is None


def test_update_resources_are_a_runtime_spec_json_object() -> None:
    doc = {"memory": {"limit": 67108864, "swap": 67108864}, "cpu": {"shares": 512, "quota": 50000,
           "period": 100000, "cpus": "0-7", "mems": "0"}, "pids": {"limit": 50}, "devices": [{"allow": False}]}
    got = parse_linux_resources(AnyMessage(TYPE_URL, json.dumps(doc).encode()))
    assert got == doc
    # What the guest's crun is given: host CPU and NUMA numbers dropped, the rest as sent.
    assert guest_resources(got) == {"memory": {"limit": 67108864, "swap": 67108864},
                                    "cpu": {"shares": 512, "quota": 50000, "period": 100000},
                                    "pids": {"limit": 50}, "devices": [{"allow": False}]}
    assert got["cpu"]["cpus"] == "0-7"  # the caller's object is left alone


@pytest.mark.parametrize("any_", [
    AnyMessage("types.containerd.io/opencontainers/runtime-spec/1/Process", b"{}"),
    AnyMessage(TYPE_URL, b"{"),
    AnyMessage(TYPE_URL, b"[1]"),
    AnyMessage(TYPE_URL, b'{"memory": 5}'),
])
def test_bad_update_payloads_are_invalid_arguments(any_: AnyMessage) -> None:
    with pytest.raises(InvalidArgument):
        parse_linux_resources(any_)
