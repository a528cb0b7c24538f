"""Unit tests of vmsandbox.network's pure parts: tap names, the plan and its JSON, argument
checks that must fail before any netlink call, the error table and the retry policy."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import socket
from pathlib import Path

import pytest
from pyroute2.netlink.exceptions import NetlinkDumpInterrupted, NetlinkError

import vmsandbox.network as network
from vmsandbox.errors import (
    AlreadyExists,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from vmsandbox.network import (
    Address,
    Interface,
    InterfaceCounters,
    NetworkPlan,
    Route,
    attach,
    create_taps,
    detach,
    inspect_netns,
    read_counters,
    tap_names,
)
from vmsandbox.network import _netlink
from vmsandbox.network._names import check_tap_names
from vmsandbox.network._netlink import RouteEntry
from vmsandbox.network._wiring import _plan_routes

V4 = socket.AF_INET
V6 = socket.AF_INET6


def sample_plan(path: str = "/run/netns/cni-1234") -> NetworkPlan:
    return NetworkPlan(
        netns_path=path,
        interfaces=(
            Interface(
                name="eth0",
                mac="0a:58:0a:f4:00:05",
                mtu=1400,
                addresses=(Address("10.244.0.5", 24, V4), Address("fd00:10:244::5", 64, V6)),
            ),
            Interface(name="net1", mac="02:00:00:00:00:01", mtu=9000),
        ),
        routes=(
            Route("169.254.1.1/32", "", V4, "eth0", scope=253),
            Route("default", "10.244.0.1", V4, "eth0"),
            Route("default", "fd00:10:244::1", V6, "eth0", metric=1024),
            Route("192.168.0.0/16", "169.254.1.1", V4, "net1", onlink=True),
        ),
    )


# --- tap names ---------------------------------------------------------------------------
def test_tap_names_are_short_prefixed_and_distinct() -> None:
    names = tap_names("5f1c0d2e-sandbox", 12)
    assert len(names) == 12
    assert len(set(names)) == 12
    for n in names:
        assert n.startswith("vsbx")
        assert len(n) <= 15


def test_tap_names_are_deterministic_and_differ_between_sandboxes() -> None:
    assert tap_names("a", 3) == tap_names("a", 3)
    assert tap_names("a", 2) == tap_names("a", 3)[:2]
    assert set(tap_names("a", 3)).isdisjoint(tap_names("b", 3))


def test_tap_names_fit_ifnamsiz_up_to_the_maximum_count() -> None:
    names = tap_names("x" * 300, 1000)
    assert max(len(n) for n in names) == 15
    assert len(set(names)) == 1000
    assert tap_names("x", 0) == []


def _ids_sharing_32_bits() -> tuple[str, str]:
    """Two sandbox ids whose sha256 digests start with the same 32 bits (a birthday search
    over ~2^16 ids: what a node with that many sandbox ids over its life will meet)."""
    seen: dict[bytes, str] = {}
    for i in range(2_000_000):
        sid = f"pod-{i}"
        head = hashlib.sha256(sid.encode()).digest()[:4]
        if head in seen:
            return seen[head], sid
        seen[head] = sid
    raise AssertionError("no 32-bit collision found")


def test_tap_names_of_sandboxes_whose_digests_share_32_bits_differ() -> None:
    a, b = _ids_sharing_32_bits()
    assert set(tap_names(a, 3)).isdisjoint(tap_names(b, 3))


def test_tap_names_fill_all_15_characters_with_hash() -> None:
    names = tap_names("5f1c0d2e-sandbox", 1000)
    assert {len(n) for n in names} == {15}
    # 11 base32 characters (55 bits) of the hash, a fresh hash per index: no two names of
    # one sandbox share the part after the prefix, not even a common start of it.
    tails = [n[len("vsbx"):] for n in names]
    assert all(re.fullmatch(r"[a-z2-7]{11}", t) for t in tails), tails[:3]
    assert len({t[:4] for t in tails}) > 900


def test_tap_names_made_by_the_old_scheme_are_still_ours() -> None:
    # Records written before the naming changed keep their taps (vsbx + 8 hex + index).
    legacy = ["vsbx0a1b2c3d0", "vsbx0a1b2c3d1", "vsbx0a1b2c3d999"]
    assert check_tap_names(legacy) == legacy
    assert check_tap_names(tap_names("a", 2)) == tap_names("a", 2)
    for bad in ("vsbx0a1b2c3d01", "vsbx0a1b2c3d1000", "vsbxabcdefghij", "vsbxABCDEFGHIJK", "vsbxabcdefghij1",
                "vsbx0a1b2c3d0\n"):
        with pytest.raises(InvalidArgument):
            check_tap_names([bad])


@pytest.mark.parametrize(("sandbox_id", "count"), [("", 1), ("a", -1), ("a", 1001), ("a", True)])
def test_tap_names_rejects_bad_arguments(sandbox_id: str, count: int) -> None:
    with pytest.raises(InvalidArgument):
        tap_names(sandbox_id, count)


# --- the plan ----------------------------------------------------------------------------
def test_plan_json_round_trip() -> None:
    plan = sample_plan()
    data = json.loads(json.dumps(plan.to_json()))
    assert data["version"] == 1
    assert data["interfaces"][0]["addresses"][1]["family"] == 6
    assert NetworkPlan.from_json(data) == plan


def test_plan_from_json_defaults_optional_route_fields() -> None:
    data = sample_plan().to_json()
    for r in data["routes"]:
        del r["metric"], r["scope"], r["onlink"]
    routes = NetworkPlan.from_json(data).routes
    assert all(r.metric == 0 and r.scope == 0 and not r.onlink for r in routes)


def _broken(mutate: str) -> dict[str, object]:
    data = sample_plan().to_json()
    if mutate == "no-interfaces-key":
        del data["interfaces"]
    elif mutate == "version":
        data["version"] = 2
    elif mutate == "family":
        data["interfaces"][0]["addresses"][0]["family"] = 2  # AF_INET's number, not 4
    elif mutate == "mtu-type":
        data["interfaces"][0]["mtu"] = "1400"
    elif mutate == "address":
        data["interfaces"][0]["addresses"][0]["address"] = "10.244.0.500"
    elif mutate == "route-device":
        data["routes"][1]["device"] = "eth9"
    elif mutate == "route-host-bits":
        data["routes"][3]["destination"] = "192.168.1.0/16"
    elif mutate == "not-a-list":
        data["routes"] = {}
    elif mutate == "relative-path":
        data["netns_path"] = "cni-1234"
    return data


@pytest.mark.parametrize(
    "mutate",
    [
        "no-interfaces-key",
        "version",
        "family",
        "mtu-type",
        "address",
        "route-device",
        "route-host-bits",
        "not-a-list",
        "relative-path",
    ],
)
def test_plan_from_json_rejects_bad_records(mutate: str) -> None:
    with pytest.raises(InvalidArgument):
        NetworkPlan.from_json(_broken(mutate))


def test_plan_from_json_rejects_non_mapping() -> None:
    with pytest.raises(InvalidArgument):
        NetworkPlan.from_json([])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "make",
    [
        lambda: Address("10.0.0.1", 33, V4),
        lambda: Address("fd00::1", 64, V4),
        lambda: Address("10.0.0.1", 24, 99),
        lambda: Interface("eth0", "0A:58:0A:F4:00:05", 1500),
        lambda: Interface("eth0", "0a:58:0a:f4:00", 1500),
        lambda: Interface("eth0", "0a:58:0a:f4:00:05", 67),
        lambda: Interface("a-very-long-ifname", "0a:58:0a:f4:00:05", 1500),
        lambda: Interface("eth/0", "0a:58:0a:f4:00:05", 1500),
        lambda: Route("default", "fd00::1", V4, "eth0"),
        lambda: Route("10.0.0.1", "", V4, "eth0"),
        lambda: Route("fd00::/64", "", V4, "eth0"),
        lambda: Route("default", "", V4, "eth0", scope=256),
        lambda: NetworkPlan("/run/netns/x", ()),
        lambda: NetworkPlan(
            "/run/netns/x",
            (Interface("eth0", "02:00:00:00:00:01", 1500), Interface("eth0", "02:00:00:00:00:02", 1500)),
        ),
    ],
)
def test_value_types_validate_their_fields(make: object) -> None:
    with pytest.raises(InvalidArgument):
        make()  # type: ignore[operator]


def test_counters_swapped_is_the_other_ends_view() -> None:
    c = InterfaceCounters("vsbx00000000", 1, 2, 3, 4, 10, 20, 30, 40)
    s = c.swapped()
    assert (s.rx_bytes, s.rx_packets, s.rx_errors, s.rx_dropped) == (10, 20, 30, 40)
    assert (s.tx_bytes, s.tx_packets, s.tx_errors, s.tx_dropped) == (1, 2, 3, 4)
    assert s.swapped() == c


# --- arguments refused before any netlink call (so: no root needed) ----------------------
@pytest.mark.parametrize("names", [["eth0"], ["vsbx0000000g0"], ["vsbx000000000", "vsbx000000000"], "vsbx000000000"])
def test_tap_operations_accept_only_our_tap_names(names: list[str]) -> None:
    with pytest.raises(InvalidArgument):
        create_taps(names)
    with pytest.raises(InvalidArgument):
        detach("/run/netns/x", names)


def test_attach_needs_one_tap_per_interface() -> None:
    with pytest.raises(InvalidArgument, match="need one each"):
        attach(sample_plan(), tap_names("s", 1))


def test_detach_refuses_a_plan_for_another_namespace() -> None:
    with pytest.raises(InvalidArgument, match="/run/netns/cni-1234"):
        detach("/run/netns/other", tap_names("s", 2), sample_plan())


def test_bad_namespace_paths_are_invalid_arguments_naming_the_path(tmp_path: Path) -> None:
    regular = tmp_path / "netns-file"
    regular.write_text("")
    missing = tmp_path / "missing"
    for path in (str(missing), str(regular), str(tmp_path)):
        with pytest.raises(InvalidArgument) as info:
            inspect_netns(path)
        assert path in str(info.value)
    with pytest.raises(InvalidArgument, match="absolute"):
        inspect_netns("relative/netns")


def test_the_hosts_own_namespace_is_refused() -> None:
    own = f"/proc/{os.getpid()}/ns/net"
    with pytest.raises(InvalidArgument, match="host's own"):
        inspect_netns(own)
    plan = NetworkPlan(own, (Interface("eth0", "02:00:00:00:00:01", 1500),))
    with pytest.raises(InvalidArgument, match="host's own"):
        attach(plan, tap_names("s", 1))
    with pytest.raises(InvalidArgument, match="host's own"):
        detach(own, tap_names("s", 1))


def test_read_counters_checks_names_and_reports_a_missing_namespace(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument):
        read_counters("/run/netns/x", ["bad/name"])
    with pytest.raises(NotFound, match=str(tmp_path / "gone")):
        read_counters(str(tmp_path / "gone"), ["eth0"])


# --- planning routes from netlink records ------------------------------------------------
def _entry(dst: str = "", dst_len: int = 0, gateway: str = "", **kw: int) -> RouteEntry:
    fields: dict[str, int] = dict(
        family=V6 if ":" in (dst + gateway) else V4,
        table=254,
        type=1,
        protocol=4,
        scope=0 if gateway else 253,
        oif=2,
        priority=0,
        flags=0,
    )
    fields.update(kw)
    return RouteEntry(dst=dst, dst_len=dst_len, gateway=gateway, multipath=False, **fields)


def test_plan_routes_keeps_what_the_guest_must_install_linkroutes_first() -> None:
    routes = [
        _entry(gateway="10.0.0.1"),  # default
        _entry("10.0.0.0", 24, protocol=2),  # derived from the address: kernel's job
        _entry("10.0.0.5", 32, table=255, type=2),  # local table
        _entry("fe80::", 64, protocol=2, priority=256),  # link-local
        _entry("fe80::", 10, protocol=4, priority=256),  # link-local, added by someone
        _entry("169.254.1.1", 32),  # a link route a gateway depends on
        _entry("10.9.0.0", 16, gateway="10.0.0.1", oif=3),  # another interface
        _entry("", 0, "fd00::1", priority=1024),  # v6 default
        _entry("10.8.0.0", 16, gateway="10.0.0.1", type=6),  # prohibit
    ]
    assert _plan_routes(routes, {2: "eth0"}) == [
        Route("169.254.1.1/32", "", V4, "eth0", scope=253),
        Route("default", "10.0.0.1", V4, "eth0"),
        Route("default", "fd00::1", V6, "eth0", metric=1024),
    ]


# --- the error table and the retry policy ------------------------------------------------
@pytest.mark.parametrize(
    ("err", "cls"),
    [
        (NetlinkError(errno.ENODEV), NotFound),
        (NetlinkError(errno.EEXIST), AlreadyExists),
        (NetlinkError(errno.EBUSY), Unavailable),
        (NetlinkError(errno.EPERM), FailedPrecondition),
        (NetlinkError(errno.EINVAL), Internal),
        (NetlinkDumpInterrupted(), Unavailable),
        (FileNotFoundError(errno.ENOENT, "x"), NotFound),
        (TimeoutError(), Unavailable),
        (RuntimeError("child process is dead"), Internal),
    ],
)
def test_translate_maps_foreign_errors_to_ours(err: Exception, cls: type[Exception]) -> None:
    ours = _netlink.translate(err, "doing x in y")
    assert type(ours) is cls
    assert "doing x in y" in str(ours)


def test_busy_netlink_is_retried_then_succeeds() -> None:
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise NetlinkError(errno.EBUSY)
        return "ok"

    assert _netlink._retrying(flaky) == "ok"
    assert len(calls) == 3


def test_other_netlink_errors_are_not_retried() -> None:
    calls = []

    def broken() -> None:
        calls.append(1)
        raise NetlinkError(errno.EINVAL)

    with pytest.raises(NetlinkError):
        _netlink._retrying(broken)
    assert len(calls) == 1


# --- the public surface ------------------------------------------------------------------
def test_all_lists_exactly_the_public_names() -> None:
    import types

    # Submodules (network.fake once a test imported it) are not part of the names exported.
    public = {n for n, v in vars(network).items()
              if not n.startswith("_") and n != "annotations" and not isinstance(v, types.ModuleType)}
    assert set(network.__all__) == public
    for name in network.__all__:
        assert getattr(network, name) is not None
