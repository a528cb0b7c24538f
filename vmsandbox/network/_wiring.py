"""Wiring a guest into a CNI-prepared network namespace, Kata "tcfilter" style.

The VMM runs in the host namespace, so its taps are created there (:func:`create_taps`),
opened by QEMU through libvirt, then moved into the sandbox namespace (:func:`attach`),
where tc ingress redirects glue each tap to the CNI interface whose MAC and addresses the
guest takes over. :func:`detach` undoes all of it and gives the addresses back so that CNI
DEL finds what CNI ADD made.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from collections.abc import Callable, Sequence
from contextlib import ExitStack

from ..errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, VmSandboxError
from ._model import Address, Interface, InterfaceCounters, NetworkPlan, Route, check_ifname
from ._names import check_tap_names
from ._netlink import (
    ARPHRD_ETHER,
    ETH_P_ALL,
    REDIRECT_PRIO,
    RT_TABLE_MAIN,
    RTN_UNICAST,
    RTNH_F_ONLINK,
    RTPROT_KERNEL,
    Addr,
    Link,
    NetnsGone,
    RouteEntry,
    Rtnl,
    host_netns_fd,
    open_netns,
    opened_netns,
)

log = logging.getLogger(__name__)

__all__ = ["inspect_netns", "create_taps", "attach", "detach", "read_counters"]

# Ethernet-like kinds that are not endpoints a guest could take over.
_NOT_GUEST_KINDS = frozenset({"tun", "bridge", "bond", "team", "ifb", "openvswitch", "vrf"})


# --- planning ----------------------------------------------------------------------------
def _is_guest_interface(link: Link) -> bool:
    return (
        link.ifi_type == ARPHRD_ETHER
        and link.kind not in _NOT_GUEST_KINDS
        and link.master == 0  # a bridge or bond port carries no addresses of its own
    )


def _is_flushable(addr: Addr) -> bool:
    """IPv4 addresses and non-link-local IPv6 ones: those the guest takes over."""
    a = addr.address
    return a.family == socket.AF_INET or not ipaddress.ip_address(a.address).is_link_local


def _destination(r: RouteEntry) -> str:
    if r.dst_len == 0:
        return "default"
    return str(ipaddress.ip_network(f"{r.dst}/{r.dst_len}", strict=False))


def _plan_routes(routes: list[RouteEntry], names: dict[int, str]) -> list[Route]:
    """Main-table unicast routes leaving by ``names``' links, except what addresses imply."""
    result: list[Route] = []
    for r in routes:
        if r.table != RT_TABLE_MAIN or r.type != RTN_UNICAST or r.protocol == RTPROT_KERNEL:
            continue
        if r.multipath:
            log.warning("ignoring multipath route to %s: not supported", _destination(r))
            continue
        if r.oif not in names or r.family not in (socket.AF_INET, socket.AF_INET6):
            continue
        destination = _destination(r)
        if r.family == socket.AF_INET6 and destination != "default" and ipaddress.ip_network(destination).is_link_local:
            continue  # fe80::/64 and friends: every IPv6 interface has its own
        result.append(
            Route(
                destination=destination,
                gateway=r.gateway,
                family=r.family,
                device=names[r.oif],
                metric=r.priority,
                scope=r.scope,
                onlink=bool(r.flags & RTNH_F_ONLINK),
            )
        )
    # Routes without next hop first: a gateway may only be reachable through one of them.
    return sorted(result, key=lambda route: route.gateway != "")


