"""Typed configuration: one tree, defaults in one place, a short list of env overrides.

Environment overrides (read only by :meth:`Config.from_env`):
``VMSANDBOX_URI`` (libvirt URI), ``VMSANDBOX_STATE_DIR``, ``VMSANDBOX_VIRT_TYPE``
(kvm | qemu | auto), ``VMSANDBOX_IMAGES_DIR`` (the guest recipe folder), ``VMSANDBOX_RUN_DIR``
(the task API sockets' folder).
"""

from __future__ import annotations

import enum
import logging
import os
import platform as _platform
from dataclasses import dataclass, field, replace
from pathlib import Path

from .errors import InvalidArgument

__all__ = ["Config", "VirtType", "detect_virt_type", "DEFAULT_STATE_DIR", "DEFAULT_RUN_DIR", "MAX_RUN_DIR",
           "DEFAULT_CONTAINERD_ADDRESS"]

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = Path("/var/lib/vmsandbox")
DEFAULT_URI = "qemu:///system"
DEFAULT_RUN_DIR = Path("/run/vmsandbox")
DEFAULT_CONTAINERD_ADDRESS = "/run/containerd/containerd.sock"
MAX_RUN_DIR = 45
"""The longest run dir that keeps every task socket under containerd's 106-byte limit."""


class VirtType(str, enum.Enum):
    """How guests are accelerated: hardware KVM, QEMU's software emulation (TCG), or auto."""

    KVM = "kvm"
    QEMU = "qemu"
    AUTO = "auto"


def _kvm_usable() -> tuple[bool, str]:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return False, f"/dev/kvm cannot be opened ({e.strerror})"
    os.close(fd)
    machine = _platform.machine()
    if machine in ("aarch64", "arm64"):
        return True, "aarch64 with /dev/kvm"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    if " vmx" in flags or " svm" in flags:
        return True, "/dev/kvm opens and the CPU advertises vmx/svm"
    # A PVM guest kernel exposes /dev/kvm, but QEMU's accel=kvm aborts on it.
    return False, "/dev/kvm opens but the CPU advertises no vmx/svm (nested PVM?)"


def detect_virt_type(requested: VirtType = VirtType.AUTO) -> VirtType:
    """Resolve ``auto`` to kvm when KVM is really usable, else to qemu with a warning."""
    if requested is not VirtType.AUTO:
        return requested
    ok, why = _kvm_usable()
    if ok:
        return VirtType.KVM
    log.warning("KVM is not usable (%s): guests run under QEMU software emulation (TCG), "
                "which is much slower", why)
    return VirtType.QEMU


