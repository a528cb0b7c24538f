"""Domain XML: a golden file, libvirt's own parser (``test:///default``), metadata round trip.

Regenerate the golden file after an intended change with
``VMSANDBOX_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/unit/test_domain_xml.py``
and review the diff.
"""

from __future__ import annotations

import os
import secrets
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from vmsandbox.hypervisor.domain import (
    METADATA_NS,
    DiskSpec,
    DomainSpec,
    NicSpec,
    ShareSpec,
    build_domain_xml,
    parse_metadata,
)

GOLDEN = Path(__file__).parent / "golden" / "domain.xml"
UPDATE = os.environ.get("VMSANDBOX_UPDATE_GOLDEN", "") not in ("", "0")

SPEC = DomainSpec(
    name="vmsandbox-golden-1",
    sandbox_id="golden-1",
    state_dir="/var/lib/vmsandbox",
    virt_type="kvm",
    arch="x86_64",
    machine="q35",
    vcpus=2,
    max_vcpus=4,
    memory_mib=384,
    max_memory_mib=512,
    kernel="/var/lib/vmsandbox/images/default/0123456789abcdef/vmlinuz",
    initrd="/var/lib/vmsandbox/images/default/0123456789abcdef/initramfs.img",
    cmdline="console=ttyS0 panic=-1 quiet",
    console_log="/var/lib/vmsandbox/sandboxes/golden-1/console.log",
    agent_socket="/var/lib/vmsandbox/sock/0123456789abcdef0123.sock",
    disks=(
        DiskSpec("/var/lib/vmsandbox/sandboxes/golden-1/config.tar", "vsbx-config", readonly=True),
        DiskSpec("/srv/images/rootfs.qcow2", "vsbx-m0", format="qcow2"),
        DiskSpec("/dev/mapper/data", "vsbx-m1", block=True, readonly=True),
    ),
    nics=(NicSpec("vsbx0a1b2c3d0", "52:54:00:12:34:56", 1400),),
    shares=(ShareSpec("/var/lib/vmsandbox/sandboxes/golden-1/shared", "vsbx-shared", "/usr/lib/qemu/virtiofsd"),),
    loader="/usr/share/qemu/qboot.rom",
    extra_metadata={"netns": "/var/run/netns/cni-1234"},
)


def test_domain_xml_matches_golden_file() -> None:
    xml = build_domain_xml(SPEC)
    if UPDATE:
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(xml)
    assert GOLDEN.exists(), "no golden file; run with VMSANDBOX_UPDATE_GOLDEN=1 once"
    assert xml == GOLDEN.read_text(), (
        "domain XML changed; if intended, regenerate with VMSANDBOX_UPDATE_GOLDEN=1 and review the diff"
    )


def test_domain_xml_is_deterministic() -> None:
    assert build_domain_xml(SPEC) == build_domain_xml(replace(SPEC))


# ---------------------------------------------------------------- structure


def _tree(spec: DomainSpec) -> ET.Element:
    return ET.fromstring(build_domain_xml(spec))


def test_kvm_passes_the_host_cpu_through_and_tcg_does_not() -> None:
    kvm = _tree(SPEC)
    assert kvm.get("type") == "kvm"
    cpu = kvm.find("cpu")
    assert cpu is not None and cpu.get("mode") == "host-passthrough"
    tcg = _tree(replace(SPEC, virt_type="qemu"))
    assert tcg.get("type") == "qemu"
    # host-passthrough is meaningless (and refused) under TCG: only the NUMA cell is there.
    assert tcg.find("cpu") is not None and tcg.find("cpu").get("mode") is None  # type: ignore[union-attr]


def test_resources_boot_and_lifecycle_settings() -> None:
    t = _tree(SPEC)
    assert t.findtext("name") == "vmsandbox-golden-1"
    mem = t.find("memory")
    cur = t.find("currentMemory")
    assert mem is not None and (mem.text, mem.get("unit")) == ("512", "MiB")
    assert cur is not None and (cur.text, cur.get("unit")) == ("384", "MiB")
    vcpu = t.find("vcpu")
    assert vcpu is not None and vcpu.text == "4" and vcpu.get("current") == "2"
    loader = t.find("os/loader")
    assert loader is not None and (loader.text, loader.get("type"), loader.get("readonly")) == (
        "/usr/share/qemu/qboot.rom", "rom", "yes")
    assert _tree(replace(SPEC, loader="")).find("os/loader") is None  # QEMU's default BIOS
    assert t.findtext("os/kernel") == SPEC.kernel
    assert t.findtext("os/initrd") == SPEC.initrd
    assert t.findtext("os/cmdline") == SPEC.cmdline
    os_type = t.find("os/type")
    assert os_type is not None and (os_type.get("arch"), os_type.get("machine")) == ("x86_64", "q35")
    # A guest that powers off, reboots or crashes is gone: containerd sees the sandbox exit.
    assert [t.findtext(k) for k in ("on_poweroff", "on_reboot", "on_crash")] == ["destroy"] * 3


