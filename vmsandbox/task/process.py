"""One container init or exec process as the task API sees it: a small state machine.

CREATED (crun create ran, or Exec recorded it) -> RUNNING (Start) -> STOPPED (its guest
process ended, or the guest connection dropped: 255). Wait blocks on it from any state, and
every Wait returns once it is STOPPED.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any as _Any

from ..model import EPOCH, PtySize, utcnow
from ..payloads.cgroupsv2 import CgroupV2Metrics
from ..sandbox.ports import GuestProcess
from .outfile import Follower
from .ports import StagedBundle
from .stdio import Stdio

__all__ = ["Status", "Exit", "IoSpec", "ProcessState", "TaskProcess", "Container", "LOST_EXIT", "exec_failure_status"]

LOST_EXIT = 255
"""The exit status of a process whose guest connection dropped (containerd's unknown exit)."""


class Status(enum.IntEnum):
    """containerd.v1.types.Status numbers."""

    UNKNOWN = 0
    CREATED = 1
    RUNNING = 2
    STOPPED = 3


@dataclass(frozen=True)
class IoSpec:
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False


@dataclass(frozen=True)
class Exit:
    pid: int
    exit_status: int
    exited_at: datetime


@dataclass(frozen=True)
class ProcessState:
    id: str
    exec_id: str
    bundle: str
    pid: int
    status: Status
    io: IoSpec
    exit_status: int
    exited_at: datetime


@dataclass
class TaskProcess:
    container_id: str
    exec_id: str
    io: IoSpec
    stdio: Stdio
    spec: dict[str, _Any] | None = None  # an exec's runtime-spec Process, as written for the guest
    pid: int = 0
    status: Status = Status.CREATED
    exit_status: int = 0
    exited_at: datetime = EPOCH
    size: PtySize | None = None
    guest: GuestProcess | None = None
    starting: bool = False  # an exec's Start is in flight (no guest process yet)
    output: Follower | None = None  # a kept init's output files, followed
    cond: threading.Condition = field(default_factory=threading.Condition)

    def started(self, pid: int) -> None:
        with self.cond:
            self.pid = pid
            if self.status is Status.CREATED:
                self.status = Status.RUNNING

    def created(self, pid: int) -> None:
        with self.cond:
            self.pid = pid

    def stopped(self, exit_status: int, at: datetime | None = None) -> bool:
        """Record the exit (the first one wins; ``at``: when, if not now); False when it had
        stopped already."""
        with self.cond:
            if self.status is Status.STOPPED:
                return False
            self.status, self.exit_status, self.exited_at = Status.STOPPED, exit_status, at or utcnow()
            self.cond.notify_all()
            return True

    def exit(self) -> Exit:
        return Exit(self.pid, self.exit_status, self.exited_at)

    def wait(self, abandon: Callable[[], bool]) -> Exit | None:
        """Block until STOPPED; None when ``abandon()`` turned true first (polled twice a second)."""
        with self.cond:
            while self.status is not Status.STOPPED:
                if abandon():
                    return None
                self.cond.wait(0.5)
            return self.exit()

    def state(self, bundle: str) -> ProcessState:
        with self.cond:
            return ProcessState(self.container_id, self.exec_id, bundle, self.pid, self.status, self.io,
                                self.exit_status, self.exited_at)


def exec_failure_status(crun_message: str) -> int | None:
    """The shell's exit status for an exec crun could not start: 127 when the executable was
    not found, 126 when it could not be executed; None for any other failure."""
    m = crun_message.lower()
    if "not found" in m or "no such file" in m:
        return 127
    if "permission denied" in m or "exec format error" in m:
        return 126
    return None


@dataclass
class Container:
    """One container of a TaskEngine: its init, its execs and what the engine keeps of it."""

    id: str
    bundle: str
    staged: StagedBundle
    init: TaskProcess
    execs: dict[str, TaskProcess] = field(default_factory=dict)
    deleting: bool = False
    namespace: str = ""  # containerd's, for the events
    oom_kills: int = 0  # memory.events oom_kill when last read
    last_stats: CgroupV2Metrics | None = None
