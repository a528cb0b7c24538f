"""TaskEngine's cgroup side and its events: Stats, Update, and /tasks/exit, oom, delete.

A container's figures come from its cgroup v2 group in the guest (:mod:`.cgroups`, one guest
exec per Stats); Update is ``crun update --resources``. A process's exit is published after
its start, with /tasks/oom first when the OOM killer took it.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any as _Any

from ..errors import FailedPrecondition, NotFound, VmSandboxError
from ..payloads.cgroupsv2 import CgroupV2Metrics
from ..sandbox.ports import GuestChannel
from . import events as ev
from .cgroups import parse_stats, stats_argv
from .ports import CRUN, GUEST_CALL_TIMEOUT, BundleStager
from .process import Container, Status, TaskProcess
from .spec import guest_resources

__all__ = ["ContainerAccounting"]

log = logging.getLogger(__name__)


class ContainerAccounting:
    """A mixin of :class:`~vmsandbox.task.engine.TaskEngine` (its state is the engine's)."""

    sandbox_id: str
    _channel: Callable[[], GuestChannel]
    _stager: BundleStager
    _lock: threading.Lock
    _containers: dict[str, Container]
    _closed: bool
    _ev: ev.OrderedEvents

    def _container(self, cid: str) -> Container:
        raise NotImplementedError  # the engine's

    def _guest(self, argv: Sequence[str], what: str, *, ok: Callable[[int], bool] = lambda code: code == 0) -> None:
        raise NotImplementedError  # the engine's

    @staticmethod
    def _name(p: TaskProcess) -> str:
        raise NotImplementedError  # the engine's

    def stats(self, cid: str) -> CgroupV2Metrics:
        """The container's guest cgroup figures, read with one guest exec. crun keeps the
        cgroup until Delete, so a container that exited still answers (CRI's OOM check reads
        memory_events.oom_kill after an exit 137); should it be gone, the figures read when
        the exit was seen, else NotFound."""
        c = self._container(cid)
        m = self._read_stats(cid) or c.last_stats
        if m is None:
            raise NotFound(f"container {cid!r} has no cgroup in the guest", sandbox_id=self.sandbox_id)
        return m

    def _read_stats(self, cid: str) -> CgroupV2Metrics | None:
        return parse_stats(self._channel().exec(stats_argv(cid), in_guest_root=True,
                                                timeout=GUEST_CALL_TIMEOUT).stdout.decode(errors="replace"))

    def update(self, cid: str, resources: dict[str, _Any]) -> None:
        """Apply runtime-spec LinuxResources to the container's cgroup: ``crun update
        --resources``, so that limits map onto cgroup v2 files exactly as at create (cpu
        shares -> cpu.weight, swap -> memory.swap.max, ...). FailedPrecondition once the
        container stopped or when crun refuses them."""
        c = self._container(cid)
        if c.init.status is Status.STOPPED:
            raise FailedPrecondition(f"container {cid!r} is stopped", sandbox_id=self.sandbox_id)
        path = self._stager.put_file(cid, "resources.json", json.dumps(guest_resources(resources)).encode())
        self._guest([CRUN, "update", "--resources", path, cid], "crun update")

    # ------------------------------------------------------------------ events
    def _exited(self, p: TaskProcess) -> None:
        """A process stopped: /tasks/oom first when the OOM killer took it (137 and the
        cgroup's oom_kill count grew), then /tasks/exit (after its /tasks/start)."""
        key = (p.container_id, p.exec_id)
        self._ev.await_start(key)
        with self._lock:
            c = self._containers.get(p.container_id)
        try:
            # No container: a create that failed, nobody was told of it. Closed: the guest lives
            # on (serve stops) or is gone with its pod; a /tasks/exit would make CRI end it.
            if c is not None and not self._closed:
                self._publish_exit(c, p)
        finally:
            self._ev.exit_due(key, False)

    def _publish_exit(self, c: Container, p: TaskProcess) -> None:
        if p.exit_status == 137:
            try:
                c.last_stats = self._read_stats(c.id) or c.last_stats
            except VmSandboxError as e:
                log.warning("sandbox %s: cannot read %s's memory.events: %s", self.sandbox_id, c.id, e)
            kills = c.last_stats.memory_events.oom_kill if c.last_stats and c.last_stats.memory_events else 0
            if kills > c.oom_kills:
                c.oom_kills = kills
                log.info("sandbox %s: %s was killed by the OOM killer", self.sandbox_id, self._name(p))
                self._ev.publish(c.namespace, ev.Topic.OOM, ev.task_oom(c.id))
        self._ev.publish(c.namespace, ev.Topic.EXIT, ev.task_exit(c.id, p.exec_id, p.exit()))

    def _publish_delete(self, c: Container, p: TaskProcess) -> None:
        self._ev.await_exit((c.id, p.exec_id))  # its waiter may still be reading memory.events
        self._ev.publish(c.namespace, ev.Topic.DELETE, ev.task_delete(c.id, p.exec_id, p.exit()))