def test_disks_keep_order_serials_formats_and_read_only_flags() -> None:
    disks = _tree(SPEC).findall("devices/disk")
    seen = []
    for d in disks:
        src = d.find("source")
        drv = d.find("driver")
        tgt = d.find("target")
        assert src is not None and drv is not None and tgt is not None
        seen.append((
            d.get("type"),
            src.get("file") or src.get("dev"),
            drv.get("type"),
            tgt.get("dev"),
            tgt.get("bus"),
            d.findtext("serial"),
            d.find("readonly") is not None,
        ))
    assert seen == [
        ("file", SPEC.disks[0].source, "raw", "vda", "virtio", "vsbx-config", True),
        ("file", "/srv/images/rootfs.qcow2", "qcow2", "vdb", "virtio", "vsbx-m0", False),
        ("block", "/dev/mapper/data", "raw", "vdc", "virtio", "vsbx-m1", True),
    ]


def test_many_disks_get_distinct_virtio_names() -> None:
    disks = tuple(DiskSpec(f"/d/{i}.img", f"vsbx-m{i}") for i in range(30))
    names = [d.get("dev") for d in _tree(replace(SPEC, disks=disks)).findall("devices/disk/target")]
    assert names[:3] == ["vda", "vdb", "vdc"]
    assert names[25:28] == ["vdz", "vdaa", "vdab"]
    assert len(set(names)) == 30


def test_nic_console_agent_channel_and_no_graphics() -> None:
    t = _tree(SPEC)
    nic = t.find("devices/interface")
    assert nic is not None and nic.get("type") == "ethernet"
    assert nic.find("mac").get("address") == "52:54:00:12:34:56"  # type: ignore[union-attr]
    assert nic.find("target").get("dev") == "vsbx0a1b2c3d0"  # type: ignore[union-attr]
    assert nic.find("target").get("managed") == "no"  # type: ignore[union-attr]
    assert nic.find("mtu").get("size") == "1400"  # type: ignore[union-attr]
    assert t.find("devices/serial/source").get("path") == SPEC.console_log  # type: ignore[union-attr]
    chan = t.find("devices/channel")
    assert chan is not None and chan.get("type") == "unix"
    assert chan.find("source").get("path") == SPEC.agent_socket  # type: ignore[union-attr]
    assert chan.find("source").get("mode") == "bind"  # type: ignore[union-attr]
    assert chan.find("target").get("name") == "vmsandbox.agent"  # type: ignore[union-attr]
    assert t.find("devices/rng/backend").text == "/dev/urandom"  # type: ignore[union-attr]
    assert _tree(replace(SPEC, rng=False)).find("devices/rng") is None
    assert t.find("devices/graphics") is None
    assert t.find("devices/video/model").get("type") == "none"  # type: ignore[union-attr]
    assert t.find("devices/controller[@type='usb']").get("model") == "none"  # type: ignore[union-attr]


def test_values_are_escaped_not_interpreted() -> None:
    spec = replace(SPEC, cmdline="a=1 <b> & 'c' \"d\"", extra_metadata={"note": "x</note><evil/>&"})
    t = _tree(spec)
    assert t.findtext("os/cmdline") == "a=1 <b> & 'c' \"d\""
    assert parse_metadata(build_domain_xml(spec))["note"] == "x</note><evil/>&"


# ---------------------------------------------------------------- metadata


def test_parse_metadata_reads_our_element_from_the_full_xml() -> None:
    assert parse_metadata(build_domain_xml(SPEC)) == {
        "id": "golden-1",
        "state-dir": "/var/lib/vmsandbox",
        "netns": "/var/run/netns/cni-1234",
    }


@pytest.mark.parametrize("text", ["", "not xml", "<domain type='kvm'><name>x</name></domain>",
                                  "<sandbox xmlns='https://example.com/other'><id>x</id></sandbox>"])