def inspect_netns(netns_path: str) -> NetworkPlan:
    """Read the namespace at ``netns_path`` and return what the guest must configure.

    Interfaces are the Ethernet-like links (veth, macvlan, ...) other than loopback, our
    taps, bridges, bonds and their ports, in ifindex order, with MAC, MTU, IPv4 and
    non-link-local IPv6 addresses; routes as described on :class:`NetworkPlan`. Read-only:
    call it before :func:`attach` to make the plan, and persist the plan, since after
    attach the interfaces have no addresses left (calling it then is harmless, but
    returns them without addresses or routes).

    Raises InvalidArgument naming the path when it is relative, missing, not a network
    namespace (a directory, a regular file), unreadable, the host's own namespace, or has
    no usable interface; Unavailable/Internal when netlink fails.
    """
    with opened_netns(netns_path) as fd, Rtnl.netns(fd, netns_path) as ns:
        links = ns.links()
        addrs = ns.addresses()
        routes = ns.routes()
    chosen = [link for link in links if _is_guest_interface(link)]
    if not chosen:
        present = ", ".join(link.name for link in links) or "none"
        raise InvalidArgument(
            f"network namespace {netns_path} has no interface a guest can take over (links: {present})"
        )
    interfaces = tuple(
        Interface(
            name=link.name,
            mac=link.mac,
            mtu=link.mtu,
            addresses=tuple(a.address for a in addrs if a.index == link.index and _is_flushable(a)),
        )
        for link in chosen
    )
    names = {link.index: link.name for link in chosen}
    return NetworkPlan(netns_path=netns_path, interfaces=interfaces, routes=tuple(_plan_routes(routes, names)))


# --- taps in the host namespace ----------------------------------------------------------
def create_taps(names: list[str]) -> None:
    """Create persistent taps called ``names`` in the host namespace (down, no owner: only
    a process with CAP_NET_ADMIN, such as libvirtd, can open them).

    All or nothing: a name that already exists is refused, never adopted (it may be another
    sandbox's tap, or anybody's link), and the taps this call made are deleted again before
    any error is raised. So a retry after a failed call starts from scratch; the caller
    removes what a successful call made (:func:`detach`) when its own later steps fail.
    Raises InvalidArgument for names :func:`tap_names` would not make, AlreadyExists naming
    the first name that is taken (by a tap or any other link), FailedPrecondition without
    CAP_NET_ADMIN, Unavailable/Internal otherwise.
    """
    taps = check_tap_names(names)
    with Rtnl.host() as host, ExitStack() as undo:
        for name in taps:
            existing = host.link(name)
            if existing is not None:
                kind = "tap" if existing.is_tap else (existing.kind or "link")
                raise AlreadyExists(f"{name} already exists in the host namespace (a {kind}): not ours to adopt")
            host.add_tap(name)
            created = host.link(name)
            if created is None:
                raise NotFound(f"tap {name} vanished right after it was created")
            undo.callback(_best_effort, f"deleting tap {name}", host.delete_link, created)
            log.debug("created tap %s in the host namespace", name)
        undo.pop_all()


# --- attach ------------------------------------------------------------------------------
def _best_effort(what: str, fn: Callable[..., object], *args: object) -> None:
    """Run one undo step; log instead of raising, so the original error surfaces."""
    try:
        fn(*args)
    except (NotFound, AlreadyExists):
        pass
    except VmSandboxError as e:
        log.warning("rollback: %s failed: %s", what, e)


def _ensure_redirect(ns: Rtnl, src: Link, dst: Link, undo: ExitStack) -> None:
    """Make ``src``'s ingress traffic leave by ``dst``, registering how to take it back."""
    qdisc = ns.ingress_qdisc(src)
    if qdisc is None:
        ns.add_ingress(src)
        undo.callback(_best_effort, f"removing the ingress qdisc of {src.name}", ns.delete_ingress, src)
    elif qdisc != "ingress":
        raise FailedPrecondition(f"{src.name} in {ns.where} already has a {qdisc} qdisc at its ingress")
    ours = [f for f in ns.ingress_filters(src) if f.prio == REDIRECT_PRIO]
    if any(f.kind == "u32" and f.redirect_to == dst.index for f in ours):
        return
    if ours:  # stale, e.g. aimed at a tap that was deleted and created again
        ns.delete_filters(src, REDIRECT_PRIO, ETH_P_ALL)
    ns.add_redirect(src, dst)
    if qdisc is not None:  # otherwise deleting the qdisc takes the filter with it
        undo.callback(
            _best_effort, f"removing the redirect of {src.name}", ns.delete_filters, src, REDIRECT_PRIO, ETH_P_ALL
        )


