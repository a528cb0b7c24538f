"""hack/bench: how fast a sandbox is ready, how many fit on a host, what the controller costs,
and how fast its network is.

Run as root from anywhere: ``hack/bench [--quick] [--out FILE] [--parallel 1,5,10] [--no-network]``.
It prints a table, writes JSON (default ``bench-results/bench-<UTC time>.json``) and one PNG per
series next to it. Everything it makes carries the unique prefix ``bench-<random>``: sandbox ids,
libvirt domains, network namespaces and (unless ``--state-dir``) a temporary state dir; all of it
is removed at the end, also after an error or Ctrl-C. Other domains, sandboxes and namespaces are
never touched.

How the numbers are taken (host ``time.monotonic()`` throughout):

* Start latency, serial: create -> start -> first exec answered, split into phases.
  ``define`` is ``create()``; ``domain start`` ends when libvirt's ``create()`` returns,
  stamped by wrapping the controller's ``_hv.start`` (a monkeypatch, bench only);
  ``kernel to init`` ends when the guest's ``vmsandbox: init started`` line appears in the
  console log file (one thread polls every watched file every 5 ms; a line's time is the
  midpoint of the poll that saw it and the one before); ``init script`` ends at the
  ``vmsandbox: agent ready`` line; ``agent ready`` ends when ``start()`` returns (the SSH
  handshake on the virtio-serial socket); ``first exec`` ends when ``cat /proc/uptime``
  answered. Samples alternate with the bare baseline below; warm-up starts are discarded.
* Guest side: the first exec returns the guest's uptime, which places the guest kernel's
  clock 0 on the host timeline (error: half that exec's round trip); ``dmesg`` (the ring
  buffer keeps messages that ``quiet`` hides from the console) gives "Run /init", "crng
  init done" and the biggest gaps in the kernel log.
* Controller overhead: the XML that the controller defined for a template sandbox (read
  back from libvirt), renamed and pointed at its own console, socket and a copy of the
  config disk, is started with bare libvirt-python (``defineXML`` + ``create``) and is ready
  when ``GuestAgent.connect`` (the same SSH handshake, same keys) returns. Reported as ours
  over bare.
* Parallel start: N threads create, start and exec at once; the time until all answered
  and sandboxes per second.
* With every parallel batch still running: status, platform, metrics, list and
  ``exec(["true"])`` on the warm transport (round-robin over the sandboxes), QEMU's PSS per
  sandbox (``/proc/<pid>/smaps_rollup``) and this process's RSS (it is the controller).
  Then stop (clean power-off) and shutdown are timed one sandbox at a time on up to
  ``--stop-samples`` of them; the rest are forced off together.
* Network (unless ``--no-network``): a CNI-style pod netns ``<prefix>-pod`` whose eth0 is a veth
  (MTU 1500, 10.199.0.2/24) with its other end in a peer netns ``<prefix>-peer`` (10.199.0.1/24),
  and one sandbox created with that netns (the guest takes eth0 over: tap + tc redirect). All
  traffic is between the peer netns and the guest, nothing else. Round trip: busybox ``ping
  -i 0.2`` from the peer to the guest and from the guest (exec) to the peer, after one warm-up
  ping each way (ARP); per-reply times give min/avg/p50/p90/max. TCP: the peer (a small Python
  client run by ``ip netns exec``) sends ``--net-mib`` MiB to busybox ``nc -l`` in the guest and
  the clock stops when the guest's FIN arrives (nc sends it only after reading our EOF, so all
  data was read); the guest sends ``dd | nc`` to a Python receiver in the peer netns that counts
  the bytes; and the guest's busybox ``httpd`` serves a sparse file of the same size (sendfile)
  to a Python client in the peer netns. busybox nc moves the data in small writes, which under
  TCG makes the guest's CPU, not the network path, the limit of ``dd | nc``; the httpd figure
  shows the path itself.
* Noise: each start records how many other guests were running on the host (a warning is
  printed when there were any), and SSH connection attempts that timed out while a guest
  booted are counted (paramiko's tracebacks for them are kept off the terminal).

The guest image is built once into ``--image-cache`` and copied into the state dir. With
``--state-dir``, use a dir that no other controller is using (the controller recovers and
reconciles whatever it finds there).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import math
import os
import platform
import re
import secrets
import shutil
import signal
import struct
import sys
import tarfile
import tempfile
import threading
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SCHEMA = "vmsandbox-bench/1"
log = logging.getLogger("bench")

# Published figures the README compares us with (see the benchmark issue).
ANCHORS = {
    "firecracker_boot_to_init_ms": 125,
    "kuasar_serial_p50_ms": 324,
    "kata_serial_p50_ms": 900,
    "kuasar_parallel_50_s": 1.0,
    "kata_parallel_50_s": 1.72,
}

INIT_MARKER = b"vmsandbox: init started"
AGENT_MARKER = b"vmsandbox: agent ready"
FIRST_EXEC = ["cat", "/proc/uptime"]

# Phases of one start, in order: (key, label, stamp at its end). Each starts where the one
# before ended; "define" starts at t0. Their sum is the total.
PHASES = (
    ("define", "define (create / defineXML)", "defined"),
    ("domain_start", "domain start (libvirt create returned)", "started"),
    ("kernel_to_init", "kernel to init (console line)", "init_line"),
    ("init_script", "init script (to 'agent ready' line)", "agent_line"),
    ("agent_ready", "agent ready (SSH handshake, start())", "ready"),
    ("first_exec", "first exec answered", "exec_done"),
)
QUICK = {"serial": 3, "warmup": 1, "ops_repeat": 20, "stop_samples": 2, "pings": 20, "net_mib": 32}
FULL = {"serial": 20, "warmup": 2, "ops_repeat": 100, "stop_samples": 5, "pings": 100, "net_mib": 256}
PARALLEL_DEFAULT = {"tcg": "1,5,10", "kvm": "1,10,50"}


# ---------------------------------------------------------------------- pure helpers
def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0..100), linear between closest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= p <= 100:
        raise ValueError(f"percentile {p} is outside 0..100")
    xs = sorted(values)
    k = (len(xs) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(values: Iterable[float | None]) -> dict[str, float] | None:
    """n, min, p50, p90, p99, max and mean of the values that are not None; None if none."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return None
    return {
        "n": len(xs),
        "min": min(xs),
        "p50": percentile(xs, 50),
        "p90": percentile(xs, 90),
        "p99": percentile(xs, 99),
        "max": max(xs),
        "mean": sum(xs) / len(xs),
    }


def phase_durations(stamps: Mapping[str, float | None]) -> dict[str, float | None]:
    """Milliseconds per phase (and ``total``) from monotonic stamps in seconds.

    A phase whose end stamp is missing is None, and the next phase then starts at the last
    stamp that is present, so the phases that are known still add up to the total.
    """
    out: dict[str, float | None] = {}
    prev = stamps.get("t0")
    for key, _label, end in PHASES:
        t = stamps.get(end)
        if t is None or prev is None:
            out[key] = None
        else:
            out[key] = (t - prev) * 1000
            prev = t
    t0, done = stamps.get("t0"), stamps.get("exec_done")
    out["total"] = None if t0 is None or done is None else (done - t0) * 1000
    return out


def parse_parallel(text: str) -> list[int]:
    """``"1,5,10"`` -> [1, 5, 10] (sorted, unique, each >= 1)."""
    try:
        levels = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--parallel takes whole numbers like 1,5,10, not {text!r}") from None
    if not levels or levels[0] < 1:
        raise argparse.ArgumentTypeError("--parallel needs at least one level, each >= 1")
    return levels


def parse_uptime(text: bytes | str) -> float | None:
    """Seconds since the guest kernel's clock started, from ``/proc/uptime``."""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    try:
        return float(text.split()[0])
    except (IndexError, ValueError):
        return None


_DMESG = re.compile(r"^(?:<\d+>)?\[\s*(\d+\.\d+)\]\s?(.*)$")


def parse_dmesg(text: bytes | str) -> list[tuple[float, str]]:
    """``[   1.234567] message`` lines as (seconds, message); other lines are skipped."""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    out = []
    for line in text.splitlines():
        m = _DMESG.match(line)
        if m:
            out.append((float(m.group(1)), m.group(2)))
    return out


def dmesg_time(events: Sequence[tuple[float, str]], pattern: str) -> float | None:
    """Guest time of the first kernel message matching the regex ``pattern``."""
    rx = re.compile(pattern)
    for t, msg in events:
        if rx.search(msg):
            return t
    return None


def biggest_gaps(events: Sequence[tuple[float, str]], top: int = 8) -> list[dict[str, Any]]:
    """The largest pauses in the kernel log: where boot time goes between two messages."""
    pairs = sorted(zip(events, events[1:]), key=lambda ab: ab[0][0] - ab[1][0])
    return [{"at_s": t1, "gap_ms": (t2 - t1) * 1000, "after": m1, "before": m2}
            for (t1, m1), (t2, m2) in pairs[:top]]


