"""What an update asks of the guest's resources: vCPUs and memory.

Sources, in order (later wins): our annotations (``vmsandbox.io/vcpus``,
``vmsandbox.io/memory-mib``, from the OCI spec), the same keys as labels, and CRI's
``updated-resources`` extension (:mod:`vmsandbox.payloads.updated_resources`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from collections.abc import Mapping, Set
from dataclasses import dataclass, replace

from ..config import Config
from ..errors import FailedPrecondition, InvalidArgument
from ..model import AnyMessage, Phase, SandboxMetadata, utcnow
from ..payloads.podconfig import PodConfig, memory_mib_from, vcpus_from
from ..payloads.updated_resources import EXTENSION as UPDATED_RESOURCES_EXTENSION
from ..payloads.updated_resources import parse_updated_resources, resized
from .store import SandboxRecord
from .validate import resources_from_annotations

__all__ = ["ResourceChange", "UpdatePlan", "resources_from_update", "plan_update", "updated_fields",
           "UPDATABLE_FIELDS", "UPDATED_RESOURCES_EXTENSION"]

UPDATABLE_FIELDS = frozenset({"labels", "extensions", "spec", "annotations", "runtime", "sandboxer"})


@dataclass(frozen=True)
class ResourceChange:
    vcpus: int | None = None
    memory_mib: int | None = None


def _from_cri(ext: AnyMessage, pod: PodConfig | None) -> ResourceChange:
    # The same sizing as at create: the pod's limits plus its RuntimeClass overhead.
    pc = resized(pod, parse_updated_resources(ext))
    return ResourceChange() if pc is None else ResourceChange(vcpus_from(pc), memory_mib_from(pc))


def resources_from_update(
    sandbox: SandboxMetadata,
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
        cri = _from_cri(ext, pod)
        vcpus, mem = cri.vcpus or vcpus, cri.memory_mib or mem
    if mem is not None and not 64 <= mem <= max_memory_mib:
        raise InvalidArgument(f"memory of {mem} MiB is out of range [64, {max_memory_mib}]")
    return ResourceChange(vcpus, mem)


@dataclass(frozen=True)
class UpdatePlan:
    """What an update leaves in the record (and memory_mib is what the guest gets)."""

    sandbox: SandboxMetadata
    annotations: dict[str, str]
    vcpus: int
    memory_mib: int


def updated_fields(sandbox: object, fields: Sequence[str], sandbox_id: str) -> set[str]:
    """The fields an update names (all updatable ones when none). Raises InvalidArgument."""
    if not isinstance(sandbox, SandboxMetadata):
        raise InvalidArgument("sandbox must be a vmsandbox.Sandbox")
    unknown = set(fields) - UPDATABLE_FIELDS
    if unknown:
        raise InvalidArgument(
            f"cannot update field(s) {', '.join(sorted(unknown))}; updatable: {', '.join(sorted(UPDATABLE_FIELDS))}",
            sandbox_id=sandbox_id,
        )
    return set(fields) or set(UPDATABLE_FIELDS)


def plan_update(rec: SandboxRecord, sandbox: SandboxMetadata, names: Set[str], config: Config) -> UpdatePlan:
    """The new record values, or FailedPrecondition for a change the guest cannot take:
    another vCPU count (no hot-plug), memory past the boot-time maximum, memory while it
    does not run. Pure: nothing is changed."""
    attrs = {n: getattr(sandbox, n) for n in names if n != "annotations"}
    new_sandbox = replace(rec.sandbox, **attrs, updated_at=utcnow())
    annotations = dict(rec.annotations)
    if names & {"spec", "annotations"}:
        annotations.update(spec_annotations(sandbox.spec))
    change = resources_from_update(new_sandbox, annotations, names, max_vcpus=config.max_vcpus,
                                   max_memory_mib=config.max_memory_mib, pod=rec.pod)
    if change.vcpus is not None and change.vcpus != rec.vcpus:
        raise FailedPrecondition(
            f"cannot change vCPUs from {rec.vcpus} to {change.vcpus}: vCPU hot-plug is not supported; "
            "set vmsandbox.io/vcpus at create", sandbox_id=rec.id)
    mem = change.memory_mib if change.memory_mib is not None else rec.memory_mib
    if mem != rec.memory_mib:
        if rec.phase is not Phase.RUNNING:
            raise FailedPrecondition(f"sandbox is {rec.phase.value}: memory can only change while it runs",
                                     sandbox_id=rec.id)
        if mem > rec.max_memory_mib:
            raise FailedPrecondition(
                f"cannot grow memory to {mem} MiB: the guest booted with at most {rec.max_memory_mib} MiB "
                "(the balloon cannot go past it)", sandbox_id=rec.id)
    return UpdatePlan(new_sandbox, annotations, rec.vcpus, mem)


def spec_annotations(spec: AnyMessage | None) -> dict[str, str]:
    """The annotations of an OCI runtime spec held in an Any (JSON, as containerd writes it)."""
    if spec is None:
        return {}
    try:
        doc = json.loads(spec.value)
    except ValueError:
        return {}
    ann = doc.get("annotations") if isinstance(doc, dict) else None
    return {str(k): str(v) for k, v in ann.items()} if isinstance(ann, dict) else {}
