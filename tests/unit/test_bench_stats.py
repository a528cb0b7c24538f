"""Unit tests of the bench's (hack/vsbench) pure parts: statistics, phase arithmetic, guest
log parsing, the bare-libvirt XML rewrite, the console watcher and the printed report."""

from __future__ import annotations

import argparse
import io
import json
import random
import statistics
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from vsbench import bare, console, guestlog, network, options, phases, report, stats

from vmsandbox.guest.keys import dropbear_private_key, generate_keypair
from vmsandbox.hypervisor.domain import DiskSpec, DomainSpec, ShareSpec, build_domain_xml


# ---------------------------------------------------------------------- statistics
def test_percentile_interpolates_between_ranks() -> None:
    xs = [4.0, 1.0, 3.0, 2.0]
    assert stats.percentile(xs, 0) == 1.0
    assert stats.percentile(xs, 100) == 4.0
    assert stats.percentile(xs, 50) == 2.5
    assert stats.percentile(xs, 90) == pytest.approx(3.7)
    assert stats.percentile([7.0], 99) == 7.0


def test_percentile_agrees_with_statistics_inclusive_quantiles() -> None:
    rng = random.Random(7)
    xs = [rng.uniform(0, 1000) for _ in range(37)]
    deciles = statistics.quantiles(xs, n=10, method="inclusive")
    for i, q in enumerate(deciles, start=1):
        assert stats.percentile(xs, i * 10) == pytest.approx(q)


@pytest.mark.parametrize("p", [-1, 101])
def test_percentile_rejects_bad_input(p: float) -> None:
    with pytest.raises(ValueError):
        stats.percentile([1.0], p)
    with pytest.raises(ValueError):
        stats.percentile([], 50)


def test_summarize_skips_missing_values() -> None:
    s = stats.summarize([None, 10.0, 30.0, 20.0])
    assert s["n"] == 3
    assert (s["min"], s["p50"], s["max"], s["mean"]) == (10.0, 20.0, 30.0, 20.0)
    assert stats.summarize([None, None]) is None
    assert stats.summarize([]) is None


# ---------------------------------------------------------------------- phases
# As a controller start gives them: lifecycle events (created, booted, agent_ready, running),
# console lines, and the bench's own clock around the first exec.
STAMPS = {"t0": 100.0, "created": 100.01, "booted": 100.41, "init_line": 102.9, "agent_line": 103.2,
          "agent_ready": 104.49, "running": 104.5, "exec_start": 104.5, "exec_done": 104.52}


def test_phases_add_up_to_the_total() -> None:
    ph = phases.phase_durations(STAMPS)
    assert ph["define"] == pytest.approx(10)
    assert ph["domain_start"] == pytest.approx(400)
    assert ph["kernel_to_init"] == pytest.approx(2490)
    assert ph["first_exec"] == pytest.approx(20)
    assert ph["total"] == pytest.approx(4520)
    assert sum(ph[k] for k, _l, _e in phases.PHASES) == pytest.approx(ph["total"])


def test_a_missing_console_line_folds_into_the_next_phase() -> None:
    ph = phases.phase_durations({**STAMPS, "init_line": None})
    assert ph["kernel_to_init"] is None
    assert ph["init_script"] == pytest.approx((103.2 - 100.41) * 1000)
    assert sum(v for k, v in ph.items() if k != "total" and v is not None) == pytest.approx(ph["total"])
    assert phases.phase_durations({"t0": 1.0})["total"] is None


def test_parse_parallel() -> None:
    assert options.parse_parallel("10,1,5,5") == [1, 5, 10]
    assert options.parse_parallel(" 3 ") == [3]
    for bad in ("", "0,1", "a,b", "-2"):
        with pytest.raises(argparse.ArgumentTypeError):
            options.parse_parallel(bad)


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
    ev = guestlog.parse_dmesg(DMESG)
    assert len(ev) == 6
    assert ev[1] == (0.219, "x86/fpu: x87 FPU will use FXSAVE")
    assert guestlog.dmesg_time(ev, r"Run \S+ as init process") == pytest.approx(1.776964)
    assert guestlog.dmesg_time(ev, r"no such message") is None
    gaps = guestlog.biggest_gaps(ev, top=2)
    assert [round(g["gap_ms"]) for g in gaps] == [1383, 1285]
    assert gaps[0]["before"] == "random: crng init done"