def _restore(ns: Rtnl, link: Link, addresses: Sequence[Address], routes: Sequence[Route]) -> list[VmSandboxError]:
    """Give ``link`` its addresses, then its routes, back; return what failed (not what was
    already there). A route whose gateway has become unreachable is logged, not returned."""
    errors: list[VmSandboxError] = []
    for address in addresses:
        try:
            ns.add_address(link, address)
        except AlreadyExists:
            pass
        except VmSandboxError as e:
            errors.append(e)
    for route in routes:
        try:
            ns.add_route(link, route)
        except AlreadyExists:
            pass
        except VmSandboxError as e:
            log.warning("could not restore route %s via %s: %s", route.destination, link.name, e)
    return errors


def _restore_best_effort(ns: Rtnl, link: Link, addresses: Sequence[Address], routes: Sequence[Route]) -> None:
    for e in _restore(ns, link, addresses, routes):
        log.warning("rollback: %s", e)


def _check_wiring(plan: NetworkPlan, taps: list[str]) -> list[str]:
    if not isinstance(plan, NetworkPlan):
        raise InvalidArgument(f"plan must be a NetworkPlan, not {type(plan).__name__}")
    taps = check_tap_names(taps)
    if len(taps) != len(plan.interfaces):
        raise InvalidArgument(
            f"{len(taps)} taps for the {len(plan.interfaces)} interfaces of {plan.netns_path}: need one each"
        )
    return taps


def attach(plan: NetworkPlan, taps: list[str]) -> None:
    """Wire ``taps[i]`` to ``plan.interfaces[i]`` inside ``plan.netns_path``.

    Preconditions: the taps exist in the host namespace (normally already opened by QEMU)
    or, from an earlier call, in the namespace; the interfaces still have the plan's MACs.
    Moves each tap into the namespace, sets its MTU to its interface's and brings it up,
    adds an ingress qdisc and a u32 match-all ``mirred egress redirect`` filter each way,
    then removes the interfaces' IPv4 and non-link-local IPv6 addresses and the routes
    through them (the guest installs both from the plan).

    Idempotent: a second call finds everything in place and changes nothing. On failure,
    what this call did is undone (taps go back to the host namespace) and the error raised:
    InvalidArgument for a bad plan, tap list or namespace path, NotFound for a missing tap
    or interface, FailedPrecondition when an interface's MAC changed or its ingress is
    taken by another qdisc, Unavailable/Internal when netlink fails.
    """
    taps = _check_wiring(plan, taps)
    path = plan.netns_path
    with (
        opened_netns(path) as fd,
        host_netns_fd() as host_fd,
        Rtnl.host() as host,
        Rtnl.netns(fd, path) as ns,
        ExitStack() as undo,
    ):
        pairs: list[tuple[Interface, Link, Link]] = []
        for iface, tap in zip(plan.interfaces, taps):
            link = ns.link(iface.name)
            if link is None:
                raise NotFound(f"interface {iface.name} is not in network namespace {path}")
            if link.mac != iface.mac:
                raise FailedPrecondition(
                    f"{iface.name} in {path} has MAC {link.mac}, the plan says {iface.mac}: the plan is stale"
                )
            pairs.append((iface, link, _take_tap(host, ns, tap, fd, host_fd, undo)))

        for iface, link, tap_link in pairs:
            if tap_link.mtu != iface.mtu or not tap_link.up:
                ns.set_link(tap_link, mtu=iface.mtu)
        for _, link, tap_link in pairs:
            _ensure_redirect(ns, link, tap_link, undo)
            _ensure_redirect(ns, tap_link, link, undo)

        addrs = ns.addresses()
        routes = ns.routes()
        for _, link, _ in pairs:
            flush = [a.address for a in addrs if a.index == link.index and _is_flushable(a)]
            lost_routes = _plan_routes(routes, {link.index: link.name})
            if not flush and not lost_routes:
                continue
            undo.callback(_restore_best_effort, ns, link, flush, lost_routes)
            for address in flush:
                try:
                    ns.delete_address(link, address)
                except NotFound:
                    pass  # a secondary IPv4 address goes with its primary
            # IPv4 routes die with their addresses; IPv6 ones through a gateway outlive them.
            for route in _plan_routes(ns.routes(), {link.index: link.name}):
                try:
                    ns.delete_route(link, route)
                except NotFound:
                    pass
        undo.pop_all()
    log.info("attached %s to %s in %s", ", ".join(taps), ", ".join(i.name for i in plan.interfaces), path)


