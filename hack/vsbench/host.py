"""This host and the guest it boots: facts for the report, and small host I/O helpers."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .stats import kib_field

__all__ = ["say", "read_text", "run", "host_facts", "code_facts", "loadavg"]

REPO = Path(__file__).resolve().parents[2]


def say(msg: str) -> None:
    """Progress on stderr (the table goes to stdout)."""
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def read_text(path: str | Path) -> str:
    """A file's text, or "" when it cannot be read."""
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def run(argv: Sequence[str], timeout: float) -> str:
    """Run a host command, return its stdout; raise with its stderr if it failed."""
    r = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        cmd = " ".join(a if len(a) <= 80 else "<script>" for a in argv)
        raise RuntimeError(f"{cmd} exited {r.returncode}: {(r.stderr or r.stdout).strip()[-500:]}")
    return r.stdout


def loadavg() -> list[str]:
    return read_text("/proc/loadavg").split()[:3]


def _cpu_model() -> str:
    for line in read_text("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _version(v: int) -> str:
    return f"{v // 1000000}.{v // 1000 % 1000}.{v % 1000}"


def _mib_of(el: ET.Element | None) -> int | None:
    """A libvirt memory element (<memory unit='KiB'>...) in MiB."""
    if el is None or not (el.text or "").strip():
        return None
    scale = {"b": 1 / 1024**2, "bytes": 1 / 1024**2, "k": 1 / 1024, "kib": 1 / 1024, "m": 1, "mib": 1,
             "g": 1024, "gib": 1024}.get((el.get("unit") or "KiB").lower(), 1 / 1024)
    return int(int(el.text or 0) * scale)


def host_facts(*, virt: str, domain_xml: str, guest_kernel: str, libvirt_version: int,
               qemu_version: int) -> dict[str, Any]:
    """What the figures depend on: the host, its libvirt and QEMU, and the guest's shape."""
    root = ET.fromstring(domain_xml)
    os_type = root.find("os/type")
    vcpu = root.find("vcpu")
    return {
        "virt_type": virt,
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "mem_total_kib": kib_field(read_text("/proc/meminfo"), "MemTotal"),
        "host_kernel": platform.release(),
        "libvirt_version": _version(libvirt_version),
        "qemu_version": _version(qemu_version),
        "guest_kernel": guest_kernel,
        "guest_machine": os_type.get("machine") if os_type is not None else None,
        "guest_vcpus": int(vcpu.get("current") or vcpu.text or 0) if vcpu is not None else None,
        "guest_max_vcpus": int(vcpu.text or 0) if vcpu is not None else None,
        "guest_memory_mib": _mib_of(root.find("currentMemory")),
        "guest_max_memory_mib": _mib_of(root.find("memory")),
        "guest_cmdline": root.findtext("os/cmdline"),
        "python": platform.python_version(),
        "loadavg_at_start": loadavg(),
    }


def code_facts() -> dict[str, str | None]:
    """Which vmsandbox is measured: the package's folder and, in a git checkout, its commit."""
    import vmsandbox

    src = Path(vmsandbox.__file__).resolve().parent
    try:
        r = subprocess.run(["git", "-C", str(src), "describe", "--always", "--dirty"], capture_output=True,
                           text=True, timeout=10)
        commit = r.stdout.strip() if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"vmsandbox": str(src), "commit": commit}