def test_parse_uptime() -> None:
    assert guestlog.parse_uptime(b"3.24 0.00\n") == 3.24
    assert guestlog.parse_uptime("") is None
    assert guestlog.parse_uptime(b"garbage") is None


def test_guest_timeline_places_the_guest_clock_on_the_host_timeline() -> None:
    # The guest kernel's clock read 0 at host time 101.0: the uptime read at the exec's
    # midpoint (104.51) was 3.51 s.
    g = guestlog.guest_timeline(STAMPS, 3.51, guestlog.parse_dmesg(DMESG))
    assert g["vmm_to_kernel_ms"] == pytest.approx(590)
    assert g["kernel_to_run_init_ms"] == pytest.approx(1776.964)
    assert g["run_init_to_console_ms"] == pytest.approx(1900 - 1776.964)
    assert g["agent_line_guest_ms"] == pytest.approx(2200)
    assert g["ready_guest_ms"] == pytest.approx(3500)
    assert g["clock_error_ms"] == pytest.approx(10)
    assert g["crng_ready_ms"] == pytest.approx(3159.959)
    none = guestlog.guest_timeline(STAMPS, None, [])
    assert none["vmm_to_kernel_ms"] is None and none["kernel_to_run_init_ms"] is None


def test_kib_field() -> None:
    text = "Rss:              210000 kB\nPss:              205312 kB\nVmRSS:\t   73216 kB\n"
    assert stats.kib_field(text, "Pss") == 205312
    assert stats.kib_field(text, "VmRSS") == 73216
    assert stats.kib_field(text, "Swap") is None


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
    assert bare.host_key_line_from_config(tar) == kp.public_line
    with pytest.raises((KeyError, ValueError)):
        bare.host_key_line_from_config(_config_tar({"hostname": b"h\n"}))


def test_a_host_key_whose_halves_do_not_belong_together_is_refused() -> None:
    a, b = generate_keypair(), generate_keypair()
    mixed = dropbear_private_key(a)[:-32] + b.public_raw  # a's seed, b's public key
    with pytest.raises(ValueError, match="does not belong"):
        bare.host_key_line_from_config(_config_tar({"hostkey": mixed}))


def _spec(**kw: object) -> DomainSpec:
    base: dict[str, object] = dict(
        name="vmsandbox-s1", sandbox_id="s1", state_dir="/var/lib/vmsandbox", virt_type="qemu",
        arch="x86_64", machine="q35", vcpus=1, max_vcpus=1, memory_mib=256, max_memory_mib=512,
        kernel="/img/vmlinuz", initrd="/img/initramfs.img", cmdline="console=ttyS0",
        console_log="/var/lib/vmsandbox/sandboxes/s1/console.log", agent_socket="/var/lib/vmsandbox/sock/a.sock",
        disks=(DiskSpec("/var/lib/vmsandbox/sandboxes/s1/config.tar", "vsbx-config", readonly=True),
               DiskSpec("/data/rootfs.img", "vsbx-disk-0")),
        shares=(ShareSpec("/var/lib/vmsandbox/sandboxes/s1/shared", "vsbx-shared", "/var/lib/vmsandbox/bin/virtiofsd"),),
    )
    base.update(kw)
    return DomainSpec(**base)  # type: ignore[arg-type]