def _take_tap(host: Rtnl, ns: Rtnl, name: str, fd: int, host_fd: int, undo: ExitStack) -> Link:
    """The tap ``name`` inside the namespace, moving it there from the host if needed."""
    link = ns.link(name)
    if link is not None:
        if not link.is_tap:
            raise FailedPrecondition(f"{name} in {ns.where} is a {link.kind or 'link'}, not our tap")
        return link
    outside = host.link(name)
    if outside is None or not outside.is_tap:
        raise NotFound(f"tap {name} is neither in the host namespace nor in {ns.where}: create_taps() first")
    host.move_link(outside, fd, ns.where)
    moved = ns.link(name)
    if moved is None:
        raise NotFound(f"tap {name} vanished while it moved to {ns.where}")
    undo.callback(_best_effort, f"moving {name} back to the host", ns.move_link, moved, host_fd, "the host")
    return moved


# --- detach ------------------------------------------------------------------------------
def detach(netns_path: str, taps: list[str], plan: NetworkPlan | None = None) -> None:
    """Undo :func:`create_taps` and :func:`attach`, whatever part of them happened.

    Deletes the taps wherever they are (host namespace or ``netns_path``). In the
    namespace, if it still exists: removes our redirect filters, and the ingress qdiscs
    left empty, from the plan's interfaces (without a plan: from every interface whose
    redirect points at one of the taps or at a link that no longer exists), then gives the
    plan's interfaces their addresses and routes back so that CNI DEL sees its own config.

    Idempotent and tolerant: a missing namespace, tap, filter or address is not an error.
    Every step is tried; the first failure is raised at the end (Unavailable/Internal), the
    others logged. Raises InvalidArgument before doing anything for bad tap names, a
    relative path, the host's own namespace, or a plan for another namespace.
    """
    taps = check_tap_names(taps)
    if plan is not None:
        if not isinstance(plan, NetworkPlan):
            raise InvalidArgument(f"plan must be a NetworkPlan or None, not {type(plan).__name__}")
        if plan.netns_path != netns_path:
            raise InvalidArgument(f"the plan is for {plan.netns_path}, not {netns_path}")
    try:
        fd: int | None = open_netns(netns_path)
    except NetnsGone as e:
        log.debug("detach: nothing to undo inside: %s", e)
        fd = None
    errors: list[VmSandboxError] = []
    try:
        if fd is not None:
            with Rtnl.netns(fd, netns_path) as ns:
                errors += _detach_in_netns(ns, taps, plan)
    except VmSandboxError as e:
        errors.append(e)
    finally:
        if fd is not None:
            os.close(fd)
    try:
        with Rtnl.host() as host:
            errors += _delete_taps(host, taps)
    except VmSandboxError as e:
        errors.append(e)
    if errors:
        for other in errors[1:]:
            log.warning("detach from %s: also failed: %s", netns_path, other)
        raise errors[0]
    log.info("detached %s from %s", ", ".join(taps) or "no taps", netns_path)


