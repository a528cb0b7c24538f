"""An in-memory hypervisor for the unit tier: the Hypervisor port with failpoints.

Domains are kept by name with the XML they were defined from; lifecycle events go to the
``on_stop`` callback like libvirt's (optionally late, twice, or never: ``events``). A guest
powering itself off is :meth:`FakeHypervisor.guest_poweroff`; ``unreachable = True``
makes every call raise Unavailable, as a libvirtd that went away.
"""

from __future__ import annotations

import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any as _Any

from .._failpoints import Failpoints
from ..errors import AlreadyExists, FailedPrecondition, NotFound, Unavailable
from ..sandbox.ports import DomainInfo, DomainState, StopReason
from .domain import parse_metadata

__all__ = ["FakeHypervisor", "FakeDomain"]


@dataclass
class FakeDomain:
    name: str
    xml: str
    state: DomainState = DomainState.SHUTOFF
    stop_reason: StopReason = StopReason.UNKNOWN
    pid: int = 0
    memory_mib: int = 0
    starts: int = 0
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def agent_socket(self) -> str:
        el = ET.fromstring(self.xml).find("devices/channel/source")
        return el.get("path", "") if el is not None else ""


class FakeHypervisor:
    """``FakeHypervisor(on_stop, on_reconnect)``; see the module docstring."""

    def __init__(self, on_stop: Callable[[str, StopReason], None] | None = None,
                 on_reconnect: Callable[[], None] | None = None) -> None:
        self.on_stop, self.on_reconnect = on_stop, on_reconnect
        self.domains: dict[str, FakeDomain] = {}
        self.fp = Failpoints()
        self.unreachable = False
        self.events = "now"  # now | twice | never | manual (queued in self.pending)
        self.pending: list[tuple[str, StopReason]] = []
        self.closed = False
        self._lock = threading.RLock()
        self._next_pid = 4000

    def factory(self, on_stop: Callable[[str, StopReason], None], on_reconnect: Callable[[], None]) -> FakeHypervisor:
        """The HypervisorFactory: the same fake for every controller made from it."""
        self.on_stop, self.on_reconnect = on_stop, on_reconnect
        self.closed = False
        return self

    def _enter(self, step: str) -> None:
        if self.unreachable:
            raise Unavailable(f"{step}: the fake hypervisor is unreachable")
        self.fp.hit(step)

    def _get(self, name: str) -> FakeDomain:
        d = self.domains.get(name)
        if d is None:
            raise NotFound(f"domain {name} not found")
        return d

    def _stopped(self, d: FakeDomain, reason: StopReason) -> None:
        d.state, d.stop_reason, d.pid = DomainState.SHUTOFF, reason, 0
        if self.events == "never" or self.on_stop is None:
            return
        if self.events == "manual":
            self.pending.append((d.name, reason))
            return
        self.on_stop(d.name, reason)
        if self.events == "twice":
            self.on_stop(d.name, reason)

    def deliver_pending(self) -> None:
        """Send the events held back with ``events = "manual"`` (late events)."""
        pending, self.pending = self.pending, []
        for name, reason in pending:
            assert self.on_stop is not None
            self.on_stop(name, reason)

    # --- the port --------------------------------------------------------------------------
    def define(self, xml: str) -> None:
        self._enter("define")
        root = ET.fromstring(xml)
        name = root.findtext("name") or ""
        mem = root.find("currentMemory")
        with self._lock:
            if name in self.domains and self.domains[name].state is not DomainState.SHUTOFF:
                raise AlreadyExists(f"domain {name} is running")
            self.domains[name] = FakeDomain(name, xml, memory_mib=int(mem.text or 0) // 1024 if mem is not None else 0,
                                            metadata=parse_metadata(xml))

    def start(self, name: str) -> None:
        self._enter("start")
        with self._lock:
            d = self._get(name)
            if d.state is not DomainState.SHUTOFF:
                raise FailedPrecondition(f"domain {name} is already running")
            self._next_pid += 1
            d.state, d.pid, d.starts = DomainState.RUNNING, self._next_pid, d.starts + 1

    def destroy(self, name: str) -> None:
        self._enter("destroy")
        with self._lock:
            d = self.domains.get(name)
            if d is None or d.state is DomainState.SHUTOFF:
                return
            self._stopped(d, StopReason.DESTROYED)

    def undefine(self, name: str) -> None:
        self._enter("undefine")
        with self._lock:
            d = self.domains.get(name)
            if d is not None and d.state is not DomainState.SHUTOFF:
                raise FailedPrecondition(f"domain {name} is running")
            self.domains.pop(name, None)

    def info(self, name: str) -> DomainInfo | None:
        self._enter("info")
        with self._lock:
            d = self.domains.get(name)
            return None if d is None else DomainInfo(d.name, d.state, d.stop_reason, dict(d.metadata))

    def list_tagged(self) -> list[DomainInfo]:
        self._enter("list_tagged")
        with self._lock:
            return [DomainInfo(d.name, d.state, d.stop_reason, dict(d.metadata))
                    for d in self.domains.values() if d.metadata]

    def xml(self, name: str) -> str:
        self._enter("xml")
        return self._get(name).xml

    def pid(self, name: str) -> int:
        self._enter("pid")
        return self._get(name).pid

    def stats(self, names: list[str]) -> dict[str, dict[str, _Any]]:
        self._enter("stats")
        with self._lock:
            return {n: {"cpu.time": 5_000_000_000, "balloon.current": self.domains[n].memory_mib * 1024,
                        "balloon.rss": 100 * 1024}
                    for n in names if n in self.domains and self.domains[n].state is DomainState.RUNNING}

    def set_memory(self, name: str, mib: int) -> None:
        self._enter("set_memory")
        with self._lock:
            self._get(name).memory_mib = mib

    def close(self) -> None:
        self.closed = True

    # --- what happens to a VM on its own ---------------------------------------------------------
    def guest_poweroff(self, name: str) -> None:
        """The guest powered itself off (or was told to by its agent)."""
        with self._lock:
            d = self._get(name)
            if d.state is not DomainState.SHUTOFF:
                self._stopped(d, StopReason.SHUTDOWN)

    def crash(self, name: str) -> None:
        with self._lock:
            d = self._get(name)
            if d.state is not DomainState.SHUTOFF:
                self._stopped(d, StopReason.CRASHED)

    def by_socket(self, socket_path: str) -> FakeDomain | None:
        with self._lock:
            return next((d for d in self.domains.values() if d.agent_socket == socket_path), None)
