"""CRI's ``updated-resources`` sandbox extension: the pod's new resources and overhead.

containerd's CRI answers the kubelet's UpdatePodSandboxResources by storing
``UpdatedResources{Overhead, Resources *runtime.LinuxContainerResources}`` as the sandbox's
``updated-resources`` extension and calling Update with ``fields=["extensions"]``. It is a
registered Go type, so typeurl writes Go's encoding/json of it (type URL
``io.containerd.cri.v1/UpdatedResources``): ``{"Overhead": null, "Resources":
{"cpu_quota": 50000, "memory_limit_in_bytes": 268435456, ...}}``. Each side is decoded into the
generated ``runtime.v1.LinuxContainerResources`` by protobuf's json_format, which takes the
proto field names Go writes as well as protojson's lowerCamelCase ones.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

from google.protobuf import json_format

from ..errors import InvalidArgument
from ..model import AnyMessage
from ..proto.k8s.runtime.v1 import api_pb2
from .podconfig import PodConfig

__all__ = ["EXTENSION", "TYPE_URL", "LinuxResources", "UpdatedResources", "parse_updated_resources", "resized"]

#: The extension's key in ``Sandbox.extensions``.
EXTENSION = "updated-resources"
#: The type URL containerd writes (a JSON payload; only the extension key is relied on).
TYPE_URL = "io.containerd.cri.v1/UpdatedResources"


@dataclass(frozen=True)
class LinuxResources:
    """The fields of a ``LinuxContainerResources`` that size a guest (0: not specified)."""

    cpu_period: int = 0
    cpu_quota: int = 0
    cpu_shares: int = 0
    memory_limit_bytes: int = 0
    cpuset_cpus: str = ""


@dataclass(frozen=True)
class UpdatedResources:
    """The pod's new resources (the sum of its containers) and its RuntimeClass overhead;
    None where containerd wrote null."""

    resources: LinuxResources | None = None
    overhead: LinuxResources | None = None


def parse_updated_resources(a: AnyMessage) -> UpdatedResources:
    """Decode the extension's JSON. Keys match as Go's decoder matches them (any case);
    unknown keys and fields are ignored. Raises InvalidArgument for bytes that are not
    such an object or a field of the wrong type."""
    try:
        doc = json.loads(a.value)
    except ValueError as e:
        raise InvalidArgument(f"extension {EXTENSION} is not JSON: {e}") from e
    if not isinstance(doc, dict):
        raise InvalidArgument(f"extension {EXTENSION} must be a JSON object, not {type(doc).__name__}")
    sides = {str(k).lower(): v for k, v in doc.items()}
    return UpdatedResources(_linux(sides.get("resources"), "Resources"), _linux(sides.get("overhead"), "Overhead"))


def _linux(value: object, where: str) -> LinuxResources | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidArgument(f"extension {EXTENSION}: {where} must be an object or null, not {type(value).__name__}")
    msg = api_pb2.LinuxContainerResources()
    try:
        json_format.ParseDict(value, msg, ignore_unknown_fields=True)
    except json_format.ParseError as e:
        raise InvalidArgument(f"extension {EXTENSION}: {where}: {e}") from e
    return LinuxResources(
        cpu_period=msg.cpu_period,
        cpu_quota=msg.cpu_quota,
        cpu_shares=msg.cpu_shares,
        memory_limit_bytes=msg.memory_limit_in_bytes,
        cpuset_cpus=msg.cpuset_cpus,
    )


def resized(pod: PodConfig | None, update: UpdatedResources) -> PodConfig | None:
    """The pod config with the update's resources, to size the guest as create does: its
    overhead replaces create's when it carries one. None when it carries no resources."""
    r, o = update.resources, update.overhead
    if r is None:
        return None
    pc = replace(pod or PodConfig(), cpu_quota=r.cpu_quota, cpu_period=r.cpu_period, cpu_shares=r.cpu_shares,
                 cpuset_cpus=r.cpuset_cpus, memory_limit_bytes=r.memory_limit_bytes)
    if o is not None:
        pc = replace(pc, overhead_cpu_quota=o.cpu_quota, overhead_cpu_period=o.cpu_period,
                     overhead_memory_limit_bytes=o.memory_limit_bytes)
    return pc
