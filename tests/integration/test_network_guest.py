"""A guest wired into a CNI-style netns: the peer reaches the guest and back, v4 and v6.

Every namespace here is made by the test (unique names) and all traffic stays between
them. The guest takes eth0's MAC, MTU, addresses and routes; afterwards nothing remains.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.conftest import unique
from vmsandbox import InvalidArgument, NotFound, SandboxMetadata

pytestmark = pytest.mark.integration


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=check, capture_output=True, text=True)


def in_ns(ns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return sh("ip", "netns", "exec", ns, *argv, check=check)


@dataclass
class PodNet:
    pod: str  # the sandbox's netns (as CNI leaves it)
    peer: str  # the other end of the veth
    path: str
    mac: str
    v4: str
    v6: str
    gw4: str
    gw6: str
    mtu: int


def make_pod_netns(prefix: str, index: int, bridge_ns: str | None = None, mtu: int = 1400) -> tuple[str, str]:
    """A pod netns with eth0; its veth peer goes to ``bridge_ns`` (or a new peer netns)."""
    pod = f"{prefix}-p{index}"
    sh("ip", "netns", "add", pod)
    peer_ns = bridge_ns or f"{prefix}-q{index}"
    if bridge_ns is None:
        sh("ip", "netns", "add", peer_ns)
    host_end = f"vsbxv{index}{prefix[-4:]}"[:15]
    sh("ip", "link", "add", "eth0", "netns", pod, "mtu", str(mtu), "type", "veth",
       "peer", "name", host_end, "netns", peer_ns, "mtu", str(mtu))
    return pod, host_end


def cleanup_ns(*names: str) -> None:
    for n in names:
        sh("ip", "netns", "del", n, check=False)


@pytest.fixture
def podnet() -> Iterator[PodNet]:
    prefix = unique()
    pod, host_end = make_pod_netns(prefix, 0)
    peer = f"{prefix}-q0"
    try:
        in_ns(pod, "ip", "addr", "add", "10.77.0.2/24", "dev", "eth0")
        in_ns(pod, "ip", "-6", "addr", "add", "fd77::2/64", "dev", "eth0", "nodad")
        in_ns(pod, "ip", "link", "set", "eth0", "up")
        in_ns(pod, "ip", "link", "set", "lo", "up")
        in_ns(pod, "ip", "route", "add", "default", "via", "10.77.0.1")
        in_ns(pod, "ip", "-6", "route", "add", "default", "via", "fd77::1")
        in_ns(peer, "ip", "addr", "add", "10.77.0.1/24", "dev", host_end)
        in_ns(peer, "ip", "-6", "addr", "add", "fd77::1/64", "dev", host_end, "nodad")
        in_ns(peer, "ip", "link", "set", host_end, "up")
        in_ns(peer, "ip", "link", "set", "lo", "up")
        mac = json.loads(in_ns(pod, "ip", "-j", "link", "show", "eth0").stdout)[0]["address"]
        yield PodNet(pod, peer, f"/var/run/netns/{pod}", mac, "10.77.0.2", "fd77::2", "10.77.0.1", "fd77::1", 1400)
    finally:
        cleanup_ns(pod, peer)


def gtext(controller, sid: str, *argv: str) -> str:  # type: ignore[no-untyped-def]
    """Run argv in the guest; its stdout as text (asserting success)."""
    r = controller.exec(sid, list(argv))
    assert r.exit_code == 0, (argv, r)
    return str(r.stdout.decode())


def taps_in(ns: str) -> list[str]:
    out = in_ns(ns, "ip", "-j", "link", "show", check=False).stdout or "[]"
    return [link["ifname"] for link in json.loads(out) if link["ifname"].startswith("vsbx")]


def host_taps() -> list[str]:
    return [line.split(":")[1].strip() for line in sh("ip", "-o", "link", "show", "type", "tun").stdout.splitlines()
            if "vsbx" in line]


def test_peer_and_guest_reach_each_other(controller, sandbox_ids, podnet):  # type: ignore[no-untyped-def]
    sid = unique("net")
    sandbox_ids.append(sid)
    taps_before = host_taps()
    controller.create(SandboxMetadata(sid), netns_path=podnet.path)
    controller.start(sid)

    # The guest took over eth0: same MAC, MTU, addresses and routes; eth0 lost its addresses.
    listing = gtext(
        controller, sid, "sh", "-c", 'for n in /sys/class/net/*; do echo "${n##*/} $(cat $n/address) $(cat $n/mtu)"; done'
    ).split("\n")
    nics = {f[1]: (f[0], int(f[2])) for f in (line.split() for line in listing) if len(f) == 3}
    assert podnet.mac in nics, listing
    name, mtu = nics[podnet.mac]
    assert mtu == podnet.mtu
    shown = gtext(controller, sid, "ip", "addr", "show", "dev", name)
    assert f"inet {podnet.v4}/24" in shown and f"inet6 {podnet.v6}/64" in shown, shown
    routes4 = gtext(controller, sid, "ip", "route", "show")
    routes6 = gtext(controller, sid, "ip", "-6", "route", "show")
    assert f"default via {podnet.gw4}" in routes4
    assert f"default via {podnet.gw6}" in routes6
    pod_addrs = in_ns(podnet.pod, "ip", "-4", "addr", "show", "eth0").stdout
    assert podnet.v4 not in pod_addrs

    # ICMP both ways, v4 and v6.
    assert in_ns(podnet.peer, "busybox", "ping", "-c", "3", "-W", "5", podnet.v4).returncode == 0
    assert in_ns(podnet.peer, "busybox", "ping", "-6", "-c", "2", "-W", "5", podnet.v6).returncode == 0
    assert controller.exec(sid, ["ping", "-c", "2", "-W", "5", podnet.gw4]).exit_code == 0
    assert controller.exec(sid, ["ping", "-6", "-c", "2", "-W", "5", podnet.gw6]).exit_code == 0

    # TCP to a server started in the guest.
    assert controller.exec(sid, ["mkdir", "-p", "/tmp/www"]).exit_code == 0
    assert controller.exec(sid, ["sh", "-c", "echo hello-from-guest > /tmp/www/index.html"]).exit_code == 0
    assert controller.exec(sid, ["httpd", "-p", "8080", "-h", "/tmp/www"]).exit_code == 0
    for url in (f"http://{podnet.v4}:8080/index.html", f"http://[{podnet.v6}]:8080/index.html"):
        got = in_ns(podnet.peer, sys.executable, "-c",
                    f"import urllib.request; print(urllib.request.urlopen({url!r}, timeout=20).read().decode())")
        assert got.stdout.strip() == "hello-from-guest"

    # Metrics carry the guest's interface counters, read inside the netns.
    from vmsandbox.payloads.cgroupsv2 import from_any

    net = {n.name: n for n in from_any(controller.metrics(sid).data).network}
    assert net["eth0"].rx_packets >= 5 and net["eth0"].tx_packets >= 5
    assert net["eth0"].rx_bytes > 0 and net["eth0"].tx_bytes > 0

    assert len(taps_in(podnet.pod)) == 1
    controller.shutdown(sid)
    # Nothing of ours remains: no tap anywhere, no ingress qdisc, and eth0 has its address back.
    assert taps_in(podnet.pod) == []
    assert host_taps() == taps_before
    assert "ingress" not in in_ns(podnet.pod, "tc", "qdisc", "show", "dev", "eth0").stdout
    assert podnet.v4 in in_ns(podnet.pod, "ip", "-4", "addr", "show", "eth0").stdout


def test_two_sandboxes_on_one_bridge_reach_each_other(controller, sandbox_ids):  # type: ignore[no-untyped-def]
    prefix = unique()
    bridge_ns = f"{prefix}-br"
    sh("ip", "netns", "add", bridge_ns)
    pods: list[str] = []
    try:
        in_ns(bridge_ns, "ip", "link", "add", "br0", "type", "bridge")
        in_ns(bridge_ns, "ip", "link", "set", "br0", "up")
        ids = []
        for i in (1, 2):
            pod, host_end = make_pod_netns(prefix, i, bridge_ns=bridge_ns, mtu=1500)
            pods.append(pod)
            in_ns(bridge_ns, "ip", "link", "set", host_end, "master", "br0", "up")
            in_ns(pod, "ip", "addr", "add", f"10.78.0.{i + 1}/24", "dev", "eth0")
            in_ns(pod, "ip", "link", "set", "eth0", "up")
            sid = unique(f"br{i}")
            sandbox_ids.append(sid)
            ids.append(sid)
            controller.create(SandboxMetadata(sid), netns_path=f"/var/run/netns/{pod}")
        for sid in ids:
            controller.start(sid)
        r = controller.exec(ids[0], ["ping", "-c", "3", "-W", "5", "10.78.0.3"])
        assert r.exit_code == 0, r
        r = controller.exec(ids[1], ["ping", "-c", "3", "-W", "5", "10.78.0.2"])
        assert r.exit_code == 0, r
        for sid in ids:
            controller.shutdown(sid)
        for pod in pods:
            assert taps_in(pod) == []
    finally:
        cleanup_ns(*pods, bridge_ns)


def test_bad_netns_fails_cleanly(controller, sandbox_ids, tmp_path):  # type: ignore[no-untyped-def]
    sid = unique("badns")
    sandbox_ids.append(sid)
    before = host_taps()
    regular = tmp_path / "not-a-netns"
    regular.write_text("x")
    empty = unique()
    sh("ip", "netns", "add", empty)  # only lo: no usable interface
    try:
        for path in ("/var/run/netns/does-not-exist-" + sid, str(regular), f"/var/run/netns/{empty}"):
            with pytest.raises(InvalidArgument) as exc:
                controller.create(SandboxMetadata(sid), netns_path=path)
            assert path in str(exc.value)
            assert not (controller.config.state_dir / "sandboxes" / sid).exists()
            assert sid not in [r.id for r in controller.list()]
        assert host_taps() == before
    finally:
        cleanup_ns(empty)


@pytest.mark.parametrize("failure", ["boot-timeout", "qemu-refuses"])
def test_a_failed_start_removes_the_sandbox_and_gives_the_netns_back(podnet, qemu_tmp, failure):  # type: ignore[no-untyped-def]
    """containerd never calls Shutdown after a failed Start: the start cleans up itself, with
    the network attached (boot timeout: the agent never answered) or not (QEMU refused)."""
    from tests.conftest import assert_no_domains_left
    from vmsandbox import Config, FailedPrecondition, LibvirtController
    from vmsandbox.errors import DeadlineExceeded
    from vmsandbox.sandbox.guestconfig import CONFIG_DISK

    state = qemu_tmp / "state"
    cfg = Config(state_dir=state, boot_timeout=0.5 if failure == "boot-timeout" else 120.0)
    taps_before = host_taps()
    with LibvirtController(config=cfg) as c:
        sid = unique("fail")
        c.create(SandboxMetadata(sid), netns_path=podnet.path)
        if failure == "qemu-refuses":
            # A sandbox too big for the host is refused at create now (memfd RAM would not be
            # refused by QEMU): a config disk gone missing makes QEMU refuse instead.
            (state / "sandboxes" / sid / CONFIG_DISK).unlink()
        expected = DeadlineExceeded if failure == "boot-timeout" else FailedPrecondition
        with pytest.raises(expected, match="No such file or directory" if failure == "qemu-refuses" else None):
            c.start(sid)
        assert c.list() == []
        with pytest.raises(NotFound):
            c.status(sid)
        c.shutdown(sid)  # what a careful caller does anyway: still fine
    assert not (state / "sandboxes" / sid).exists()
    assert_no_domains_left(state)
    assert taps_in(podnet.pod) == [] and host_taps() == taps_before
    assert f"inet {podnet.v4}/24" in in_ns(podnet.pod, "ip", "-4", "addr", "show", "eth0").stdout
    assert "default via 10.77.0.1" in in_ns(podnet.pod, "ip", "route", "show").stdout
