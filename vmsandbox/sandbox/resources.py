"""What an update asks of the guest's resources: vCPUs and memory.

Sources, in order (later wins): our annotations (``vmsandbox.io/vcpus``,
``vmsandbox.io/memory-mib``, from the OCI spec), the same keys as labels, and CRI's
``updated-resources`` extension (JSON of ``UpdatedResources{Linux: LinuxContainerResources}``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Set
from dataclasses import dataclass, replace
from typing import Any as _Any

from ..errors import InvalidArgument
from ..model import Sandbox
from ..podconfig import PodConfig, memory_mib_from, vcpus_from
from .validate import resources_from_annotations

__all__ = ["ResourceChange", "resources_from_update", "UPDATED_RESOURCES_EXTENSION"]

UPDATED_RESOURCES_EXTENSION = "updated-resources"


@dataclass(frozen=True)
class ResourceChange:
    vcpus: int | None = None
    memory_mib: int | None = None


def _get(d: Mapping[str, _Any], *keys: str) -> int:
    for k in keys:
        v = d.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return int(v)
    return 0


def _from_cri(raw: bytes, pod: PodConfig | None) -> ResourceChange:
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise InvalidArgument(f"extension {UPDATED_RESOURCES_EXTENSION} is not JSON: {e}") from e
    linux = doc.get("Linux") or doc.get("linux") if isinstance(doc, dict) else None
    if not isinstance(linux, dict):
        return ResourceChange()
    # The same sizing as at create: the pod's limits plus its RuntimeClass overhead.
    pc = replace(
        pod or PodConfig(),
        cpu_quota=_get(linux, "cpu_quota", "cpuQuota", "CpuQuota"),
        cpu_period=_get(linux, "cpu_period", "cpuPeriod", "CpuPeriod"),
        memory_limit_bytes=_get(linux, "memory_limit_in_bytes", "memoryLimitInBytes", "MemoryLimitInBytes"),
    )
    return ResourceChange(vcpus_from(pc), memory_mib_from(pc))


def resources_from_update(
    sandbox: Sandbox,
    annotations: Mapping[str, str],
    fields: Set[str],
    *,
    max_vcpus: int,
    max_memory_mib: int,
    pod: PodConfig | None = None,
) -> ResourceChange:
    """The vCPUs and memory an update asks for (None: unchanged). ``pod`` is the sandbox's
    PodSandboxConfig from create, whose overhead CRI's updated resources do not repeat."""
    vcpus: int | None = None
    mem: int | None = None
    sources: list[Mapping[str, str]] = []
    if fields & {"spec", "annotations"}:
        sources.append(annotations)
    if "labels" in fields:
        sources.append(sandbox.labels)
    for src in sources:
        v, m = resources_from_annotations(src, max_vcpus=max_vcpus, max_memory_mib=max_memory_mib)
        vcpus, mem = v or vcpus, m or mem
    if "extensions" in fields and (ext := sandbox.extensions.get(UPDATED_RESOURCES_EXTENSION)) is not None:
        cri = _from_cri(ext.value, pod)
        vcpus, mem = cri.vcpus or vcpus, cri.memory_mib or mem
    if mem is not None and not 64 <= mem <= max_memory_mib:
        raise InvalidArgument(f"memory of {mem} MiB is out of range [64, {max_memory_mib}]")
    return ResourceChange(vcpus, mem)
