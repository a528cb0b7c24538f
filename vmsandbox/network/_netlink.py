"""The pyroute2 edge: namespace handles, typed views of netlink messages, error translation.

Everything that touches pyroute2 goes through :class:`Rtnl`, whose methods return small
typed records and raise only :mod:`vmsandbox.errors` classes (translated in one table,
:func:`translate`). Sockets inside a namespace come from :mod:`._netns` (no fork, no shared
thread in another namespace).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import tenacity
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkDumpInterrupted, NetlinkError
from pyroute2.netlink.rtnl.ifinfmsg import tuntap as _tuntap

from ..errors import (
    AlreadyExists,
    FailedPrecondition,
    Internal,
    NotFound,
    Unavailable,
    VmSandboxError,
)
from ._model import Address, Route
from ._netns import NetnsGone, host_netns_fd, netlink_socket_in, open_netns, opened_netns

__all__ = ["Rtnl", "Link", "Addr", "RouteEntry", "Filter", "translate", "error_code", "NetnsGone",
           "host_netns_fd", "netlink_socket_in", "open_netns", "opened_netns"]

log = logging.getLogger(__name__)

# --- kernel constants (linux/if_arp.h, if_ether.h, pkt_sched.h, rtnetlink.h, nsfs.h) -----
ARPHRD_ETHER = 1
ARPHRD_LOOPBACK = 772
IFF_UP = 0x1
ETH_P_ALL = 0x0003
TC_H_INGRESS_PARENT = 0xFFFFFFF1  # where ingress/clsact qdiscs attach
INGRESS_HANDLE = 0xFFFF0000  # "ffff:", the ingress qdisc's handle and its filters' parent
RT_TABLE_MAIN = 254
RTN_UNICAST = 1
RTPROT_KERNEL = 2
RTNH_F_ONLINK = 0x4
IFLA_TUN_TYPE_TAP = 2
_IFF_TAP = 0x0002  # linux/if_tun.h
_IFF_NO_PI = 0x1000
_IFF_TUN_EXCL = 0x8000  # fail with EBUSY instead of opening a tap that already exists
# The ioctl numbers differ between architectures; pyroute2 has the table.
_TUNSETIFF: int | None = getattr(_tuntap, "TUNSETIFF", None)
_TUNSETPERSIST: int | None = getattr(_tuntap, "TUNSETPERSIST", None)
_TC_ACT_MIRRED_EGRESS_REDIRECT = 1

REDIRECT_PRIO = 1
"""Priority of our u32 redirect filters (Kata uses 1 too); teardown removes this priority."""
# pyroute2's u32 encoder insists on a class id; the value is irrelevant because the mirred
# action steals every packet before classification would use it.
_REDIRECT_FLOWID = 0x10001


# --- errors ------------------------------------------------------------------------------
_BY_ERRNO: dict[int, type[VmSandboxError]] = {
    errno.ENODEV: NotFound,
    errno.ENOENT: NotFound,
    errno.ENXIO: NotFound,
    errno.ESRCH: NotFound,
    errno.EADDRNOTAVAIL: NotFound,
    errno.EEXIST: AlreadyExists,
    errno.ENOTEMPTY: AlreadyExists,
    errno.EBUSY: Unavailable,
    errno.EAGAIN: Unavailable,
    errno.EINTR: Unavailable,
    errno.ENOBUFS: Unavailable,
    errno.ETIMEDOUT: Unavailable,
    errno.EPERM: FailedPrecondition,
    errno.EACCES: FailedPrecondition,
    errno.EOPNOTSUPP: FailedPrecondition,
    errno.ENETUNREACH: FailedPrecondition,
}


def error_code(err: BaseException) -> int | None:
    """The errno carried by a pyroute2 or OS error, if any."""
    if isinstance(err, NetlinkError):
        return int(err.code)
    if isinstance(err, OSError):
        return err.errno
    return None


def translate(err: BaseException, what: str) -> VmSandboxError:
    """The one table from foreign errors to ours; ``what`` says what was being done where."""
    if isinstance(err, VmSandboxError):
        return err
    if isinstance(err, NetlinkDumpInterrupted):
        return Unavailable(f"{what}: the kernel kept changing the table while it was read")
    if isinstance(err, TimeoutError):
        return Unavailable(f"{what}: netlink did not answer in time")
    code = error_code(err)
    if code is not None and code > 0:
        cls = _BY_ERRNO.get(code, Internal)
        return cls(f"{what}: {os.strerror(code)} ({errno.errorcode.get(code, code)})")
    return Internal(f"{what}: {type(err).__name__}: {err}")


def _is_transient(err: BaseException) -> bool:
    if isinstance(err, NetlinkDumpInterrupted):
        return True
    return isinstance(err, NetlinkError) and err.code in (errno.EBUSY, errno.EAGAIN, errno.EINTR)


NETLINK_BUSY_RETRY = tenacity.retry(
    retry=tenacity.retry_if_exception(_is_transient),
    stop=tenacity.stop_after_attempt(6) | tenacity.stop_after_delay(3.0),
    wait=tenacity.wait_exponential(multiplier=0.02, max=0.5),
    before_sleep=tenacity.before_sleep_log(log, logging.DEBUG),
    reraise=True,
)
"""Retry a netlink request the kernel refused as busy (EBUSY/EAGAIN/EINTR) or a dump it
interrupted; such a request had no effect, so repeating it is safe."""

_T = TypeVar("_T")


@NETLINK_BUSY_RETRY
def _retrying(fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    return fn(*args, **kwargs)


# --- typed records -----------------------------------------------------------------------
@dataclass(frozen=True)
class Link:
    """One link as netlink reports it."""

    index: int
    name: str
    kind: str  # IFLA_INFO_KIND: "veth", "tun", "bridge", ... or "" (physical, loopback)
    ifi_type: int  # ARPHRD_*
    mac: str
    mtu: int
    up: bool
    master: int  # ifindex of the bridge/bond it is enslaved to, 0 if none
    tun_type: int  # IFLA_TUN_TYPE: 1 tun, 2 tap, 0 when not a tun device
    stats: dict[str, int] = field(default_factory=dict, compare=False)

    @property
    def is_tap(self) -> bool:
        return self.kind == "tun" and self.tun_type == IFLA_TUN_TYPE_TAP


@dataclass(frozen=True)
class Addr:
    """One interface address as netlink reports it."""

    index: int
    address: Address
    scope: int


@dataclass(frozen=True)
class RouteEntry:
    """One route as netlink reports it (only the fields we use)."""

    family: int
    table: int
    type: int
    protocol: int
    scope: int
    dst: str  # "" for the default route
    dst_len: int
    gateway: str
    oif: int
    priority: int
    flags: int
    multipath: bool


@dataclass(frozen=True)
class Filter:
    """One tc filter message on a link's ingress (u32 shows a few per filter)."""

    prio: int
    protocol: int
    kind: str
    redirect_to: int | None  # ifindex of a mirred egress redirect action, if any