def guest_timeline(
    stamps: Mapping[str, float | None], uptime: float | None, events: Sequence[tuple[float, str]]
) -> dict[str, float | None]:
    """Guest-clock facts of one boot, placed on the host timeline (milliseconds).

    The first exec read the guest's uptime somewhere between ``ready`` and ``exec_done``;
    its midpoint minus the uptime is when the guest kernel's clock read 0 (the error is
    half the exec's round trip, ``clock_error_ms``).
    """
    out: dict[str, float | None] = dict.fromkeys(
        ("vmm_to_kernel_ms", "kernel_to_run_init_ms", "run_init_to_console_ms", "crng_ready_ms",
         "agent_line_guest_ms", "ready_guest_ms", "clock_error_ms"))
    ready, done, started = stamps.get("ready"), stamps.get("exec_done"), stamps.get("started")
    run_init = dmesg_time(events, r"Run \S+ as init process")
    crng = dmesg_time(events, r"crng init done")
    out["kernel_to_run_init_ms"] = None if run_init is None else run_init * 1000
    out["crng_ready_ms"] = None if crng is None else crng * 1000
    if uptime is None or ready is None or done is None:
        return out
    zero = (ready + done) / 2 - uptime
    out["clock_error_ms"] = (done - ready) / 2 * 1000
    out["ready_guest_ms"] = (ready - zero) * 1000
    if started is not None:
        out["vmm_to_kernel_ms"] = (zero - started) * 1000
    init_line, agent_line = stamps.get("init_line"), stamps.get("agent_line")
    if init_line is not None and run_init is not None:
        out["run_init_to_console_ms"] = ((init_line - zero) - run_init) * 1000
    if agent_line is not None:
        out["agent_line_guest_ms"] = (agent_line - zero) * 1000
    return out


def kib_field(text: str, name: str) -> int | None:
    """A ``Name:   1234 kB`` field of /proc/<pid>/status or smaps_rollup, in KiB."""
    m = re.search(rf"^{re.escape(name)}:\s+(\d+)\s+kB", text, re.M)
    return int(m.group(1)) if m else None


def host_key_line_from_config(config_tar: bytes) -> str:
    """The guest's pinned host key (``ssh-ed25519 AAAA...``) from a config disk.

    The disk is a tar (images/README.md) whose ``hostkey`` member is dropbear's ed25519
    format: string "ssh-ed25519", string (32-byte seed || 32-byte public key).
    """
    with tarfile.open(fileobj=io.BytesIO(config_tar), mode="r:") as tar:
        member = tar.extractfile("hostkey")
        if member is None:
            raise ValueError("config disk has no hostkey")
        blob = member.read()
    (n,) = struct.unpack(">I", blob[:4])
    kind = blob[4:4 + n]
    (m,) = struct.unpack(">I", blob[4 + n:8 + n])
    key = blob[8 + n:8 + n + m]
    if kind != b"ssh-ed25519" or len(key) != 64:
        raise ValueError(f"hostkey is not a dropbear ed25519 key ({kind!r}, {len(key)} bytes)")
    pub = key[32:]
    wire = struct.pack(">I", 11) + b"ssh-ed25519" + struct.pack(">I", 32) + pub
    return "ssh-ed25519 " + base64.b64encode(wire).decode()


def bare_domain_xml(xml: str, *, name: str, console: str, agent_socket: str, config_disk: str) -> str:
    """The controller's domain XML as a stand-alone domain: renamed, no uuid, no metadata
    (so no controller ever adopts it), its own console file, agent socket and config disk."""
    root = ET.fromstring(xml)
    name_el = root.find("name")
    if name_el is None:
        raise ValueError("domain XML has no <name>")
    name_el.text = name
    for tag in ("uuid", "title", "description", "metadata"):
        for el in root.findall(tag):
            root.remove(el)
    devices = root.find("devices")
    if devices is None:
        raise ValueError("domain XML has no <devices>")
    found = {"console": False, "socket": False, "disk": False}
    for el in list(devices.findall("serial")) + list(devices.findall("console")):
        src = el.find("source")
        if el.get("type") == "file" and src is not None:
            src.set("path", console)
            found["console"] = True
    for chan in devices.findall("channel"):
        src, target = chan.find("source"), chan.find("target")
        if chan.get("type") == "unix" and src is not None and target is not None and target.get("type") == "virtio":
            src.set("path", agent_socket)
            found["socket"] = True
    for disk in devices.findall("disk"):
        serial, src = disk.find("serial"), disk.find("source")
        if serial is not None and serial.text == "vsbx-config" and src is not None:
            src.set("file", config_disk)
            found["disk"] = True
    missing = [k for k, ok in found.items() if not ok]
    if missing:
        raise ValueError(f"domain XML lacks the expected {', '.join(missing)}")
    return ET.tostring(root, encoding="unicode")


_PING_REPLY = re.compile(r"bytes from .*\btime[=<]\s*([\d.]+)\s*ms")
_PING_COUNTS = re.compile(r"(\d+) packets transmitted, (\d+) (?:packets )?received")


def parse_ping(text: bytes | str) -> dict[str, Any]:
    """Per-reply round trips (ms) and packet counts from ``ping`` output (busybox or iputils).

    Duplicate replies (``(DUP!)``) are skipped; counts are None when the summary is missing
    (ping was killed).
    """
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    rtts = []
    for line in text.splitlines():
        m = _PING_REPLY.search(line)
        if m and "DUP!" not in line:
            rtts.append(float(m.group(1)))
    c = _PING_COUNTS.search(text)
    return {"rtt_ms": rtts, "transmitted": int(c.group(1)) if c else None,
            "received": int(c.group(2)) if c else None}


def rtt_summary(ping: Mapping[str, Any]) -> dict[str, Any] | None:
    """min/avg/p50/p90/max of a :func:`parse_ping` result, with counts and loss; None if no reply."""
    s = summarize(ping["rtt_ms"])
    if s is None:
        return None
    sent, got = ping.get("transmitted"), ping.get("received")
    return {
        "n": s["n"], "min": s["min"], "avg": s["mean"], "p50": s["p50"], "p90": s["p90"], "max": s["max"],
        "sent": sent, "received": got,
        "loss_pct": None if not sent or got is None else 100.0 * (sent - got) / sent,
    }


def tcp_listening(proc_net_tcp: bytes | str, port: int) -> bool:
    """Whether /proc/net/tcp{,6} text shows a socket listening (state 0A) on ``port``."""
    if isinstance(proc_net_tcp, bytes):
        proc_net_tcp = proc_net_tcp.decode(errors="replace")
    for line in proc_net_tcp.splitlines():
        f = line.split()
        if len(f) > 3 and ":" in f[1] and f[3] == "0A":
            try:
                if int(f[1].rsplit(":", 1)[1], 16) == port:
                    return True
            except ValueError:
                continue
    return False


def mib_per_s(nbytes: int | float, seconds: float) -> float | None:
    return None if seconds <= 0 else nbytes / 1048576 / seconds


def fmt_ms(v: float | None) -> str:
    if v is None:
        return "n/a"
    if abs(v) >= 100:
        return f"{v:.0f}"
    return f"{v:.1f}" if abs(v) >= 1 else f"{v:.2f}"


def fmt_ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b <= 0:
        return "n/a"
    return f"{a / b:.2f}x"


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]], indent: int = 2) -> str:
    """A plain text table: the first column left-aligned, the others right-aligned."""
    cols = [headers, *rows]
    widths = [max(len(r[i]) for r in cols) for i in range(len(headers))]
    lines = []
    for r in cols:
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        lines.append(" " * indent + "  ".join(cells).rstrip())
    lines.insert(1, " " * indent + "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def p(summary: Mapping[str, float] | None, key: str) -> float | None:
    return None if summary is None else summary.get(key)


# ---------------------------------------------------------------------- console watcher
class ConsoleWatcher:
    """One thread that polls watched console logs for marker lines.

    A marker's time is the midpoint between the poll that first saw it and the poll
    before, so its error is half the poll interval.
    """

    def __init__(self, markers: Mapping[str, bytes], interval: float = 0.005) -> None:
        self.markers = dict(markers)
        self.interval = interval
        self._watches: dict[str, dict[str, Any]] = {}
        self._cond = threading.Condition()
        self._passes = 0
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="console-watcher", daemon=True)
        self._thread.start()

    def watch(self, key: str, path: Path) -> None:
        with self._cond:
            self._watches[key] = {"path": path, "offset": 0, "tail": b"", "found": {}, "last": time.monotonic()}

    def unwatch(self, key: str) -> dict[str, float]:
        """Stop watching after one more full poll; return {marker name: monotonic time}."""
        with self._cond:
            target = self._passes + 2
            while self._passes < target and not self._stop:
                self._cond.wait(1.0)
            w = self._watches.pop(key, None)
        return dict(w["found"]) if w else {}

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(2.0)

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._stop:
                    return
                watches = list(self._watches.values())
            for w in watches:
                self._poll(w)
            with self._cond:
                self._passes += 1
                self._cond.notify_all()
            time.sleep(self.interval)

    def _poll(self, w: dict[str, Any]) -> None:
        now = time.monotonic()
        last, w["last"] = w["last"], now
        if len(w["found"]) == len(self.markers):
            return
        try:
            size = os.stat(w["path"]).st_size
            if size < w["offset"]:  # the file was truncated (QEMU opened it anew)
                w["offset"], w["tail"] = 0, b""
            if size == w["offset"]:
                return
            with open(w["path"], "rb") as f:
                f.seek(w["offset"])
                data = f.read(size - w["offset"])
        except OSError:
            return
        w["offset"] += len(data)
        text = w["tail"] + data
        for name, marker in self.markers.items():
            if name not in w["found"] and marker in text:
                w["found"][name] = (last + now) / 2
        w["tail"] = text[-256:]


