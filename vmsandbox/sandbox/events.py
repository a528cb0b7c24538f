"""Lifecycle events: what the controller tells an observer as a sandbox moves along.

An observer (``SandboxController(events=...)``) gets one :class:`LifecycleEvent` per step, on
the thread doing the operation, after the step happened. The bench times start phases from
them; a caller may log or export them. An observer that raises is logged and ignored: the
lifecycle never depends on it.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from ..model import utcnow

__all__ = ["Step", "LifecycleEvent", "EventSink", "Emitter"]

log = logging.getLogger(__name__)


class Step(str, enum.Enum):
    """The steps, in the order a sandbox goes through them."""

    CREATING = "creating"  #: create() began (checks passed, the id is reserved)
    DEFINED = "defined"  #: the domain is defined with the hypervisor
    CREATED = "created"  #: the record is saved; create() returns
    STARTING = "starting"  #: start() began
    BOOTED = "booted"  #: the hypervisor started the VM (its CPUs run)
    WIRED = "wired"  #: the pod netns is wired to the VM's taps (only with a netns)
    AGENT_READY = "agent-ready"  #: the guest agent answered
    RUNNING = "running"  #: the record says RUNNING; start() returns
    START_FAILED = "start-failed"  #: start() failed; the sandbox is being removed
    STOPPING = "stopping"  #: stop() of a running sandbox began
    STOPPED = "stopped"  #: the guest is gone and its exit recorded
    REMOVED = "removed"  #: everything the sandbox owned is gone


@dataclass(frozen=True)
class LifecycleEvent:
    """One step of one sandbox; ``monotonic`` is ``time.monotonic()`` when it happened."""

    sandbox_id: str
    step: Step
    monotonic: float = field(default_factory=time.monotonic)
    at: datetime = field(default_factory=utcnow)
    detail: str = ""


EventSink = Callable[[LifecycleEvent], None]


class Emitter:
    """Calls the sink, if any, and never lets it break the caller."""

    def __init__(self, sink: EventSink | None) -> None:
        self._sink = sink

    def __call__(self, sandbox_id: str, step: Step, detail: str = "") -> None:
        if self._sink is None:
            return
        try:
            self._sink(LifecycleEvent(sandbox_id, step, detail=detail))
        except Exception:  # noqa: BLE001 - an observer's bug must not fail a sandbox operation
            log.exception("lifecycle observer failed on %s %s", sandbox_id, step.value)
