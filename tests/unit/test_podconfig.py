"""vmsandbox.payloads.podconfig: CRI's runtime.v1.PodSandboxConfig in Create options."""

from __future__ import annotations

import json

import pytest

from vmsandbox.errors import InvalidArgument
from vmsandbox.model import AnyMessage
from vmsandbox.payloads.podconfig import (
    POD_SANDBOX_CONFIG_TYPE,
    PodConfig,
    PortMapping,
    memory_mib_from,
    parse_pod_config,
    vcpus_from,
)
from vmsandbox.proto.k8s.runtime.v1 import api_pb2

MiB = 1 << 20


def full_config() -> api_pb2.PodSandboxConfig:
    cfg = api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(name="web-0", uid="b5e3-uid", namespace="prod", attempt=2),
        hostname="web-0",
        log_directory="/var/log/pods/prod_web-0_b5e3-uid",
        dns_config=api_pb2.DNSConfig(
            servers=["10.96.0.10"], searches=["prod.svc.cluster.local", "svc.cluster.local"], options=["ndots:5"]
        ),
        port_mappings=[
            api_pb2.PortMapping(protocol=api_pb2.UDP, container_port=53, host_port=5353, host_ip="127.0.0.1"),
            api_pb2.PortMapping(container_port=80),
        ],
        labels={"app": "web", "io.kubernetes.pod.name": "web-0"},
        annotations={"kubernetes.io/config.source": "api"},
    )
    cfg.linux.cgroup_parent = "/kubepods/burstable/podb5e3"
    cfg.linux.sysctls["net.ipv4.ip_forward"] = "1"
    cfg.linux.resources.cpu_period = 100_000
    cfg.linux.resources.cpu_quota = 150_000
    cfg.linux.resources.cpu_shares = 1536
    cfg.linux.resources.cpuset_cpus = "0-1"
    cfg.linux.resources.memory_limit_in_bytes = 256 * MiB
    cfg.linux.overhead.cpu_period = 100_000
    cfg.linux.overhead.cpu_quota = 25_000
    cfg.linux.overhead.memory_limit_in_bytes = 64 * MiB
    return cfg


def as_any(cfg: api_pb2.PodSandboxConfig, url: str = POD_SANDBOX_CONFIG_TYPE) -> AnyMessage:
    return AnyMessage(type_url=url, value=cfg.SerializeToString())


def test_parses_every_field() -> None:
    pc = parse_pod_config(as_any(full_config()))
    assert pc == PodConfig(
        name="web-0",
        uid="b5e3-uid",
        namespace="prod",
        attempt=2,
        hostname="web-0",
        log_directory="/var/log/pods/prod_web-0_b5e3-uid",
        dns_servers=("10.96.0.10",),
        dns_searches=("prod.svc.cluster.local", "svc.cluster.local"),
        dns_options=("ndots:5",),
        port_mappings=(
            PortMapping(protocol="UDP", container_port=53, host_port=5353, host_ip="127.0.0.1"),
            PortMapping(protocol="TCP", container_port=80),
        ),
        labels={"app": "web", "io.kubernetes.pod.name": "web-0"},
        annotations={"kubernetes.io/config.source": "api"},
        cgroup_parent="/kubepods/burstable/podb5e3",
        sysctls={"net.ipv4.ip_forward": "1"},
        cpu_quota=150_000,
        cpu_period=100_000,
        cpu_shares=1536,
        cpuset_cpus="0-1",
        memory_limit_bytes=256 * MiB,
        overhead_cpu_quota=25_000,
        overhead_cpu_period=100_000,
        overhead_memory_limit_bytes=64 * MiB,
    )


def test_field_numbers_match_cri_api() -> None:
    """Wire contract with k8s.io/cri-api pkg/apis/runtime/v1/api.proto."""

    def numbers(desc: object) -> dict[str, int]:
        return {f.name: f.number for f in desc.fields}  # type: ignore[attr-defined]

    assert api_pb2.PodSandboxConfig.DESCRIPTOR.full_name == "runtime.v1.PodSandboxConfig"
    assert numbers(api_pb2.PodSandboxConfig.DESCRIPTOR) == {
        "metadata": 1, "hostname": 2, "log_directory": 3, "dns_config": 4, "port_mappings": 5,
        "labels": 6, "annotations": 7, "linux": 8,
    }  # fmt: skip
    assert numbers(api_pb2.LinuxPodSandboxConfig.DESCRIPTOR) == {
        "cgroup_parent": 1, "security_context": 2, "sysctls": 3, "overhead": 4, "resources": 5,
    }  # fmt: skip
    assert numbers(api_pb2.LinuxContainerResources.DESCRIPTOR) == {
        "cpu_period": 1, "cpu_quota": 2, "cpu_shares": 3, "memory_limit_in_bytes": 4, "oom_score_adj": 5,
        "cpuset_cpus": 6, "cpuset_mems": 7, "hugepage_limits": 8, "unified": 9, "memory_swap_limit_in_bytes": 10,
    }  # fmt: skip
    assert numbers(api_pb2.DNSConfig.DESCRIPTOR) == {"servers": 1, "searches": 2, "options": 3}
    assert numbers(api_pb2.PodSandboxMetadata.DESCRIPTOR) == {"name": 1, "uid": 2, "namespace": 3, "attempt": 4}


