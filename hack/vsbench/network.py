"""The network section: round trip and TCP throughput between a peer netns and a guest.

A CNI-style pod netns ``<prefix>-pod`` whose eth0 is a veth with its other end in a peer
netns ``<prefix>-peer``, and one sandbox created with the pod netns (the guest takes eth0
over: tap + tc redirect). All traffic is between the peer netns and the guest.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from vmsandbox import ExecResult, LibvirtController, SandboxMetadata

from .host import run, say
from .stats import mib_per_s, summarize

__all__ = ["NET_GUEST", "NET_PEER", "NET_MTU", "PING_INTERVAL_S", "PEER_TCP", "parse_ping", "rtt_summary",
           "tcp_listening", "NetworkSection"]

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


class NetworkSection:
    """Makes the two namespaces and the sandbox, measures, and removes all of it."""

    def __init__(self, ctl: LibvirtController, *, prefix: str, pings: int, net_mib: int,
                 others: Callable[[], int]) -> None:
        self.ctl = ctl
        self.pod, self.peer, self.host_end = f"{prefix}-pod", f"{prefix}-peer", f"{prefix}-v"
        assert len(self.host_end) <= 15  # an interface name's limit
        self.sid = f"{prefix}-net"
        self.pings, self.mib = pings, net_mib
        self.others = others
        self.netns: list[str] = []  # namespaces made, deleted by cleanup()
        self.sandbox_live = False

    def run(self, out: dict[str, Any]) -> None:
        """Fill ``out`` as the figures are measured, so an error or Ctrl-C keeps what was."""
        if shutil.which("busybox") is None:
            raise RuntimeError("the network section needs busybox on the host (ping); or use --no-network")
        begin = time.monotonic()
        out.update({
            "guest_addr": NET_GUEST, "peer_addr": NET_PEER, "mtu": NET_MTU,
            "netns": {"pod": self.pod, "peer": self.peer}, "sandbox": self.sid, "pings": self.pings,
            "ping_interval_s": PING_INTERVAL_S, "mib": self.mib, "other_domains_running": self.others(),
        })
        say(f"network: netns {self.pod} + {self.peer}, sandbox {self.sid}")
        try:
            self._make_namespaces()
            self.sandbox_live = True
            t = time.monotonic()
            self.ctl.create(SandboxMetadata(id=self.sid), netns_path=f"/var/run/netns/{self.pod}")
            self.ctl.start(self.sid)
            out["boot_s"] = time.monotonic() - t
            self._warm_up_ping()
            rtt: dict[str, Any] = out.setdefault("rtt_ms", {})
            rtt["peer_to_guest"] = self._ping_from_peer()
            rtt["guest_to_peer"] = self._ping_from_guest()
            tcp: dict[str, Any] = out.setdefault("tcp", {})
            mib_s: dict[str, Any] = out.setdefault("tcp_mib_s", {})
            for key, measure in (("peer_to_guest", self._tcp_peer_to_guest),
                                 ("guest_to_peer", self._tcp_guest_to_peer),
                                 ("guest_to_peer_httpd", self._tcp_guest_httpd)):
                tcp[key] = measure()
                mib_s[key] = tcp[key]["mib_s"]
        finally:
            self.cleanup()
            out["duration_s"] = time.monotonic() - begin

    def cleanup(self) -> None:
        """Remove the sandbox (it gives the pod netns its eth0 addresses back), then the netns."""
        if self.sandbox_live:
            try:
                self.ctl.stop(self.sid, timeout=0)
                self.ctl.shutdown(self.sid)
                self.sandbox_live = False
            except Exception as e:  # noqa: BLE001 - delete what can be; the bench's cleanup tries again
                say(f"network: removing {self.sid} failed: {e}")
        for ns in list(self.netns):
            r = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True, timeout=30)
            if r.returncode != 0 and os.path.exists(f"/var/run/netns/{ns}"):
                say(f"cleanup: ip netns del {ns}: {r.stderr.strip()}")
            else:
                self.netns.remove(ns)

    def _make_namespaces(self) -> None:
        pod, peer, end, mtu = self.pod, self.peer, self.host_end, str(NET_MTU)
        for ns in (pod, peer):
            self.netns.append(ns)
            run(["ip", "netns", "add", ns], 30)
        run(["ip", "link", "add", "eth0", "netns", pod, "mtu", mtu, "type", "veth",
             "peer", "name", end, "netns", peer, "mtu", mtu], 30)
        run(["ip", "-n", pod, "addr", "add", f"{NET_GUEST}/{NET_PREFIX_LEN}", "dev", "eth0"], 30)
        run(["ip", "-n", pod, "link", "set", "eth0", "up"], 30)
        run(["ip", "-n", peer, "addr", "add", f"{NET_PEER}/{NET_PREFIX_LEN}", "dev", end], 30)
        run(["ip", "-n", peer, "link", "set", end, "up"], 30)
        run(["ip", "-n", peer, "link", "set", "lo", "up"], 30)

    def _gexec(self, argv: Sequence[str], timeout: float) -> ExecResult:
        r = self.ctl.exec(self.sid, list(argv), timeout=timeout)
        if r.exit_code != 0:
            raise RuntimeError(f"guest: {' '.join(argv)} exited {r.exit_code}: "
                               f"{(r.stderr or r.stdout).decode(errors='replace').strip()[-500:]}")
        return r

    def _warm_up_ping(self) -> None:
        """One ping each way first (ARP, and the guest's interface may still be coming up)."""
        deadline = time.monotonic() + 20
        while True:
            r = subprocess.run(["ip", "netns", "exec", self.peer, "busybox", "ping", "-c", "1", "-W", "2", NET_GUEST],
                               capture_output=True, text=True, timeout=30)
            if r.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the guest does not answer ping from the peer netns: {r.stdout.strip()[-300:]}")
        self._gexec(["ping", "-c", "1", "-W", "5", NET_PEER], timeout=30)

    def _ping_args(self) -> list[str]:
        return ["ping", "-c", str(self.pings), "-i", str(PING_INTERVAL_S), "-W", "2"]

    def _ping_timeout(self) -> float:
        return float(self.pings * PING_INTERVAL_S + 30)

    def _ping_from_peer(self) -> dict[str, Any] | None:
        say(f"network: {self.pings} pings peer -> guest")
        text = run(["ip", "netns", "exec", self.peer, "busybox", *self._ping_args(), NET_GUEST], self._ping_timeout())
        return rtt_summary(parse_ping(text))

    def _ping_from_guest(self) -> dict[str, Any] | None:
        say(f"network: {self.pings} pings guest -> peer")
        r = self._gexec([*self._ping_args(), NET_PEER], timeout=self._ping_timeout())
        return rtt_summary(parse_ping(r.stdout))

    def _transfer_timeout(self) -> float:
        return float(60 + 2 * self.mib)  # as slow as 0.5 MiB/s

    def _peer_tcp(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.peer, sys.executable, "-c", PEER_TCP, *args, str(self._transfer_timeout())]

    @staticmethod
    def _tcp_result(got: Mapping[str, Any], want: int, how: str) -> dict[str, Any]:
        if got.get("bytes") != want:
            raise RuntimeError(f"TCP {how}: {got.get('bytes')} of {want} bytes arrived ({got})")
        return {**got, "mib_s": mib_per_s(got["bytes"], got["seconds"]), "how": how}

    def _tcp_peer_to_guest(self) -> dict[str, Any]:
        """Peer sends to busybox ``nc -l`` in the guest. nc's stdin is a pipe that stays open
        (``sleep |``): on stdin EOF busybox nc half-closes at once, which would end the
        client's wait before the data was read."""
        n, port = self.mib << 20, SINK_PORT
        say(f"network: TCP peer -> guest, {self.mib} MiB")
        sink = f"(sleep {int(self._transfer_timeout())} | nc -l -p {port} >/dev/null) </dev/null >/dev/null 2>&1 &"
        self._gexec(["sh", "-c", sink], timeout=30)
        self._wait_guest_listening(port)
        got = json.loads(run(self._peer_tcp("send", NET_GUEST, str(port), str(n)),
                             self._transfer_timeout() + 30).strip().splitlines()[-1])
        return self._tcp_result(got, n, "python sender (peer) -> busybox nc -l (guest)")

    def _wait_guest_listening(self, port: int) -> None:
        deadline = time.monotonic() + 15
        while True:
            r = self.ctl.exec(self.sid, ["sh", "-c", "cat /proc/net/tcp /proc/net/tcp6 2>/dev/null"], timeout=30)
            if tcp_listening(r.stdout, port):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on port {port} in the guest")
            time.sleep(0.1)

    def _tcp_guest_to_peer(self) -> dict[str, Any]:
        """``dd | nc`` in the guest to a Python receiver in the peer netns."""
        mib, port = self.mib, RECV_PORT
        say(f"network: TCP guest -> peer, {mib} MiB (dd | nc)")
        recv = subprocess.Popen(self._peer_tcp("recv", NET_PEER, str(port), str(mib << 20)),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert recv.stdout is not None
            if not select.select([recv.stdout], [], [], 30)[0] or recv.stdout.readline().strip() != "ready":
                recv.kill()
                why = recv.communicate()[1].strip()[-500:]
                raise RuntimeError(f"the receiver in the peer netns did not start: {why}")
            t = time.monotonic()
            send = f"dd if=/dev/zero bs=64k count={mib * 16} 2>/dev/null | nc {NET_PEER} {port}"
            self._gexec(["sh", "-c", send], timeout=self._transfer_timeout())
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

    def _tcp_guest_httpd(self) -> dict[str, Any]:
        """busybox httpd in the guest serves a sparse file (no guest memory) with sendfile."""
        mib, port = self.mib, HTTP_PORT
        say(f"network: TCP guest -> peer, {mib} MiB (httpd)")
        self._gexec(["sh", "-c", f"mkdir -p /tmp/bench-www && truncate -s {mib}M /tmp/bench-www/zero"
                                 f" && httpd -p {port} -h /tmp/bench-www"], timeout=30)
        self._wait_guest_listening(port)
        got = json.loads(run(self._peer_tcp("get", NET_GUEST, str(port), "/zero"),
                             self._transfer_timeout() + 30).strip().splitlines()[-1])
        if not str(got.get("status", "")).split()[1:2] == ["200"]:
            raise RuntimeError(f"guest httpd answered {got.get('status')!r}")
        return self._tcp_result(got, mib << 20, "busybox httpd sendfile (guest) -> python client (peer)")