def _delete_taps(rtnl: Rtnl, taps: list[str]) -> list[VmSandboxError]:
    errors: list[VmSandboxError] = []
    for name in taps:
        try:
            link = rtnl.link(name)
            if link is not None and link.is_tap:
                rtnl.delete_link(link)
        except NotFound:
            pass
        except VmSandboxError as e:
            errors.append(e)
    return errors


def _detach_in_netns(ns: Rtnl, taps: list[str], plan: NetworkPlan | None) -> list[VmSandboxError]:
    errors: list[VmSandboxError] = []
    links = ns.links()
    by_name = {link.name: link for link in links}
    tap_indexes = {link.index for link in links if link.name in taps and link.is_tap}
    known = {link.index for link in links}
    if plan is not None:
        candidates = [by_name[i.name] for i in plan.interfaces if i.name in by_name]
    else:
        candidates = [link for link in links if _is_guest_interface(link) and link.index not in tap_indexes]

    for link in candidates:
        try:
            _remove_redirect(ns, link, None if plan is not None else tap_indexes, known)
        except NotFound:
            pass
        except VmSandboxError as e:
            errors.append(e)

    errors += _delete_taps(ns, taps)

    if plan is not None:
        for iface in plan.interfaces:
            owner = by_name.get(iface.name)
            if owner is None:
                continue  # CNI or the runtime deleted it already
            routes = [r for r in plan.routes if r.device == iface.name]
            errors += _restore(ns, owner, iface.addresses, routes)
    return errors


def _remove_redirect(ns: Rtnl, link: Link, targets: set[int] | None, known: set[int]) -> None:
    """Remove our redirect from ``link``'s ingress, and the ingress qdisc if left empty.

    ``targets`` None: any redirect at our priority is ours (the plan named the link);
    otherwise only one aimed at ``targets`` or at a link that no longer exists.
    """
    if ns.ingress_qdisc(link) != "ingress":
        return
    filters = ns.ingress_filters(link)
    ours = [
        f
        for f in filters
        if f.prio == REDIRECT_PRIO
        and f.kind == "u32"
        and f.redirect_to is not None
        and (targets is None or f.redirect_to in targets or f.redirect_to not in known)
    ]
    if not ours:
        return
    ns.delete_filters(link, REDIRECT_PRIO, ETH_P_ALL)
    if not ns.ingress_filters(link):
        ns.delete_ingress(link)


# --- counters ----------------------------------------------------------------------------
def read_counters(netns_path: str, names: list[str]) -> dict[str, InterfaceCounters]:
    """Traffic counters of the interfaces ``names`` (taps or CNI links), read inside
    ``netns_path`` because libvirt cannot see a tap that left the host namespace.

    For a tap, rx is what the guest sent: see :meth:`InterfaceCounters.swapped`. Returns
    one entry per name, in order. Raises InvalidArgument for a bad name or path, NotFound
    when the namespace or an interface does not exist, Unavailable/Internal otherwise.
    """
    if isinstance(names, str):
        raise InvalidArgument(f"interface names must be a list, not the string {names!r}")
    wanted = [check_ifname(n) for n in names]
    try:
        with opened_netns(netns_path) as fd, Rtnl.netns(fd, netns_path) as ns:
            links = {link.name: link for link in ns.links()}
    except NetnsGone as e:
        raise NotFound(str(e)) from e
    result: dict[str, InterfaceCounters] = {}
    for name in wanted:
        found = links.get(name)
        if found is None:
            raise NotFound(f"no interface {name} in network namespace {netns_path}")
        s = found.stats
        result[name] = InterfaceCounters(
            name=name,
            rx_bytes=s.get("rx_bytes", 0),
            rx_packets=s.get("rx_packets", 0),
            rx_errors=s.get("rx_errors", 0),
            rx_dropped=s.get("rx_dropped", 0),
            tx_bytes=s.get("tx_bytes", 0),
            tx_packets=s.get("tx_packets", 0),
            tx_errors=s.get("tx_errors", 0),
            tx_dropped=s.get("tx_dropped", 0),
        )
    return result