def test_parse_metadata_of_foreign_or_broken_xml_is_empty(text: str) -> None:
    assert parse_metadata(text) == {}


# ---------------------------------------------------------------- libvirt's own parser


@pytest.fixture
def test_driver() -> Iterator[Any]:
    libvirt = pytest.importorskip("libvirt")
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    conn = libvirt.open("test:///default")
    yield conn
    conn.close()


def _define(conn: Any, spec: DomainSpec) -> Any:
    return conn.defineXML(build_domain_xml(spec))


@pytest.mark.parametrize("virt_type", ["kvm", "qemu"])
def test_libvirt_accepts_the_xml_and_keeps_what_we_asked_for(test_driver: Any, virt_type: str) -> None:
    name = f"vmsandbox-unit-{secrets.token_hex(4)}"
    spec = replace(SPEC, name=name, virt_type=virt_type, tb_cache_mib=32)
    dom = _define(test_driver, spec)
    try:
        back = ET.fromstring(dom.XMLDesc(0))
        assert back.get("type") == virt_type
        assert back.findtext("name") == name
        assert back.findtext("memory") == str(512 * 1024)  # libvirt reports KiB
        assert back.findtext("currentMemory") == str(384 * 1024)
        vcpu = back.find("vcpu")
        assert vcpu is not None and vcpu.text == "4" and vcpu.get("current") == "2"
        assert back.findtext("os/kernel") == spec.kernel
        assert back.findtext("os/cmdline") == spec.cmdline
        assert [d.findtext("serial") for d in back.findall("devices/disk")] == ["vsbx-config", "vsbx-m0", "vsbx-m1"]
        assert [d.find("readonly") is not None for d in back.findall("devices/disk")] == [True, False, True]
        assert back.find("devices/channel/source").get("path") == spec.agent_socket  # type: ignore[union-attr]
        assert back.find("devices/interface/mac").get("address") == "52:54:00:12:34:56"  # type: ignore[union-attr]
        assert back.findtext("on_poweroff") == "destroy"
        fs = back.find("devices/filesystem")
        assert fs is not None and fs.find("driver").get("type") == "virtiofs"  # type: ignore[union-attr]
        assert fs.find("source").get("dir") == "/var/lib/vmsandbox/sandboxes/golden-1/shared"  # type: ignore[union-attr]
        assert fs.find("target").get("dir") == "vsbx-shared"  # type: ignore[union-attr]
        assert back.find("memoryBacking/source").get("type") == "memfd"  # type: ignore[union-attr]
        assert back.find("memoryBacking/access").get("mode") == "shared"  # type: ignore[union-attr]
        assert back.find("devices/memballoon").get("freePageReporting") == "on"  # type: ignore[union-attr]
        # TCG's translation cache is bounded; under KVM there is none.
        assert back.findtext("features/tcg/tb-cache") == ("32768" if virt_type == "qemu" else None)
        # The whole document, as libvirt serialises it, still carries our metadata.
        assert parse_metadata(dom.XMLDesc(0)) == {"id": "golden-1", "state-dir": "/var/lib/vmsandbox",
                                                  "netns": "/var/run/netns/cni-1234"}
    finally:
        dom.undefine()


def test_metadata_as_libvirt_returns_it_parses(test_driver: Any) -> None:
    """What recovery reads (virDomainGetMetadata) must parse to our fields."""
    import libvirt

    dom = _define(test_driver, replace(SPEC, name=f"vmsandbox-unit-{secrets.token_hex(4)}"))
    try:
        meta = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS)
        assert parse_metadata(meta) == {"id": "golden-1", "state-dir": "/var/lib/vmsandbox",
                                        "netns": "/var/run/netns/cni-1234"}
    finally:
        dom.undefine()


def test_libvirt_can_run_the_domain_and_power_it_off(test_driver: Any) -> None:
    import libvirt

    dom = _define(test_driver, replace(SPEC, name=f"vmsandbox-unit-{secrets.token_hex(4)}"))
    try:
        dom.create()
        assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
        dom.destroy()
        assert dom.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF
    finally:
        dom.undefine()


def test_golden_file_itself_loads_into_libvirt(test_driver: Any) -> None:
    """The reviewed artefact, not only the code, is valid libvirt XML."""
    text = GOLDEN.read_text().replace("<name>vmsandbox-golden-1</name>",
                                      f"<name>vmsandbox-unit-{secrets.token_hex(4)}</name>")
    dom = test_driver.defineXML(text)
    dom.undefine()