def test_prefixed_type_url_accepted() -> None:
    pc = parse_pod_config(as_any(full_config(), "type.googleapis.com/runtime.v1.PodSandboxConfig"))
    assert pc is not None and pc.name == "web-0"


def test_none_and_other_types_give_none() -> None:
    assert parse_pod_config(None) is None
    assert parse_pod_config(AnyMessage("containerd.runc.v1.Options", b"\x08\x01")) is None
    assert parse_pod_config(AnyMessage("runtime.v1alpha2.PodSandboxConfig", full_config().SerializeToString())) is None


def test_garbage_bytes_are_invalid_argument() -> None:
    with pytest.raises(InvalidArgument):
        parse_pod_config(AnyMessage(POD_SANDBOX_CONFIG_TYPE, b"\x0a\xff\xff\xff\xff"))


def test_unknown_fields_tolerated() -> None:
    """Fields we do not declare (windows=9, a newer kubelet's additions) are skipped."""
    raw = full_config().SerializeToString() + b"\x4a\x02\x0a\x00" + b"\xa0\x06\x01"  # field 9 msg; field 100 varint
    pc = parse_pod_config(AnyMessage(POD_SANDBOX_CONFIG_TYPE, raw))
    assert pc is not None and pc.hostname == "web-0"


def test_empty_config() -> None:
    pc = parse_pod_config(AnyMessage(POD_SANDBOX_CONFIG_TYPE, b""))
    assert pc == PodConfig()
    assert vcpus_from(pc) is None and memory_mib_from(pc) is None


def test_json_round_trip_keeps_every_field() -> None:
    pc = parse_pod_config(as_any(full_config()))
    assert pc is not None
    doc = json.loads(json.dumps(pc.to_json()))
    assert doc["port_mappings"][0]["protocol"] == "UDP" and doc["dns_searches"][1] == "svc.cluster.local"
    assert PodConfig.from_json(doc) == pc
    assert PodConfig.from_json({}) == PodConfig()  # a field the writer did not know takes its default


@pytest.mark.parametrize("doc, match", [
    pytest.param([], "must be an object", id="a-list"),
    pytest.param({"attempt": True}, r"attempt must be an integer", id="bool-for-int"),
    pytest.param({"hostname": 5}, r"hostname must be a string", id="int-for-str"),
    pytest.param({"dns_servers": "10.0.0.1"}, r"dns_servers must be a list", id="str-for-list"),
    pytest.param({"labels": {"a": None}}, r"labels\['a'\] must be a string", id="null-label"),
    pytest.param({"port_mappings": [{"protocol": "TCP"}]}, r"port_mappings\[0\] lacks 'container_port'",
                 id="port-without-container-port"),
])
def test_json_that_is_no_pod_config_is_invalid_argument(doc: object, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        PodConfig.from_json(doc)


def test_sizing_with_overhead() -> None:
    pc = parse_pod_config(as_any(full_config()))
    assert pc is not None
    assert vcpus_from(pc) == 2  # ceil(1.5 + 0.25)
    assert memory_mib_from(pc) == 320  # 256 + 64


@pytest.mark.parametrize(
    ("quota", "period", "ovh_quota", "ovh_period", "want"),
    [
        (100_000, 100_000, 0, 0, 1),
        (100_001, 100_000, 0, 0, 2),
        (50_000, 100_000, 0, 0, 1),  # half a CPU still needs one vCPU
        (200_000, 100_000, 0, 0, 2),
        (200_000, 100_000, 1, 100_000, 3),
        (200_000, 100_000, 10_000, 0, 3),  # overhead without a period: the pod's
        (300_000, 100_000, 100, 1_000, 4),  # overhead over its own period: 0.1 CPU
        (0, 100_000, 50_000, 100_000, None),  # no pod limit: no sizing, overhead alone does not count
        (100_000, 0, 0, 0, None),
        (-1, 100_000, 0, 0, None),
    ],
)
def test_vcpus_from(quota: int, period: int, ovh_quota: int, ovh_period: int, want: int | None) -> None:
    pc = PodConfig(cpu_quota=quota, cpu_period=period, overhead_cpu_quota=ovh_quota, overhead_cpu_period=ovh_period)
    assert vcpus_from(pc) == want


@pytest.mark.parametrize(
    ("limit", "overhead", "want"),
    [
        (128 * MiB, 0, 128),
        (128 * MiB + 1, 0, 129),
        (1, 0, 1),
        (100 * MiB, 28 * MiB, 128),
        (0, 64 * MiB, None),
        (-1, 0, None),
    ],
)
def test_memory_mib_from(limit: int, overhead: int, want: int | None) -> None:
    assert memory_mib_from(PodConfig(memory_limit_bytes=limit, overhead_memory_limit_bytes=overhead)) == want
