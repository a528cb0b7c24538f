"""Guest networking: the only part of vmsandbox that imports pyroute2 (netns, tap, tc).

A sandbox's guest takes over the interfaces CNI prepared in a network namespace, the way
Kata's "tcfilter" mode does, while QEMU runs in the host namespace under libvirtd:

1. :func:`inspect_netns` reads the namespace into a :class:`NetworkPlan`. Persist it
   (``to_json``): step 4 removes the addresses it records.
2. :func:`tap_names` + :func:`create_taps` make one persistent tap per plan interface in
   the host namespace; libvirt gets each as ``<interface type='ethernet'><target dev='T'
   managed='no'/>`` with the MAC of its plan interface.
3. Once QEMU has opened the taps, :func:`attach` moves them into the namespace and
   redirects traffic between each tap and its interface both ways with tc;
4. it then removes the interfaces' addresses and routes, which the guest configures
   from the plan.
5. :func:`detach` undoes steps 2-4 and gives the addresses back; :func:`read_counters`
   reads interface counters inside the namespace.

The functions block (netlink round trips, and a short-lived thread per namespace handle
that makes its socket inside the namespace; nothing forks): call them from worker threads, never from a
thread that is running an asyncio loop. Errors are :mod:`vmsandbox.errors` classes;
nothing from pyroute2 escapes.
"""

from __future__ import annotations

from ._model import Address, Interface, InterfaceCounters, NetworkPlan, Route
from ._names import TAP_PREFIX, tap_names
from ._wiring import attach, create_taps, detach, inspect_netns, read_counters


class NetlinkNetwork:
    """The network port of :mod:`vmsandbox.sandbox.ports` over this package's functions."""

    inspect_netns = staticmethod(inspect_netns)
    tap_names = staticmethod(tap_names)
    create_taps = staticmethod(create_taps)
    attach = staticmethod(attach)
    detach = staticmethod(detach)
    read_counters = staticmethod(read_counters)


__all__ = [
    "NetlinkNetwork",
    "Address",
    "Route",
    "Interface",
    "NetworkPlan",
    "InterfaceCounters",
    "TAP_PREFIX",
    "tap_names",
    "inspect_netns",
    "create_taps",
    "attach",
    "detach",
    "read_counters",
]
