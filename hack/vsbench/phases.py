"""The phases of one start, stamped by the controller's lifecycle events.

The controller reports each step to an observer (``LibvirtController(events=...)``); an
:class:`EventLog` keeps them by sandbox, and :func:`stamps_from_events` turns one sandbox's
events into stamps that the console watcher (console lines) and the bench's own clock (its
call began, first exec answered) complete. :func:`phase_durations` cuts the stamps into
phases. All stamps are ``time.monotonic()`` seconds of this host.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from vmsandbox.sandbox.events import LifecycleEvent, Step

from .guestlog import guest_timeline

__all__ = ["PHASES", "EVENT_STAMPS", "EventLog", "Start", "stamps_from_events",
           "phase_durations", "relative_ms"]

# Phases of one start, in order: (key, label, stamp at its end). Each starts where the one
# before ended; "define" starts at "t0", when the bench called create(). Their sum is the total.
PHASES = (
    ("define", "define (create() until CREATED)", "created"),
    ("domain_start", "domain start (until BOOTED: libvirt's create or restore returned)", "booted"),
    ("kernel_to_init", "kernel to init (console line)", "init_line"),
    ("init_script", "init script (to 'agent ready' line)", "agent_line"),
    ("agent_ready", "agent ready (SSH handshake, AGENT_READY)", "agent_ready"),
    ("running", "running (checks, record saved, RUNNING)", "running"),
    ("first_exec", "first exec answered", "exec_done"),
)

# The stamp each lifecycle step gives (the first event of that step counts).
EVENT_STAMPS: dict[Step, str] = {
    Step.CREATING: "creating",
    Step.DEFINED: "defined",
    Step.CREATED: "created",
    Step.STARTING: "starting",
    Step.BOOTED: "booted",
    Step.WIRED: "wired",
    Step.AGENT_READY: "agent_ready",
    Step.RUNNING: "running",
    Step.START_FAILED: "start_failed",
}
# A start from a template reports BOOTED (detail "template") when libvirt's restore returned;
# its console shows no boot lines, so its kernel and init phases stay None and "agent ready"
# runs from BOOTED.


class EventLog:
    """The controller's event observer: keeps every event, by sandbox, until taken.

    Called on whichever thread runs the operation, so parallel starts are safe.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: dict[str, list[LifecycleEvent]] = {}

    def __call__(self, event: LifecycleEvent) -> None:
        with self._lock:
            self._events.setdefault(event.sandbox_id, []).append(event)

    def take(self, sandbox_id: str) -> list[LifecycleEvent]:
        """The sandbox's events so far, in the order they came; forgets them."""
        with self._lock:
            return self._events.pop(sandbox_id, [])


def stamps_from_events(events: Iterable[LifecycleEvent]) -> dict[str, float]:
    """{stamp name: monotonic seconds} of the steps in :data:`EVENT_STAMPS`; the first of each."""
    out: dict[str, float] = {}
    for ev in events:
        name = EVENT_STAMPS.get(ev.step)
        if name is not None and name not in out:
            out[name] = ev.monotonic
    return out


def phase_durations(stamps: Mapping[str, float | None]) -> dict[str, float | None]:
    """Milliseconds per phase (and ``total``) from monotonic stamps in seconds.

    A phase whose end stamp is missing is None, and the next phase then starts at the last
    stamp that is present, so the phases that are known still add up to the total.
    """
    out: dict[str, float | None] = {}
    prev = stamps.get("t0")
    for key, _label, end in PHASES:
        t = stamps.get(end)
        if t is None or prev is None:
            out[key] = None
        else:
            out[key] = (t - prev) * 1000
            prev = t
    t0, done = stamps.get("t0"), stamps.get("exec_done")
    out["total"] = None if t0 is None or done is None else (done - t0) * 1000
    return out


def relative_ms(stamps: Mapping[str, float | None]) -> dict[str, float | None]:
    """The stamps as milliseconds since ``t0``, in time order (missing ones last)."""
    t0 = stamps.get("t0")
    if t0 is None:
        raise ValueError("stamps without t0")
    known = sorted(((k, v) for k, v in stamps.items() if v is not None), key=lambda kv: kv[1])
    out: dict[str, float | None] = {k: (v - t0) * 1000 for k, v in known}
    out.update({k: None for k, v in stamps.items() if v is None})
    return out


@dataclass
class Start:
    """One measured start: its stamps, what the first exec returned, the kernel log."""

    id: str
    stamps: dict[str, float | None]
    exit_code: int
    uptime: float | None
    dmesg: list[tuple[float, str]]
    others: int  #: other guests running on the host when it began
    events: list[LifecycleEvent] = field(default_factory=list)
    asked: str | None = None  #: the start path asked for ("cold", "template"; None: the default)
    path: str | None = None  #: the path the start took (status verbose "start"; None: not reported)
    qemu_cpu_s: float | None = None  #: QEMU's CPU seconds (user + system) when the first exec answered

    @property
    def path_ok(self) -> bool:
        """The start took the path asked for (or the controller does not say which it took)."""
        return self.asked is None or self.path is None or self.path == self.asked

    def sample(self) -> dict[str, Any]:
        """The JSON form: phases, stamps and events in ms since t0, the guest's clocks."""
        t0 = self.stamps["t0"]
        assert t0 is not None
        return {
            "id": self.id,
            "phases_ms": phase_durations(self.stamps),
            "stamps_ms": relative_ms(self.stamps),
            "events_ms": [{"step": ev.step.value, "ms": (ev.monotonic - t0) * 1000,
                           **({"detail": ev.detail} if ev.detail else {})} for ev in self.events],
            "guest": guest_timeline(self.stamps, self.uptime, self.dmesg) if self.dmesg else None,
            "guest_uptime_s": self.uptime,
            "other_domains_running": self.others,
            "start_asked": self.asked,
            "start_path": self.path,
            "qemu_cpu_s": self.qemu_cpu_s,
        }