# ---------------------------------------------------------------------- network
NET_GUEST, NET_PEER, NET_PREFIX_LEN, NET_MTU = "10.199.0.2", "10.199.0.1", 24, 1500
SINK_PORT, RECV_PORT, HTTP_PORT = 5001, 5002, 5003  # guest nc -l, peer receiver, guest httpd
PING_INTERVAL_S = 0.2

# Run in the peer netns (``ip netns exec PEER python -c PEER_TCP MODE ...``); prints one JSON line.
#   send HOST PORT BYTES TIMEOUT: connect, send, half-close; the clock stops at the server's EOF.
#   recv HOST PORT BYTES TIMEOUT: listen, print "ready", accept one, count bytes until EOF (or all
#        expected bytes) and close.
#   get HOST PORT PATH TIMEOUT: HTTP/1.0 GET, count the body until EOF.
PEER_TCP = r"""
import json, socket, sys, time
mode, host, port, arg, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], float(sys.argv[5])
out = {}
if mode == "send":
    n, buf = int(arg), bytes(1 << 16)
    s = socket.create_connection((host, port), timeout=timeout)
    t = time.monotonic()
    left = n
    while left > 0:
        left -= s.send(buf[:min(left, len(buf))])
    out["send_returned_s"] = time.monotonic() - t
    s.shutdown(socket.SHUT_WR)
    while s.recv(1 << 16):
        pass
    out.update(bytes=n, seconds=time.monotonic() - t)
elif mode == "recv":
    want = int(arg)
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((host, port))
    ls.listen(1)
    ls.settimeout(timeout)
    print("ready", flush=True)
    c, _ = ls.accept()
    c.settimeout(timeout)
    t, n = time.monotonic(), 0
    while n < want:
        d = c.recv(1 << 20)
        if not d:
            break
        n += len(d)
    out.update(bytes=n, seconds=time.monotonic() - t)
    c.close()
elif mode == "get":
    s = socket.create_connection((host, port), timeout=timeout)
    t = time.monotonic()
    s.sendall(b"GET " + arg.encode() + b" HTTP/1.0\r\n\r\n")
    data, n = b"", 0
    while b"\r\n\r\n" not in data:
        d = s.recv(1 << 16)
        if not d:
            break
        data += d
    head, _, body = data.partition(b"\r\n\r\n")
    out["status"] = head.split(b"\r\n", 1)[0].decode(errors="replace")
    n = len(body)
    while True:
        d = s.recv(1 << 20)
        if not d:
            break
        n += len(d)
    out.update(bytes=n, seconds=time.monotonic() - t)
print(json.dumps(out), flush=True)
"""


def _run(argv: Sequence[str], timeout: float) -> str:
    """Run a host command, return its stdout; raise with its stderr if it failed."""
    import subprocess

    r = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        cmd = " ".join(a if len(a) <= 80 else "<script>" for a in argv)
        raise RuntimeError(f"{cmd} exited {r.returncode}: {(r.stderr or r.stdout).strip()[-500:]}")
    return r.stdout


