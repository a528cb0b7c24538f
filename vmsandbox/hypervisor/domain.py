"""Domain XML for a sandbox, built by pure code from a :class:`DomainSpec`.

No libvirt import here: the XML is checked by golden-file tests and by loading it into
libvirt's in-process ``test:///default`` driver.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

__all__ = ["DiskSpec", "NicSpec", "DomainSpec", "build_domain_xml", "parse_metadata", "METADATA_NS"]

METADATA_NS = "https://vmsandbox.io/xmlns/sandbox/1"
METADATA_PREFIX = "vmsandbox"


@dataclass(frozen=True)
class DiskSpec:
    """One virtio disk: a file image (raw or qcow2) or a block device."""

    source: str
    serial: str
    format: str = "raw"  # raw | qcow2
    block: bool = False
    readonly: bool = False


@dataclass(frozen=True)
class NicSpec:
    """A NIC on a pre-made tap (``type='ethernet'``, not managed by libvirt)."""

    tap: str
    mac: str
    mtu: int = 1500


@dataclass(frozen=True)
class DomainSpec:
    name: str
    sandbox_id: str
    state_dir: str
    virt_type: str  # "kvm" | "qemu"
    arch: str  # libvirt arch, e.g. x86_64
    machine: str
    vcpus: int
    max_vcpus: int
    memory_mib: int
    max_memory_mib: int
    kernel: str
    initrd: str
    cmdline: str
    console_log: str
    agent_socket: str
    disks: tuple[DiskSpec, ...] = ()
    nics: tuple[NicSpec, ...] = ()
    balloon_period: int = 2
    agent_channel: str = "vmsandbox.agent"
    loader: str = ""  # firmware ROM (e.g. qboot) instead of the default BIOS
    rng: bool = True  # virtio-rng fed from the host: the guest's RNG is ready at once
    extra_metadata: dict[str, str] = field(default_factory=dict)


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrs)
    if text is not None:
        el.text = text
    return el


def build_domain_xml(spec: DomainSpec) -> str:
    """The libvirt domain XML for ``spec``: direct kernel boot, virtio everything, no
    graphics or USB, console to a file, the agent on a virtio-serial unix channel."""
    dom = ET.Element("domain", {"type": spec.virt_type})
    _sub(dom, "name", spec.name)
    _sub(dom, "title", f"vmsandbox sandbox {spec.sandbox_id}")
    meta = _sub(dom, "metadata")
    ours = _sub(meta, f"{{{METADATA_NS}}}sandbox")
    _sub(ours, f"{{{METADATA_NS}}}id", spec.sandbox_id)
    _sub(ours, f"{{{METADATA_NS}}}state-dir", spec.state_dir)
    for k, v in sorted(spec.extra_metadata.items()):
        _sub(ours, f"{{{METADATA_NS}}}{k}", v)
    _sub(dom, "memory", str(spec.max_memory_mib), unit="MiB")
    _sub(dom, "currentMemory", str(spec.memory_mib), unit="MiB")
    _sub(dom, "vcpu", str(spec.max_vcpus), placement="static", current=str(spec.vcpus))
    os_ = _sub(dom, "os")
    _sub(os_, "type", "hvm", arch=spec.arch, machine=spec.machine)
    if spec.loader:
        _sub(os_, "loader", spec.loader, type="rom", readonly="yes")
    _sub(os_, "kernel", spec.kernel)
    _sub(os_, "initrd", spec.initrd)
    _sub(os_, "cmdline", spec.cmdline)
    features = _sub(dom, "features")
    _sub(features, "acpi")
    if spec.virt_type == "kvm":
        _sub(dom, "cpu", mode="host-passthrough")
    _sub(dom, "clock", offset="utc")
    _sub(dom, "on_poweroff", "destroy")
    _sub(dom, "on_reboot", "destroy")
    _sub(dom, "on_crash", "destroy")
    devices = _sub(dom, "devices")
    for i, disk in enumerate(spec.disks):
        d = _sub(devices, "disk", type="block" if disk.block else "file", device="disk")
        _sub(d, "driver", name="qemu", type=disk.format, cache="none" if disk.block else "writeback")
        _sub(d, "source", **({"dev": disk.source} if disk.block else {"file": disk.source}))
        _sub(d, "target", dev=_disk_name(i), bus="virtio")
        _sub(d, "serial", disk.serial)
        if disk.readonly:
            _sub(d, "readonly")
    for nic in spec.nics:
        n = _sub(devices, "interface", type="ethernet")
        _sub(n, "mac", address=nic.mac)
        _sub(n, "target", dev=nic.tap, managed="no")
        _sub(n, "model", type="virtio")
        _sub(n, "mtu", size=str(nic.mtu))
    # libvirt gives a file chardev to virtlogd (qemu.conf stdio_handler="logd", the default),
    # which rotates it at max_size (2 MiB, 3 backups): a chatty guest cannot fill the disk.
    serial = _sub(devices, "serial", type="file")
    _sub(serial, "source", path=spec.console_log)
    _sub(serial, "target", port="0")
    chan = _sub(devices, "channel", type="unix")
    _sub(chan, "source", mode="bind", path=spec.agent_socket)
    _sub(chan, "target", type="virtio", name=spec.agent_channel)
    _sub(devices, "controller", type="usb", model="none")
    video = _sub(devices, "video")
    _sub(video, "model", type="none")
    balloon = _sub(devices, "memballoon", model="virtio")
    _sub(balloon, "stats", period=str(spec.balloon_period))
    if spec.rng:
        rng = _sub(devices, "rng", model="virtio")
        _sub(rng, "backend", "/dev/urandom", model="random")
    ET.register_namespace(METADATA_PREFIX, METADATA_NS)
    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode") + "\n"


def _disk_name(index: int) -> str:
    letters = ""
    n = index
    while True:
        letters = chr(ord("a") + n % 26) + letters
        n = n // 26 - 1
        if n < 0:
            return "vd" + letters


def parse_metadata(xml: str) -> dict[str, str]:
    """Our ``<metadata>`` element (as libvirt returns it) as a dict; empty if absent."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return {}
    # libvirt returns the element it stores under our namespace *without* the namespace
    # (libvirt 9.0: "<sandbox><id>..."), while the full domain XML keeps it.
    if root.tag in (f"{{{METADATA_NS}}}sandbox", "sandbox"):
        el: ET.Element | None = root
    else:
        el = root.find(f".//{{{METADATA_NS}}}sandbox")
    if el is None:
        return {}
    return {child.tag.split("}", 1)[-1]: child.text or "" for child in el}
