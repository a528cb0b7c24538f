"""The libvirt save-image header (read, refused, rewritten), the restore XML and zero-page trimming."""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

import pytest

from vmsandbox.hypervisor.domain import DiskSpec, DomainSpec, NicSpec, ShareSpec, build_domain_xml, hotplugged, restore_xml
from vmsandbox.hypervisor.memtrim import punch_zero_pages
from vmsandbox.hypervisor.savefile import SaveImage, read_save_image, save_header

STREAM = b"QEVM\0\0\0\3" + bytes(100)


def image(tmp_path: Path, xml: str = "<domain><name>a</name></domain>", cookie: bytes = b"<cookie/>") -> Path:
    p = tmp_path / "a.save"
    p.write_bytes(save_header(SaveImage(p, xml, cookie, True, 0, 0), xml) + STREAM)
    return p


def test_a_header_round_trips_and_a_rewrite_keeps_the_stream(tmp_path: Path) -> None:
    saved = read_save_image(image(tmp_path))
    assert (saved.xml, saved.cookie, saved.was_running) == ("<domain><name>a</name></domain>", b"<cookie/>", True)
    other = tmp_path / "b.save"
    with open(saved.path, "rb") as f:
        f.seek(saved.stream_offset)
        other.write_bytes(save_header(saved, "<domain><name>bb</name></domain>") + f.read())
    again = read_save_image(other)
    assert again.xml == "<domain><name>bb</name></domain>" and again.cookie == b"<cookie/>"
    assert other.read_bytes()[again.stream_offset:] == STREAM


@pytest.mark.parametrize("damage", ["partial", "magic", "compressed", "truncated", "no-stream"])
def test_what_libvirt_could_not_restore_is_refused(tmp_path: Path, damage: str) -> None:
    p = image(tmp_path)
    data = bytearray(p.read_bytes())
    if damage == "partial":
        data[:16] = b"LibvirtQemudPart"
    elif damage == "magic":
        data[:16] = b"NotASaveImage..."
    elif damage == "compressed":
        data[28:32] = struct.pack("<I", 1)
    elif damage == "truncated":
        del data[100:]
    else:
        del data[read_save_image(p).stream_offset:]
    p.write_bytes(bytes(data))
    with pytest.raises(ValueError):
        read_save_image(p)


def spec(**kw: object) -> DomainSpec:
    base: dict[str, object] = dict(
        name="vsbxtpl-x", sandbox_id="template-x", state_dir="/s", virt_type="qemu", arch="x86_64", machine="q35",
        vcpus=1, max_vcpus=1, memory_mib=256, max_memory_mib=512, kernel="/img/vmlinuz", initrd="/img/initramfs.img",
        cmdline="console=ttyS0", console_log="/t/console.log", agent_socket="/sock/t.sock",
        disks=(DiskSpec("/t/config.tar", "vsbx-config", readonly=True),))
    base.update(kw)
    return DomainSpec(**base)  # type: ignore[arg-type]


def sandbox_xml(**kw: object) -> str:
    xml = build_domain_xml(spec(
        name="vmsandbox-a", sandbox_id="a", console_log="/s/a/console.log", agent_socket="/sock/a.sock",
        disks=(DiskSpec("/s/a/config.tar", "vsbx-config", readonly=True), DiskSpec("/s/a/root.img", "vsbx-m0")),
        nics=(NicSpec("vsbx-tap0", "0a:58:0a:f4:01:05"),), shares=(ShareSpec("/s/a/shared", "vsbx-shared", "/bin/vfsd",),),
        partition="/pod.slice", **kw))
    # as libvirt returns a defined domain: a UUID and a PCI address on every device
    xml = xml.replace("<name>vmsandbox-a</name>", "<name>vmsandbox-a</name>\n  <uuid>1111-2222</uuid>")
    return xml.replace("</interface>", "<address type='pci' bus='0x05' slot='0x00'/></interface>")