# ---------------------------------------------------------------------- the benchmark
class SSHFailures(logging.Handler):
    """Counts failed SSH connection attempts that paramiko logs (banner timeouts while a
    guest is still booting), so they show up as a figure instead of tracebacks."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("Exception (client)"):
            self.count += 1


SSH_FAILURES = SSHFailures()


def say(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def _read(path: str | Path) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _cpu_model() -> str:
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


class Bench:
    """One benchmark run: owns the controller, the bare libvirt connection and cleanup."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.prefix = f"bench-{secrets.token_hex(3)}"
        self.results: dict[str, Any] = {
            "schema": SCHEMA,
            "prefix": self.prefix,
            "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "mode": "quick" if args.quick else "full",
            "anchors": ANCHORS,
        }
        self.ctl: Any = None
        self.conn: Any = None
        self.watcher = ConsoleWatcher({"init": INIT_MARKER, "agent": AGENT_MARKER})
        self.sids: set[str] = set()
        self.bare_domains: set[str] = set()
        self.own_state_dir = args.state_dir is None
        self.state_dir = Path(args.state_dir).resolve() if args.state_dir else None
        self.bare_dir: Path | None = None
        self._hv_stamps: dict[str, tuple[float, float]] = {}
        self._hv_lock = threading.Lock()
        self.netns: list[str] = []  # network namespaces this run made, removed in cleanup

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        import libvirt

        from vmsandbox import Config, LibvirtController, Sandbox, VirtType

        if self.state_dir is None:
            self.state_dir = Path(tempfile.mkdtemp(prefix=self.prefix + "-"))
        self._provision_image(self.state_dir)
        cfg = Config.from_env(
            uri=self.args.uri,
            state_dir=self.state_dir,
            virt_type=VirtType(self.args.virt_type),
            boot_timeout=self.args.boot_timeout,
        )
        self.conn = libvirt.open(cfg.uri)
        self.ctl = LibvirtController(config=cfg)
        self._hook_domain_start()
        self.virt = "kvm" if self.ctl.virt_type is VirtType.KVM else "tcg"
        if not self.args.parallel:
            self.args.parallel = parse_parallel(PARALLEL_DEFAULT[self.virt])
        self.results["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(self.args).items()}
        self.results["controller_rss_kib_idle"] = kib_field(_read("/proc/self/status"), "VmRSS")

        # The template: a sandbox the controller defines (never started) whose XML, keys
        # and config disk the bare baseline reuses.
        tid = f"{self.prefix}-tmpl"
        self.sids.add(tid)
        self.ctl.create(Sandbox(id=tid))
        from vmsandbox.sandbox.controller import DOMAIN_PREFIX

        self.domain_prefix = DOMAIN_PREFIX
        xml = self.ctl._hv.xml(DOMAIN_PREFIX + tid)
        sdir = self.ctl.console_log(tid).parent
        self.bare_dir = self.state_dir / f"{self.prefix}-bare"
        self.bare_dir.mkdir()
        os.chmod(self.bare_dir, 0o711)
        disk = next(
            str(d.find("source").get("file"))  # type: ignore[union-attr]
            for d in ET.fromstring(xml).iter("disk")
            if d.findtext("serial") == "vsbx-config"
        )
        self.bare_config = self.bare_dir / "config.tar"
        shutil.copyfile(disk, self.bare_config)
        os.chmod(self.bare_config, 0o600)
        self.client_key = (sdir / "id_ed25519").read_bytes()
        self.host_key = host_key_line_from_config(self.bare_config.read_bytes())
        self.template_xml = xml
        self.ctl.shutdown(tid)
        self.sids.discard(tid)

        image = self.ctl.image()
        root = ET.fromstring(xml)
        os_type = root.find("os/type")
        vcpu = root.find("vcpu")
        self.results["host"] = {
            "virt_type": self.virt,
            "cpu_model": _cpu_model(),
            "cpu_count": os.cpu_count(),
            "mem_total_kib": kib_field(_read("/proc/meminfo"), "MemTotal"),
            "host_kernel": platform.release(),
            "libvirt_version": _version(self.conn.getLibVersion()),
            "qemu_version": _version(self.conn.getVersion()),
            "guest_kernel": image.kernel_version,
            "guest_machine": os_type.get("machine") if os_type is not None else None,
            "guest_vcpus": int(vcpu.get("current") or vcpu.text or 0) if vcpu is not None else None,
            "guest_max_vcpus": int(vcpu.text or 0) if vcpu is not None else None,
            "guest_memory_mib": _mib_of(root.find("currentMemory")),
            "guest_max_memory_mib": _mib_of(root.find("memory")),
            "guest_cmdline": root.findtext("os/cmdline"),
            "python": platform.python_version(),
            "loadavg_at_start": _read("/proc/loadavg").split()[:3],
        }

    def _provision_image(self, state_dir: Path) -> None:
        """Put the guest image into the state dir: copied from a cache (built there once)."""
        from vmsandbox import Config
        from vmsandbox.image import ensure_image, find_image, recipe_digest

        images = Config.from_env().images_dir
        if find_image(state_dir, images) is not None:
            return
        cache = Path(self.args.image_cache)
        src = find_image(cache, images) or find_image(Config.from_env().state_dir, images)
        if src is None:
            say(f"building the guest image into {cache} (once)")
            src = ensure_image(cache, images, progress=lambda line: log.info("%s", line))
        dst = state_dir / "images" / src.name / recipe_digest(images)
        dst.parent.mkdir(parents=True, exist_ok=True)
        for d in (state_dir, state_dir / "images", dst.parent):
            os.chmod(d, 0o755 if d != state_dir else 0o711)
        shutil.copytree(src.directory, dst)
        os.chmod(dst, 0o755)

    def _hook_domain_start(self) -> None:
        """Stamp when libvirt's create() returns for each domain (bench-only monkeypatch)."""
        hv = self.ctl._hv
        original: Callable[[str], None] = hv.start

        def timed_start(name: str) -> None:
            t = time.monotonic()
            original(name)
            with self._hv_lock:
                self._hv_stamps[name] = (t, time.monotonic())

        hv.start = timed_start

    # ------------------------------------------------------------------ one start
    def others(self) -> int:
        """Running domains that are not this run's: their load skews our figures."""
        try:
            names = [d.name() for d in self.conn.listAllDomains(1)]  # VIR_CONNECT_LIST_DOMAINS_ACTIVE
        except Exception:  # noqa: BLE001 - only a hint
            return 0
        return sum(1 for n in names if not (n.startswith(self.prefix + "-") or n.startswith(f"vmsandbox-{self.prefix}-")))

    def ours(self, sid: str, *, dmesg: bool) -> dict[str, Any]:
        """create -> start -> first exec through the controller; stamps and phases."""
        from vmsandbox import Sandbox

        self.sids.add(sid)
        others = self.others()
        st: dict[str, float | None] = {"t0": time.monotonic()}
        self.ctl.create(Sandbox(id=sid))
        st["defined"] = time.monotonic()
        self.watcher.watch(sid, self.ctl.console_log(sid))
        try:
            self.ctl.start(sid)
            st["ready"] = time.monotonic()
            r = self.ctl.exec(sid, FIRST_EXEC, timeout=30)
            st["exec_done"] = time.monotonic()
        finally:
            found = self.watcher.unwatch(sid)
        with self._hv_lock:
            hv = self._hv_stamps.pop(self.domain_prefix + sid, None)
        st["started"] = hv[1] if hv else None
        st["init_line"], st["agent_line"] = found.get("init"), found.get("agent")
        events = parse_dmesg(self.ctl.exec(sid, ["dmesg"], timeout=30).stdout) if dmesg else []
        return self._sample(sid, st, r.exit_code, parse_uptime(r.stdout), events, others)

    def bare(self, i: int | str) -> dict[str, Any]:
        """The same XML, kernel and initramfs by bare libvirt, the same readiness signal."""
        from vmsandbox.guest.agent import GuestAgent

        assert self.bare_dir is not None
        name = f"{self.prefix}-bare-{i}"
        console, sock = self.bare_dir / f"{i}.console.log", self.bare_dir / f"{i}.sock"
        xml = bare_domain_xml(self.template_xml, name=name, console=str(console),
                              agent_socket=str(sock), config_disk=str(self.bare_config))
        agent = GuestAgent(str(sock), self.client_key, self.host_key, sandbox_id=name)
        self.watcher.watch(name, console)
        self.bare_domains.add(name)
        others = self.others()
        st: dict[str, float | None] = {"t0": time.monotonic()}
        try:
            dom = self.conn.defineXML(xml)
            st["defined"] = time.monotonic()
            dom.create()
            st["started"] = time.monotonic()
            agent.connect(time.monotonic() + self.args.boot_timeout)
            st["ready"] = time.monotonic()
            r = agent.exec(FIRST_EXEC, timeout=30)
            st["exec_done"] = time.monotonic()
            found = self.watcher.unwatch(name)
            st["init_line"], st["agent_line"] = found.get("init"), found.get("agent")
            events = parse_dmesg(agent.exec(["dmesg"], timeout=30).stdout)
        finally:
            self.watcher.unwatch(name)
            agent.close()
            self._remove_bare(name)
            for f in (console, sock):
                f.unlink(missing_ok=True)
        return self._sample(name, st, r.exit_code, parse_uptime(r.stdout), events, others)

    def _sample(self, sid: str, st: Mapping[str, float | None], code: int, uptime: float | None,
                events: Sequence[tuple[float, str]], others: int) -> dict[str, Any]:
        if code != 0:
            raise RuntimeError(f"{sid}: first exec {FIRST_EXEC} exited {code}")
        t0 = st["t0"]
        assert t0 is not None
        return {
            "id": sid,
            "phases_ms": phase_durations(st),
            "stamps_ms": {k: None if v is None else (v - t0) * 1000 for k, v in st.items()},
            "guest": guest_timeline(st, uptime, events) if events else None,
            "guest_uptime_s": uptime,
            "other_domains_running": others,
            "_events": events,
            "_abs": dict(st),
        }

    def _remove_bare(self, name: str) -> None:
        import libvirt

        try:
            dom = self.conn.lookupByName(name)
        except libvirt.libvirtError:
            self.bare_domains.discard(name)
            return
        try:
            if dom.isActive():
                dom.destroy()
        finally:
            dom.undefine()
        self.bare_domains.discard(name)

    def remove(self, sid: str, *, clean: bool = False) -> tuple[float, float]:
        """Stop (forced unless ``clean``) and shut down; (stop s, shutdown s)."""
        t = time.monotonic()
        self.ctl.stop(sid, timeout=None if clean else 0)
        t1 = time.monotonic()
        self.ctl.shutdown(sid)
        t2 = time.monotonic()
        self.sids.discard(sid)
        return t1 - t, t2 - t1

    # ------------------------------------------------------------------ serial
    def run_serial(self) -> None:
        n, warm = self.args.serial, self.args.warmup
        ours: list[dict[str, Any]] = []
        bare: list[dict[str, Any]] = []
        failures = SSH_FAILURES.count
        for i in range(-warm, n):
            tag = f"w{-i}" if i < 0 else f"s{i}"
            say(f"serial {tag} ({'warm-up' if i < 0 else f'{i + 1}/{n}, ours and bare'})")
            # Alternate which goes first, so that drift on the host hits both alike. The
            # warm-up has no bare start: ours warms the same kernel, initramfs and QEMU.
            order = ("ours", "bare") if i % 2 == 0 else ("bare", "ours")
            for kind in order:
                if kind == "ours":
                    sid = f"{self.prefix}-{tag}"
                    s = self.ours(sid, dmesg=True)
                    self.remove(sid)
                    if i >= 0:
                        ours.append(s)
                elif i >= 0 and not self.args.no_bare:
                    bare.append(self.bare(tag))
        out: dict[str, Any] = {"n": n, "warmup": warm, "failed_ssh_attempts": SSH_FAILURES.count - failures}
        for kind, samples in (("controller", ours), ("bare", bare)):
            if not samples:
                continue
            keys = [k for k, _l, _e in PHASES] + ["total"]
            guest_keys = list(samples[0]["guest"] or {})
            out[kind] = {
                "phases": {k: summarize(s["phases_ms"][k] for s in samples) for k in keys},
                "guest": {k: summarize((s["guest"] or {}).get(k) for s in samples) for k in guest_keys},
                "samples": [{k: v for k, v in s.items() if not k.startswith("_")} for s in samples],
                "dmesg_gaps": biggest_gaps(samples[0]["_events"]),
            }
        if ours and bare:
            out["ratio_p50"] = {
                k: _ratio(p(out["controller"]["phases"][k], "p50"), p(out["bare"]["phases"][k], "p50"))
                for k in out["controller"]["phases"]
            }
        self.results["serial"] = out

    # ------------------------------------------------------------------ parallel
    def run_parallel(self) -> None:
        self.results["parallel"] = []
        self.results["operations"] = {}
        self.results["memory"] = []
        for n in self.args.parallel:
            say(f"parallel: {n} at once")
            sids = [f"{self.prefix}-p{n}-{j}" for j in range(n)]
            gate = threading.Barrier(n + 1)
            others, failures = self.others(), SSH_FAILURES.count

            def one(sid: str) -> dict[str, Any]:
                gate.wait()
                return self.ours(sid, dmesg=False)

            with ThreadPoolExecutor(max_workers=n, thread_name_prefix="bench-par") as pool:
                futures = [pool.submit(one, sid) for sid in sids]
                try:
                    gate.wait()
                except BaseException:
                    gate.abort()  # never leave workers waiting at the gate
                    raise
                go = time.monotonic()
                samples = [f.result() for f in futures]
            # Wall time from the moment all threads were let go until the last answered.
            wall = max(s["_abs"]["exec_done"] for s in samples) - go
            self.results["parallel"].append({
                "n": n,
                "all_ready_s": wall,
                "sandboxes_per_s": n / wall,
                "per_sandbox_ms": summarize(s["phases_ms"]["total"] for s in samples),
                "failed_ssh_attempts": SSH_FAILURES.count - failures,
                "other_domains_running": others,
                "phases": {k: summarize(s["phases_ms"][k] for s in samples) for k, _l, _e in PHASES},
            })
            say(f"parallel: {n} ready in {wall:.2f}s; operations and memory with {n} running")
            self.results["memory"].append(self.memory(sids))
            ops = self.operations(sids)
            self.results["operations"][str(n)] = ops
            self.teardown_batch(sids, ops)

    def operations(self, sids: Sequence[str]) -> dict[str, Any]:
        """Latency (ms) of the cheap operations, round-robin over the running sandboxes."""
        ctl = self.ctl

        def exec_true(s: str) -> None:
            r = ctl.exec(s, ["true"], timeout=30)
            if r.exit_code != 0:
                raise RuntimeError(f"{s}: exec true exited {r.exit_code}")

        ops: dict[str, Callable[[str], object]] = {
            "status": ctl.status,
            "platform": ctl.platform,
            "metrics": ctl.metrics,
            "list": lambda _s: ctl.list(),
            "exec_true": exec_true,
        }
        out: dict[str, Any] = {}
        for name, fn in ops.items():
            xs = []
            for k in range(self.args.ops_repeat):
                sid = sids[k % len(sids)]
                t = time.monotonic()
                fn(sid)
                xs.append((time.monotonic() - t) * 1000)
            out[name] = summarize(xs)
        return out

    def memory(self, sids: Sequence[str]) -> dict[str, Any]:
        pss, rss = [], []
        for sid in sids:
            pid = self.ctl.status(sid).pid
            rollup = _read(f"/proc/{pid}/smaps_rollup") if pid else ""
            pss.append(kib_field(rollup, "Pss"))
            rss.append(kib_field(rollup, "Rss"))
        return {
            "running": len(sids),
            "qemu_pss_kib": summarize(pss),
            "qemu_pss_kib_total": sum(x for x in pss if x is not None),
            "qemu_rss_kib": summarize(rss),
            "controller_rss_kib": kib_field(_read("/proc/self/status"), "VmRSS"),
        }

    def teardown_batch(self, sids: Sequence[str], ops: dict[str, Any]) -> None:
        """Time stop (clean) + shutdown one by one on a few; force the rest off together."""
        k = min(len(sids), self.args.stop_samples)
        stops, shutdowns = [], []
        for sid in sids[:k]:
            a, b = self.remove(sid, clean=True)
            stops.append(a * 1000)
            shutdowns.append(b * 1000)
        ops["stop"] = summarize(stops)
        ops["shutdown"] = summarize(shutdowns)
        rest = list(sids[k:])
        if rest:
            with ThreadPoolExecutor(max_workers=min(8, len(rest))) as pool:
                list(pool.map(self.remove, rest))

    # ------------------------------------------------------------------ network
    def run_network(self) -> None:
        """Round trip and TCP throughput between a peer netns and a guest that took over the
        pod netns's eth0 (see the module docstring)."""
        from vmsandbox import Sandbox

        if shutil.which("busybox") is None:
            raise RuntimeError("the network section needs busybox on the host (ping); or use --no-network")
        begin = time.monotonic()
        pod, peer, host_end = f"{self.prefix}-pod", f"{self.prefix}-peer", f"{self.prefix}-v"
        assert len(host_end) <= 15
        guest, peer_ip, plen, mtu = NET_GUEST, NET_PEER, NET_PREFIX_LEN, str(NET_MTU)
        sid = f"{self.prefix}-net"
        out: dict[str, Any] = {
            "guest_addr": guest, "peer_addr": peer_ip, "mtu": NET_MTU, "netns": {"pod": pod, "peer": peer},
            "sandbox": sid, "pings": self.args.pings, "ping_interval_s": PING_INTERVAL_S,
            "mib": self.args.net_mib, "other_domains_running": self.others(),
        }
        self.results["network"] = out
        say(f"network: netns {pod} + {peer}, sandbox {sid}")
        try:
            for ns in (pod, peer):
                self.netns.append(ns)
                _run(["ip", "netns", "add", ns], 30)
            _run(["ip", "link", "add", "eth0", "netns", pod, "mtu", mtu, "type", "veth",
                  "peer", "name", host_end, "netns", peer, "mtu", mtu], 30)
            _run(["ip", "-n", pod, "addr", "add", f"{guest}/{plen}", "dev", "eth0"], 30)
            _run(["ip", "-n", pod, "link", "set", "eth0", "up"], 30)
            _run(["ip", "-n", peer, "addr", "add", f"{peer_ip}/{plen}", "dev", host_end], 30)
            _run(["ip", "-n", peer, "link", "set", host_end, "up"], 30)
            _run(["ip", "-n", peer, "link", "set", "lo", "up"], 30)

            self.sids.add(sid)
            t = time.monotonic()
            self.ctl.create(Sandbox(id=sid), netns_path=f"/var/run/netns/{pod}")
            self.ctl.start(sid)
            out["boot_s"] = time.monotonic() - t

            self._warm_up_ping(peer, sid)
            # Filled as they are measured, so an error or Ctrl-C keeps what was.
            rtt: dict[str, Any] = out.setdefault("rtt_ms", {})
            rtt["peer_to_guest"] = self._ping_from_peer(peer)
            rtt["guest_to_peer"] = self._ping_from_guest(sid)
            tcp: dict[str, Any] = out.setdefault("tcp", {})
            mib_s: dict[str, Any] = out.setdefault("tcp_mib_s", {})
            for key, measure in (("peer_to_guest", self._tcp_peer_to_guest),
                                 ("guest_to_peer", self._tcp_guest_to_peer),
                                 ("guest_to_peer_httpd", self._tcp_guest_httpd)):
                tcp[key] = measure(peer, sid)
                mib_s[key] = tcp[key]["mib_s"]
        finally:
            if sid in self.sids:
                try:
                    self.remove(sid)
                except Exception as e:  # noqa: BLE001 - cleanup() tries again
                    say(f"network: removing {sid} failed: {e}")
            self._delete_netns()
            out["duration_s"] = time.monotonic() - begin

    def _delete_netns(self) -> None:
        import subprocess

        for ns in list(self.netns):
            r = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True, timeout=30)
            if r.returncode != 0 and os.path.exists(f"/var/run/netns/{ns}"):
                say(f"cleanup: ip netns del {ns}: {r.stderr.strip()}")
            else:
                self.netns.remove(ns)

    def _gexec(self, sid: str, argv: Sequence[str], timeout: float) -> Any:
        r = self.ctl.exec(sid, list(argv), timeout=timeout)
        if r.exit_code != 0:
            raise RuntimeError(f"guest: {' '.join(argv)} exited {r.exit_code}: "
                               f"{(r.stderr or r.stdout).decode(errors='replace').strip()[-500:]}")
        return r

    def _warm_up_ping(self, peer: str, sid: str) -> None:
        """One ping each way first (ARP, and the guest's interface may still be coming up)."""
        import subprocess

        deadline = time.monotonic() + 20
        while True:
            r = subprocess.run(["ip", "netns", "exec", peer, "busybox", "ping", "-c", "1", "-W", "2", NET_GUEST],
                               capture_output=True, text=True, timeout=30)
            if r.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the guest does not answer ping from the peer netns: {r.stdout.strip()[-300:]}")
        self._gexec(sid, ["ping", "-c", "1", "-W", "5", NET_PEER], timeout=30)

    def _ping_args(self) -> list[str]:
        return ["ping", "-c", str(self.args.pings), "-i", str(PING_INTERVAL_S), "-W", "2"]

    def _ping_timeout(self) -> float:
        return float(self.args.pings * PING_INTERVAL_S + 30)

    def _ping_from_peer(self, peer: str) -> dict[str, Any] | None:
        say(f"network: {self.args.pings} pings peer -> guest")
        text = _run(["ip", "netns", "exec", peer, "busybox", *self._ping_args(), NET_GUEST], self._ping_timeout())
        return rtt_summary(parse_ping(text))

    def _ping_from_guest(self, sid: str) -> dict[str, Any] | None:
        say(f"network: {self.args.pings} pings guest -> peer")
        r = self._gexec(sid, [*self._ping_args(), NET_PEER], timeout=self._ping_timeout())
        return rtt_summary(parse_ping(r.stdout))

    def _transfer_timeout(self) -> float:
        return float(60 + 2 * self.args.net_mib)  # as slow as 0.5 MiB/s

    def _peer_tcp(self, peer: str, *args: str) -> list[str]:
        return ["ip", "netns", "exec", peer, sys.executable, "-c", PEER_TCP, *args, str(self._transfer_timeout())]

    @staticmethod
    def _tcp_result(got: Mapping[str, Any], want: int, how: str) -> dict[str, Any]:
        if got.get("bytes") != want:
            raise RuntimeError(f"TCP {how}: {got.get('bytes')} of {want} bytes arrived ({got})")
        return {**got, "mib_s": mib_per_s(got["bytes"], got["seconds"]), "how": how}

    def _tcp_peer_to_guest(self, peer: str, sid: str) -> dict[str, Any]:
        """Peer sends to busybox ``nc -l`` in the guest. nc's stdin is a pipe that stays open
        (``sleep |``): on stdin EOF busybox nc half-closes at once, which would end the
        client's wait before the data was read."""
        n, port = self.args.net_mib << 20, SINK_PORT
        say(f"network: TCP peer -> guest, {self.args.net_mib} MiB")
        sink = f"(sleep {int(self._transfer_timeout())} | nc -l -p {port} >/dev/null) </dev/null >/dev/null 2>&1 &"
        self._gexec(sid, ["sh", "-c", sink], timeout=30)
        self._wait_guest_listening(sid, port)
        got = json.loads(_run(self._peer_tcp(peer, "send", NET_GUEST, str(port), str(n)),
                              self._transfer_timeout() + 30).strip().splitlines()[-1])
        return self._tcp_result(got, n, "python sender (peer) -> busybox nc -l (guest)")

    def _wait_guest_listening(self, sid: str, port: int) -> None:
        deadline = time.monotonic() + 15
        while True:
            r = self.ctl.exec(sid, ["sh", "-c", "cat /proc/net/tcp /proc/net/tcp6 2>/dev/null"], timeout=30)
            if tcp_listening(r.stdout, port):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on port {port} in the guest")
            time.sleep(0.1)

    def _tcp_guest_to_peer(self, peer: str, sid: str) -> dict[str, Any]:
        """``dd | nc`` in the guest to a Python receiver in the peer netns."""
        import select
        import subprocess

        mib, port = self.args.net_mib, RECV_PORT
        say(f"network: TCP guest -> peer, {mib} MiB (dd | nc)")
        recv = subprocess.Popen(self._peer_tcp(peer, "recv", NET_PEER, str(port), str(mib << 20)),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert recv.stdout is not None
            if not select.select([recv.stdout], [], [], 30)[0] or recv.stdout.readline().strip() != "ready":
                recv.kill()
                why = recv.communicate()[1].strip()[-500:]
                raise RuntimeError(f"the receiver in the peer netns did not start: {why}")
            t = time.monotonic()
            send = f"dd if=/dev/zero bs=64k count={mib * 16} 2>/dev/null | nc {NET_PEER} {port}"
            self._gexec(sid, ["sh", "-c", send], timeout=self._transfer_timeout())
            exec_s = time.monotonic() - t
            stdout, stderr = recv.communicate(timeout=30)
            if recv.returncode != 0:
                raise RuntimeError(f"the receiver in the peer netns failed: {stderr.strip()[-500:]}")
        finally:
            if recv.poll() is None:
                recv.kill()
                recv.wait()
        got = json.loads(stdout.strip().splitlines()[-1])
        return {**self._tcp_result(got, mib << 20, "busybox dd | nc (guest) -> python receiver (peer)"),
                "guest_exec_s": exec_s}

    def _tcp_guest_httpd(self, peer: str, sid: str) -> dict[str, Any]:
        """busybox httpd in the guest serves a sparse file (no guest memory) with sendfile."""
        mib, port = self.args.net_mib, HTTP_PORT
        say(f"network: TCP guest -> peer, {mib} MiB (httpd)")
        self._gexec(sid, ["sh", "-c", f"mkdir -p /tmp/bench-www && truncate -s {mib}M /tmp/bench-www/zero"
                                      f" && httpd -p {port} -h /tmp/bench-www"], timeout=30)
        self._wait_guest_listening(sid, port)
        got = json.loads(_run(self._peer_tcp(peer, "get", NET_GUEST, str(port), "/zero"),
                              self._transfer_timeout() + 30).strip().splitlines()[-1])
        if not str(got.get("status", "")).split()[1:2] == ["200"]:
            raise RuntimeError(f"guest httpd answered {got.get('status')!r}")
        return self._tcp_result(got, mib << 20, "busybox httpd sendfile (guest) -> python client (peer)")

    # ------------------------------------------------------------------ cleanup
    def cleanup(self) -> None:
        """Remove every sandbox, domain and file this run made; never anything else."""
        if self.ctl is not None:
            for sid in sorted(self.sids):
                try:
                    self.ctl.stop(sid, timeout=0)
                    self.ctl.shutdown(sid)
                except Exception as e:  # noqa: BLE001 - keep cleaning
                    say(f"cleanup: shutdown of {sid} failed: {e}")
        if self.conn is not None:
            import libvirt

            for dom in self.conn.listAllDomains(0):
                try:
                    name = dom.name()
                    if name.startswith(self.prefix + "-") or name.startswith(f"vmsandbox-{self.prefix}-"):
                        if dom.isActive():
                            dom.destroy()
                        dom.undefine()
                        say(f"cleanup: removed left-over domain {name}")
                except libvirt.libvirtError as e:
                    say(f"cleanup: {e}")
        # After the sandboxes: shutdown gives the pod netns its eth0 addresses back first.
        self._delete_netns()
        if self.ctl is not None:
            self.ctl.close()
        if self.conn is not None:
            self.conn.close()
        self.watcher.close()
        if self.state_dir is not None:
            if self.own_state_dir:
                shutil.rmtree(self.state_dir, ignore_errors=True)
            elif self.bare_dir is not None:
                shutil.rmtree(self.bare_dir, ignore_errors=True)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


def _mib_of(el: ET.Element | None) -> int | None:
    """A libvirt memory element (<memory unit='KiB'>...) in MiB."""
    if el is None or not (el.text or "").strip():
        return None
    scale = {"b": 1 / 1024**2, "bytes": 1 / 1024**2, "k": 1 / 1024, "kib": 1 / 1024, "m": 1, "mib": 1,
             "g": 1024, "gib": 1024}.get((el.get("unit") or "KiB").lower(), 1 / 1024)
    return int(int(el.text or 0) * scale)


def _version(v: int) -> str:
    return f"{v // 1000000}.{v // 1000 % 1000}.{v % 1000}"


# ---------------------------------------------------------------------- report
def report(res: Mapping[str, Any]) -> str:
    """The printed table: start phases (ours vs bare), guest boot, parallel, ops, memory."""
    out: list[str] = []
    h = res.get("host", {})
    out.append(
        f"vmsandbox bench ({res.get('mode')}) | virt {h.get('virt_type')} | {h.get('cpu_model')} x {h.get('cpu_count')}"
        f" | host kernel {h.get('host_kernel')} | libvirt {h.get('libvirt_version')} | QEMU {h.get('qemu_version')}"
    )
    out.append(
        f"guest: kernel {h.get('guest_kernel')}, {h.get('guest_machine')}, {h.get('guest_vcpus')} vCPU,"
        f" {h.get('guest_memory_mib')} MiB (max {h.get('guest_max_memory_mib')}), cmdline '{h.get('guest_cmdline')}'"
    )
    ser = res.get("serial")
    if ser:
        ours, bare = ser.get("controller"), ser.get("bare")
        out.append("")
        out.append(f"Start latency, serial: N={ser['n']} (+{ser['warmup']} warm-up), create -> first exec answered, ms")
        heads = ["phase", "ours p50", "p90", "p99", "bare p50", "p90", "p99", "ours/bare p50"]
        rows = []
        for key, label, _end in (*PHASES, ("total", "total", "")):
            a = ours["phases"].get(key) if ours else None
            b = bare["phases"].get(key) if bare else None
            rows.append([label, fmt_ms(p(a, "p50")), fmt_ms(p(a, "p90")), fmt_ms(p(a, "p99")),
                         fmt_ms(p(b, "p50")), fmt_ms(p(b, "p90")), fmt_ms(p(b, "p99")),
                         fmt_ratio(p(a, "p50"), p(b, "p50"))])
        out.append(render_table(heads, rows))
        g = (ours or bare or {}).get("guest") or {}
        if g:
            out.append("")
            out.append("Guest boot, from the guest's clocks (dmesg + /proc/uptime), ms, "
                       + ("ours" if ours else "bare") + " samples")
            labels = [
                ("vmm_to_kernel_ms", "libvirt create returned -> guest kernel clock 0 (firmware, kernel load)"),
                ("kernel_to_run_init_ms", "kernel clock 0 -> 'Run /init' (kernel boot)"),
                ("run_init_to_console_ms", "'Run /init' -> 'init started' on the console"),
                ("crng_ready_ms", "'crng init done' (guest clock)"),
                ("agent_line_guest_ms", "'agent ready' line (guest clock)"),
                ("ready_guest_ms", "start() returned (guest clock)"),
                ("clock_error_ms", "(error of the clock mapping, +/-)"),
            ]
            rows = [[lab, fmt_ms(p(g.get(k), "p50")), fmt_ms(p(g.get(k), "p90"))] for k, lab in labels if g.get(k)]
            out.append(render_table(["", "p50", "p90"], rows))
            gaps = (ours or bare or {}).get("dmesg_gaps") or []
            if gaps:
                out.append("  biggest gaps in the kernel log (first sample):")
                for gap in gaps[:5]:
                    out.append(f"    {gap['gap_ms']:7.1f} ms at {gap['at_s']:.3f}s  after '{gap['after'][:60]}'"
                               f"  before '{gap['before'][:60]}'")
    par = res.get("parallel")
    if par:
        out.append("")
        out.append("Parallel start: N at once, create -> first exec answered")
        rows = [[str(r["n"]), f"{r['all_ready_s']:.2f}", f"{r['sandboxes_per_s']:.2f}",
                 fmt_ms(p(r["per_sandbox_ms"], "p50")), fmt_ms(p(r["per_sandbox_ms"], "p90")),
                 fmt_ms(p(r["per_sandbox_ms"], "max")), str(r.get("failed_ssh_attempts", "n/a"))] for r in par]
        out.append(render_table(["N", "all ready s", "sandboxes/s", "each p50 ms", "p90", "max",
                                 "SSH attempts timed out"], rows))
    ops = res.get("operations")
    if ops:
        levels = list(ops)
        out.append("")
        out.append("Operation latency, ms, p50 / p90, by sandboxes running")
        names = [("status", "status"), ("platform", "platform"), ("metrics", "metrics"), ("list", "list"),
                 ("exec_true", "exec true (warm transport)"), ("stop", "stop (clean power-off)"),
                 ("shutdown", "shutdown (remove)")]
        rows = []
        for key, label in names:
            row = [label]
            for lv in levels:
                s = ops[lv].get(key)
                row.append("n/a" if s is None else f"{fmt_ms(s['p50'])} / {fmt_ms(s['p90'])}")
            rows.append(row)
        out.append(render_table(["operation", *[f"{lv} running" for lv in levels]], rows))
    mem = res.get("memory")
    if mem:
        out.append("")
        out.append("Memory, MiB")
        rows = [["QEMU PSS per sandbox (mean)", *[_mib(p(m["qemu_pss_kib"], "mean")) for m in mem]],
                ["QEMU PSS per sandbox (max)", *[_mib(p(m["qemu_pss_kib"], "max")) for m in mem]],
                ["QEMU PSS, all sandboxes", *[_mib(m["qemu_pss_kib_total"]) for m in mem]],
                ["controller RSS (this process)", *[_mib(m["controller_rss_kib"]) for m in mem]]]
        out.append(render_table(["", *[f"{m['running']} running" for m in mem]], rows))
        idle = res.get("controller_rss_kib_idle")
        if idle:
            out.append(f"  controller RSS before any sandbox: {_mib(idle)} MiB")
    net = res.get("network")
    if net:
        out.append("")
        out.extend(network_lines(net))
    noise = noise_line(res)
    if noise:
        out.append("")
        out.append(noise)
    out.append("")
    out.append(anchors_line(res))
    if res.get("error"):
        out.append(f"\nERROR: {res['error']}")
    if "duration_s" in res:
        out.append(f"total bench time {res['duration_s']:.1f}s")
    return "\n".join(out)


def network_lines(net: Mapping[str, Any]) -> list[str]:
    """The network section of the report: round trips, then TCP throughput."""
    out = [f"Network (peer netns <-> guest, tap + tc redirect): {net.get('peer_addr')} <-> {net.get('guest_addr')},"
           f" MTU {net.get('mtu')}" + (f", guest booted in {net['boot_s']:.1f}s" if net.get("boot_s") else "")]
    rtt = net.get("rtt_ms") or {}
    if rtt:
        rows = []
        for key, label in (("peer_to_guest", "ping peer -> guest"), ("guest_to_peer", "ping guest -> peer")):
            r = rtt.get(key)
            if key not in rtt:
                continue
            if r is None:
                rows.append([label, *["n/a"] * 5, "no reply"])
                continue
            lost = "n/a" if r.get("loss_pct") is None else f"{r['received']}/{r['sent']}"
            rows.append([label, *[fmt_ms(r.get(k)) for k in ("min", "avg", "p50", "p90", "max")], lost])
        out.append(render_table([f"round trip, ms (busybox ping -i {net.get('ping_interval_s')})",
                                 "min", "avg", "p50", "p90", "max", "replies"], rows))
    tcp = net.get("tcp") or {}
    if tcp:
        rows = []
        for key, label in (("peer_to_guest", "peer -> guest (nc -l in the guest)"),
                           ("guest_to_peer", "guest -> peer (dd | nc in the guest)"),
                           ("guest_to_peer_httpd", "guest -> peer (httpd sendfile in the guest)")):
            t = tcp.get(key)
            if t:
                rows.append([label, f"{t['bytes'] / 1048576:.0f}", f"{t['seconds']:.2f}",
                             "n/a" if t.get("mib_s") is None else f"{t['mib_s']:.1f}"])
        out.append(render_table(["TCP throughput", "MiB", "s", "MiB/s"], rows))
        if "guest_to_peer" in tcp and "guest_to_peer_httpd" in tcp:
            out.append("  (busybox nc writes in small chunks: under TCG the guest's CPU, not the path, limits dd | nc)")
    if net.get("other_domains_running"):
        out.append(f"  WARNING: {net['other_domains_running']} other guest(s) were running during the network figures")
    if "rtt_ms" not in net and "tcp" not in net:
        out.append("  (not measured)")
    return out


def noise_line(res: Mapping[str, Any]) -> str | None:
    """A warning when other guests ran on the host during our starts."""
    ser = res.get("serial") or {}
    counts = [s.get("other_domains_running", 0) for kind in ("controller", "bare")
              for s in (ser.get(kind) or {}).get("samples", [])]
    counts += [r.get("other_domains_running", 0) for r in res.get("parallel") or []]
    busy = [c for c in counts if c]
    if not busy:
        return None
    return (f"WARNING: other guests were running on this host during {len(busy)} of {len(counts)} measured starts"
            f" (up to {max(busy)} at once): the figures include their load")


def anchors_line(res: Mapping[str, Any]) -> str:
    a = ANCHORS
    ours = ((res.get("serial") or {}).get("controller") or {}).get("phases") or {}
    to_init = None
    if ours.get("domain_start") and ours.get("kernel_to_init"):
        to_init = ours["domain_start"]["p50"] + ours["kernel_to_init"]["p50"]
    total = p(ours.get("total"), "p50")
    par = res.get("parallel") or []
    big = par[-1] if par else None
    parts = [
        f"Firecracker boot to init <= {a['firecracker_boot_to_init_ms']} ms (ours, domain start + kernel to init p50: {fmt_ms(to_init)} ms)",
        f"Kuasar / Kata serial start p50 {a['kuasar_serial_p50_ms']} / {a['kata_serial_p50_ms']} ms (ours: {fmt_ms(total)} ms)",
        f"50 in parallel {a['kuasar_parallel_50_s']} / {a['kata_parallel_50_s']} s"
        + (f" (ours: {big['n']} in {big['all_ready_s']:.2f} s)" if big else ""),
    ]
    virt = (res.get("host") or {}).get("virt_type")
    note = " [ours under TCG software emulation: not comparable to KVM figures]" if virt == "tcg" else ""
    return "Anchors: " + "; ".join(parts) + note


def _mib(kib: float | None) -> str:
    return "n/a" if kib is None else f"{kib / 1024:.1f}"


def plots(res: Mapping[str, Any], out: Path) -> list[str]:
    """One PNG per series next to the JSON; returns their paths."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("matplotlib is missing (.venv/bin/pip install '.[bench]'): no plots")
        return []
    made: list[str] = []
    title = f"vmsandbox ({(res.get('host') or {}).get('virt_type')}, {res.get('started_at')})"

    def save(fig: Any, suffix: str) -> None:
        path = out.with_name(f"{out.stem}-{suffix}.png")
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(str(path))

    ser = res.get("serial") or {}
    if ser.get("controller") or ser.get("bare"):
        fig, ax = plt.subplots(figsize=(9, 4.5))
        rows: list[tuple[str, dict[str, Any]]] = []
        for kind in ("controller", "bare"):
            for i, s in enumerate((ser.get(kind) or {}).get("samples", [])):
                rows.append((f"{'ours' if kind == 'controller' else 'bare'} {i}", s["phases_ms"]))
        colors = [plt.get_cmap("tab10")(j) for j in range(10)]
        lefts = [0.0] * len(rows)
        for j, (key, label, _e) in enumerate(PHASES):
            widths = [ph.get(key) or 0.0 for _n, ph in rows]
            ax.barh([n for n, _ph in rows], widths, left=lefts, color=colors[j % 10], label=label)
            lefts = [a + b for a, b in zip(lefts, widths)]
        ax.invert_yaxis()
        ax.set_xlabel("ms since create (serial starts, one bar each)")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=3)
        save(fig, "serial")
    par = res.get("parallel") or []
    if par:
        fig, ax = plt.subplots(figsize=(6, 4))
        ns = [r["n"] for r in par]
        ax.plot(ns, [r["all_ready_s"] for r in par], "o-", label="all ready (s)")
        ax.set_xlabel("sandboxes started at once")
        ax.set_ylabel("seconds until all answered")
        ax2 = ax.twinx()
        ax2.plot(ns, [r["sandboxes_per_s"] for r in par], "s--", color="tab:orange", label="sandboxes/s")
        ax2.set_ylabel("sandboxes per second")
        ax.set_xticks(ns)
        ax.set_ylim(bottom=0)
        ax2.set_ylim(bottom=0)
        fig.legend(fontsize=8, loc="lower right")
        save(fig, "parallel")
    ops = res.get("operations") or {}
    if ops:
        fig, ax = plt.subplots(figsize=(8, 4))
        names = ["status", "platform", "metrics", "list", "exec_true", "stop", "shutdown"]
        width = 0.8 / max(1, len(ops))
        for j, (lv, o) in enumerate(ops.items()):
            xs = [i + j * width for i in range(len(names))]
            p50 = [(o.get(nm) or {}).get("p50", 0) for nm in names]
            p90 = [(o.get(nm) or {}).get("p90", 0) for nm in names]
            ax.bar(xs, p50, width, label=f"{lv} running (p50, bar to p90)",
                   yerr=[[0] * len(names), [b - a for a, b in zip(p50, p90)]])
        ax.set_xticks([i + width * (len(ops) - 1) / 2 for i in range(len(names))], names)
        ax.set_yscale("log")
        ax.set_ylabel("ms (log)")
        ax.legend(fontsize=8)
        save(fig, "operations")
    mem = res.get("memory") or []
    if mem:
        fig, ax = plt.subplots(figsize=(6, 4))
        ns = [m["running"] for m in mem]
        ax.plot(ns, [(p(m["qemu_pss_kib"], "mean") or 0) / 1024 for m in mem], "o-", label="QEMU PSS per sandbox")
        ax.plot(ns, [(m["controller_rss_kib"] or 0) / 1024 for m in mem], "s--", label="controller RSS")
        ax.set_xlabel("sandboxes running")
        ax.set_xticks(ns)
        ax.set_ylabel("MiB")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
        save(fig, "memory")
    return made


# ---------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="hack/bench",
        description="Benchmark vmsandbox: start latency (phases, vs bare libvirt), parallel start, "
                    "operation latency, memory and network (round trip and TCP throughput between a "
                    "peer netns and a guest). Needs root and libvirtd.",
    )
    ap.add_argument("--quick", action="store_true",
                    help=f"few samples, for a 2-core TCG host in < 3 min ({QUICK})")
    ap.add_argument("--serial", type=int, help=f"serial samples (quick {QUICK['serial']}, full {FULL['serial']})")
    ap.add_argument("--warmup", type=int, help="discarded serial starts first (quick 1, full 2)")
    ap.add_argument("--parallel", type=parse_parallel,
                    help=f"sandboxes started at once, e.g. 1,5,10 (default {PARALLEL_DEFAULT['tcg']} under TCG, "
                         f"{PARALLEL_DEFAULT['kvm']} under KVM)")
    ap.add_argument("--ops-repeat", type=int, help="calls per operation and level (quick 20, full 100)")
    ap.add_argument("--stop-samples", type=int, help="sandboxes per level whose stop/shutdown is timed")
    ap.add_argument("--no-bare", action="store_true", help="skip the bare-libvirt baseline")
    ap.add_argument("--no-network", action="store_true",
                    help="skip the network section (ping and TCP between a peer netns and a guest)")
    ap.add_argument("--pings", type=int, help=f"pings each way (quick {QUICK['pings']}, full {FULL['pings']})")
    ap.add_argument("--net-mib", type=int,
                    help=f"MiB per TCP transfer (quick {QUICK['net_mib']}, full {FULL['net_mib']})")
    ap.add_argument("--out", type=Path, help="JSON file (default bench-results/bench-<UTC time>.json); PNGs go beside it")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--state-dir", help="controller state dir that no other controller uses "
                                        "(default: a fresh temporary one, removed afterwards)")
    ap.add_argument("--image-cache", default=os.environ.get("VMSANDBOX_BENCH_IMAGE_CACHE",
                                                            str(Path.home() / ".cache" / "vmsandbox-bench")),
                    help="where the guest image is built once and copied from (default ~/.cache/vmsandbox-bench)")
    ap.add_argument("--uri", default=None, help="libvirt URI (default qemu:///system or $VMSANDBOX_URI)")
    ap.add_argument("--virt-type", default=os.environ.get("VMSANDBOX_VIRT_TYPE", "auto"), choices=["auto", "kvm", "qemu"])
    ap.add_argument("--boot-timeout", type=float, default=180.0, help="seconds per start (default 180)")
    ap.add_argument("-v", "--verbose", action="store_true", help="log the controller's INFO messages")
    args = ap.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.serial < 0 or args.warmup < 0 or args.ops_repeat < 1 or args.stop_samples < 0:
        ap.error("--serial/--warmup/--stop-samples must be >= 0 and --ops-repeat >= 1")
    if args.pings < 1 or args.net_mib < 1:
        ap.error("--pings and --net-mib must be >= 1")
    if args.out is None:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        args.out = REPO / "bench-results" / f"bench-{stamp}.json"
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("vmsandbox").setLevel(logging.INFO if args.verbose else logging.WARNING)
    logging.getLogger("paramiko").setLevel(logging.WARNING)
    ssh_log = logging.getLogger("paramiko.transport")
    ssh_log.addHandler(SSH_FAILURES)
    ssh_log.propagate = args.verbose
    logging.getLogger("bench").setLevel(logging.INFO if args.verbose else logging.WARNING)
    if os.geteuid() != 0:
        print("hack/bench: must run as root (qemu:///system, guest sockets)", file=sys.stderr)
        return 2

    # The controller's network code opens netlink sockets inside a netns through pyroute2,
    # which forks a short-lived child (no exec) and stops it with SIGTERM; Ctrl-C reaches
    # such a child too. Raising there would unwind a copy of this process through main()
    # and clean up (delete the netns, close libvirt) under the live run's feet.
    main_pid = os.getpid()

    def on_signal(signum: int, _frame: object) -> None:
        if os.getpid() != main_pid:
            os._exit(128 + signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    begin = time.monotonic()
    bench = Bench(args)
    status = 0
    try:
        say(f"run {bench.prefix}: setting up")
        bench.setup()
        if args.serial:
            bench.run_serial()
        bench.run_parallel()
        if not args.no_network:
            bench.run_network()
    except KeyboardInterrupt:
        bench.results["error"] = "interrupted"
        status = 130
    except Exception as e:  # noqa: BLE001 - report, clean up, keep what was measured
        traceback.print_exc()
        bench.results["error"] = f"{type(e).__name__}: {e}"
        status = 1
    finally:
        if os.getpid() != main_pid:  # a forked helper must never clean up or report
            os._exit(70)
        say("cleaning up")
        bench.cleanup()
    res = bench.results
    res["duration_s"] = time.monotonic() - begin
    if "host" in res:
        res["host"]["loadavg_at_end"] = _read("/proc/loadavg").split()[:3]
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    if not args.no_plots:
        res["plots"] = plots(res, out)
    out.write_text(json.dumps(res, indent=2, default=str) + "\n")
    print(report(res))
    print(f"results: {out}" + "".join(f"\nplot: {x}" for x in res.get("plots", [])))
    return status


if __name__ == "__main__":
    sys.exit(main())
