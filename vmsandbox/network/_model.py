"""Value types of the network adapter: what the guest must configure, and interface counters.

Pure data with checks, no netlink: the sandbox layer persists a :class:`NetworkPlan` as JSON
(``to_json``/``from_json``) because the namespace loses its addresses once the guest has
taken them over.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidArgument

__all__ = [
    "Address",
    "Route",
    "Interface",
    "NetworkPlan",
    "InterfaceCounters",
    "PLAN_VERSION",
    "check_ifname",
]

PLAN_VERSION = 1
"""Version written by :meth:`NetworkPlan.to_json`; ``from_json`` refuses newer records."""

# JSON keeps the family as 4/6 rather than Linux's AF_* numbers, so records read naturally.
_FAMILY_TO_JSON: dict[int, int] = {int(socket.AF_INET): 4, int(socket.AF_INET6): 6}
_FAMILY_FROM_JSON: dict[int, int] = {v: k for k, v in _FAMILY_TO_JSON.items()}
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_IFNAMSIZ = 16  # the kernel's limit, including the terminating NUL
_MIN_MTU = 68  # the smallest MTU IPv4 allows (RFC 791)
_MAX_MTU = 65535


def check_ifname(name: object, what: str = "interface name") -> str:
    """Return ``name`` if it is a valid Linux interface name, else raise InvalidArgument."""
    if not isinstance(name, str) or not 0 < len(name) < _IFNAMSIZ:
        raise InvalidArgument(f"{what} {name!r} must be a string of 1 to {_IFNAMSIZ - 1} characters")
    if name in (".", "..") or any(c in name for c in "/:") or any(c.isspace() for c in name):
        raise InvalidArgument(f"{what} {name!r} contains a character Linux does not allow")
    return name


def _family_name(family: int) -> str:
    return "IPv6" if family == socket.AF_INET6 else "IPv4"


def _check_family(family: object, what: str) -> int:
    if isinstance(family, bool) or not isinstance(family, int) or family not in _FAMILY_TO_JSON:
        raise InvalidArgument(f"{what}: family must be socket.AF_INET or socket.AF_INET6, not {family!r}")
    return family


def _check_ip(text: object, family: int, what: str) -> None:
    if not isinstance(text, str):
        raise InvalidArgument(f"{what}: {text!r} is not a string")
    try:
        ip = ipaddress.ip_address(text)
    except ValueError as e:
        raise InvalidArgument(f"{what}: {text!r} is not an IP address") from e
    if ip.version != _FAMILY_TO_JSON[family]:
        raise InvalidArgument(f"{what}: {text!r} is not an {_family_name(family)} address")


@dataclass(frozen=True)
class Address:
    """An IP address of an interface: ``10.1.2.3``/24 with ``socket.AF_INET``."""

    address: str
    prefixlen: int
    family: int

    def __post_init__(self) -> None:
        family = _check_family(self.family, f"address {self.address!r}")
        _check_ip(self.address, family, "address")
        limit = 32 if family == socket.AF_INET else 128
        if isinstance(self.prefixlen, bool) or not isinstance(self.prefixlen, int) or not (
            0 <= self.prefixlen <= limit
        ):
            raise InvalidArgument(f"address {self.address}: prefix length {self.prefixlen!r} not in 0..{limit}")

    def __str__(self) -> str:
        return f"{self.address}/{self.prefixlen}"


@dataclass(frozen=True)
class Route:
    """A route the guest must install.

    ``destination`` is ``"default"`` or a network in CIDR form (``10.1.0.0/16``,
    ``fd00::/64``); ``gateway`` is ``""`` for a route without next hop; ``device`` names the
    namespace interface the route leaves by (the guest NIC wired to it), ``""`` if none.
    ``metric`` is the route priority (0: unset), ``scope`` the kernel's ``RT_SCOPE_*`` value
    (0 universe, 253 link, 254 host), ``onlink`` the ``onlink`` next-hop flag.
    """

    destination: str
    gateway: str
    family: int
    device: str
    metric: int = 0
    scope: int = 0
    onlink: bool = False

    def __post_init__(self) -> None:
        what = f"route {self.destination!r}"
        family = _check_family(self.family, what)
        if self.destination != "default":
            if not isinstance(self.destination, str) or "/" not in self.destination:
                raise InvalidArgument(f"{what}: destination must be 'default' or a network in CIDR form")
            try:
                net = ipaddress.ip_network(self.destination, strict=True)
            except ValueError as e:
                raise InvalidArgument(f"{what}: destination is not 'default' nor a network in CIDR form") from e
            if net.version != _FAMILY_TO_JSON[family]:
                raise InvalidArgument(f"{what}: destination is not an {_family_name(family)} network")
        if self.gateway != "":
            _check_ip(self.gateway, family, f"{what}: gateway")
        if self.device != "":
            check_ifname(self.device, f"{what}: device")
        for name, value, limit in (("metric", self.metric, 2**32 - 1), ("scope", self.scope, 255)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
                raise InvalidArgument(f"{what}: {name} {value!r} not in 0..{limit}")
        if not isinstance(self.onlink, bool):
            raise InvalidArgument(f"{what}: onlink must be a bool")

    @property
    def is_default(self) -> bool:
        return self.destination == "default"


@dataclass(frozen=True)
class Interface:
    """A namespace interface the guest takes over: its name, MAC, MTU and addresses."""

    name: str
    mac: str
    mtu: int
    addresses: tuple[Address, ...] = ()

    def __post_init__(self) -> None:
        check_ifname(self.name)
        if not isinstance(self.mac, str) or not _MAC_RE.match(self.mac):
            raise InvalidArgument(f"interface {self.name}: MAC {self.mac!r} is not of the form aa:bb:cc:dd:ee:ff")
        if isinstance(self.mtu, bool) or not isinstance(self.mtu, int) or not _MIN_MTU <= self.mtu <= _MAX_MTU:
            raise InvalidArgument(f"interface {self.name}: MTU {self.mtu!r} not in {_MIN_MTU}..{_MAX_MTU}")
        if not isinstance(self.addresses, tuple) or not all(isinstance(a, Address) for a in self.addresses):
            raise InvalidArgument(f"interface {self.name}: addresses must be a tuple of Address")


@dataclass(frozen=True)
class NetworkPlan:
    """What the guest must configure to take over a CNI-prepared network namespace.

    ``interfaces`` are in namespace order; interface ``i`` is wired to the i-th tap given to
    :func:`~vmsandbox.network.attach`. ``routes`` are the main-table routes leaving by those
    interfaces (default routes included), in an order the guest can install one by one
    (routes without gateway first). Routes the kernel derives from an address and IPv6
    link-local ones are left out: the guest's kernel makes its own.
    """

    netns_path: str
    interfaces: tuple[Interface, ...]
    routes: tuple[Route, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.netns_path, str) or not os.path.isabs(self.netns_path):
            raise InvalidArgument(f"network namespace path {self.netns_path!r} must be an absolute path")
        if not isinstance(self.interfaces, tuple) or not all(isinstance(i, Interface) for i in self.interfaces):
            raise InvalidArgument("plan: interfaces must be a tuple of Interface")
        if not self.interfaces:
            raise InvalidArgument(f"plan for {self.netns_path}: no interface")
        names = [i.name for i in self.interfaces]
        if len(set(names)) != len(names):
            raise InvalidArgument(f"plan for {self.netns_path}: duplicate interface names {names}")
        if not isinstance(self.routes, tuple) or not all(isinstance(r, Route) for r in self.routes):
            raise InvalidArgument("plan: routes must be a tuple of Route")
        for r in self.routes:
            if r.device and r.device not in names:
                raise InvalidArgument(
                    f"plan for {self.netns_path}: route {r.destination} uses {r.device}, not one of {names}"
                )

    def interface(self, name: str) -> Interface:
        """The interface called ``name``; raises InvalidArgument when the plan has none."""
        for i in self.interfaces:
            if i.name == name:
                return i
        raise InvalidArgument(f"plan for {self.netns_path} has no interface {name!r}")

    def to_json(self) -> dict[str, Any]:
        """A JSON-serializable dict (``json.dumps`` works on it); read back by ``from_json``."""
        return {
            "version": PLAN_VERSION,
            "netns_path": self.netns_path,
            "interfaces": [
                {
                    "name": i.name,
                    "mac": i.mac,
                    "mtu": i.mtu,
                    "addresses": [
                        {"address": a.address, "prefixlen": a.prefixlen, "family": _FAMILY_TO_JSON[a.family]}
                        for a in i.addresses
                    ],
                }
                for i in self.interfaces
            ],
            "routes": [
                {
                    "destination": r.destination,
                    "gateway": r.gateway,
                    "family": _FAMILY_TO_JSON[r.family],
                    "device": r.device,
                    "metric": r.metric,
                    "scope": r.scope,
                    "onlink": r.onlink,
                }
                for r in self.routes
            ],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> NetworkPlan:
        """Rebuild a plan written by :meth:`to_json`.

        Raises InvalidArgument naming the first bad field when ``data`` is not such a record
        (missing or mistyped field, unknown family, newer version).
        """
        try:
            return _plan_from_json(data)
        except InvalidArgument:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise InvalidArgument(f"not a network plan record: {e!r}") from e


def _field(data: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    if not isinstance(data, Mapping):
        raise InvalidArgument(f"network plan: {where} must be an object, not {type(data).__name__}")
    if key not in data:
        raise InvalidArgument(f"network plan: {where} lacks {key!r}")
    value = data[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InvalidArgument(f"network plan: {where}.{key} must be {kind.__name__}, not {value!r}")
    return value


def _family_from_json(value: int, where: str) -> int:
    if value not in _FAMILY_FROM_JSON:
        raise InvalidArgument(f"network plan: {where}.family must be 4 or 6, not {value!r}")
    return _FAMILY_FROM_JSON[value]


def _plan_from_json(data: Mapping[str, Any]) -> NetworkPlan:
    version = data.get("version", PLAN_VERSION) if isinstance(data, Mapping) else None
    if version != PLAN_VERSION:
        raise InvalidArgument(f"network plan: version {version!r} is not supported (expected {PLAN_VERSION})")
    interfaces = []
    for n, i in enumerate(_field(data, "interfaces", list, "plan")):
        where = f"interfaces[{n}]"
        addresses = []
        for m, a in enumerate(_field(i, "addresses", list, where)):
            awhere = f"{where}.addresses[{m}]"
            addresses.append(
                Address(
                    address=_field(a, "address", str, awhere),
                    prefixlen=_field(a, "prefixlen", int, awhere),
                    family=_family_from_json(_field(a, "family", int, awhere), awhere),
                )
            )
        interfaces.append(
            Interface(
                name=_field(i, "name", str, where),
                mac=_field(i, "mac", str, where),
                mtu=_field(i, "mtu", int, where),
                addresses=tuple(addresses),
            )
        )
    routes = []
    for n, r in enumerate(_field(data, "routes", list, "plan")):
        where = f"routes[{n}]"
        routes.append(
            Route(
                destination=_field(r, "destination", str, where),
                gateway=_field(r, "gateway", str, where),
                family=_family_from_json(_field(r, "family", int, where), where),
                device=_field(r, "device", str, where),
                metric=_field(r, "metric", int, where) if "metric" in r else 0,
                scope=_field(r, "scope", int, where) if "scope" in r else 0,
                onlink=_field(r, "onlink", bool, where) if "onlink" in r else False,
            )
        )
    return NetworkPlan(
        netns_path=_field(data, "netns_path", str, "plan"),
        interfaces=tuple(interfaces),
        routes=tuple(routes),
    )


@dataclass(frozen=True)
class InterfaceCounters:
    """Traffic counters of one interface as its own kernel counts them.

    For a tap, ``rx`` is what the guest sent and ``tx`` what it received: use
    :meth:`swapped` for the guest's point of view.
    """

    name: str
    rx_bytes: int
    rx_packets: int
    rx_errors: int
    rx_dropped: int
    tx_bytes: int
    tx_packets: int
    tx_errors: int
    tx_dropped: int

    def swapped(self) -> InterfaceCounters:
        """The same counters seen from the other end of the link (rx and tx exchanged)."""
        return InterfaceCounters(
            name=self.name,
            rx_bytes=self.tx_bytes,
            rx_packets=self.tx_packets,
            rx_errors=self.tx_errors,
            rx_dropped=self.tx_dropped,
            tx_bytes=self.rx_bytes,
            tx_packets=self.rx_packets,
            tx_errors=self.rx_errors,
            tx_dropped=self.rx_dropped,
        )
