"""One task API socket per running sandbox, and the Controller that hands their address to containerd.

:class:`TaskSockets` runs a ttrpc server with a :class:`TaskEngine` per sandbox at
``<run dir>/<id>/task.sock`` (an id too long for containerd's 106-byte socket path limit
gets ``<run dir>/_<digest>/task.sock``; ``_`` starts no valid id). :class:`TaskServingController`
wraps any Controller: Start opens the sandbox's socket and returns it as
``ttrpc+unix://...`` with version 3, Status returns it too (containerd re-reads it there
after a restart), Shutdown closes it; at construction it reopens the sockets of every
running sandbox (recovery after a restart of ``vmsandbox serve``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from ..controller import Controller
from ..errors import FailedPrecondition, VmSandboxError
from ..model import (
    AnyMessage,
    ControllerInstance,
    ControllerStatus,
    ExitStatus,
    Metric,
    Mount,
    Platform,
    SandboxMetadata,
    SandboxState,
)
from ..sandbox.events import LifecycleEvent, Step
from ..sandbox.ports import GuestChannel
from ..ttrpc import Server
from .engine import TaskEngine
from .events import NO_EVENTS, EventSink
from .ports import BundleStager, StagedBundle
from .records import TaskRecords
from .service import TaskService

__all__ = ["TaskSockets", "TaskServingController", "task_socket_path", "task_address", "TASK_API_VERSION",
           "SOCKET_PATH_LIMIT", "NoShareStager"]

log = logging.getLogger(__name__)

TASK_API_VERSION = 3
SOCKET_PATH_LIMIT = 106  # containerd's pkg/shim socketPathLimit
SOCKET_NAME = "task.sock"
UPSTREAM_NAME = "serve.sock"  # where serve listens behind the relay
RELAY_PID = "relay.pid"


def task_socket_path(run_dir: Path, sandbox_id: str) -> Path:
    """Where the sandbox's task API listens; always under :data:`SOCKET_PATH_LIMIT` bytes
    for a run dir of at most :data:`vmsandbox.config.MAX_RUN_DIR` characters."""
    path = run_dir / sandbox_id / SOCKET_NAME
    if len(os.fsencode(path)) < SOCKET_PATH_LIMIT:
        return path
    return run_dir / ("_" + hashlib.sha256(sandbox_id.encode()).hexdigest()[:48]) / SOCKET_NAME


def task_address(run_dir: Path, sandbox_id: str) -> str:
    return f"ttrpc+unix://{task_socket_path(run_dir, sandbox_id)}"


class NoShareStager:
    """The stager until the guest has a rootfs share: every container create is refused."""

    def stage(self, container_id: str, rootfs: Sequence[Mount], binds: Sequence[str]) -> StagedBundle:
        raise FailedPrecondition("this sandbox's guest has no rootfs share yet: containers cannot run in it")

    def put_file(self, container_id: str, name: str, data: bytes) -> str:
        raise FailedPrecondition("this sandbox's guest has no rootfs share yet")

    def guest_file(self, container_id: str, name: str, *, create: bool = False) -> int | None:
        return None

    def unstage(self, container_id: str) -> None:
        pass


@dataclass
class _Served:
    server: Server
    engine: TaskEngine
    address: str


class TaskSockets:
    """The task API servers of the sandboxes, by sandbox id. Thread-safe."""

    def __init__(self, run_dir: Path, channel_of: Callable[[str], GuestChannel],
                 stager_of: Callable[[str], BundleStager] = lambda sandbox_id: NoShareStager(), *,
                 records_of: Callable[[str], TaskRecords | None] = lambda sandbox_id: None,
                 allowed_uids: Collection[int] = (0,), events: EventSink = NO_EVENTS, relay: bool = False) -> None:
        """``relay``: containerd connects to a relay process that outlives serve (:mod:`.relay`)
        rather than to serve itself; ``vmsandbox serve`` uses one so that its restarts do not
        fail containerd's Waits."""
        self.run_dir, self._relay = run_dir, relay
        self._events = events
        self._channel_of, self._stager_of, self._uids = channel_of, stager_of, tuple(allowed_uids)
        self._records_of = records_of
        self._lock = threading.Lock()
        self._served: dict[str, _Served] = {}

    def address(self, sandbox_id: str) -> str | None:
        with self._lock:
            s = self._served.get(sandbox_id)
        return s.address if s else None

    def open(self, sandbox_id: str) -> str:
        """Serve the sandbox's task API (idempotent); its ``ttrpc+unix://`` address."""
        with self._lock:
            s = self._served.get(sandbox_id)
            if s is not None:
                return s.address
            path = task_socket_path(self.run_dir, sandbox_id)
            try:
                self.run_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
                path.parent.mkdir(mode=0o700, exist_ok=True)
            except OSError as e:
                raise FailedPrecondition(f"cannot make the task socket folder {path.parent}: {e}",
                                         sandbox_id=sandbox_id) from e
            engine = TaskEngine(sandbox_id, lambda: self._channel_of(sandbox_id), self._stager_of(sandbox_id),
                                events=self._events, records=self._records_of(sandbox_id))
            engine.recover()  # the kept containers of a serve that ran before
            server = Server(allowed_uids=(os.getuid(),) if self._relay else self._uids)
            TaskService(engine).register(server)
            try:
                server.start(str(path.parent / UPSTREAM_NAME if self._relay else path))
                if self._relay:
                    ensure_relay(path, path.parent / UPSTREAM_NAME, self._uids)
            except BaseException:
                server.stop(grace=0)
                engine.detach()
                _rmdir(path.parent)
                raise
            self._served[sandbox_id] = s = _Served(server, engine, f"ttrpc+unix://{path}")
        log.info("sandbox %s: task API on %s", sandbox_id, s.address)
        return s.address

    def close(self, sandbox_id: str) -> None:
        """Stop serving: every Wait returns, the socket and its folder go. Idempotent."""
        with self._lock:
            s = self._served.pop(sandbox_id, None)
        if s is None:
            return
        s.engine.close()
        s.server.stop(grace=1.0)
        stop_relay(task_socket_path(self.run_dir, sandbox_id))
        _rmdir(task_socket_path(self.run_dir, sandbox_id).parent)

    def on_lifecycle(self, event: LifecycleEvent) -> None:
        """A controller's event sink: a sandbox that is removed stops serving."""
        if event.step in (Step.REMOVED, Step.START_FAILED):
            self.close(event.sandbox_id)

    def close_all(self) -> None:
        """``vmsandbox serve`` stops: every socket goes, kept containers run on (see
        :meth:`TaskEngine.detach`); the next serve takes them back."""
        with self._lock:
            served, self._served = dict(self._served), {}
        for sid, s in served.items():
            s.server.stop(answer=False)  # a relay keeps containerd's connections and requests
            s.engine.detach()
            if not self._relay:
                _rmdir(task_socket_path(self.run_dir, sid).parent)


