"""Integration tests of vmsandbox.network on real network namespaces (root, iproute2).

Each test builds its own namespaces (``vsbxt-<random>``): a "pod" namespace whose eth0 is a
veth to a "peer" namespace playing the CNI bridge/gateway. Taps are real persistent taps
with no VMM attached. Everything is deleted in finalizers; traffic only ever goes between
the test's own namespaces. ``ip`` and ``tc`` are used here to arrange and to observe, never
by the code under test.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

import pytest

from vmsandbox.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from vmsandbox.network import (
    Address,
    Interface,
    NetworkPlan,
    Route,
    attach,
    create_taps,
    detach,
    inspect_netns,
    read_counters,
    tap_names,
)
from vmsandbox.network._netlink import Rtnl

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(shutil.which("ip") is None or shutil.which("tc") is None, reason="needs iproute2"),
]

V4 = 2
V6 = 10


def sh(*args: str, check: bool = True) -> str:
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def netns_exists(name: str) -> bool:
    return os.path.exists(f"/run/netns/{name}")


def host_link_exists(name: str) -> bool:
    return subprocess.run(["ip", "link", "show", "dev", name], capture_output=True).returncode == 0


def link_json(ns: str, name: str) -> dict[str, object] | None:
    done = subprocess.run(["ip", "-n", ns, "-j", "-d", "link", "show", "dev", name], capture_output=True, text=True)
    if done.returncode != 0:
        return None
    result: dict[str, object] = json.loads(done.stdout)[0]
    return result


def addresses(ns: str, dev: str, family: str) -> list[str]:
    data = json.loads(sh("ip", "-n", ns, "-j", family, "addr", "show", "dev", dev))
    return [f"{a['local']}/{a['prefixlen']}" for entry in data for a in entry["addr_info"] if a["scope"] != "link"]


def ingress_filters(ns: str, dev: str) -> str:
    return sh("tc", "-n", ns, "-s", "filter", "show", "dev", dev, "ingress")


def filters_without_stats(ns: str, dev: str) -> str:
    return sh("tc", "-n", ns, "filter", "show", "dev", dev, "ingress")


def ingress_qdisc(ns: str, dev: str) -> str:
    return sh("tc", "-n", ns, "qdisc", "show", "dev", dev, "ingress")


@dataclass
class Pod:
    """A CNI-like setup: ``ns`` holds eth0 (MTU 1400, v4+v6, default routes) whose veth peer
    sits in ``peer`` with the gateway addresses."""

    ns: str
    peer: str
    taps: list[str]

    @property
    def path(self) -> str:
        return f"/run/netns/{self.ns}"

    def mac(self, dev: str = "eth0") -> str:
        link = link_json(self.ns, dev)
        assert link is not None
        return str(link["address"])


class Namespaces:
    """Creates namespaces and taps with unique names and removes them all at the end."""

    def __init__(self) -> None:
        self.token = secrets.token_hex(3)
        self.netns: list[str] = []
        self.taps: list[str] = []
        self.host_links: list[str] = []

    def new_netns(self, role: str) -> str:
        name = f"vsbxt-{self.token}{role}"
        sh("ip", "netns", "add", name)
        self.netns.append(name)
        return name

    def new_taps(self, count: int) -> list[str]:
        names = tap_names(f"vsbxt-{self.token}-{len(self.taps)}", count)
        self.taps += names
        return names

    def cleanup(self) -> None:
        for name in self.taps + self.host_links:
            if host_link_exists(name):
                sh("ip", "link", "del", "dev", name, check=False)
        for name in self.netns:
            if netns_exists(name):
                sh("ip", "netns", "del", name, check=False)


@pytest.fixture
def spaces() -> Iterator[Namespaces]:
    s = Namespaces()
    try:
        yield s
    finally:
        s.cleanup()


def add_veth(pod_ns: str, peer_ns: str, dev: str, peer_dev: str, v4: str, v6: str, mtu: int) -> None:
    """``dev`` in ``pod_ns`` with .2/::2 addresses, ``peer_dev`` in ``peer_ns`` with .1/::1."""
    sh("ip", "-n", pod_ns, "link", "add", dev, "mtu", str(mtu), "type", "veth", "peer", "name", peer_dev,
       "mtu", str(mtu), "netns", peer_ns)  # fmt: skip
    sh("ip", "-n", peer_ns, "addr", "add", f"{v4}.1/24", "dev", peer_dev)
    sh("ip", "-n", peer_ns, "addr", "add", f"{v6}::1/64", "dev", peer_dev, "nodad")
    sh("ip", "-n", peer_ns, "link", "set", peer_dev, "up")
    sh("ip", "-n", pod_ns, "link", "set", dev, "up")
    sh("ip", "-n", pod_ns, "addr", "add", f"{v4}.2/24", "dev", dev)
    sh("ip", "-n", pod_ns, "addr", "add", f"{v6}::2/64", "dev", dev, "nodad")


@pytest.fixture
def pod(spaces: Namespaces) -> Pod:
    ns = spaces.new_netns("p")
    peer = spaces.new_netns("q")
    add_veth(ns, peer, "eth0", "peer0", "10.77.0", "fd77:0:0:1", 1400)
    sh("ip", "-n", ns, "route", "add", "default", "via", "10.77.0.1")
    sh("ip", "-n", ns, "route", "add", "10.123.0.0/16", "via", "10.77.0.1")
    sh("ip", "-n", ns, "-6", "route", "add", "default", "via", "fd77:0:0:1::1")
    return Pod(ns=ns, peer=peer, taps=spaces.new_taps(1))


def expected_plan(pod: Pod) -> NetworkPlan:
    return NetworkPlan(
        netns_path=pod.path,
        interfaces=(
            Interface(
                name="eth0",
                mac=pod.mac(),
                mtu=1400,
                addresses=(Address("10.77.0.2", 24, V4), Address("fd77:0:0:1::2", 64, V6)),
            ),
        ),
        routes=(
            Route("default", "10.77.0.1", V4, "eth0"),
            Route("10.123.0.0/16", "10.77.0.1", V4, "eth0"),
            Route("default", "fd77:0:0:1::1", V6, "eth0", metric=1024),
        ),
    )


# --- inspect -----------------------------------------------------------------------------
def test_inspect_reports_interfaces_addresses_and_routes(pod: Pod) -> None:
    plan = inspect_netns(pod.path)
    assert plan == expected_plan(pod)
    assert NetworkPlan.from_json(json.loads(json.dumps(plan.to_json()))) == plan


def test_inspect_refuses_a_namespace_with_only_loopback(spaces: Namespaces) -> None:
    empty = spaces.new_netns("e")
    with pytest.raises(InvalidArgument, match=f"/run/netns/{empty}.*no interface"):
        inspect_netns(f"/run/netns/{empty}")


def test_inspect_refuses_a_namespace_file_left_after_unmount(spaces: Namespaces) -> None:
    gone = spaces.new_netns("g")
    path = f"/run/netns/{gone}"
    sh("umount", path)  # what remains is the empty regular file `ip netns` mounted on
    with pytest.raises(InvalidArgument, match=path):
        inspect_netns(path)


# --- taps --------------------------------------------------------------------------------
def test_create_taps_makes_persistent_taps_with_all_15_characters(spaces: Namespaces) -> None:
    taps = spaces.new_taps(2)
    create_taps(taps)
    for name in taps:
        assert len(name) == 15
        link = link_json_host(name)
        assert link["ifname"] == name
        info = link["linkinfo"]["info_data"]  # type: ignore[index]
        assert info["type"] == "tap" and info["persist"] is True and info["pi"] is False


def link_json_host(name: str) -> dict[str, object]:
    result: dict[str, object] = json.loads(sh("ip", "-j", "-d", "link", "show", "dev", name))[0]
    return result


def test_create_taps_refuses_a_tap_that_exists_and_leaves_it_alone(spaces: Namespaces) -> None:
    taps = spaces.new_taps(2)
    # Someone else's tap with our second name (made by ip, with an owner ours never have).
    sh("ip", "tuntap", "add", "dev", taps[1], "mode", "tap", "user", "65534")
    spaces.host_links.append(taps[1])
    before = link_json_host(taps[1])
    with pytest.raises(AlreadyExists, match=taps[1]):
        create_taps(taps)
    assert not host_link_exists(taps[0])  # what the call made is gone again
    after = link_json_host(taps[1])
    assert after["ifindex"] == before["ifindex"] and after["linkinfo"] == before["linkinfo"]
    # And a second create of taps this test made is refused too: nothing is adopted.
    create_taps(taps[:1])
    with pytest.raises(AlreadyExists, match=taps[0]):
        create_taps(taps[:1])
    assert host_link_exists(taps[0])


def test_a_tap_made_between_the_check_and_the_create_is_refused_too(spaces: Namespaces) -> None:
    # TUNSETIFF without IFF_TUN_EXCL would open the existing tap and succeed.
    tap, = spaces.new_taps(1)
    sh("ip", "tuntap", "add", "dev", tap, "mode", "tap")
    with Rtnl.host() as host, pytest.raises(AlreadyExists, match=tap):
        host.add_tap(tap)
    assert host_link_exists(tap)


def test_create_taps_rolls_back_when_a_name_is_taken(spaces: Namespaces) -> None:
    taps = spaces.new_taps(2)
    other = spaces.new_netns("o")
    # A link of this test's with a tap's name, but a veth (no dummy driver on some hosts).
    sh("ip", "link", "add", taps[1], "type", "veth", "peer", "name", "peer0", "netns", other)
    spaces.host_links.append(taps[1])
    with pytest.raises(AlreadyExists, match=f"{taps[1]}.*veth"):
        create_taps(taps)
    assert not host_link_exists(taps[0])
    assert host_link_exists(taps[1])  # not ours to delete


# --- attach ------------------------------------------------------------------------------
def assert_wired(pod: Pod, tap: str, dev: str = "eth0") -> None:
    assert not host_link_exists(tap)
    link = link_json(pod.ns, tap)
    assert link is not None, f"{tap} is not in {pod.ns}"
    assert "UP" in link["flags"]  # type: ignore[operator]
    assert link["mtu"] == link_json(pod.ns, dev)["mtu"]  # type: ignore[index]
    for src, dst in ((dev, tap), (tap, dev)):
        assert "ingress ffff:" in ingress_qdisc(pod.ns, src)
        out = ingress_filters(pod.ns, src)
        assert out.count("mirred") == 1, out
        assert f"mirred (Egress Redirect to device {dst})" in out, out
        assert "match 00000000/00000000 at 0" in out


def test_attach_wires_tap_and_hands_addresses_to_the_guest(pod: Pod) -> None:
    plan = inspect_netns(pod.path)
    create_taps(pod.taps)
    attach(plan, pod.taps)
    assert_wired(pod, pod.taps[0])
    assert addresses(pod.ns, "eth0", "-4") == []
    assert addresses(pod.ns, "eth0", "-6") == []
    assert sh("ip", "-n", pod.ns, "-4", "route", "show", "dev", "eth0") == ""
    assert "default" not in sh("ip", "-n", pod.ns, "-6", "route", "show", "dev", "eth0")
    # After attach the namespace still names the interface, now without what the guest took.
    assert inspect_netns(pod.path) == replace(
        plan, interfaces=(replace(plan.interfaces[0], addresses=()),), routes=()
    )


def test_attach_twice_changes_nothing(pod: Pod) -> None:
    plan = inspect_netns(pod.path)
    create_taps(pod.taps)
    attach(plan, pod.taps)
    before = {d: filters_without_stats(pod.ns, d) for d in ("eth0", pod.taps[0])}
    attach(plan, pod.taps)
    assert_wired(pod, pod.taps[0])
    after = {d: filters_without_stats(pod.ns, d) for d in ("eth0", pod.taps[0])}
    assert after == before


def test_attach_without_taps_is_not_found_and_leaves_the_namespace_alone(pod: Pod) -> None:
    plan = inspect_netns(pod.path)
    with pytest.raises(NotFound, match=pod.taps[0]):
        attach(plan, pod.taps)
    assert inspect_netns(pod.path) == plan


def test_attach_refuses_a_stale_plan(pod: Pod) -> None:
    plan = inspect_netns(pod.path)
    stale = replace(plan, interfaces=(replace(plan.interfaces[0], mac="02:00:00:00:00:99"),))
    create_taps(pod.taps)
    with pytest.raises(FailedPrecondition, match="stale"):
        attach(stale, pod.taps)
    assert host_link_exists(pod.taps[0])
    assert inspect_netns(pod.path) == plan


def test_attach_rolls_back_everything_on_a_late_failure(spaces: Namespaces, pod: Pod) -> None:
    add_veth(pod.ns, pod.peer, "eth1", "peer1", "10.78.0", "fd78:0:0:1", 1500)
    # eth1's ingress is taken by someone else's clsact: wiring eth1 fails after eth0 is done.
    sh("tc", "-n", pod.ns, "qdisc", "add", "dev", "eth1", "clsact")
    plan = inspect_netns(pod.path)
    assert [i.name for i in plan.interfaces] == ["eth0", "eth1"]
    taps = spaces.new_taps(2)
    create_taps(taps)
    with pytest.raises(FailedPrecondition, match="clsact"):
        attach(plan, taps)
    for tap in taps:
        assert host_link_exists(tap), f"{tap} was not moved back to the host"
        assert link_json(pod.ns, tap) is None
    assert ingress_qdisc(pod.ns, "eth0") == ""
    assert inspect_netns(pod.path) == plan


# --- detach ------------------------------------------------------------------------------
def test_detach_removes_wiring_and_restores_addresses_and_routes(pod: Pod) -> None:
    plan = inspect_netns(pod.path)
    create_taps(pod.taps)
    attach(plan, pod.taps)
    detach(pod.path, pod.taps, plan)
    assert not host_link_exists(pod.taps[0])
    assert link_json(pod.ns, pod.taps[0]) is None
    assert ingress_qdisc(pod.ns, "eth0") == ""
    assert ingress_filters(pod.ns, "eth0") == ""
    assert inspect_netns(pod.path) == plan
    detach(pod.path, pod.taps, plan)
    assert inspect_netns(pod.path) == plan


def test_detach_without_plan_removes_wiring_only(pod: Pod) -> None:
    plan = inspect_netns(pod.path)
    create_taps(pod.taps)
    attach(plan, pod.taps)
    detach(pod.path, pod.taps)
    assert link_json(pod.ns, pod.taps[0]) is None
    assert ingress_qdisc(pod.ns, "eth0") == ""
    assert addresses(pod.ns, "eth0", "-4") == []


def test_detach_of_taps_never_attached_deletes_them_from_the_host(pod: Pod) -> None:
    create_taps(pod.taps)
    plan = inspect_netns(pod.path)
    detach(pod.path, pod.taps, plan)
    assert not host_link_exists(pod.taps[0])
    assert inspect_netns(pod.path) == plan


def test_detach_after_the_namespace_was_deleted(pod: Pod) -> None:
    plan = inspect_netns(pod.path)
    create_taps(pod.taps)
    attach(plan, pod.taps)
    sh("ip", "netns", "del", pod.ns)
    detach(pod.path, pod.taps, plan)
    detach(pod.path, pod.taps, plan)
    assert not host_link_exists(pod.taps[0])


# --- counters ----------------------------------------------------------------------------
# An ICMP echo sender run inside the peer namespace (the hosts have no ping binary).
PING = r"""
import socket, struct, sys, time
def csum(b):
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xFFFF)
    return ~(s + (s >> 16)) & 0xFFFF
sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
for seq in range(int(sys.argv[2])):
    body = struct.pack("!BBHHH", 8, 0, 0, 0x7673, seq) + b"vmsandbox-test-payload"
    sock.sendto(body[:2] + struct.pack("!H", csum(body)) + body[4:], (sys.argv[1], 0))
    time.sleep(0.1)
"""


def ping_from_peer(pod: Pod, address: str, count: int = 5) -> None:
    sh("ip", "netns", "exec", pod.peer, sys.executable, "-c", PING, address, str(count))


def wait_for(predicate: object, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return False


def test_read_counters_grow_with_traffic_before_and_after_attach(pod: Pod) -> None:
    plan = inspect_netns(pod.path)
    start = read_counters(pod.path, ["eth0"])["eth0"]
    ping_from_peer(pod, "10.77.0.2")
    assert wait_for(lambda: read_counters(pod.path, ["eth0"])["eth0"].rx_packets >= start.rx_packets + 5)
    assert read_counters(pod.path, ["eth0"])["eth0"].tx_packets > start.tx_packets  # echo replies

    create_taps(pod.taps)
    attach(plan, pod.taps)
    tap = pod.taps[0]
    before = read_counters(pod.path, ["eth0", tap])
    ping_from_peer(pod, "10.77.0.2")
    # eth0 still counts what arrives before its ingress filter steals it for the tap.
    assert wait_for(lambda: read_counters(pod.path, ["eth0"])["eth0"].rx_packets > before["eth0"].rx_packets)
    counters = read_counters(pod.path, ["eth0", tap])
    assert list(counters) == ["eth0", tap]
    assert counters["eth0"].rx_bytes > before["eth0"].rx_bytes
    # With no VMM on the tap (no carrier) mirred drops the redirected packets itself, so
    # the tap's own counters stay put; the action statistics show the redirect happened.
    assert re.search(r"Sent \d+ bytes [1-9]\d* pkt", ingress_filters(pod.ns, "eth0"))


def test_read_counters_of_a_missing_interface_is_not_found(pod: Pod) -> None:
    with pytest.raises(NotFound, match="nothere"):
        read_counters(pod.path, ["eth0", "nothere"])


# --- threads ------------------------------------------------------------------------------
def test_namespace_work_forks_nothing_and_runs_from_many_threads(spaces: Namespaces) -> None:
    """`vmsandbox serve` is a threaded gRPC server: a forked child (pyroute2's netns mode)
    died there with SIGSEGV in about half of the calls. Namespace sockets must be made
    without fork, from any thread, and leave the calling thread in the host namespace."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    forks: list[int] = []
    os.register_at_fork(before=lambda: forks.append(1))
    pods = []
    for i in range(4):
        ns, peer = spaces.new_netns(f"t{i}"), spaces.new_netns(f"u{i}")
        add_veth(ns, peer, "eth0", "peer0", f"10.78.{i}", f"fd78:0:0:{i}", 1500)
        pods.append(Pod(ns=ns, peer=peer, taps=spaces.new_taps(1)))
    host_ns = os.stat("/proc/self/ns/net").st_ino

    def cycle(pod: Pod) -> int:
        for _ in range(3):
            plan = inspect_netns(pod.path)
            create_taps(pod.taps)
            attach(plan, pod.taps)
            read_counters(pod.path, ["eth0", pod.taps[0]])
            detach(pod.path, pod.taps, plan)
        return os.stat("/proc/thread-self/ns/net").st_ino

    with ThreadPoolExecutor(max_workers=4) as pool:
        thread_ns = list(pool.map(cycle, pods))
    assert forks == [], f"{len(forks)} fork(s) while entering network namespaces"
    assert thread_ns == [host_ns] * 4  # no worker thread was left inside a pod namespace
    assert [t for t in threading.enumerate() if t.name == "vsbx-netns-socket"] == []  # none outlived its call
    for pod in pods:
        assert addresses(pod.ns, "eth0", "-4") == [f"10.78.{pods.index(pod)}.2/24"]
        assert not host_link_exists(pod.taps[0]) and link_json(pod.ns, pod.taps[0]) is None
