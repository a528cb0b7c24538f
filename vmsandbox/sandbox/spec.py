"""From what a caller asks for to what the hypervisor gets: sizing and the domain spec.

:func:`size_sandbox` is the one sizing rule (our annotations win, then the pod's limits plus
its RuntimeClass overhead, then the defaults, all clamped to the host's maxima);
:func:`domain_spec` is the one place a sandbox becomes a :class:`DomainSpec`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..config import Config, VirtType
from ..errors import InvalidArgument
from ..hypervisor.domain import DiskSpec, DomainSpec, NicSpec, ShareSpec
from ..image import GuestImage
from ..network._model import NetworkPlan
from ..payloads.podconfig import PodConfig, memory_mib_from, vcpus_from
from .guestconfig import CONFIG_DISK
from .mounts import DiskPlan
from .share import SHARE_TAG, virtiofsd_wrapper
from .validate import MIN_MEMORY_MIB, resources_from_annotations

__all__ = ["Size", "size_sandbox", "check_fits_host", "domain_spec"]


@dataclass(frozen=True)
class Size:
    vcpus: int
    memory_mib: int
    max_memory_mib: int  # what memory may grow to while it runs


def size_sandbox(annotations: Mapping[str, str], pod: PodConfig | None, config: Config) -> Size:
    """vCPUs and memory of a new sandbox. Raises InvalidArgument for bad annotations."""
    vcpus, mem = resources_from_annotations(
        annotations, max_vcpus=config.max_vcpus, max_memory_mib=config.max_memory_mib
    )
    if pod is not None:
        vcpus = vcpus or _clamp(vcpus_from(pod), 1, config.max_vcpus)
        mem = mem or _clamp(memory_mib_from(pod), MIN_MEMORY_MIB, config.max_memory_mib)
    vcpus = vcpus or config.default_vcpus
    mem = mem or config.default_memory_mib
    return Size(vcpus, mem, max(mem, min(config.max_memory_mib, mem * config.memory_headroom)))


def check_fits_host(size: Size, host_memory_mib: int) -> None:
    """InvalidArgument when the guest's boot memory is more than the host has at all.

    Guest RAM is a shared memfd (virtio-fs needs it), which the kernel's overcommit heuristic
    never refuses, so QEMU would start such a guest and the host would swap or OOM-kill
    later; a private mapping of that size used to fail with ENOMEM at start. Sandboxes that
    fit one by one may still overcommit the host together: that is a density decision.
    """
    if host_memory_mib > 0 and size.memory_mib > host_memory_mib:
        raise InvalidArgument(f"memory of {size.memory_mib} MiB is more than this host's {host_memory_mib} MiB")


def domain_spec(
    *,
    sandbox_id: str,
    domain: str,
    config: Config,
    virt_type: VirtType,
    image: GuestImage,
    sandbox_dir: Path,
    agent_socket: str,
    size: Size,
    disks: Sequence[DiskPlan],
    taps: Sequence[str],
    network: NetworkPlan | None,
    partition: str = "",
    share: Path | None = None,
) -> DomainSpec:
    return DomainSpec(
        name=domain,
        sandbox_id=sandbox_id,
        state_dir=str(config.state_dir),
        virt_type=virt_type.value,
        arch=os.uname().machine,
        machine=config.machine_type(),
        loader=config.loader(),
        rng=config.rng,
        vcpus=size.vcpus,
        max_vcpus=size.vcpus,
        memory_mib=size.memory_mib,
        max_memory_mib=size.max_memory_mib,
        kernel=str(image.kernel),
        initrd=str(image.initrd),
        cmdline=config.kernel_cmdline,
        console_log=str(sandbox_dir / "console.log"),
        agent_socket=agent_socket,
        disks=(DiskSpec(str(sandbox_dir / CONFIG_DISK), "vsbx-config", readonly=True),)
        + tuple(DiskSpec(p.source, p.serial, p.format, p.block, p.readonly) for p in disks),
        nics=tuple(NicSpec(t, i.mac, i.mtu) for t, i in zip(taps, network.interfaces)) if network else (),
        partition=partition,
        shares=(ShareSpec(str(share), SHARE_TAG, str(virtiofsd_wrapper(config.state_dir))),) if share is not None else (),
    )


def _clamp(v: int | None, lo: int, hi: int) -> int | None:
    return None if v is None else max(lo, min(hi, v))
