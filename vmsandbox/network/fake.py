"""An in-memory network for the unit tier: the Network port with failpoints.

A namespace is registered with the plan :func:`inspect_netns` should find in it
(:meth:`FakeNetwork.add_netns`). Taps live in the host (``host_taps``) until attached, then
in their namespace; attaching takes the interfaces' addresses away and detaching with a plan
gives them back, so a test can see what the real adapter would leave behind.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from .._failpoints import Failpoints
from ..errors import AlreadyExists, InvalidArgument, NotFound
from ._model import InterfaceCounters, NetworkPlan
from ._names import check_tap_names, tap_names

__all__ = ["FakeNetwork", "FakeNetns"]


@dataclass
class FakeNetns:
    plan: NetworkPlan
    taps: set[str] = field(default_factory=set)
    has_addresses: bool = True


class FakeNetwork:
    def __init__(self) -> None:
        self.netns: dict[str, FakeNetns] = {}
        self.host_taps: set[str] = set()
        self.fp = Failpoints()
        self._lock = threading.Lock()

    def add_netns(self, plan: NetworkPlan) -> None:
        self.netns[plan.netns_path] = FakeNetns(plan)

    def all_taps(self) -> set[str]:
        """Every tap anywhere (host and namespaces): what a leak check looks at."""
        with self._lock:
            return set(self.host_taps).union(*(ns.taps for ns in self.netns.values()))

    # --- the port -------------------------------------------------------------------------------
    def inspect_netns(self, netns_path: str) -> NetworkPlan:
        self.fp.hit("inspect_netns")
        ns = self.netns.get(netns_path)
        if ns is None:
            raise InvalidArgument(f"network namespace {netns_path} does not exist")
        return ns.plan

    def tap_names(self, sandbox_id: str, count: int) -> list[str]:
        return tap_names(sandbox_id, count)

    def create_taps(self, names: list[str]) -> None:
        taps = check_tap_names(names)
        self.fp.hit("create_taps")
        with self._lock:
            # Like the real one: a name taken in the host namespace is refused, all or nothing.
            taken = [t for t in taps if t in self.host_taps]
            if taken:
                raise AlreadyExists(f"tap {taken[0]} already exists in the host namespace: not ours to adopt")
            self.host_taps.update(taps)

    def attach(self, plan: NetworkPlan, taps: list[str]) -> None:
        taps = check_tap_names(taps)
        self.fp.hit("attach")
        with self._lock:
            ns = self.netns.get(plan.netns_path)
            if ns is None:
                raise NotFound(f"network namespace {plan.netns_path} is gone")
            missing = [t for t in taps if t not in self.host_taps and t not in ns.taps]
            if missing:
                raise NotFound(f"tap(s) {', '.join(missing)} not found")
            self.host_taps.difference_update(taps)
            ns.taps.update(taps)
            ns.has_addresses = False

    def detach(self, netns_path: str, taps: list[str], plan: NetworkPlan | None = None) -> None:
        taps = check_tap_names(taps)
        self.fp.hit("detach")
        if plan is not None and plan.netns_path != netns_path:
            raise InvalidArgument(f"the plan is for {plan.netns_path}, not {netns_path}")
        with self._lock:
            self.host_taps.difference_update(taps)
            ns = self.netns.get(netns_path)
            if ns is not None:
                ns.taps.difference_update(taps)
                if plan is not None:
                    ns.has_addresses = True

    def read_counters(self, netns_path: str, names: list[str]) -> dict[str, InterfaceCounters]:
        self.fp.hit("read_counters")
        return {n: InterfaceCounters(n, 1000, 10, 0, 0, 2000, 20, 0, 0) for n in names}