# ---------------------------------------------------------------- memory: boot size + virtio-mem


def test_a_share_brings_shared_memfd_memory_and_one_virtiofs_device_per_share() -> None:
    root = _tree(replace(SPEC, shares=(ShareSpec("/s/a", "tag-a", "/usr/lib/qemu/virtiofsd"), ShareSpec("/s/b", "tag-b", "/opt/virtiofsd"))))
    assert [(m.tag, m.attrib) for m in root.find("memoryBacking")] == [  # type: ignore[union-attr]
        ("source", {"type": "memfd"}), ("access", {"mode": "shared"})]
    fss = root.findall("devices/filesystem")
    assert [(f.get("type"), f.get("accessmode")) for f in fss] == [("mount", "passthrough")] * 2
    assert [(f.find("source").get("dir"), f.find("target").get("dir"), f.find("binary").get("path"))  # type: ignore[union-attr]
            for f in fss] == [("/s/a", "tag-a", "/usr/lib/qemu/virtiofsd"), ("/s/b", "tag-b", "/opt/virtiofsd")]
    # virtio-mem keeps its NUMA node and maximum with the shared backing.
    assert root.find("devices/memory[@model='virtio-mem']") is not None and root.find("cpu/numa/cell") is not None


def test_without_a_share_the_memory_is_private_and_there_is_no_filesystem() -> None:
    root = _tree(replace(SPEC, shares=()))
    assert root.find("memoryBacking") is None and root.find("devices/filesystem") is None


def test_without_headroom_there_is_no_hotplug_device_and_no_numa() -> None:
    root = _tree(replace(SPEC, virt_type="qemu", memory_mib=256, max_memory_mib=256))
    assert root.find("maxMemory") is None and root.find("devices/memory") is None and root.find("cpu") is None
    assert root.findtext("memory") == root.findtext("currentMemory") == "256"


def test_the_hotplug_device_covers_the_headroom_in_whole_blocks() -> None:
    root = _tree(replace(SPEC, memory_mib=192, max_memory_mib=385))
    assert root.findtext("devices/memory/target/size") == "194"  # 193 rounded up to 2 MiB blocks
    assert root.findtext("maxMemory") == root.findtext("memory") == str(192 + 194)
    assert root.find("cpu/numa/cell").get("memory") == "192"  # type: ignore[union-attr]


@pytest.mark.parametrize("mib, balloon_kib, plugged_kib", [
    pytest.param(384, 384 * 1024, 0, id="boot-size"),
    pytest.param(200, 200 * 1024, 0, id="below-boot-balloon-only"),
    pytest.param(385, 384 * 1024, 2048, id="just-above-boot-one-block"),
    pytest.param(512, 384 * 1024, 128 * 1024, id="the-maximum"),
])
def test_a_memory_change_plugs_above_boot_and_balloons_below(mib: int, balloon_kib: int, plugged_kib: int) -> None:
    from vmsandbox.hypervisor.domain import plan_memory_change

    change = plan_memory_change(build_domain_xml(SPEC), mib)
    assert change.balloon_kib == balloon_kib
    assert change.device_xml is not None
    dev = ET.fromstring(change.device_xml)
    assert dev.get("model") == "virtio-mem"
    assert dev.findtext("target/requested") == str(plugged_kib) and dev.find("target/requested").get("unit") == "KiB"  # type: ignore[union-attr]


def test_a_memory_change_over_the_maximum_is_refused() -> None:
    from vmsandbox.hypervisor.domain import plan_memory_change

    with pytest.raises(ValueError, match="maximum of 512 MiB"):
        plan_memory_change(build_domain_xml(SPEC), 513)


def test_a_live_device_loses_its_read_only_current_size_in_the_update() -> None:
    from vmsandbox.hypervisor.domain import plan_memory_change

    live = build_domain_xml(SPEC).replace("<requested unit=\"MiB\">0</requested>",
                                          "<requested unit=\"MiB\">0</requested><current unit=\"KiB\">0</current>")
    change = plan_memory_change(live, 400)
    assert change.device_xml is not None and "current" not in change.device_xml


def test_an_old_domain_without_hotplug_is_ballooned_within_its_memory() -> None:
    from vmsandbox.hypervisor.domain import plan_memory_change

    old = build_domain_xml(replace(SPEC, memory_mib=512, max_memory_mib=512))
    assert plan_memory_change(old, 300).device_xml is None
    with pytest.raises(ValueError):
        plan_memory_change(old, 600)
