"""``vmsandbox doctor``: what this host (and, with ``--containerd``, its containerd) lacks.

Exit code 1 when a required check fails; warnings (no KVM, no guest image yet) do not count.
"""

from __future__ import annotations

import argparse
import os
import shutil
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..config import Config, VirtType, detect_virt_type
from ..errors import VmSandboxError
from . import wiring
from .output import Output

if TYPE_CHECKING:
    from ..containerd_check import Check

__all__ = ["host_checks", "doctor"]

TOOLS = ("mkfs.ext4", "gcc", "cpio", "busybox", "dropbear", "crun", "apt-get")
"""What the guest image recipe and the rootfs copies run on the host (crun is copied into the guest)."""


def host_checks(cfg: Config, hypervisor_info: Callable[[str], dict[str, str]]) -> list[Check]:
    """The host's checks, in the order doctor prints them; ``hypervisor_info(uri)`` asks
    libvirtd for its versions (VmSandboxError when it does not answer)."""
    from ..containerd_check import Check  # here, not at start-up: it loads grpc

    checks: list[Check] = []

    def check(name: str, ok: bool, detail: str, required: bool = True) -> None:
        checks.append(Check(name, ok, detail, required))

    check("root", os.geteuid() == 0, "running as root" if os.geteuid() == 0 else "run as root (libvirt system, netns, taps)")
    try:
        host = hypervisor_info(cfg.uri)
        check("libvirtd", True, f"{cfg.uri} answers (libvirt {host['libvirt_version']}, "
                                f"{host['hypervisor']} {host['hypervisor_version']})")
    except VmSandboxError as e:
        check("libvirtd", False, f"{cfg.uri}: {e} (start it: hack/setup.sh)")
    vt = detect_virt_type(cfg.virt_type)
    check("accelerator", True, "KVM" if vt is VirtType.KVM else "TCG (software emulation; KVM not usable here)",
          required=False)
    # Without root:kvm 0660 libvirt re-probes QEMU's capabilities (~50 s) on every define.
    kvm_ok = not os.path.exists("/dev/kvm") or os.stat("/dev/kvm").st_mode & 0o060 == 0o060
    check("/dev/kvm access", kvm_ok, "group kvm rw" if kvm_ok else
          "not root:kvm 0660: libvirt re-probes QEMU on every define (hack/setup.sh fixes it)", required=False)
    check("network namespaces", os.path.exists("/proc/self/ns/net"), "/proc/self/ns/net")
    for tool in TOOLS:
        path = shutil.which(tool) or (f"/usr/sbin/{tool}" if os.path.exists(f"/usr/sbin/{tool}") else None)
        check(tool, path is not None, path or "missing (hack/setup.sh installs it)")
    # libvirt runs it for every sandbox's share: without it no domain starts.
    found = shutil.which(cfg.virtiofsd)
    check("virtiofsd", found is not None, found or f"{cfg.virtiofsd} missing (qemu-system-common; hack/setup.sh)")
    from ..image import find_image

    img = find_image(cfg.state_dir, cfg.images_dir, cfg.image_name)
    check("guest image", img is not None,
          f"{img.directory} (kernel {img.kernel_version})" if img else "not built yet (vmsandbox image build)",
          required=False)
    return checks


def doctor(args: argparse.Namespace, out: Output) -> int:
    checks = host_checks(wiring.config_from(args), wiring.hypervisor_info)
    if args.containerd:
        from ..containerd_check import check_containerd

        checks += check_containerd(args.containerd, sandboxer=args.sandboxer, pause_image=args.pause_image)
    ok = all(c.ok for c in checks if c.required)
    if out.json:
        out.emit({"ok": ok, "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail, "required": c.required}
                                       for c in checks]})
    else:
        for c in checks:
            print(f"{'ok ' if c.ok else ('MISSING' if c.required else 'warn')}  {c.name:<20} {c.detail}")
    return 0 if ok else 1
