"""An in-memory hypervisor for the unit tier: the Hypervisor port with failpoints.

Domains are kept by name with the XML they were defined from. Each controller gets its own
connection from :meth:`FakeHypervisor.factory` (like one libvirt connection per process);
lifecycle events go to the ``on_stop`` callback of every open connection, like libvirt's
(optionally late, twice, or never: ``events``), and a closed connection gets none. A guest
powering itself off is :meth:`FakeHypervisor.guest_poweroff`; a start cut short while QEMU
still holds the new domain paused is :meth:`FakeHypervisor.pause`; ``unreachable = True``
makes every call raise Unavailable, as a libvirtd that went away.
"""

from __future__ import annotations

import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any as _Any

from .._failpoints import Failpoints
from ..errors import AlreadyExists, FailedPrecondition, NotFound, Unavailable
from ..sandbox.ports import DomainInfo, DomainState, StopReason
from .domain import parse_metadata, plan_memory_change
from .savefile import SaveImage, read_save_image, save_header

__all__ = ["FakeHypervisor", "FakeConnection", "FakeDomain"]


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
    transient: bool = False  # gone once it stops (create_transient)
    live_xml: str = ""  # while it runs from a restore: the XML it was restored as
    attached: list[str] = field(default_factory=list)  # devices plugged in while it runs
    restores: int = 0

    @property
    def agent_socket(self) -> str:
        el = ET.fromstring(self.xml).find("devices/channel/source")
        return el.get("path", "") if el is not None else ""


def _mib(el: ET.Element | None) -> int:
    """A libvirt memory element's size in MiB (its ``unit``, KiB by default)."""
    if el is None or not (el.text or "").strip():
        return 0
    factor = {"b": 1 / 1024 ** 2, "bytes": 1 / 1024 ** 2, "k": 1 / 1024, "kib": 1 / 1024,
              "m": 1, "mib": 1, "g": 1024, "gib": 1024}[el.get("unit", "KiB").lower()]
    return int(int(el.text or 0) * factor)