def _link(msg: Any) -> Link:
    info = msg.get_attr("IFLA_LINKINFO")
    kind = ""
    tun_type = 0
    if info is not None:
        kind = str(info.get_attr("IFLA_INFO_KIND") or "")
        data = info.get_attr("IFLA_INFO_DATA")
        if kind == "tun" and data is not None and hasattr(data, "get_attr"):
            tun_type = int(data.get_attr("IFLA_TUN_TYPE") or 0)
    raw_stats = msg.get_attr("IFLA_STATS64") or msg.get_attr("IFLA_STATS")
    stats: dict[str, int] = {}
    if raw_stats is not None:
        for key in (
            "rx_bytes", "rx_packets", "rx_errors", "rx_dropped",
            "tx_bytes", "tx_packets", "tx_errors", "tx_dropped",
        ):  # fmt: skip
            stats[key] = int(raw_stats[key])
    return Link(
        index=int(msg["index"]),
        name=str(msg.get_attr("IFLA_IFNAME")),
        kind=kind,
        ifi_type=int(msg["ifi_type"]),
        mac=str(msg.get_attr("IFLA_ADDRESS") or "").lower(),
        mtu=int(msg.get_attr("IFLA_MTU") or 0),
        up=bool(int(msg["flags"]) & IFF_UP),
        master=int(msg.get_attr("IFLA_MASTER") or 0),
        tun_type=tun_type,
        stats=stats,
    )


def _addr(msg: Any) -> Addr:
    family = int(msg["family"])
    # For IPv4, IFA_LOCAL is the interface's own address (IFA_ADDRESS is the peer on p2p).
    text = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
    return Addr(
        index=int(msg["index"]),
        address=Address(address=str(text), prefixlen=int(msg["prefixlen"]), family=family),
        scope=int(msg["scope"]),
    )


def _route(msg: Any) -> RouteEntry:
    return RouteEntry(
        family=int(msg["family"]),
        table=int(msg.get_attr("RTA_TABLE") or msg["table"]),
        type=int(msg["type"]),
        protocol=int(msg["proto"]),
        scope=int(msg["scope"]),
        dst=str(msg.get_attr("RTA_DST") or ""),
        dst_len=int(msg["dst_len"]),
        gateway=str(msg.get_attr("RTA_GATEWAY") or ""),
        oif=int(msg.get_attr("RTA_OIF") or 0),
        priority=int(msg.get_attr("RTA_PRIORITY") or 0),
        flags=int(msg["flags"]),
        multipath=msg.get_attr("RTA_MULTIPATH") is not None,
    )


