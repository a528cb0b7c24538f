"""Unit tests of hack/bench.py's pure parts: statistics, phase arithmetic, guest log
parsing, the bare-libvirt XML rewrite, the console watcher and the printed report."""

from __future__ import annotations

import argparse
import importlib.util
import io
import random
import statistics
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from types import ModuleType

import pytest

from vmsandbox.guest.keys import dropbear_private_key, generate_keypair
from vmsandbox.hypervisor.domain import DiskSpec, DomainSpec, build_domain_xml

REPO = Path(__file__).resolve().parents[2]


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("vmsandbox_bench", REPO / "hack" / "bench.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


bench = _load()


# ---------------------------------------------------------------------- statistics
def test_percentile_interpolates_between_ranks() -> None:
    xs = [4.0, 1.0, 3.0, 2.0]
    assert bench.percentile(xs, 0) == 1.0
    assert bench.percentile(xs, 100) == 4.0
    assert bench.percentile(xs, 50) == 2.5
    assert bench.percentile(xs, 90) == pytest.approx(3.7)
    assert bench.percentile([7.0], 99) == 7.0


def test_percentile_agrees_with_statistics_inclusive_quantiles() -> None:
    rng = random.Random(7)
    xs = [rng.uniform(0, 1000) for _ in range(37)]
    deciles = statistics.quantiles(xs, n=10, method="inclusive")
    for i, q in enumerate(deciles, start=1):
        assert bench.percentile(xs, i * 10) == pytest.approx(q)


@pytest.mark.parametrize("p", [-1, 101])
def test_percentile_rejects_bad_input(p: float) -> None:
    with pytest.raises(ValueError):
        bench.percentile([1.0], p)
    with pytest.raises(ValueError):
        bench.percentile([], 50)


def test_summarize_skips_missing_values() -> None:
    s = bench.summarize([None, 10.0, 30.0, 20.0])
    assert s["n"] == 3
    assert (s["min"], s["p50"], s["max"], s["mean"]) == (10.0, 20.0, 30.0, 20.0)
    assert bench.summarize([None, None]) is None
    assert bench.summarize([]) is None


# ---------------------------------------------------------------------- phases
STAMPS = {"t0": 100.0, "defined": 100.01, "started": 100.41, "init_line": 102.9,
          "agent_line": 103.2, "ready": 104.5, "exec_done": 104.52}


def test_phases_add_up_to_the_total() -> None:
    ph = bench.phase_durations(STAMPS)
    assert ph["define"] == pytest.approx(10)
    assert ph["domain_start"] == pytest.approx(400)
    assert ph["kernel_to_init"] == pytest.approx(2490)
    assert ph["first_exec"] == pytest.approx(20)
    assert ph["total"] == pytest.approx(4520)
    assert sum(ph[k] for k, _l, _e in bench.PHASES) == pytest.approx(ph["total"])


def test_a_missing_console_line_folds_into_the_next_phase() -> None:
    ph = bench.phase_durations({**STAMPS, "init_line": None})
    assert ph["kernel_to_init"] is None
    assert ph["init_script"] == pytest.approx((103.2 - 100.41) * 1000)
    assert sum(v for k, v in ph.items() if k != "total" and v is not None) == pytest.approx(ph["total"])
    assert bench.phase_durations({"t0": 1.0})["total"] is None


def test_parse_parallel() -> None:
    assert bench.parse_parallel("10,1,5,5") == [1, 5, 10]
    assert bench.parse_parallel(" 3 ") == [3]
    for bad in ("", "0,1", "a,b", "-2"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.parse_parallel(bad)


# ---------------------------------------------------------------------- guest side
DMESG = b"""[    0.000000] Linux version 6.1.0-56-cloud-amd64
<6>[    0.219000] x86/fpu: x87 FPU will use FXSAVE
[    0.492200] Freeing SMP alternatives memory: 36K
not a kernel line
[    1.776964] Run /init as init process
[    1.777018]   with arguments:
[    3.159959] random: crng init done
"""


def test_parse_dmesg_and_find_messages() -> None:
    ev = bench.parse_dmesg(DMESG)
    assert len(ev) == 6
    assert ev[1] == (0.219, "x86/fpu: x87 FPU will use FXSAVE")
    assert bench.dmesg_time(ev, r"Run \S+ as init process") == pytest.approx(1.776964)
    assert bench.dmesg_time(ev, r"no such message") is None
    gaps = bench.biggest_gaps(ev, top=2)
    assert [round(g["gap_ms"]) for g in gaps] == [1383, 1285]
    assert gaps[0]["before"] == "random: crng init done"


def test_parse_uptime() -> None:
    assert bench.parse_uptime(b"3.24 0.00\n") == 3.24
    assert bench.parse_uptime("") is None
    assert bench.parse_uptime(b"garbage") is None


def test_guest_timeline_places_the_guest_clock_on_the_host_timeline() -> None:
    # The guest kernel's clock read 0 at host time 101.0: the uptime read at the exec's
    # midpoint (104.51) was 3.51 s.
    g = bench.guest_timeline(STAMPS, 3.51, bench.parse_dmesg(DMESG))
    assert g["vmm_to_kernel_ms"] == pytest.approx(590)
    assert g["kernel_to_run_init_ms"] == pytest.approx(1776.964)
    assert g["run_init_to_console_ms"] == pytest.approx(1900 - 1776.964)
    assert g["agent_line_guest_ms"] == pytest.approx(2200)
    assert g["ready_guest_ms"] == pytest.approx(3500)
    assert g["clock_error_ms"] == pytest.approx(10)
    assert g["crng_ready_ms"] == pytest.approx(3159.959)
    none = bench.guest_timeline(STAMPS, None, [])
    assert none["vmm_to_kernel_ms"] is None and none["kernel_to_run_init_ms"] is None


def test_kib_field() -> None:
    text = "Rss:              210000 kB\nPss:              205312 kB\nVmRSS:\t   73216 kB\n"
    assert bench.kib_field(text, "Pss") == 205312
    assert bench.kib_field(text, "VmRSS") == 73216
    assert bench.kib_field(text, "Swap") is None


# ---------------------------------------------------------------------- bare baseline
def _config_tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    return data + b"\0" * (-len(data) % 4096)


def test_host_key_line_from_the_config_disk_matches_the_pinned_key() -> None:
    kp = generate_keypair()
    tar = _config_tar({"authorized_keys": b"x\n", "hostkey": dropbear_private_key(kp)})
    assert bench.host_key_line_from_config(tar) == kp.public_line
    with pytest.raises((KeyError, ValueError)):
        bench.host_key_line_from_config(_config_tar({"hostname": b"h\n"}))


def _spec(**kw: object) -> DomainSpec:
    base: dict[str, object] = dict(
        name="vmsandbox-s1", sandbox_id="s1", state_dir="/var/lib/vmsandbox", virt_type="qemu",
        arch="x86_64", machine="q35", vcpus=1, max_vcpus=1, memory_mib=256, max_memory_mib=512,
        kernel="/img/vmlinuz", initrd="/img/initramfs.img", cmdline="console=ttyS0",
        console_log="/var/lib/vmsandbox/sandboxes/s1/console.log", agent_socket="/var/lib/vmsandbox/sock/a.sock",
        disks=(DiskSpec("/var/lib/vmsandbox/sandboxes/s1/config.tar", "vsbx-config", readonly=True),
               DiskSpec("/data/rootfs.img", "vsbx-disk-0")),
    )
    base.update(kw)
    return DomainSpec(**base)  # type: ignore[arg-type]


def test_bare_domain_xml_is_the_same_domain_under_its_own_name_and_files() -> None:
    xml = build_domain_xml(_spec()).replace("<name>", "<uuid>1b4e28ba-2fa1-11d2-883f-0016d3cca427</uuid><name>", 1)
    out = bench.bare_domain_xml(xml, name="bench-x-bare-0", console="/t/0.log", agent_socket="/t/0.sock",
                                config_disk="/t/config.tar")
    root = ET.fromstring(out)
    assert root.findtext("name") == "bench-x-bare-0"
    assert root.find("uuid") is None and root.find("metadata") is None and root.find("title") is None
    assert root.find("devices/serial/source").get("path") == "/t/0.log"
    assert root.find("devices/channel/source").get("path") == "/t/0.sock"
    sources = [d.find("source").get("file") for d in root.iter("disk")]
    assert sources == ["/t/config.tar", "/data/rootfs.img"]
    # Kernel, initrd, cmdline, memory and devices are untouched.
    before = ET.fromstring(xml)
    for path in ("os/kernel", "os/initrd", "os/cmdline", "memory", "currentMemory", "vcpu"):
        assert root.findtext(path) == before.findtext(path)


def test_bare_domain_xml_loads_into_libvirts_test_driver() -> None:
    libvirt = pytest.importorskip("libvirt")
    out = bench.bare_domain_xml(build_domain_xml(_spec()), name="bench-x-bare-1", console="/t/1.log",
                                agent_socket="/t/1.sock", config_disk="/t/config.tar")
    conn = libvirt.open("test:///default")
    try:
        dom = conn.defineXML(out)
        assert dom.name() == "bench-x-bare-1"
        dom.undefine()
    finally:
        conn.close()


def test_bare_domain_xml_refuses_xml_without_the_agent_channel() -> None:
    xml = build_domain_xml(_spec())
    root = ET.fromstring(xml)
    devices = root.find("devices")
    devices.remove(devices.find("channel"))
    with pytest.raises(ValueError, match="socket"):
        bench.bare_domain_xml(ET.tostring(root, encoding="unicode"), name="n", console="c", agent_socket="s",
                              config_disk="d")


# ---------------------------------------------------------------------- watcher and report
def test_console_watcher_stamps_lines_when_they_appear(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    w = bench.ConsoleWatcher({"init": bench.INIT_MARKER, "agent": bench.AGENT_MARKER}, interval=0.002)
    try:
        w.watch("a", log)  # the file does not exist yet, as before QEMU starts
        time.sleep(0.02)
        log.write_bytes(b"\r\nvmsandbox: init ")
        time.sleep(0.02)
        before = time.monotonic()
        with log.open("ab") as f:
            f.write(b"started\r\n")
        time.sleep(0.05)
        after_init = time.monotonic()
        with log.open("ab") as f:
            f.write(b"vmsandbox: agent ready on /dev/vport0p1\r\n")
        found = w.unwatch("a")
    finally:
        w.close()
    assert before - 0.01 <= found["init"] <= after_init
    assert found["agent"] >= after_init - 0.005
    assert w.unwatch("a") == {}


def test_report_renders_phases_ratio_and_anchors() -> None:
    s = bench.summarize
    ours = {k: s([v, v * 1.1]) for k, v in bench.phase_durations(STAMPS).items()}
    bare = {k: s([v * 0.9]) for k, v in bench.phase_durations(STAMPS).items()}
    res = {
        "mode": "quick",
        "host": {"virt_type": "tcg", "cpu_model": "CPU", "cpu_count": 2},
        "serial": {"n": 2, "warmup": 1, "controller": {"phases": ours, "guest": {}}, "bare": {"phases": bare}},
        "parallel": [{"n": 5, "all_ready_s": 9.5, "sandboxes_per_s": 0.53, "per_sandbox_ms": s([9000.0, 9400.0])}],
        "operations": {"5": {"status": s([0.6]), "exec_true": s([16.0])}},
        "memory": [{"running": 5, "qemu_pss_kib": s([204800.0]), "qemu_pss_kib_total": 1024000,
                    "controller_rss_kib": 73216}],
        "duration_s": 120.0,
    }
    text = bench.report(res)
    assert "total" in text and "1.17x" in text  # p50 ours (1.05 v) over bare (0.9 v)
    assert "Firecracker boot to init <= 125 ms" in text and "not comparable" in text
    assert "200.0" in text  # PSS in MiB
    assert "exec true (warm transport)" in text and "n/a" in text  # platform was not measured


def test_render_table_aligns_columns() -> None:
    text = bench.render_table(["name", "p50"], [["a", "1.0"], ["longer", "100"]])
    lines = text.splitlines()
    assert len({len(line) for line in lines}) == 1
    assert lines[2].endswith("1.0") and lines[3].startswith("  longer")
    assert bench.fmt_ms(None) == "n/a" and bench.fmt_ms(1234.5) == "1234" and bench.fmt_ms(0.004) == "0.00"


def test_noise_line_warns_when_other_guests_ran() -> None:
    quiet = {"serial": {"controller": {"samples": [{"other_domains_running": 0}]}},
             "parallel": [{"other_domains_running": 0}]}
    assert bench.noise_line(quiet) is None
    busy = {"serial": {"controller": {"samples": [{"other_domains_running": 0}]},
                       "bare": {"samples": [{"other_domains_running": 2}]}},
            "parallel": [{"other_domains_running": 1}]}
    assert "during 2 of 3 measured starts (up to 2 at once)" in bench.noise_line(busy)