class FakeHypervisor:
    """``FakeHypervisor(on_stop, on_reconnect)``; see the module docstring.

    ``on_stop`` and ``on_reconnect`` are the callbacks of the connection made last (a test
    calls ``hv.on_reconnect()`` to tell that controller libvirtd came back).
    """

    def __init__(self, on_stop: Callable[[str, StopReason], None] | None = None,
                 on_reconnect: Callable[[], None] | None = None) -> None:
        self.on_stop, self.on_reconnect = on_stop, on_reconnect
        self.domains: dict[str, FakeDomain] = {}
        self.connections: list[FakeConnection] = []
        self.fp = Failpoints()
        self.unreachable = False
        self.memory_mib = 64 * 1024  # the host's
        self.events = "now"  # now | twice | never | manual (queued in self.pending)
        self.pending: list[tuple[str, StopReason]] = []
        self._closed = False
        self._lock = threading.RLock()
        self._next_pid = 4000
        self.trimmed: list[tuple[str, dict[str, list[tuple[int, int]]] | None]] = []

    def factory(self, on_stop: Callable[[str, StopReason], None], on_reconnect: Callable[[], None]) -> FakeConnection:
        """The HypervisorFactory: a new connection to the same fake for every controller."""
        conn = FakeConnection(self, on_stop, on_reconnect)
        with self._lock:
            self.connections.append(conn)
        self.on_stop, self.on_reconnect = on_stop, on_reconnect
        return conn

    @property
    def closed(self) -> bool:
        """True when no connection is open (or, used directly, after :meth:`close`)."""
        if self.connections:
            return all(c.closed for c in self.connections)
        return self._closed

    def _listeners(self) -> list[Callable[[str, StopReason], None]]:
        if self.connections:
            return [c.on_stop for c in self.connections if not c.closed]
        return [] if self._closed or self.on_stop is None else [self.on_stop]

    def _emit(self, name: str, reason: StopReason) -> None:
        for on_stop in self._listeners():
            on_stop(name, reason)

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
        d.live_xml, d.attached = "", []
        if d.transient:
            self.domains.pop(d.name, None)
        if self.events == "never":
            return
        if self.events == "manual":
            self.pending.append((d.name, reason))
            return
        self._emit(d.name, reason)
        if self.events == "twice":
            self._emit(d.name, reason)

    def deliver_pending(self) -> None:
        """Send the events held back with ``events = "manual"`` (late events)."""
        pending, self.pending = self.pending, []
        for name, reason in pending:
            self._emit(name, reason)

    # --- the port --------------------------------------------------------------------------
    def define(self, xml: str) -> None:
        self._enter("define")
        root = ET.fromstring(xml)
        name = root.findtext("name") or ""
        mem = root.find("currentMemory")
        if mem is None:
            mem = root.find("memory")
        with self._lock:
            if name in self.domains and self.domains[name].state is not DomainState.SHUTOFF:
                raise AlreadyExists(f"domain {name} is running")
            self.domains[name] = FakeDomain(name, xml, memory_mib=_mib(mem), metadata=parse_metadata(xml))

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
        d = self._get(name)
        return d.live_xml or d.xml

    def host_info(self) -> dict[str, str]:
        self._enter("host_info")
        return {"libvirt_version": "9.0.0", "hypervisor_version": "7.2.0", "hypervisor": "QEMU"}

    def create_transient(self, xml: str) -> None:
        self._enter("create_transient")
        self.define(xml)
        name = ET.fromstring(xml).findtext("name") or ""
        self.domains[name].transient = True
        self.start(name)

    def save(self, name: str, path: str) -> None:
        """Writes a real save-image header (the domain's XML) before a fake stream."""
        self._enter("save")
        with self._lock:
            d = self._get(name)
            if d.state is DomainState.SHUTOFF:
                raise FailedPrecondition(f"domain {name} is not running")
            image = SaveImage(Path(path), d.live_xml or d.xml, b"<cookie/>", True, 0, 0)
            Path(path).write_bytes(save_header(image, image.xml) + b"QEVM fake stream")
            self._stopped(d, StopReason.UNKNOWN)

    def restore(self, image: str, xml: str, scratch_dir: str) -> None:
        self._enter("restore")
        read_save_image(Path(image))  # ValueError for what libvirt could not read
        name = ET.fromstring(xml).findtext("name") or ""
        with self._lock:
            d = self.domains.get(name)
            if d is not None and d.state is not DomainState.SHUTOFF:
                raise FailedPrecondition(f"domain {name} is already active")
            if d is None:
                d = self.domains[name] = FakeDomain(name, xml, metadata=parse_metadata(xml), transient=True)
            self._next_pid += 1
            d.state, d.pid, d.live_xml, d.restores = DomainState.PAUSED, self._next_pid, xml, d.restores + 1
            d.memory_mib = _mib(ET.fromstring(xml).find("currentMemory"))

    def resume(self, name: str) -> None:
        self._enter("resume")
        with self._lock:
            d = self._get(name)
            if d.state is not DomainState.PAUSED:
                raise FailedPrecondition(f"domain {name} is not paused")
            d.state = DomainState.RUNNING

    def attach(self, name: str, device_xml: str) -> None:
        self._enter("attach")
        with self._lock:
            d = self._get(name)
            if d.state is DomainState.SHUTOFF:
                raise FailedPrecondition(f"domain {name} is not running")
            d.attached.append(device_xml)

    def zero_map(self, name: str) -> dict[str, list[tuple[int, int]]]:
        self._enter("zero_map")
        return {"/memfd:memory-backend-memfd (deleted)": [(0, 4096)]}

    def trim_memory(self, name: str, zeros: dict[str, list[tuple[int, int]]] | None = None) -> int:
        self._enter("trim_memory")
        self.trimmed.append((name, zeros))
        return 0

    def pid(self, name: str) -> int:
        self._enter("pid")
        return self._get(name).pid

    def stats(self, names: list[str]) -> dict[str, dict[str, _Any]]:
        """libvirt's bulk stats of the running ones: fixed CPU time, the balloon at the
        domain's current memory, and per virtio disk 4 KiB read and 8 KiB written per index."""
        self._enter("stats")
        with self._lock:
            return {n: self._stats(self.domains[n])
                    for n in names if n in self.domains and self.domains[n].state is DomainState.RUNNING}

    @staticmethod
    def _stats(d: FakeDomain) -> dict[str, _Any]:
        out: dict[str, _Any] = {"cpu.time": 5_000_000_000, "balloon.current": d.memory_mib * 1024,
                                "balloon.rss": 100 * 1024}
        disks = [t.get("dev", "") for t in ET.fromstring(d.xml).findall("devices/disk/target")]
        out["block.count"] = len(disks)
        for i, dev in enumerate(disks):
            out.update({f"block.{i}.name": dev, f"block.{i}.rd.bytes": 4096 * (i + 1), f"block.{i}.rd.reqs": i + 1,
                        f"block.{i}.wr.bytes": 8192 * (i + 1), f"block.{i}.wr.reqs": 2 * (i + 1)})
        return out

    def set_memory(self, name: str, mib: int) -> None:
        self._enter("set_memory")
        with self._lock:
            d = self._get(name)
            try:
                plan_memory_change(d.xml, mib)  # what libvirt would refuse, refused alike
            except ValueError as e:
                raise FailedPrecondition(f"domain {name}: {e}") from e
            d.memory_mib = mib

    def host_memory_mib(self) -> int:
        self._enter("host_memory_mib")
        return self.memory_mib

    def close(self) -> None:
        self._closed = True

    # --- what happens to a VM on its own ---------------------------------------------------------
    def guest_poweroff(self, name: str) -> None:
        """The guest powered itself off (or was told to by its agent)."""
        with self._lock:
            d = self._get(name)
            if d.state is not DomainState.SHUTOFF:
                self._stopped(d, StopReason.SHUTDOWN)

    def pause(self, name: str) -> None:
        """QEMU holds the domain paused: a start that was cut short before it resumed."""
        with self._lock:
            d = self._get(name)
            if d.state is DomainState.SHUTOFF:
                self._next_pid += 1
                d.pid = self._next_pid
            d.state = DomainState.PAUSED

    def crash(self, name: str) -> None:
        with self._lock:
            d = self._get(name)
            if d.state is not DomainState.SHUTOFF:
                self._stopped(d, StopReason.CRASHED)

    def by_socket(self, socket_path: str) -> FakeDomain | None:
        with self._lock:
            return next((d for d in self.domains.values() if d.agent_socket == socket_path), None)