def test_bare_domain_xml_is_the_same_domain_under_its_own_name_and_files() -> None:
    xml = build_domain_xml(_spec()).replace("<name>", "<uuid>1b4e28ba-2fa1-11d2-883f-0016d3cca427</uuid><name>", 1)
    out = bare.bare_domain_xml(xml, name="bench-x-bare-0", console="/t/0.log", agent_socket="/t/0.sock",
                                config_disk="/t/config.tar", share="/t/0.shared")
    root = ET.fromstring(out)
    # The template's share folder goes with the template sandbox: the bare domain has its own.
    assert [f.find("source").get("dir") for f in root.iter("filesystem")] == ["/t/0.shared"]
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
    out = bare.bare_domain_xml(build_domain_xml(_spec()), name="bench-x-bare-1", console="/t/1.log",
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
        bare.bare_domain_xml(ET.tostring(root, encoding="unicode"), name="n", console="c", agent_socket="s",
                              config_disk="d")


# ---------------------------------------------------------------------- watcher and report
def test_console_watcher_stamps_lines_when_they_appear(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    w = console.ConsoleWatcher({"init": console.INIT_MARKER, "agent": console.AGENT_MARKER}, interval=0.002)
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
    s = stats.summarize
    ours = {k: s([v, v * 1.1]) for k, v in phases.phase_durations(STAMPS).items()}
    bare = {k: s([v * 0.9]) for k, v in phases.phase_durations(STAMPS).items()}
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
    text = report.report(res)
    assert "total" in text and "1.17x" in text  # p50 ours (1.05 v) over bare (0.9 v)
    assert "Firecracker boot to init <= 125 ms" in text and "not comparable" in text
    assert "200.0" in text  # PSS in MiB
    assert "exec true (warm transport)" in text and "n/a" in text  # platform was not measured


def test_render_table_aligns_columns() -> None:
    text = report.render_table(["name", "p50"], [["a", "1.0"], ["longer", "100"]])
    lines = text.splitlines()
    assert len({len(line) for line in lines}) == 1
    assert lines[2].endswith("1.0") and lines[3].startswith("  longer")
    assert report.fmt_ms(None) == "n/a" and report.fmt_ms(1234.5) == "1234" and report.fmt_ms(0.004) == "0.00"


def test_noise_line_warns_when_other_guests_ran() -> None:
    quiet = {"serial": {"controller": {"samples": [{"other_domains_running": 0}]}},
             "parallel": [{"other_domains_running": 0}]}
    assert report.noise_line(quiet) is None
    busy = {"serial": {"controller": {"samples": [{"other_domains_running": 0}]},
                       "bare": {"samples": [{"other_domains_running": 2}]}},
            "parallel": [{"other_domains_running": 1}]}
    assert "during 2 of 3 measured starts (up to 2 at once)" in report.noise_line(busy)


# ---------------------------------------------------------------------- network
PING_BUSYBOX = """PING 10.199.0.1 (10.199.0.1): 56 data bytes
64 bytes from 10.199.0.1: seq=0 ttl=64 time=17.300 ms
64 bytes from 10.199.0.1: seq=1 ttl=64 time=1.289 ms
64 bytes from 10.199.0.1: seq=1 ttl=64 time=9.999 ms (DUP!)
64 bytes from 10.199.0.1: seq=3 ttl=64 time=0.957 ms

--- 10.199.0.1 ping statistics ---
4 packets transmitted, 3 packets received, 1 duplicates, 25% packet loss
round-trip min/avg/max = 0.957/6.515/17.300 ms
"""

PING_IPUTILS = b"""PING 10.0.0.1 (10.0.0.1) 56(84) bytes of data.
64 bytes from 10.0.0.1: icmp_seq=1 ttl=64 time=0.045 ms
64 bytes from 10.0.0.1: icmp_seq=2 ttl=64 time<1 ms

--- 10.0.0.1 ping statistics ---
2 packets transmitted, 2 received, 0% packet loss, time 1001ms
rtt min/avg/max/mdev = 0.045/0.050/0.055/0.005 ms
"""


def test_parse_ping_busybox_skips_duplicates() -> None:
    got = network.parse_ping(PING_BUSYBOX)
    assert got == {"rtt_ms": [17.3, 1.289, 0.957], "transmitted": 4, "received": 3}


def test_parse_ping_iputils_and_a_killed_ping() -> None:
    got = network.parse_ping(PING_IPUTILS)
    assert got == {"rtt_ms": [0.045, 1.0], "transmitted": 2, "received": 2}
    cut = network.parse_ping("PING 10.0.0.1 (10.0.0.1): 56 data bytes\n64 bytes from 10.0.0.1: seq=0 ttl=64 time=2.5 ms\n")
    assert cut == {"rtt_ms": [2.5], "transmitted": None, "received": None}
    assert network.parse_ping(b"") == {"rtt_ms": [], "transmitted": None, "received": None}


def test_rtt_summary() -> None:
    s = network.rtt_summary(network.parse_ping(PING_BUSYBOX))
    assert s is not None
    assert (s["n"], s["min"], s["p50"], s["max"]) == (3, 0.957, 1.289, 17.3)
    assert s["avg"] == pytest.approx((17.3 + 1.289 + 0.957) / 3)
    assert (s["sent"], s["received"], s["loss_pct"]) == (4, 3, 25.0)
    assert network.rtt_summary({"rtt_ms": [1.0], "transmitted": None, "received": None})["loss_pct"] is None
    assert network.rtt_summary({"rtt_ms": [], "transmitted": 5, "received": 0}) is None


PROC_NET_TCP = """  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1234 1 0 100 0 0 10 0
   1: 0200C70A:1389 0100C70A:D2F0 01 00000000:00000000 00:00000000 00000000     0        0 1235 1 0 20 4 30 10 -1
  sl  local_address                         remote_address                        st tx_queue rx_queue
   0: 00000000000000000000000000000000:138B 00000000000000000000000000000000:0000 0A 00000000:00000000 00:0
"""


def test_tcp_listening() -> None:
    assert network.tcp_listening(PROC_NET_TCP, 8080)  # 0x1F90, v4 listener
    assert network.tcp_listening(PROC_NET_TCP.encode(), 5003)  # 0x138B, v6 listener
    assert not network.tcp_listening(PROC_NET_TCP, 5001)  # 0x1389 is only an established connection
    assert not network.tcp_listening("", 5001)


def test_mib_per_s() -> None:
    assert stats.mib_per_s(32 << 20, 2.0) == 16.0
    assert stats.mib_per_s(1, 0.0) is None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _peer_tcp(*args: str) -> list[str]:
    return [sys.executable, "-c", network.PEER_TCP, *args, "20"]


def test_peer_tcp_send_waits_for_the_servers_eof() -> None:
    import socket
    import subprocess
    import threading

    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    got = []

    def sink() -> None:
        c, _ = srv.accept()
        n = 0
        while d := c.recv(1 << 16):
            n += len(d)
        got.append(n)
        c.close()

    t = threading.Thread(target=sink)
    t.start()
    try:
        out = subprocess.run(_peer_tcp("send", "127.0.0.1", str(port), str(3 << 20)), capture_output=True,
                             text=True, timeout=30, check=True).stdout
    finally:
        t.join(10)
        srv.close()
    r = json.loads(out)
    assert got == [3 << 20] and r["bytes"] == 3 << 20 and r["seconds"] >= r["send_returned_s"] > 0


def test_peer_tcp_recv_counts_bytes() -> None:
    import socket
    import subprocess

    port = _free_port()
    p = subprocess.Popen(_peer_tcp("recv", "127.0.0.1", str(port), str(1 << 20)), stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
            c.sendall(bytes(1 << 20))
            c.shutdown(socket.SHUT_WR)
            assert c.recv(1) == b""  # the receiver closes once it has everything
        out, _ = p.communicate(timeout=10)
    finally:
        if p.poll() is None:
            p.kill()
    r = json.loads(out)
    assert r["bytes"] == 1 << 20 and r["seconds"] > 0


def test_peer_tcp_get_counts_the_body() -> None:
    import http.server
    import subprocess
    import threading

    body = b"z" * 200_000

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            self.send_response(200 if self.path == "/zero" else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_a: object) -> None:
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.handle_request)
    t.start()
    try:
        out = subprocess.run(_peer_tcp("get", "127.0.0.1", str(srv.server_address[1]), "/zero"),
                             capture_output=True, text=True, timeout=30, check=True).stdout
    finally:
        t.join(10)
        srv.server_close()
    r = json.loads(out)
    assert r["status"].split()[1] == "200" and r["bytes"] == len(body)


NETWORK = {
    "guest_addr": "10.199.0.2", "peer_addr": "10.199.0.1", "mtu": 1500, "boot_s": 3.2, "ping_interval_s": 0.2,
    "rtt_ms": {"peer_to_guest": network.rtt_summary(network.parse_ping(PING_BUSYBOX)), "guest_to_peer": None},
    "tcp": {"peer_to_guest": {"bytes": 32 << 20, "seconds": 0.31, "mib_s": 103.2},
            "guest_to_peer": {"bytes": 32 << 20, "seconds": 9.42, "mib_s": 3.4},
            "guest_to_peer_httpd": {"bytes": 32 << 20, "seconds": 0.13, "mib_s": 248.2}},
    "other_domains_running": 1,
}


def test_report_renders_the_network_section() -> None:
    text = report.report({"host": {}, "network": NETWORK})
    assert "Network (peer netns <-> guest, tap + tc redirect): 10.199.0.1 <-> 10.199.0.2, MTU 1500" in text
    line = next(x for x in text.splitlines() if "ping peer -> guest" in x)
    assert line.split()[4:] == ["0.96", "6.5", "1.3", "14.1", "17.3", "3/4"]
    assert "ping guest -> peer" in text and "no reply" in text
    assert "248.2" in text and "103.2" in text and "dd | nc in the guest" in text
    assert "1 other guest(s) were running" in text
    partial = report.network_lines({"guest_addr": "g", "peer_addr": "p", "mtu": 1500})
    assert partial[-1] == "  (not measured)"


def test_network_presets_and_flags() -> None:
    quick = options.parse_args(["--quick", "--out", "x.json"])
    assert (quick.pings, quick.net_mib, quick.no_network) == (20, 32, False)
    full = options.parse_args(["--no-network", "--net-mib", "8", "--out", "x.json"])
    assert (full.pings, full.net_mib, full.no_network) == (100, 8, True)
    with pytest.raises(SystemExit):
        options.parse_args(["--pings", "0", "--out", "x.json"])
    assert len(network.NET_GUEST.split(".")) == 4 and network.NET_MTU == 1500


def test_cri_presets_flags_and_report() -> None:
    quick = options.parse_args(["--quick", "--out", "x.json"])
    assert (quick.cri, quick.cri_execs, quick.only_cri) == (3, 10, False)
    only = options.parse_args(["--only-cri", "--cri", "2", "--out", "x.json"])
    assert (only.cri, only.only_cri) == (2, True)
    with pytest.raises(SystemExit):
        options.parse_args(["--only-cri", "--cri", "0", "--out", "x.json"])
    figs = {k: stats.summarize([100.0, 300.0]) for k in report.CRI_LABELS}
    figs["exec_sync"] = stats.summarize([40.0, 50.0, 60.0])
    text = "\n".join(report.cri_lines({"containerd": "2.1.9", "n": 2, "warmup": 1, "execs_per_pod": 3,
                                       "figures_ms": figs}))
    assert "containerd 2.1.9): N=2 pods (+1 warm-up), 3 ExecSync each" in text
    line = next(x for x in text.splitlines() if "ExecSync true" in x)
    assert line.split()[-4:] == ["50.0", "58.0", "60.0", "3"]
    assert "RunPodSandbox -> 1st container RUNNING" in report.report({"host": {}, "cri": {"figures_ms": figs}})
    assert report.cri_lines({"skipped": "no containerd"}) == ["Containers through CRI: skipped (no containerd)"]