def test_restore_xml_takes_the_sandboxes_identity_and_keeps_the_templates_machine() -> None:
    saved = build_domain_xml(spec(shared_memory=True, spare_ports=8))
    out = restore_xml(saved, sandbox_xml())
    assert "<name>vmsandbox-a</name>" in out and "<uuid>1111-2222</uuid>" in out and "vsbxtpl" not in out
    assert "/s/a/console.log" in out and "/sock/a.sock" in out and "/s/a/config.tar" in out
    assert "/t/" not in out and "/sock/t.sock" not in out
    assert out.count('append="on"') == 1  # the console log keeps the template's boot lines
    assert "<partition>/pod.slice</partition>" in out and ">a</vmsandbox:id>" in out
    assert "root.img" not in out and "<interface" not in out and "<filesystem" not in out  # plugged in later
    assert out.count("pcie-root-port") == 8 and "memfd" in out


@pytest.mark.parametrize("change", [{"memory_mib": 512, "max_memory_mib": 1024}, {"vcpus": 2, "max_vcpus": 2},
                                    {"cmdline": "console=ttyS0 quiet"}, {"kernel": "/other/vmlinuz"}])
def test_a_template_of_another_shape_or_kernel_does_not_fit(change: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        restore_xml(build_domain_xml(spec(shared_memory=True)), sandbox_xml(**change))


def test_hotplugged_lists_disks_nics_and_shares_without_their_cold_addresses() -> None:
    devices = hotplugged(sandbox_xml())
    assert len(devices) == 3
    disk, nic, share = devices
    assert "root.img" in disk and "vsbx-config" not in "".join(devices)
    assert "vsbx-tap0" in nic and "0a:58:0a:f4:01:05" in nic and "<address" not in nic
    assert "vsbx-shared" in share


def test_punching_zero_pages_frees_them_and_changes_no_byte() -> None:
    fd = os.memfd_create("vsbx-test-ram")
    try:
        size = 64 * 4096
        os.ftruncate(fd, size)
        with mmap.mmap(fd, size) as m:
            m[:] = bytes(size)  # every page resident, all zero ...
            for page in (3, 10, 11, 40):  # ... but these
                m[page * 4096 + 17] = 0x5A
            before = os.fstat(fd).st_blocks
            freed = punch_zero_pages(os.getpid())
            assert freed >= 60 * 4096  # this process may hold other memfds too
            assert os.fstat(fd).st_blocks < before
            assert [i for i in range(64) if m[i * 4096:(i + 1) * 4096] != bytes(4096)] == [3, 10, 11, 40]
            assert m[40 * 4096 + 17] == 0x5A
    finally:
        os.close(fd)


def test_the_zero_map_counts_holes_and_zero_pages_and_punching_it_frees_them() -> None:
    from vmsandbox.hypervisor.memtrim import zero_ranges, punch_ranges

    fd = os.memfd_create("vsbx-test-map")
    try:
        size = 32 * 4096
        os.ftruncate(fd, size)
        with mmap.mmap(fd, size) as m:
            m[8 * 4096:16 * 4096] = bytes(8 * 4096)  # resident zeros; pages 0-7 and 17-31 are holes
            m[9 * 4096] = 1
            m[16 * 4096] = 2
            name = os.readlink(f"/proc/self/fd/{fd}")
            zeros = zero_ranges(os.getpid())[name]
            assert zeros == [(0, 9 * 4096), (10 * 4096, 6 * 4096), (17 * 4096, 15 * 4096)]
            m[0:8 * 4096] = bytes(8 * 4096)  # as a restore does: the holes get filled
            before = os.fstat(fd).st_blocks
            punch_ranges(os.getpid(), {name: zeros})
            assert os.fstat(fd).st_blocks < before
            assert [i for i in range(32) if m[i * 4096:(i + 1) * 4096] != bytes(4096)] == [9, 16]
    finally:
        os.close(fd)
