"""Domain XML for a sandbox, built by pure code from a :class:`DomainSpec`.

No libvirt import here: the XML is checked by golden-file tests and by loading it into
libvirt's in-process ``test:///default`` driver.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

__all__ = ["DiskSpec", "NicSpec", "ShareSpec", "DomainSpec", "build_domain_xml", "device_xml", "disk_target", "restore_xml", "CONFIG_SERIAL", "hotplugged", "hotplug_mib", "MemoryChange", "plan_memory_change", "parse_metadata", "METADATA_NS"]

METADATA_NS = "https://vmsandbox.io/xmlns/sandbox/1"
METADATA_PREFIX = "vmsandbox"
CONFIG_SERIAL = "vsbx-config"
ET.register_namespace(METADATA_PREFIX, METADATA_NS)


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
class ShareSpec:
    """A host folder served to the guest over virtio-fs (libvirt runs a virtiofsd for it)."""

    source: str
    tag: str
    virtiofsd: str  # the daemon's path, as <binary path>


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
    memory_mib: int  # what the guest boots with
    max_memory_mib: int  # above memory_mib: a virtio-mem device that can plug the rest later
    kernel: str
    initrd: str
    cmdline: str
    console_log: str
    agent_socket: str
    disks: tuple[DiskSpec, ...] = ()
    nics: tuple[NicSpec, ...] = ()
    shares: tuple[ShareSpec, ...] = ()
    balloon_period: int = 2
    agent_channel: str = "vmsandbox.agent"
    loader: str = ""  # firmware ROM (e.g. qboot) instead of the default BIOS
    rng: bool = True  # virtio-rng fed from the host: the guest's RNG is ready at once
    tb_cache_mib: int = 0  # TCG only: the translation cache's size (0: QEMU's 1 GiB default)
    partition: str = ""  # libvirt resource partition (the pod's systemd slice), "" for libvirt's default
    hotplug_block_mib: int = 2  # virtio-mem granule (x86's pageblock: Linux >= 5.17 plugs at this size)
    shared_memory: bool = False  # memfd RAM even without a share (a template: one is plugged in later)
    spare_ports: int = 0  # empty PCIe root ports for devices plugged in while it runs
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
    _metadata(_sub(dom, "metadata"), spec)
    hotplug = hotplug_mib(spec)
    if hotplug:
        # Memory hot-plug wants a maximum and a NUMA node for the device to feed.
        _sub(dom, "maxMemory", str(spec.memory_mib + hotplug), unit="MiB", slots="1")
    _sub(dom, "memory", str(spec.memory_mib + hotplug), unit="MiB")
    _sub(dom, "currentMemory", str(spec.memory_mib), unit="MiB")
    if spec.shares or spec.shared_memory:
        # vhost-user (virtiofsd) maps guest RAM: it must be shared memory, virtio-mem's too.
        backing = _sub(dom, "memoryBacking")
        _sub(backing, "source", type="memfd")
        _sub(backing, "access", mode="shared")
    _sub(dom, "vcpu", str(spec.max_vcpus), placement="static", current=str(spec.vcpus))
    if spec.partition:
        _sub(_sub(dom, "resource"), "partition", spec.partition)
    os_ = _sub(dom, "os")
    _sub(os_, "type", "hvm", arch=spec.arch, machine=spec.machine)
    if spec.loader:
        _sub(os_, "loader", spec.loader, type="rom", readonly="yes")
    _sub(os_, "kernel", spec.kernel)
    _sub(os_, "initrd", spec.initrd)
    _sub(os_, "cmdline", spec.cmdline)
    features = _sub(dom, "features")
    _sub(features, "acpi")
    if spec.virt_type == "qemu" and spec.tb_cache_mib:
        # QEMU's default TCG code buffer is 1 GiB of huge-page-advised memory that an idle
        # guest fills to ~55 MiB and a busy one past 110 MiB; bounded it flushes instead.
        _sub(_sub(features, "tcg"), "tb-cache", str(spec.tb_cache_mib), unit="MiB")
    if spec.virt_type == "kvm" or hotplug:
        cpu = _sub(dom, "cpu", **({"mode": "host-passthrough"} if spec.virt_type == "kvm" else {}))
        if hotplug:
            numa = _sub(cpu, "numa")
            _sub(numa, "cell", id="0", cpus=f"0-{spec.max_vcpus - 1}", memory=str(spec.memory_mib), unit="MiB")
    _sub(dom, "clock", offset="utc")
    _sub(dom, "on_poweroff", "destroy")
    _sub(dom, "on_reboot", "destroy")
    _sub(dom, "on_crash", "destroy")
    devices = _sub(dom, "devices")
    for i, disk in enumerate(spec.disks):
        devices.append(_disk(disk, i))
    for nic in spec.nics:
        devices.append(_nic(nic))
    for share in spec.shares:
        devices.append(_share(share))
    # libvirt gives a file chardev to virtlogd (qemu.conf stdio_handler="logd", the default),
    # which rotates it at max_size (2 MiB, 3 backups): a chatty guest cannot fill the disk.
    serial = _sub(devices, "serial", type="file")
    _sub(serial, "source", path=spec.console_log)
    _sub(serial, "target", port="0")
    chan = _sub(devices, "channel", type="unix")
    _sub(chan, "source", mode="bind", path=spec.agent_socket)
    _sub(chan, "target", type="virtio", name=spec.agent_channel)
    _sub(devices, "controller", type="usb", model="none")
    for i in range(spec.spare_ports):
        # libvirt refuses a root port without an index ("index='0' must be pcie-root"); these
        # sit above the ones it adds for the devices above.
        _sub(devices, "controller", type="pci", model="pcie-root-port", index=str(SPARE_PORT_INDEX + i))
    video = _sub(devices, "video")
    _sub(video, "model", type="none")
    if hotplug:
        mem = _sub(devices, "memory", model="virtio-mem")
        target = _sub(mem, "target")
        _sub(target, "size", str(hotplug), unit="MiB")
        _sub(target, "node", "0")
        _sub(target, "block", str(spec.hotplug_block_mib), unit="MiB")
        _sub(target, "requested", "0", unit="MiB")
    # Free page reporting: the guest hands back the pages it frees (QEMU punches them out
    # of the memfd), so memory a boot or a burst touched does not stay with the VM.
    balloon = _sub(devices, "memballoon", model="virtio", freePageReporting="on")
    _sub(balloon, "stats", period=str(spec.balloon_period))
    if spec.rng:
        rng = _sub(devices, "rng", model="virtio")
        _sub(rng, "backend", "/dev/urandom", model="random")
    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode") + "\n"


SPARE_PORT_INDEX = 8


def _disk(disk: DiskSpec, index: int) -> ET.Element:
    d = ET.Element("disk", type="block" if disk.block else "file", device="disk")
    _sub(d, "driver", name="qemu", type=disk.format, cache="none" if disk.block else "writeback")
    _sub(d, "source", **({"dev": disk.source} if disk.block else {"file": disk.source}))
    _sub(d, "target", dev=disk_target(index), bus="virtio")
    _sub(d, "serial", disk.serial)
    if disk.readonly:
        _sub(d, "readonly")
    return d


def _nic(nic: NicSpec) -> ET.Element:
    n = ET.Element("interface", type="ethernet")
    _sub(n, "mac", address=nic.mac)
    _sub(n, "target", dev=nic.tap, managed="no")
    _sub(n, "model", type="virtio")
    _sub(n, "mtu", size=str(nic.mtu))
    return n


def _share(share: ShareSpec) -> ET.Element:
    fs = ET.Element("filesystem", type="mount", accessmode="passthrough")
    _sub(fs, "driver", type="virtiofs")
    _sub(fs, "binary", path=share.virtiofsd)
    _sub(fs, "source", dir=share.source)
    _sub(fs, "target", dir=share.tag)
    return fs


def device_xml(device: DiskSpec | NicSpec | ShareSpec, index: int = 0) -> str:
    """One device's XML, as in :func:`build_domain_xml` (``index``: a disk's position, which
    names its target), for plugging it into a running domain."""
    if isinstance(device, DiskSpec):
        el = _disk(device, index)
    elif isinstance(device, NicSpec):
        el = _nic(device)
    else:
        el = _share(device)
    return ET.tostring(el, encoding="unicode")


def _metadata(parent: ET.Element, spec: DomainSpec) -> None:
    ours = _sub(parent, f"{{{METADATA_NS}}}sandbox")
    _sub(ours, f"{{{METADATA_NS}}}id", spec.sandbox_id)
    _sub(ours, f"{{{METADATA_NS}}}state-dir", spec.state_dir)
    for k, v in sorted(spec.extra_metadata.items()):
        _sub(ours, f"{{{METADATA_NS}}}{k}", v)


def _serial(disk: ET.Element) -> str:
    return (disk.findtext("serial") or "").strip()


def hotplugged(defined_xml: str) -> list[str]:
    """The devices of a sandbox's domain that a template does not have, as XML to plug into
    the restored VM: disks past the config disk, NICs, shares. Their PCI addresses (libvirt
    placed them for a cold boot) are dropped: the restored VM has its own free ports."""
    devices = ET.fromstring(defined_xml).find("devices")
    out: list[str] = []
    if devices is None:
        return out
    picked = [d for d in devices.findall("disk") if _serial(d) != CONFIG_SERIAL]
    picked += devices.findall("interface") + devices.findall("filesystem")
    for dev in picked:
        for child in list(dev):
            if child.tag in ("address", "alias"):
                dev.remove(child)
        out.append(ET.tostring(dev, encoding="unicode"))
    return out


_MUST_MATCH = ("vcpu", "memory", "currentMemory", "maxMemory", "os/type", "os/loader", "os/kernel", "os/initrd",
               "os/cmdline", "features/tcg/tb-cache", "cpu/numa/cell", "devices/memory/target/size")


def _signature(root: ET.Element, path: str) -> tuple[str, tuple[tuple[str, str], ...]] | None:
    el = root.find(path)
    if el is None:
        return None
    return (el.text or "").strip(), tuple(sorted(el.attrib.items()))


def restore_xml(saved_xml: str, defined_xml: str, *, kernel: str = "", initrd: str = "") -> str:
    """A template's saved live XML made into the sandbox domain ``defined_xml``: that one's
    name, UUID, title, metadata, resource partition, console log, agent socket and config
    disk. Nothing the guest sees changes: the machine, memory, CPUs and devices stay the
    template's, which is what lets QEMU load the template's state (:func:`hotplugged`
    lists the rest). ValueError when the two differ in what a restore must keep (the shape,
    the kernel, its command line): that template does not fit this sandbox. ``kernel`` and
    ``initrd`` replace the boot files QEMU loads at start but a restored guest never reads
    (QEMU keeps a private copy of the kernel: 14 MiB per VM)."""
    saved, defined = ET.fromstring(saved_xml), ET.fromstring(defined_xml)
    for path in _MUST_MATCH:
        if _signature(saved, path) != _signature(defined, path):
            raise ValueError(f"the template's {path} differs from the sandbox's")
    for tag in ("name", "uuid", "title", "metadata", "resource"):
        old, new = saved.find(tag), defined.find(tag)
        if old is not None:
            saved.remove(old)
        if new is not None:
            saved.insert(list(defined).index(new), new)
    for tag, path in (("os/kernel", kernel), ("os/initrd", initrd)):
        if path and (el := saved.find(tag)) is not None:
            el.text = path
    devices, mine = saved.find("devices"), defined.find("devices")
    if devices is None or mine is None:
        raise ValueError("a domain without devices")

    def source(dev: ET.Element | None, attr: str) -> str | None:
        src = dev.find("source") if dev is not None else None
        return src.get(attr) if src is not None else None

    console = source(next((d for d in mine.findall("serial") if d.get("type") == "file"), None), "path")
    for chardev in devices.findall("serial") + devices.findall("console"):
        if chardev.get("type") == "file" and (src := chardev.find("source")) is not None and console:
            # appended to: the log starts with the template's boot (the restore does not boot)
            src.set("path", console)
            src.set("append", "on")
    for chan in devices.findall("channel"):
        target = chan.find("target")
        name = target.get("name", "") if target is not None else ""
        sock = source(next((d for d in mine.findall("channel") if d.find(f"target[@name='{name}']") is not None), None),
                      "path") if name else None
        if sock and (src := chan.find("source")) is not None:
            src.set("path", sock)
    config = source(next((d for d in mine.findall("disk") if _serial(d) == CONFIG_SERIAL), None), "file")
    for disk in devices.findall("disk"):
        if _serial(disk) == CONFIG_SERIAL and config and (src := disk.find("source")) is not None:
            src.set("file", config)
    return ET.tostring(saved, encoding="unicode") + "\n"


def hotplug_mib(spec: DomainSpec) -> int:
    """The virtio-mem device's size: what memory may grow by, in whole blocks (0: no device)."""
    grow = max(0, spec.max_memory_mib - spec.memory_mib)
    block = spec.hotplug_block_mib
    return -(-grow // block) * block


@dataclass(frozen=True)
class MemoryChange:
    """How to give a running domain ``mib`` of memory: the balloon target (never above boot
    memory: libvirt refuses that) and, when it has one, the virtio-mem device XML to update."""

    balloon_kib: int
    device_xml: str | None


def plan_memory_change(live_xml: str, mib: int) -> MemoryChange:
    """Growth past boot memory plugs virtio-mem blocks; shrinking below it inflates the
    balloon. Raises ValueError when ``mib`` is over what the domain can reach."""
    root = ET.fromstring(live_xml)
    dev = root.find("devices/memory[@model='virtio-mem']")
    cells = root.findall("cpu/numa/cell")
    want = mib * 1024
    if dev is None or not cells:
        # A domain without hot-plug (made by an older vmsandbox): the balloon only.
        top = _kib(root.find("memory"))
        if want > top:
            raise ValueError(f"{mib} MiB is over the domain's maximum of {top // 1024} MiB")
        return MemoryChange(want, None)
    boot = sum(_kib(c, "memory") for c in cells)
    size, block = _kib(dev.find("target/size")), _kib(dev.find("target/block")) or 2048
    plug = -(-max(0, want - boot) // block) * block
    if plug > size:
        raise ValueError(f"{mib} MiB is over the domain's maximum of {(boot + size) // 1024} MiB")
    target = dev.find("target")
    assert target is not None  # size was found under it
    requested = target.find("requested")
    if requested is None:
        requested = ET.SubElement(target, "requested")
    requested.text, requested.attrib = str(plug), {"unit": "KiB"}
    current = target.find("current")
    if current is not None:
        target.remove(current)  # read-only: libvirt refuses it in an update
    return MemoryChange(min(want, boot), ET.tostring(dev, encoding="unicode"))


_UNIT_KIB = {"b": 1 / 1024, "bytes": 1 / 1024, "k": 1, "kib": 1, "kb": 1000 / 1024, "m": 1024, "mib": 1024,
             "mb": 1000**2 / 1024, "g": 1024**2, "gib": 1024**2, "gb": 1000**3 / 1024}


def _kib(el: ET.Element | None, attr: str | None = None) -> int:
    """A libvirt size (an element's text, or its ``attr``) in KiB; ``unit`` defaults to KiB."""
    if el is None:
        return 0
    value = el.get(attr) if attr else el.text
    return int(int((value or "0").strip()) * _UNIT_KIB[(el.get("unit") or "KiB").lower()])


def disk_target(index: int) -> str:
    """The guest-side target name libvirt gets for the ``index``-th disk (vda, vdb, ...)."""
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