class FakeConnection:
    """One controller's connection to a :class:`FakeHypervisor`: the Hypervisor port.

    Every call goes to the shared fake; after :meth:`close` calls raise Unavailable and no
    lifecycle event reaches this connection's ``on_stop``.
    """

    def __init__(self, hv: FakeHypervisor, on_stop: Callable[[str, StopReason], None],
                 on_reconnect: Callable[[], None]) -> None:
        self.hv, self.on_stop, self.on_reconnect = hv, on_stop, on_reconnect
        self.closed = False

    def _open(self) -> FakeHypervisor:
        if self.closed:
            raise Unavailable("the fake hypervisor connection is closed")
        return self.hv

    def define(self, xml: str) -> None:
        self._open().define(xml)

    def start(self, name: str) -> None:
        self._open().start(name)

    def destroy(self, name: str) -> None:
        self._open().destroy(name)

    def undefine(self, name: str) -> None:
        self._open().undefine(name)

    def info(self, name: str) -> DomainInfo | None:
        return self._open().info(name)

    def list_tagged(self) -> list[DomainInfo]:
        return self._open().list_tagged()

    def xml(self, name: str) -> str:
        return self._open().xml(name)

    def pid(self, name: str) -> int:
        return self._open().pid(name)

    def stats(self, names: list[str]) -> dict[str, dict[str, _Any]]:
        return self._open().stats(names)

    def set_memory(self, name: str, mib: int) -> None:
        self._open().set_memory(name, mib)

    def host_memory_mib(self) -> int:
        return self._open().host_memory_mib()

    def host_info(self) -> dict[str, str]:
        return self._open().host_info()

    def create_transient(self, xml: str) -> None:
        self._open().create_transient(xml)

    def save(self, name: str, path: str) -> None:
        self._open().save(name, path)

    def restore(self, image: str, xml: str, scratch_dir: str) -> None:
        self._open().restore(image, xml, scratch_dir)

    def resume(self, name: str) -> None:
        self._open().resume(name)

    def attach(self, name: str, device_xml: str) -> None:
        self._open().attach(name, device_xml)

    def pause(self, name: str) -> None:
        self._open().pause(name)

    def zero_map(self, name: str) -> dict[str, list[tuple[int, int]]]:
        return self._open().zero_map(name)

    def trim_memory(self, name: str, zeros: dict[str, list[tuple[int, int]]] | None = None) -> int:
        return self._open().trim_memory(name, zeros)

    def close(self) -> None:
        self.closed = True