def _filter(msg: Any) -> Filter:
    info = int(msg["info"])
    redirect_to: int | None = None
    options = msg.get_attr("TCA_OPTIONS")
    actions = options.get_attr("TCA_U32_ACT") if options is not None and hasattr(options, "get_attr") else None
    if actions is not None:
        for _, act in actions["attrs"]:
            if act.get_attr("TCA_ACT_KIND") != "mirred":
                continue
            act_options = act.get_attr("TCA_ACT_OPTIONS")
            parms = act_options.get_attr("TCA_MIRRED_PARMS") if act_options is not None else None
            if parms is not None and int(parms["eaction"]) == _TC_ACT_MIRRED_EGRESS_REDIRECT:
                redirect_to = int(parms["ifindex"])
    return Filter(
        prio=info >> 16,
        protocol=socket.ntohs(info & 0xFFFF),
        kind=str(msg.get_attr("TCA_KIND") or ""),
        redirect_to=redirect_to,
    )


# --- the handle --------------------------------------------------------------------------
class Rtnl:
    """A route-netlink socket in one namespace, with typed, translated operations.

    Every method raises only :mod:`vmsandbox.errors` classes: NotFound for a missing link,
    address or qdisc, AlreadyExists for a name or address already there, Unavailable when
    the kernel stayed busy, FailedPrecondition for missing privileges, Internal otherwise.
    """

    def __init__(self, ipr: Any, where: str) -> None:
        self._ipr = ipr
        self.where = where

    @classmethod
    @contextmanager
    def host(cls) -> Iterator[Rtnl]:
        """A handle in this thread's network namespace (the host's)."""
        with cls._open("the host network namespace") as rtnl:
            yield rtnl

    @classmethod
    @contextmanager
    def netns(cls, fd: int, path: str) -> Iterator[Rtnl]:
        """A handle inside the namespace open as ``fd`` (``path`` is for messages only)."""
        with cls._open(f"network namespace {path}", fd) as rtnl:
            yield rtnl

    @classmethod
    @contextmanager
    def _open(cls, where: str, fd: int | None = None) -> Iterator[Rtnl]:
        try:
            # groups=0: no multicast subscription, so no event can fill the socket buffer
            # between requests. pyroute2 owns (and closes) a socket handed over as fileno.
            if fd is None:
                ipr = IPRoute(groups=0)
            else:
                sock = netlink_socket_in(fd)
                try:
                    ipr = IPRoute(fileno=sock.fileno(), groups=0)
                except BaseException:
                    sock.close()
                    raise
                sock.detach()
        except Exception as e:  # the adapter edge: anything pyroute2 raises is translated
            raise translate(e, f"opening a netlink socket in {where}") from e
        try:
            yield cls(ipr, where)
        finally:
            ipr.close()

    def _call(self, what: str, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return _retrying(getattr(self._ipr, method), *args, **kwargs)
        except Exception as e:  # the adapter edge: anything pyroute2 raises is translated
            raise translate(e, f"{what} in {self.where}") from e

    # links
    def links(self) -> list[Link]:
        return sorted((_link(m) for m in self._call("listing links", "link", "dump")), key=lambda x: x.index)

    def link(self, name: str) -> Link | None:
        try:
            msgs = self._call(f"looking up {name}", "link", "get", ifname=name)
        except NotFound:
            return None
        return _link(msgs[0]) if msgs else None

    def add_tap(self, name: str) -> None:
        """A new persistent tap in the calling thread's namespace (the host's: call it on
        :meth:`host`). AlreadyExists when the name is taken, even by a tap made a moment ago:
        TUNSETIFF without IFF_TUN_EXCL (what pyroute2 and ``ip tuntap`` send) would open
        an existing tap instead of failing."""
        if _TUNSETIFF is None or _TUNSETPERSIST is None:
            raise FailedPrecondition(f"creating tap {name}: pyroute2 knows no tun ioctls for this architecture")
        # IFF_NO_PI like `ip tuntap add mode tap`; the opener (libvirt) sets its own flags.
        ifr = struct.pack("16sH", name.encode("ascii"), _IFF_TAP | _IFF_NO_PI | _IFF_TUN_EXCL)
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
            try:
                fcntl.ioctl(fd, _TUNSETIFF, ifr)
                fcntl.ioctl(fd, _TUNSETPERSIST, 1)
            finally:
                os.close(fd)
        except OSError as e:
            if e.errno == errno.EBUSY:
                raise AlreadyExists(f"creating tap {name} in {self.where}: a tap of that name exists") from e
            raise translate(e, f"creating tap {name} in {self.where}") from e

    def delete_link(self, link: Link) -> None:
        self._call(f"deleting {link.name}", "link", "del", index=link.index)

    def move_link(self, link: Link, netns_fd: int, target: str) -> None:
        self._call(f"moving {link.name} to {target}", "link", "set", index=link.index, net_ns_fd=netns_fd)

    def set_link(self, link: Link, *, mtu: int) -> None:
        self._call(f"setting {link.name} up with MTU {mtu}", "link", "set", index=link.index, mtu=mtu, state="up")

    # addresses and routes
    def addresses(self) -> list[Addr]:
        return [_addr(m) for m in self._call("listing addresses", "addr", "dump")]

    def add_address(self, link: Link, address: Address) -> None:
        self._call(
            f"adding {address} to {link.name}",
            "addr",
            "add",
            index=link.index,
            address=address.address,
            prefixlen=address.prefixlen,
            family=address.family,
        )

    def delete_address(self, link: Link, address: Address) -> None:
        self._call(
            f"removing {address} from {link.name}",
            "addr",
            "del",
            index=link.index,
            address=address.address,
            prefixlen=address.prefixlen,
            family=address.family,
        )

    def routes(self) -> list[RouteEntry]:
        return [_route(m) for m in self._call("listing routes", "route", "dump")]

    def add_route(self, link: Link, route: Route) -> None:
        spec = self._route_spec(link, route)
        self._call(f"adding route {route.destination} via {link.name}", "route", "add", **spec)

    def delete_route(self, link: Link, route: Route) -> None:
        spec = self._route_spec(link, route)
        self._call(f"removing route {route.destination} via {link.name}", "route", "del", **spec)

    @staticmethod
    def _route_spec(link: Link, route: Route) -> dict[str, Any]:
        spec: dict[str, Any] = {"family": route.family, "oif": link.index, "scope": route.scope}
        if not route.is_default:
            spec["dst"] = route.destination
        if route.gateway:
            spec["gateway"] = route.gateway
        if route.metric:
            spec["priority"] = route.metric
        if route.onlink:
            spec["flags"] = RTNH_F_ONLINK
        return spec

    # tc
    def ingress_qdisc(self, link: Link) -> str | None:
        """The kind of the qdisc at ``link``'s ingress hook ("ingress", "clsact"), or None."""
        for msg in self._call(f"listing qdiscs of {link.name}", "get_qdiscs", index=link.index):
            if int(msg["index"]) == link.index and int(msg["parent"]) == TC_H_INGRESS_PARENT:
                return str(msg.get_attr("TCA_KIND"))
        return None

    def add_ingress(self, link: Link) -> None:
        self._call(f"adding an ingress qdisc to {link.name}", "tc", "add", "ingress", link.index)

    def delete_ingress(self, link: Link) -> None:
        self._call(f"removing the ingress qdisc of {link.name}", "tc", "del", "ingress", link.index)

    def ingress_filters(self, link: Link) -> list[Filter]:
        msgs = self._call(
            f"listing ingress filters of {link.name}", "get_filters", index=link.index, parent=INGRESS_HANDLE
        )
        return [_filter(m) for m in msgs]

    def add_redirect(self, link: Link, target: Link) -> None:
        """``tc filter add dev LINK parent ffff: protocol all prio 1 u32 match u8 0 0
        action mirred egress redirect dev TARGET``."""
        self._call(
            f"redirecting {link.name} ingress to {target.name}",
            "tc",
            "add-filter",
            "u32",
            link.index,
            parent=INGRESS_HANDLE,
            protocol=ETH_P_ALL,
            prio=REDIRECT_PRIO,
            keys=["0x0/0x0+0"],
            target=_REDIRECT_FLOWID,
            action={"kind": "mirred", "direction": "egress", "action": "redirect", "ifindex": target.index},
        )

    def delete_filters(self, link: Link, prio: int, protocol: int) -> None:
        # No kind: pyroute2's u32 plugin would demand a match to encode; the kernel deletes
        # by (parent, prio, protocol) alone.
        self._call(
            f"removing ingress filters of {link.name} at priority {prio}",
            "tc",
            "del-filter",
            index=link.index,
            parent=INGRESS_HANDLE,
            info=(prio << 16) | socket.htons(protocol),
        )