@dataclass(frozen=True)
class Config:
    """Everything the controller needs to know about the host.

    ``boot_timeout`` bounds start() (kernel boot to agent ready); ``stop_timeout`` is the
    default grace period of stop() before the VM is forced off.
    """

    uri: str = DEFAULT_URI
    state_dir: Path = DEFAULT_STATE_DIR
    run_dir: Path = DEFAULT_RUN_DIR  # one task API socket per sandbox under it
    # containerd's gRPC socket, where serve publishes the containers' /tasks/* events ("": none)
    containerd_address: str = DEFAULT_CONTAINERD_ADDRESS
    virt_type: VirtType = VirtType.AUTO
    images_dir: Path = field(default_factory=lambda: Path(__file__).resolve().parent.parent / "images")
    image_name: str = "default"
    default_vcpus: int = 1
    default_memory_mib: int = 256
    max_vcpus: int = 64
    max_memory_mib: int = 1024 * 1024
    memory_headroom: int = 2  # a guest may grow to this multiple of its boot memory (virtio-mem)
    boot_timeout: float = 120.0
    stop_timeout: float = 10.0
    machine: str = ""  # "" = q35 on x86_64, virt on aarch64
    firmware: str = "auto"  # auto = qboot when QEMU ships it (fast direct kernel boot), else "bios"
    rng: bool = True
    # TCG's translation cache (MiB; 0: QEMU's default of 1 GiB). 32 measured no slower to boot
    # than the default and 23 MiB less resident when idle; 8 booted about twice as slow.
    tcg_tb_cache_mib: int = 32
    # Start a sandbox's VM by restoring a saved, booted template of its image and shape
    # (built on first use) instead of booting it; False: always boot (see sandbox/templates.py).
    templates: bool = True
    # Starts that boot or restore at once (the rest wait their turn): 0 = twice the host's CPU
    # count, -1 = no limit. A start under TCG is CPU-bound: far more at once than cores only
    # share them.
    max_parallel_starts: int = 0
    virtiofsd: str = "/usr/lib/qemu/virtiofsd"  # QEMU 7.2's C virtiofsd (Debian 12: qemu-system-common)
    kernel_cmdline: str = (
        "console=ttyS0 panic=-1 quiet loglevel=3 i8042.noaux i8042.nokbd i8042.nopnp i8042.dumbkbd "
        "cryptomgr.notests noreplace-smp no_timer_check tsc=reliable rcupdate.rcu_expedited=1 "
        # virtio-mem's blocks go online as they are plugged, movable while the ratio allows.
        "memhp_default_state=online memory_hotplug.online_policy=auto-movable "
        # The hot-plug region lies above 4 GiB, which makes x86 reserve a 64 MiB swiotlb bounce
        # buffer (measured: MemTotal 286 MiB of 384); virtio devices do 64-bit DMA and need none.
        "swiotlb=noforce"
    )

    def __post_init__(self) -> None:
        if self.boot_timeout <= 0 or self.stop_timeout < 0:
            raise InvalidArgument("boot_timeout must be > 0 and stop_timeout >= 0")
        if self.max_parallel_starts < -1:
            raise InvalidArgument("max_parallel_starts must be -1 (no limit), 0 (the CPU count) or more")
        if not self.run_dir.is_absolute() or len(str(self.run_dir)) > MAX_RUN_DIR:
            raise InvalidArgument(f"run_dir must be an absolute path of at most {MAX_RUN_DIR} characters "
                                  f"(task sockets must stay under 106 bytes), not {str(self.run_dir)!r}")

    def loader(self) -> str:
        """The firmware ROM path for domains, "" for QEMU's default BIOS."""
        if self.firmware == "bios":
            return ""
        if self.firmware != "auto":
            return self.firmware
        qboot = Path("/usr/share/qemu/qboot.rom")
        return str(qboot) if _platform.machine() == "x86_64" and qboot.is_file() else ""

    def machine_type(self) -> str:
        """The libvirt machine type for domains (``machine``, or the architecture's default)."""
        return self.machine or ("q35" if _platform.machine() == "x86_64" else "virt")

    @classmethod
    def from_env(cls, **overrides: object) -> Config:
        """Defaults, then environment overrides, then explicit keyword overrides."""
        env: dict[str, object] = {}
        if v := os.environ.get("VMSANDBOX_URI"):
            env["uri"] = v
        if v := os.environ.get("VMSANDBOX_STATE_DIR"):
            env["state_dir"] = Path(v)
        if v := os.environ.get("VMSANDBOX_VIRT_TYPE"):
            env["virt_type"] = parse_virt_type(v)
        if v := os.environ.get("VMSANDBOX_IMAGES_DIR"):
            env["images_dir"] = Path(v)
        if v := os.environ.get("VMSANDBOX_RUN_DIR"):
            env["run_dir"] = Path(v)
        if v := os.environ.get("VMSANDBOX_TEMPLATES"):
            if v.lower() not in ("0", "1", "true", "false", "yes", "no", "on", "off"):
                raise InvalidArgument(f"VMSANDBOX_TEMPLATES must be 0 or 1, not {v!r}")
            env["templates"] = v.lower() in ("1", "true", "yes", "on")
        if (v := os.environ.get("VMSANDBOX_CONTAINERD_ADDRESS")) is not None:
            env["containerd_address"] = v
        env.update({k: v for k, v in overrides.items() if v is not None})
        return replace(cls(), **env)  # type: ignore[arg-type]


def parse_virt_type(value: str) -> VirtType:
    try:
        return VirtType(value.lower())
    except ValueError:
        raise InvalidArgument(f"virt type must be kvm, qemu or auto, not {value!r}") from None