def _rmdir(d: Path) -> None:
    for leftover in (UPSTREAM_NAME, RELAY_PID, SOCKET_NAME):
        (d / leftover).unlink(missing_ok=True)
    try:
        d.rmdir()
    except FileNotFoundError:
        pass


def _relay_pid(listen: Path) -> int:
    """The pid of the relay that serves ``listen``, 0 when none runs."""
    try:
        pid = int((listen.parent / RELAY_PID).read_text())
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return 0
    return pid if len(argv) > 2 and argv[1].endswith(b"relay.py") and argv[2] == os.fsencode(listen) else 0


def ensure_relay(listen: Path, upstream: Path, uids: Collection[int], timeout: float = 30.0) -> None:
    """Start the relay of ``listen`` unless it runs (it survived a restart of serve); return
    once it accepts connections."""
    if _relay_pid(listen):
        return
    script = Path(__file__).with_name("relay.py")
    p = subprocess.Popen([sys.executable, str(script), str(listen), str(upstream), *map(str, uids)],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True)
    (listen.parent / RELAY_PID).write_text(f"{p.pid}\n")
    deadline = time.monotonic() + timeout
    while not listen.exists():
        if p.poll() is not None or time.monotonic() > deadline:
            p.kill()
            raise FailedPrecondition(f"the task socket relay for {listen} did not start (exit {p.poll()})")
        time.sleep(0.02)


def stop_relay(listen: Path) -> None:
    pid = _relay_pid(listen)
    if pid:
        os.kill(pid, signal.SIGTERM)
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass  # a relay a serve before us started: init reaps it


class TaskServingController:
    """A Controller whose running sandboxes serve the task API (see the module docstring)."""

    def __init__(self, inner: Controller, sockets: TaskSockets, running: Iterable[str] = ()) -> None:
        self.inner, self.sockets = inner, sockets
        for sid in running:
            try:
                sockets.open(sid)
            except VmSandboxError as e:
                log.error("sandbox %s: cannot serve its task API again: %s", sid, e)

    def _endpoint(self, sandbox_id: str) -> tuple[str, int]:
        addr = self.sockets.address(sandbox_id)
        return (addr, TASK_API_VERSION) if addr else ("", 0)

    def create(self, sandbox: SandboxMetadata, *, rootfs: Iterable[Mount] = (), options: AnyMessage | None = None,
               netns_path: str = "", annotations: Mapping[str, str] | None = None) -> None:
        self.inner.create(sandbox, rootfs=rootfs, options=options, netns_path=netns_path, annotations=annotations)

    def start(self, sandbox_id: str) -> ControllerInstance:
        """Start, then serve the task API; a socket that cannot be served fails the Start and,
        as any failed Start, removes the sandbox."""
        inst = self.inner.start(sandbox_id)
        try:
            address = self.sockets.open(sandbox_id)
        except BaseException:
            self.inner.shutdown(sandbox_id)
            raise
        return replace(inst, address=address, version=TASK_API_VERSION)

    def platform(self, sandbox_id: str) -> Platform:
        return self.inner.platform(sandbox_id)

    def stop(self, sandbox_id: str, *, timeout: float | None = None) -> None:
        self.inner.stop(sandbox_id, timeout=timeout)

    def wait(self, sandbox_id: str, timeout: float | None = None) -> ExitStatus:
        return self.inner.wait(sandbox_id, timeout)

    def status(self, sandbox_id: str, *, verbose: bool = False) -> ControllerStatus:
        st = self.inner.status(sandbox_id, verbose=verbose)
        if st.state != SandboxState.READY.value:
            return st
        address, version = self._endpoint(sandbox_id)
        return replace(st, address=address, version=version)

    def shutdown(self, sandbox_id: str) -> None:
        self.sockets.close(sandbox_id)
        self.inner.shutdown(sandbox_id)

    def metrics(self, sandbox_id: str) -> Metric:
        return self.inner.metrics(sandbox_id)

    def update(self, sandbox_id: str, sandbox: SandboxMetadata, *fields: str) -> None:
        self.inner.update(sandbox_id, sandbox, *fields)
