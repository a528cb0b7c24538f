"""Exit tracking: lifecycle events in, one recorded exit per run, waiters woken.

Events from the hypervisor (:meth:`Exits.on_domain_stop`) are the fast path; because an
event can be lost (the hypervisor restarted, or we were down), :meth:`Exits.check` asks the
hypervisor directly, and :meth:`Exits.wait` does so periodically while it blocks. However
often an exit is reported, it is recorded once.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime

from ..errors import NotFound, Unavailable
from ..model import Phase, utcnow
from .events import Emitter, Step
from .ports import DomainState, Hypervisor, StopReason
from .registry import Entry, Registry

__all__ = ["Exits", "EXIT_CLEAN", "EXIT_KILLED", "EXIT_FAILED", "DOMAIN_PREFIX"]

log = logging.getLogger(__name__)

DOMAIN_PREFIX = "vmsandbox-"
EXIT_CLEAN = 0
EXIT_KILLED = 137  # 128 + SIGKILL: the VM was forced off
EXIT_FAILED = 255  # crashed, failed, or the end was not observed
_EXIT_FOR_REASON = {
    StopReason.SHUTDOWN: EXIT_CLEAN,
    StopReason.DESTROYED: EXIT_KILLED,
    StopReason.CRASHED: EXIT_FAILED,
    StopReason.FAILED: EXIT_FAILED,
    StopReason.UNKNOWN: EXIT_FAILED,
}


class Exits:
    def __init__(self, registry: Registry, emit: Emitter | None = None) -> None:
        self._registry = registry
        self._emit = emit or Emitter(None)
        self._hv: Hypervisor | None = None

    def bind(self, hv: Hypervisor) -> None:
        """The hypervisor to ask (it exists only after its callbacks, ours, were given)."""
        self._hv = hv

    @property
    def hv(self) -> Hypervisor:
        assert self._hv is not None, "Exits.bind() first"
        return self._hv

    def on_domain_stop(self, domain: str, reason: StopReason) -> None:
        """The hypervisor's lifecycle callback (on its event thread: quick, never raises)."""
        if not domain.startswith(DOMAIN_PREFIX):
            return
        e = self._registry.find(domain[len(DOMAIN_PREFIX):])
        if e is not None:
            self.record(e, reason)

    def record(self, e: Entry, reason: StopReason, at: datetime | None = None) -> None:
        """Mark a running sandbox stopped (once) and wake every waiter."""
        with e.state_lock:
            if e.record.phase is not Phase.RUNNING:
                return
            self._registry.save(
                e, phase=Phase.STOPPED, exit_status=_EXIT_FOR_REASON[reason], exited_at=at or utcnow(), pid=0
            )
            e.exited.notify_all()
        log.info("sandbox %s: stopped (%s, exit status %s)", e.record.id, reason.value, e.record.exit_status)
        self._emit(e.record.id, Step.STOPPED, reason.value)

    def check(self, e: Entry) -> None:
        """Catch an exit whose event we missed (the hypervisor restarted, or we were down)."""
        if e.record.phase is not Phase.RUNNING:
            return
        info = self.hv.info(e.record.domain)
        if info is None or info.state is DomainState.SHUTOFF:
            reason = info.stop_reason if info is not None else StopReason.UNKNOWN
            # Dated when observed: the console log's mtime was only when the guest last
            # printed, which may be long before it ended.
            self.record(e, reason)

    def wait(self, e: Entry, deadline: float | None, *, poll_every: float) -> bool:
        """Block until the sandbox is stopped (True) or ``deadline`` passes (False); NotFound
        when it is removed meanwhile (a failed start).

        Lifecycle events wake us; every ``poll_every`` seconds the hypervisor is also asked
        directly, in case an event was lost. The clock is per sandbox, so callers that wait in
        short slices (the gRPC server) still poll. Call without e.state_lock held.
        """
        with e.state_lock:
            while e.record.phase is not Phase.STOPPED:
                if e.removed:
                    raise NotFound(f"sandbox {e.record.id} was removed", sandbox_id=e.record.id)
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                slice_ = min(poll_every, 1.0) if remaining is None else min(poll_every, 1.0, remaining)
                e.exited.wait(slice_)
                if e.record.phase is Phase.RUNNING and time.monotonic() - e.last_exit_check >= poll_every:
                    e.last_exit_check = time.monotonic()
                    e.state_lock.release()
                    try:
                        self.check(e)
                    except Unavailable:
                        pass  # the hypervisor is away: keep waiting for its event or the next poll
                    finally:
                        e.state_lock.acquire()
            return True

