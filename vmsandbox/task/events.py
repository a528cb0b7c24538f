"""containerd's ``/tasks/*`` events for the containers of a sandbox: topics, payloads, and the sink port.

A runc shim publishes these; with a host task server nobody else does, so the engine hands
each one to an :class:`EventSink` (``vmsandbox serve``: a publisher to containerd's events
service; unit tests: a list). Payloads are the ``containerd.events`` messages; the namespace
is the one the container's Create came in (ttrpc metadata ``containerd-namespace-ttrpc``).
A sink must never block nor raise: events are best effort.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Protocol

from google.protobuf import timestamp_pb2
from google.protobuf.message import Message

from ..model import Mount
from ..proto.containerd.events import task_pb2 as ev
from ..proto.containerd.types import mount_pb2
from .process import Exit, IoSpec

__all__ = ["EventSink", "NO_EVENTS", "OrderedEvents", "Topic", "NAMESPACE_KEY", "namespace_of", "timestamp", "task_create", "task_start",
           "task_exit", "task_oom", "task_delete", "exec_added", "exec_started"]

#: The ttrpc metadata key that carries the request's namespace (containerd's pkg/namespaces/ttrpc.go).
NAMESPACE_KEY = "containerd-namespace-ttrpc"


class Topic:
    CREATE = "/tasks/create"
    START = "/tasks/start"
    EXIT = "/tasks/exit"
    OOM = "/tasks/oom"
    DELETE = "/tasks/delete"
    EXEC_ADDED = "/tasks/exec-added"
    EXEC_STARTED = "/tasks/exec-started"


class EventSink(Protocol):
    def publish(self, namespace: str, topic: str, event: Message) -> None:
        """Queue ``event`` for containerd; never blocks, never raises."""


class _NoEvents:
    def publish(self, namespace: str, topic: str, event: Message) -> None:
        pass


NO_EVENTS: EventSink = _NoEvents()


class OrderedEvents:
    """The engine's side of a sink, keeping the order runc's shim keeps: a process's
    /tasks/exit after its /tasks/start, its /tasks/delete after its /tasks/exit. Processes
    are keyed by (container id, exec id); a wait gives up after ``timeout`` s (never a hang:
    the events are best effort). Nothing is published without a namespace."""

    def __init__(self, sink: EventSink, timeout: float = 10.0) -> None:
        self._sink, self._timeout = sink, timeout
        self._cond = threading.Condition()
        self._starting: set[tuple[str, str]] = set()
        self._exit_due: set[tuple[str, str]] = set()

    def publish(self, namespace: str, topic: str, event: Message) -> None:
        if namespace:
            self._sink.publish(namespace, topic, event)

    def _mark(self, marks: set[tuple[str, str]], key: tuple[str, str], on: bool) -> None:
        with self._cond:
            (marks.add if on else marks.discard)(key)
            self._cond.notify_all()

    def _await(self, marks: set[tuple[str, str]], key: tuple[str, str]) -> None:
        with self._cond:
            self._cond.wait_for(lambda: key not in marks, self._timeout)

    def starting(self, key: tuple[str, str], on: bool = True) -> None:
        """A Start is under way (``on``) or over (its /tasks/start published or failed)."""
        self._mark(self._starting, key, on)

    def exit_due(self, key: tuple[str, str], on: bool = True) -> None:
        """The process has a waiter that will publish its exit (``on``), or it did."""
        self._mark(self._exit_due, key, on)

    def await_start(self, key: tuple[str, str]) -> None:
        self._await(self._starting, key)

    def await_exit(self, key: tuple[str, str]) -> None:
        self._await(self._exit_due, key)


def namespace_of(metadata: Mapping[str, Sequence[str]]) -> str:
    """The containerd namespace of a ttrpc request ("" when it carries none)."""
    values = metadata.get(NAMESPACE_KEY) or ()
    return values[0] if values else ""


def timestamp(at: datetime) -> timestamp_pb2.Timestamp:
    t = timestamp_pb2.Timestamp()
    t.FromDatetime(at)
    return t


def task_create(cid: str, bundle: str, rootfs: Sequence[Mount], io: IoSpec, pid: int) -> ev.TaskCreate:
    return ev.TaskCreate(container_id=cid, bundle=bundle, pid=pid,
                         rootfs=[mount_pb2.Mount(type=m.type, source=m.source, target=m.target,
                                                 options=list(m.options)) for m in rootfs],
                         io=ev.TaskIO(stdin=io.stdin, stdout=io.stdout, stderr=io.stderr, terminal=io.terminal))


def task_start(cid: str, pid: int) -> ev.TaskStart:
    return ev.TaskStart(container_id=cid, pid=pid)


def task_exit(cid: str, exec_id: str, x: Exit) -> ev.TaskExit:
    """As runc's shim sends it: ``id`` is the exec id, or the container id for the init."""
    return ev.TaskExit(container_id=cid, id=exec_id or cid, pid=x.pid, exit_status=x.exit_status,
                       exited_at=timestamp(x.exited_at))


def task_oom(cid: str) -> ev.TaskOOM:
    return ev.TaskOOM(container_id=cid)


def task_delete(cid: str, exec_id: str, x: Exit) -> ev.TaskDelete:
    return ev.TaskDelete(container_id=cid, id=exec_id, pid=x.pid, exit_status=x.exit_status,
                         exited_at=timestamp(x.exited_at))


def exec_added(cid: str, exec_id: str) -> ev.TaskExecAdded:
    return ev.TaskExecAdded(container_id=cid, exec_id=exec_id)


def exec_started(cid: str, exec_id: str, pid: int) -> ev.TaskExecStarted:
    return ev.TaskExecStarted(container_id=cid, exec_id=exec_id, pid=pid)
