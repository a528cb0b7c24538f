"""vmsandbox.payloads.updated_resources: CRI's updated-resources extension as containerd writes it."""

from __future__ import annotations

import json

import pytest

from vmsandbox import AnyMessage, InvalidArgument
from vmsandbox.payloads.podconfig import PodConfig, memory_mib_from, vcpus_from
from vmsandbox.payloads.updated_resources import (
    TYPE_URL,
    LinuxResources,
    UpdatedResources,
    parse_updated_resources,
    resized,
)

MiB = 1 << 20


def ext(doc: object) -> AnyMessage:
    return AnyMessage(TYPE_URL, json.dumps(doc).encode())


def test_go_json_of_containerds_struct_decodes() -> None:
    # Go's encoding/json: field names of the struct, proto names from the json tags, int64 as
    # numbers, zero fields left out, a nil pointer as null; hugepages and unified as CRI has them.
    doc = {
        "Overhead": None,
        "Resources": {"cpu_period": 100_000, "cpu_quota": 150_000, "cpu_shares": 1536,
                      "memory_limit_in_bytes": 300 * MiB, "cpuset_cpus": "0-1", "oom_score_adj": -997,
                      "hugepage_limits": [{"page_size": "2MB", "limit": 0}], "unified": {"memory.high": "max"}},
    }
    got = parse_updated_resources(ext(doc))
    assert got == UpdatedResources(resources=LinuxResources(100_000, 150_000, 1536, 300 * MiB, "0-1"), overhead=None)


def test_protojson_names_strings_for_int64_and_any_key_case_are_accepted() -> None:
    doc = {"resources": {"memoryLimitInBytes": str(256 * MiB)}, "OVERHEAD": {"memory_limit_in_bytes": 64 * MiB}}
    got = parse_updated_resources(ext(doc))
    assert got.resources == LinuxResources(memory_limit_bytes=256 * MiB)
    assert got.overhead == LinuxResources(memory_limit_bytes=64 * MiB)


def test_unknown_keys_and_fields_are_ignored() -> None:
    got = parse_updated_resources(ext({"Windows": {}, "Resources": {"memory_limit_in_bytes": 1, "from_2030": 1}}))
    assert got == UpdatedResources(resources=LinuxResources(memory_limit_bytes=1))
    assert parse_updated_resources(ext({})) == UpdatedResources()


@pytest.mark.parametrize("raw, match", [
    pytest.param(b"{oops", "not JSON", id="not-json"),
    pytest.param(b"[]", "object", id="a-list"),
    pytest.param(b'{"Resources": [1]}', "Resources must be an object", id="resources-a-list"),
    pytest.param(b'{"Resources": {"memory_limit_in_bytes": "lots"}}', "memory_limit_in_bytes", id="bad-int"),
    pytest.param(b'{"Overhead": {"cpu_quota": 1.5}}', "Overhead", id="fraction"),
])
def test_what_is_not_updated_resources_is_invalid_argument(raw: bytes, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        parse_updated_resources(AnyMessage(TYPE_URL, raw))


def test_resized_sizes_like_create() -> None:
    pod = PodConfig(name="web", cpu_quota=100_000, cpu_period=100_000, memory_limit_bytes=128 * MiB,
                    overhead_cpu_quota=25_000, overhead_memory_limit_bytes=64 * MiB)
    # Create's overhead stays when the update carries none; the rest of the pod is kept.
    pc = resized(pod, UpdatedResources(LinuxResources(100_000, 300_000, memory_limit_bytes=256 * MiB)))
    assert pc is not None and pc.name == "web"
    assert (vcpus_from(pc), memory_mib_from(pc)) == (4, 320)
    # The update's own overhead wins.
    pc = resized(pod, UpdatedResources(LinuxResources(memory_limit_bytes=256 * MiB),
                                       LinuxResources(memory_limit_bytes=32 * MiB)))
    assert pc is not None and (vcpus_from(pc), memory_mib_from(pc)) == (None, 288)
    # No pod config from create: the update alone.
    pc = resized(None, UpdatedResources(LinuxResources(memory_limit_bytes=200 * MiB)))
    assert pc is not None and memory_mib_from(pc) == 200
    assert resized(pod, UpdatedResources(None, LinuxResources(memory_limit_bytes=1))) is None
