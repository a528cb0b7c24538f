"""What an update asks of the guest: our annotations/labels and CRI's updated-resources."""

from __future__ import annotations

import json

import pytest

from vmsandbox import AnyMessage, InvalidArgument, SandboxMetadata
from vmsandbox.payloads.podconfig import PodConfig
from vmsandbox.sandbox.resources import ResourceChange, resources_from_update

LIMITS = {"max_vcpus": 8, "max_memory_mib": 4096}


def cri(resources: dict[str, int] | None, overhead: dict[str, int] | None = None) -> SandboxMetadata:
    """The extension as containerd's UpdatePodSandboxResources stores it: Go's encoding/json of
    ``UpdatedResources{Overhead, Resources *LinuxContainerResources}`` (a nil pointer is null)."""
    doc = {"Overhead": overhead, "Resources": resources}
    ext = AnyMessage("io.containerd.cri.v1/UpdatedResources", json.dumps(doc).encode())
    return SandboxMetadata("s", extensions={"updated-resources": ext})


def test_cri_update_is_sized_like_create_including_runtimeclass_overhead() -> None:
    pod = PodConfig(cpu_quota=100_000, cpu_period=100_000, overhead_cpu_quota=25_000,
                    memory_limit_bytes=256 << 20, overhead_memory_limit_bytes=64 << 20)
    same = cri({"cpu_quota": 100_000, "cpu_period": 100_000, "memory_limit_in_bytes": 256 << 20})
    assert resources_from_update(same, {}, {"extensions"}, pod=pod, **LIMITS) == ResourceChange(2, 320)
    camel = cri({"cpuQuota": 300_000, "cpuPeriod": 100_000, "memoryLimitInBytes": 512 << 20})
    assert resources_from_update(camel, {}, {"extensions"}, **LIMITS) == ResourceChange(3, 512)


def test_cri_update_takes_the_overhead_it_carries_over_the_one_from_create() -> None:
    pod = PodConfig(memory_limit_bytes=256 << 20, overhead_memory_limit_bytes=64 << 20)
    sb = cri({"memory_limit_in_bytes": 300 << 20}, overhead={"memory_limit_in_bytes": 32 << 20})
    assert resources_from_update(sb, {}, {"extensions"}, pod=pod, **LIMITS) == ResourceChange(None, 332)


def test_cri_update_without_resources_changes_nothing() -> None:
    assert resources_from_update(cri(None), {}, {"extensions"}, **LIMITS) == ResourceChange()
    assert resources_from_update(cri({}), {}, {"extensions"}, **LIMITS) == ResourceChange()


def test_only_named_fields_count_and_labels_override_annotations() -> None:
    sb = SandboxMetadata("s", labels={"vmsandbox.io/memory-mib": "300"})
    ann = {"vmsandbox.io/memory-mib": "200", "vmsandbox.io/vcpus": "2"}
    assert resources_from_update(sb, ann, {"labels"}, **LIMITS) == ResourceChange(None, 300)
    assert resources_from_update(sb, ann, {"spec"}, **LIMITS) == ResourceChange(2, 200)
    assert resources_from_update(sb, ann, {"labels", "spec"}, **LIMITS) == ResourceChange(2, 300)
    assert resources_from_update(sb, ann, {"runtime"}, **LIMITS) == ResourceChange()


def test_bad_values_are_invalid_argument() -> None:
    with pytest.raises(InvalidArgument):
        resources_from_update(SandboxMetadata("s", labels={"vmsandbox.io/vcpus": "0"}), {}, {"labels"}, **LIMITS)
    with pytest.raises(InvalidArgument):
        resources_from_update(SandboxMetadata(
            "s", extensions={"updated-resources": AnyMessage("x", b"not json")}), {}, {"extensions"}, **LIMITS)
    with pytest.raises(InvalidArgument):
        resources_from_update(cri({"memory_limit_in_bytes": 1 << 20}), {}, {"extensions"}, **LIMITS)
    with pytest.raises(InvalidArgument, match="memory_limit_in_bytes"):
        resources_from_update(cri({"memory_limit_in_bytes": "lots"}), {}, {"extensions"}, **LIMITS)  # type: ignore[dict-item]
