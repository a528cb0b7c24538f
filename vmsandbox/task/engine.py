"""The containers of one sandbox, run in its guest by crun: what the task rpcs do.

Every container init is one supervised ``crun create`` on its own guest channel (vsbx-exec
token ``p``: the channel ends with the init's exit status); every exec process likewise is
one supervised ``crun exec --detach``, its stdio the channel's. Start is ``crun start``, Kill
``crun kill`` (or ``kill`` for an exec), Delete ``crun delete --force`` and the bundle
unstaged. A waiter thread per process turns the end of its channel into STOPPED (255 when
the connection dropped), after its output drained and its FIFOs were closed.

An init without a tty may be kept, to survive restarts of serve (:mod:`.restarts`).

Guest layout: the stager's per-container dir holds config.json, ``init.pid`` (+ ``.ready``),
``init.out``/``.err``/``.exit`` and ``exec-<id>.json``/``exec-<id>.pid``; crun keeps its
state in its default root.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any as _Any

from ..errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
    Unimplemented,
    VmSandboxError,
)
from ..model import Mount, PtySize
from ..sandbox.ports import GuestChannel, GuestProcess
from ..sandbox.undo import quietly
from . import events as ev
from .accounting import ContainerAccounting
from .events import NO_EVENTS, EventSink
from .keeper import kept_exit
from .podfiles import PodFiles
from .ports import CRUN, GUEST_CALL_TIMEOUT, BundleStager
from .process import LOST_EXIT, Container, Exit, IoSpec, ProcessState, Status, TaskProcess, exec_failure_status
from .records import TaskRecords
from .restarts import KeptInits
from .spec import is_bind, load_spec, rewrite_process, rewrite_spec
from .stdio import FIFO_OPEN_TIMEOUT, Stdio
from .terminal import console_argv, console_size, stdio_for

__all__ = ["TaskEngine", "CRUN", "READY_TIMEOUT", "GUEST_CALL_TIMEOUT", "exec_failure_status"]

log = logging.getLogger(__name__)

READY_TIMEOUT = 120.0
"""How long crun create / crun exec may take to leave its process behind (TCG is slow)."""
_POLL = 0.05
# One exec waits in the guest for the pid vsbx-exec publishes, up to $1 ticks of 10 ms (``read -t``
# on a private FIFO: builtins only, no fork per tick), rather than a new exec every 50 ms: under
# TCG each of those cost 150-480 ms of guest CPU while crun ran. Exit 3: not yet.
_AWAIT_READY = ('f=/tmp/vsbx-tick.$$; mkfifo "$f" && exec 3<>"$f" || exit 4; rm -f "$f"; i=0; '
                'while [ ! -s "$0" ]; do i=$((i+1)); [ $i -gt $1 ] && exit 3; read -t 0.01 x <&3; done; '
                'read p < "$0"; echo "$p"')


class TaskEngine(KeptInits, ContainerAccounting):
    """The task API's logic for one sandbox. Thread-safe; every method raises vmsandbox.errors.

    ``channel()`` returns the sandbox's connected guest channel (Unavailable or
    FailedPrecondition when the sandbox is not running).
    """

    def __init__(self, sandbox_id: str, channel: Callable[[], GuestChannel], stager: BundleStager, *,
                 records: TaskRecords | None = None,
                 ready_timeout: float = READY_TIMEOUT, fifo_timeout: float = FIFO_OPEN_TIMEOUT,
                 events: EventSink = NO_EVENTS) -> None:
        self.sandbox_id = sandbox_id
        self._ev, self._closed = ev.OrderedEvents(events), False
        self._channel, self._stager, self._records = channel, stager, records
        self._detached = False
        self._ready_timeout, self._fifo_timeout = ready_timeout, fifo_timeout
        self._lock = threading.Lock()
        self._containers: dict[str, Container] = {}
        self._creating: set[str] = set()
        self._waiters: list[threading.Thread] = []
        self._pod_files = PodFiles(channel)

    # ------------------------------------------------------------------ lookup
    def _container(self, cid: str) -> Container:
        with self._lock:
            c = self._containers.get(cid)
        if c is None:
            raise NotFound(f"container {cid!r} not found", sandbox_id=self.sandbox_id)
        return c

    def _process(self, cid: str, exec_id: str) -> tuple[Container, TaskProcess]:
        c = self._container(cid)
        if not exec_id:
            return c, c.init
        with self._lock:
            p = c.execs.get(exec_id)
        if p is None:
            raise NotFound(f"exec {exec_id!r} of container {cid!r} not found", sandbox_id=self.sandbox_id)
        return c, p

    def _guest(self, argv: Sequence[str], what: str, *, ok: Callable[[int], bool] = lambda code: code == 0) -> None:
        r = self._channel().exec(argv, in_guest_root=True, timeout=GUEST_CALL_TIMEOUT)
        if not ok(r.exit_code):
            msg = (r.stderr or r.stdout).decode(errors="replace").strip()
            raise FailedPrecondition(f"{what} failed (exit {r.exit_code}): {msg}", sandbox_id=self.sandbox_id)

    # ------------------------------------------------------------------ create
    def create(self, cid: str, *, bundle: str, rootfs: Sequence[Mount], io: IoSpec, checkpoint: str = "",
               namespace: str = "") -> int:
        """crun create in the guest; the init's guest pid. AlreadyExists for a known id,
        InvalidArgument for a bad bundle or FIFO, Unimplemented for a checkpoint; a failure
        leaves nothing staged or running. ``namespace``: containerd's, which the container's
        events are published in."""
        if checkpoint:
            raise Unimplemented("restoring from a checkpoint is not supported", sandbox_id=self.sandbox_id)
        with self._lock:
            if cid in self._containers or cid in self._creating:
                raise AlreadyExists(f"container {cid!r} already exists", sandbox_id=self.sandbox_id)
            self._creating.add(cid)
        try:
            pid = self._create(cid, bundle, rootfs, io, namespace)
        finally:
            with self._lock:
                self._creating.discard(cid)
        self._ev.publish(namespace, ev.Topic.CREATE, ev.task_create(cid, bundle, rootfs, io, pid))
        return pid

    def _create(self, cid: str, bundle: str, rootfs: Sequence[Mount], io: IoSpec, namespace: str) -> int:
        try:
            spec = load_spec(Path(bundle, "config.json").read_bytes())
        except OSError as e:
            raise InvalidArgument(f"cannot read {bundle}/config.json: {e.strerror}", sandbox_id=self.sandbox_id) from e
        binds = sorted({str(m.get("source", "")) for m in spec.get("mounts") or [] if is_bind(m)})
        with ExitStack() as undo:
            staged = self._stager.stage(cid, rootfs, binds)
            undo.callback(quietly(self._stager.unstage, cid))
            guest_spec = rewrite_spec(spec, container_id=cid, guest_rootfs=staged.guest_rootfs,
                                      sources=staged.sources, pod_files=self._pod_files(), terminal=io.terminal)
            self._stager.put_file(cid, "config.json", json.dumps(guest_spec).encode())
            init, keep = self._new_init(cid, io, undo, console_size(guest_spec["process"]))
            pidfile = f"{staged.guest_dir}/init.pid"
            argv = [CRUN, "create", "--bundle", staged.guest_dir, "--pid-file", pidfile, cid]
            undo.callback(quietly(self._force_delete, cid))
            self._launch(init, argv, pidfile, created=True, keep=keep and f"{staged.guest_dir}/{keep}")
            c = Container(cid, bundle, staged, init, namespace=namespace)
            self._save(c)
            undo.pop_all()
        with self._lock:
            self._containers[cid] = c
        log.info("sandbox %s: container %s created, guest pid %d", self.sandbox_id, cid, init.pid)
        return init.pid

    def _launch(self, proc: TaskProcess, argv: list[str], pidfile: str, *, created: bool,
                keep: str | None = None) -> None:
        """Spawn a supervised crun command, wait for its pid, start the waiter."""
        argv, console = console_argv(argv, self.sandbox_id, proc)  # a terminal: crun's console socket
        gp = self._channel().spawn(argv, stdout=proc.stdio.stdout, stderr=proc.stdio.stderr,
                                   tty=proc.io.terminal, size=proc.size, in_guest_root=True,
                                   supervise_pidfile=pidfile, keep=keep, console_socket=console)
        proc.guest = gp
        try:
            pid = self._await_pid(gp, pidfile, argv[1], proc)
        except BaseException:
            gp.abort()
            raise
        if created:
            proc.created(pid)
        else:
            proc.started(pid)
        proc.stdio.attach(gp)
        self._start_watch(proc)

    def _start_watch(self, proc: TaskProcess) -> None:
        t = threading.Thread(target=self._watch, args=(proc,), daemon=True,
                             name=f"vsbx-task-{self.sandbox_id[:12]}-{proc.container_id[:12]}")
        with self._lock:
            self._waiters = [w for w in self._waiters if w.is_alive()] + [t]
        self._ev.exit_due((proc.container_id, proc.exec_id))
        t.start()

    def _await_pid(self, gp: GuestProcess, pidfile: str, verb: str, proc: TaskProcess) -> int:
        deadline = time.monotonic() + self._ready_timeout
        ch = self._channel()
        while True:
            done = gp.done  # before the read: a quick process may end right after its pid is out
            r = ch.exec(["sh", "-c", _AWAIT_READY, pidfile + ".ready", "25"], in_guest_root=True,
                        timeout=GUEST_CALL_TIMEOUT)
            if r.exit_code == 0 and r.stdout.strip().isdigit():
                return int(r.stdout)
            if done:
                try:
                    code = gp.wait(0)
                except VmSandboxError as e:
                    raise Unavailable(f"crun {verb}: {e}", sandbox_id=self.sandbox_id) from e
                if proc.output is not None:
                    proc.output.drain()  # crun's message is in the err file
                raise FailedPrecondition(f"crun {verb} failed (exit {code}): {proc.stdio.tail}",
                                         sandbox_id=self.sandbox_id)
            if time.monotonic() >= deadline:
                raise FailedPrecondition(f"crun {verb} did not finish in {self._ready_timeout}s",
                                         sandbox_id=self.sandbox_id)
            if r.exit_code != 3:
                time.sleep(_POLL)  # the guest could not wait (no FIFO): poll from here

    def _watch(self, proc: TaskProcess) -> None:
        gp, status = proc.guest, LOST_EXIT
        while gp is not None:
            try:
                status = gp.wait()
                break
            except VmSandboxError as e:
                if proc.output is None and not self._detached:
                    log.warning("sandbox %s: lost %s/%s (%s); exit %d", self.sandbox_id, proc.container_id,
                                proc.exec_id or "init", e, LOST_EXIT)
                gp = self._rejoin_lost(proc)  # a kept init runs on: watch it on a new channel
        if self._detached:
            return  # serve stops: a kept init runs on, the next serve rejoins it
        ended = kept_exit(self._stager, proc.container_id) if proc.output is not None else None
        if proc.output is not None:
            proc.output.finish()  # the keeper ended (or the channel dropped): deliver what the files hold
        proc.stdio.close()  # output drained (wait returns after the sinks got everything)
        proc.stopped(*(ended or (status, None)))
        self._exited(proc)

    def _force_delete(self, cid: str) -> None:
        try:
            self._guest([CRUN, "delete", "--force", cid], "crun delete", ok=lambda code: True)
        except VmSandboxError as e:
            log.warning("sandbox %s: crun delete --force %s: %s", self.sandbox_id, cid, e)

    # ------------------------------------------------------------------ start / exec
    def start(self, cid: str, exec_id: str = "") -> int:
        """Start the init (crun start) or a created exec; its pid. FailedPrecondition unless CREATED."""
        c, p = self._process(cid, exec_id)
        with p.cond:
            if p.status is not Status.CREATED or (exec_id and (p.guest is not None or p.starting)):
                raise FailedPrecondition(f"{self._name(p)} is {p.status.name.lower()}, not created",
                                         sandbox_id=self.sandbox_id)
            p.starting = True
        self._ev.starting((cid, exec_id))
        failed = False
        try:
            if not exec_id:
                self._guest([CRUN, "start", cid], "crun start")
                p.started(p.pid)
                self._save(c)
                self._ev.publish(c.namespace, ev.Topic.START, ev.task_start(cid, p.pid))
                return p.pid
            pidfile = f"{c.staged.guest_dir}/exec-{exec_id}.pid"
            spec = self._stager.put_file(cid, f"exec-{exec_id}.json", json.dumps(p.spec).encode())
            argv = [CRUN, "exec", "--detach", "--process", spec, "--pid-file", pidfile, cid]
            try:
                self._launch(p, argv, pidfile, created=False)
            except FailedPrecondition:
                code = exec_failure_status(p.stdio.tail)
                if code is None:
                    raise
                failed = True
                # As a shell reports it (127 not found, 126 not executable), with crun's
                # message on the exec's stderr: ExecSync gets an exit code, not an error.
                p.started(0)
                p.stdio.close()
                p.stopped(code)
                return 0
            self._ev.publish(c.namespace, ev.Topic.EXEC_STARTED, ev.exec_started(cid, exec_id, p.pid))
            return p.pid
        finally:
            p.starting = False
            self._ev.starting((cid, exec_id), False)
            if failed:
                self._exited(p)  # crun could not start it: an exit status all the same

    def exec(self, cid: str, exec_id: str, *, io: IoSpec, process: dict[str, _Any]) -> None:
        """Record an exec process (started by :meth:`start`). AlreadyExists for a known exec id,
        FailedPrecondition when the container is not running."""
        if not exec_id:
            raise InvalidArgument("exec_id must not be empty", sandbox_id=self.sandbox_id)
        c = self._container(cid)
        spec = rewrite_process(process, terminal=io.terminal)
        if c.init.status is not Status.RUNNING:
            raise FailedPrecondition(f"container {cid!r} is {c.init.status.name.lower()}, not running",
                                     sandbox_id=self.sandbox_id)
        with self._lock:
            if exec_id in c.execs:
                raise AlreadyExists(f"exec {exec_id!r} already exists in {cid!r}", sandbox_id=self.sandbox_id)
            stdio = stdio_for(io, self._fifo_timeout)
            c.execs[exec_id] = p = TaskProcess(cid, exec_id, io, stdio, spec=spec, size=console_size(spec))
        try:
            stdio.open()
        except BaseException:
            with self._lock:
                c.execs.pop(exec_id, None)
            raise
        log.info("sandbox %s: exec %s added to %s (%s)", self.sandbox_id, exec_id, cid, p.spec and p.spec["args"][0])
        self._ev.publish(c.namespace, ev.Topic.EXEC_ADDED, ev.exec_added(cid, exec_id))

    # ------------------------------------------------------------------ queries
    def state(self, cid: str, exec_id: str = "") -> ProcessState:
        c, p = self._process(cid, exec_id)
        return p.state(c.bundle)

    def wait(self, cid: str, exec_id: str = "", abandon: Callable[[], bool] = lambda: False) -> Exit | None:
        """Block until the process stopped (from any state, before Start too); its exit.
        None when ``abandon()`` became true (the caller went away)."""
        _, p = self._process(cid, exec_id)
        return p.wait(abandon)

    def connect(self, cid: str) -> int:
        """The init's guest pid (non-zero once created)."""
        return self._container(cid).init.pid

    def pids(self, cid: str) -> list[int]:
        """Guest pids of the init and of the running execs ([] once the init stopped)."""
        c = self._container(cid)
        if c.init.status is Status.STOPPED:
            return []
        with self._lock:
            execs = list(c.execs.values())
        return [c.init.pid] + [p.pid for p in execs if p.status is Status.RUNNING and p.pid]

    # ------------------------------------------------------------------ signals and io
    def kill(self, cid: str, exec_id: str = "", signal: int = 15, all: bool = False) -> None:
        """Signal the process (``all``: every process of the container). NotFound once it stopped."""
        if not 0 < signal < 65:
            raise InvalidArgument(f"signal {signal} is not valid", sandbox_id=self.sandbox_id)
        _, p = self._process(cid, exec_id)
        with p.cond:
            if p.status is Status.STOPPED:
                raise NotFound(f"{self._name(p)}: process already finished", sandbox_id=self.sandbox_id)
            never_started = bool(exec_id) and p.guest is None and not p.starting
        if never_started:
            p.stopped(128 + signal)  # nothing runs in the guest: it just never starts
            p.stdio.close()
            return
        if exec_id:
            argv = ["kill", f"-{signal}", str(p.pid)]
        else:
            argv = [CRUN, "kill"] + (["--all"] if all else []) + [cid, str(signal)]
        try:
            self._guest(argv, "kill")
        except FailedPrecondition:
            if p.wait(lambda: True) is not None or self._settles(p):
                raise NotFound(f"{self._name(p)}: process already finished", sandbox_id=self.sandbox_id) from None
            raise

    @staticmethod
    def _settles(p: TaskProcess, within: float = 2.0) -> bool:
        deadline = time.monotonic() + within
        return p.wait(lambda: time.monotonic() > deadline) is not None

    def close_io(self, cid: str, exec_id: str = "", stdin: bool = True) -> None:
        _, p = self._process(cid, exec_id)
        if stdin:
            p.stdio.close_stdin()

    def resize(self, cid: str, exec_id: str, size: PtySize) -> None:
        _, p = self._process(cid, exec_id)
        if not p.io.terminal:
            raise FailedPrecondition(f"{self._name(p)} has no terminal", sandbox_id=self.sandbox_id)
        with p.cond:
            p.size = size
            gp = p.guest
        if gp is not None and p.status is not Status.STOPPED:
            gp.resize(size)

    # ------------------------------------------------------------------ delete
    def delete(self, cid: str, exec_id: str = "") -> Exit:
        """Forget a stopped (or never started) process; for the init also ``crun delete`` and
        unstage. FailedPrecondition while it runs."""
        c, p = self._process(cid, exec_id)
        if exec_id:
            with p.cond:
                if p.status is Status.RUNNING or p.starting:
                    raise FailedPrecondition(f"{self._name(p)} is running", sandbox_id=self.sandbox_id)
            with self._lock:
                c.execs.pop(exec_id, None)
            p.stdio.close()
            self._publish_delete(c, p)
            return p.exit()
        with self._lock:
            if p.status is Status.RUNNING:
                raise FailedPrecondition(f"container {cid!r} is running", sandbox_id=self.sandbox_id)
            if c.deleting:
                raise FailedPrecondition(f"container {cid!r} is being deleted", sandbox_id=self.sandbox_id)
            c.deleting = True
        try:
            self._guest([CRUN, "delete", "--force", cid], "crun delete")
        except (Unavailable, FailedPrecondition) as e:
            if p.status is not Status.STOPPED:
                with self._lock:
                    c.deleting = False
                raise
            # It ended already; a guest that is gone has nothing left to delete.
            log.warning("sandbox %s: crun delete %s: %s; forgetting it", self.sandbox_id, cid, e)
        deadline = time.monotonic() + GUEST_CALL_TIMEOUT
        if p.wait(lambda: time.monotonic() > deadline) is None and p.guest is not None:
            p.stdio.cancel()  # crun delete --force killed it: only a stalled reader holds it up
            p.guest.abort()
        p.wait(lambda: False)
        self._stager.unstage(cid)
        if self._records is not None:
            self._records.remove(cid)
        with self._lock:
            self._containers.pop(cid, None)
            execs = list(c.execs.values())
        for x in execs:
            x.stdio.close()
        log.info("sandbox %s: container %s deleted (exit %d)", self.sandbox_id, cid, p.exit_status)
        self._publish_delete(c, p)
        return p.exit()

    def shutdown(self) -> None:
        """containerd's Shutdown(id): the socket serves the whole sandbox, so nothing to do."""

    def close(self) -> None:
        """The sandbox goes away: end every guest process; every Wait returns. Idempotent."""
        with self._lock:
            self._closed = True
            procs = [p for c in self._containers.values() for p in (c.init, *c.execs.values())]
            waiters = list(self._waiters)
        for p in procs:
            p.stdio.cancel()  # a reader that stalls must not keep the pump (and Wait) stuck
            gp = p.guest
            if gp is not None:
                gp.abort()
            elif p.stopped(LOST_EXIT):
                p.stdio.close()
        for w in waiters:
            w.join(timeout=10)
        with self._lock:
            ids = list(self._containers)
        for cid in ids:
            if self._records is not None:
                self._records.remove(cid)

    @staticmethod
    def _name(p: TaskProcess) -> str:
        return f"exec {p.exec_id!r} of {p.container_id!r}" if p.exec_id else f"container {p.container_id!r}"



