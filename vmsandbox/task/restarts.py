"""TaskEngine's part in restarts of ``vmsandbox serve``: kept inits, their records, taking them back.

With records (``vmsandbox serve``) and a guest dir the host sees, an init without a tty is
kept (vsbx-exec token ``k``): a keeper outside the SSH session supervises it, its output goes
to files on the share that the host follows (:mod:`.outfile`), and a host-only record
(:mod:`.records`) lets the next serve take it back (:meth:`KeptInits.recover`, token ``w``).
Stopping serve (:meth:`KeptInits.detach`) leaves kept inits running; execs end with their
channels.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack

from ..errors import VmSandboxError
from ..model import PtySize
from ..sandbox.ports import GuestChannel, GuestProcess
from ..sandbox.undo import quietly
from .keeper import KEEP_NAME, follow, kept_exit
from .ports import BundleStager
from .process import LOST_EXIT, Container, IoSpec, Status, TaskProcess
from .records import TaskRecord, TaskRecords
from .stdio import Stdio
from .terminal import stdio_for

__all__ = ["KeptInits"]

log = logging.getLogger(__name__)

REJOIN_ATTEMPTS, REJOIN_PAUSE = 5, 1.0


class KeptInits:
    """A mixin of :class:`~vmsandbox.task.engine.TaskEngine` (its state is the engine's)."""

    sandbox_id: str
    _channel: Callable[[], GuestChannel]
    _stager: BundleStager
    _records: TaskRecords | None
    _fifo_timeout: float
    _lock: threading.Lock
    _containers: dict[str, Container]
    _waiters: list[threading.Thread]
    _detached: bool
    _closed: bool

    def _start_watch(self, proc: TaskProcess) -> None:
        raise NotImplementedError  # the engine's

    def _new_init(self, cid: str, io: IoSpec, undo: ExitStack,
                  size: PtySize | None = None) -> tuple[TaskProcess, str | None]:
        """A new init with its FIFOs open (undone by ``undo``) and, when it is kept, its output
        followed and a FIFO holder; the keep prefix's name for vsbx-exec (None: not kept).
        ``size``: a terminal's first size. A terminal init is never kept (:mod:`.terminal`)."""
        kept = self._records is not None and not io.terminal
        stdio = stdio_for(io, self._fifo_timeout, holder=cid if kept else "")
        stdio.open()
        undo.callback(quietly(stdio.close))
        init = TaskProcess(cid, "", io, stdio, size=size)
        keep = self._keep_output(init) if kept else None
        if init.output is not None:
            undo.callback(init.output.stop)
        return init, keep

    def _keep_output(self, proc: TaskProcess) -> str | None:
        """Make the init's output files and follow them; their prefix name (None when the
        stager's guest dir is not visible to the host: the output stays on the channel)."""
        assert self._records is not None
        proc.output = follow(self._stager, self._records, proc, create=True)
        return KEEP_NAME if proc.output is not None else None

    def _save(self, c: Container) -> None:
        if self._records is not None and c.init.output is not None:
            self._records.save(TaskRecord(c.id, c.bundle, c.init.io, c.staged.guest_dir, c.staged.guest_rootfs,
                                          c.init.pid, c.init.status is not Status.CREATED, c.init.stdio.holder_pid,
                                          c.namespace))

    def recover(self) -> None:
        """Take back the kept containers of the records (after a restart of ``vmsandbox
        serve``): reopen their stdout/stderr FIFOs, follow their output from the saved
        offsets, and rejoin their keepers; one that ended meanwhile gets the exit code and
        time of its exit file. Their stdin does not come back."""
        for rec in self._records.load() if self._records is not None else ():
            try:
                self._recover(rec)
            except (VmSandboxError, OSError) as e:
                log.error("sandbox %s: cannot take back container %s: %s", self.sandbox_id, rec.id, e)

    def _recover(self, rec: TaskRecord) -> None:
        assert self._records is not None
        stdio = Stdio.reopened(rec.io, holder=rec.id, holder_pid=rec.holder_pid, open_timeout=self._fifo_timeout)
        init = TaskProcess(rec.id, "", rec.io, stdio)
        init.created(rec.pid)
        if rec.started:
            init.started(rec.pid)
        init.output = follow(self._stager, self._records, init, create=False)
        with self._lock:
            self._containers[rec.id] = Container(rec.id, rec.bundle, rec.staged, init, namespace=rec.namespace)
        try:  # ends at once with the exit code when it ended while serve was down
            init.guest = self._channel().spawn([], stdout=init.stdio.stdout, stderr=init.stdio.stderr,
                                               in_guest_root=True, rejoin=f"{rec.guest_dir}/{KEEP_NAME}")
        except VmSandboxError as e:
            log.error("sandbox %s: cannot rejoin container %s: %s", self.sandbox_id, rec.id, e)
            if init.output is not None:
                init.output.finish()
            init.stdio.close()
            init.stopped(*(kept_exit(self._stager, rec.id) or (LOST_EXIT, None)))
            return
        self._start_watch(init)
        log.info("sandbox %s: container %s taken back, guest pid %d", self.sandbox_id, rec.id, rec.pid)

    def _rejoin_lost(self, proc: TaskProcess, attempts: int = REJOIN_ATTEMPTS) -> GuestProcess | None:
        """The kept init's channel dropped while serve runs (the guest connection was
        replaced): rejoin its keeper on a new one, unless it ended, is being deleted or the
        engine lets go. None: give up (its exit file, if any, says how it ended)."""
        with self._lock:
            c = self._containers.get(proc.container_id)
        for attempt in range(attempts if proc.output is not None else 0):
            if c is None or c.deleting or self._detached or self._closed or kept_exit(self._stager, c.id):
                return None
            try:
                gp = self._channel().spawn([], stdout=proc.stdio.stdout, stderr=proc.stdio.stderr,
                                           in_guest_root=True, rejoin=f"{c.staged.guest_dir}/{KEEP_NAME}")
            except VmSandboxError as e:
                log.warning("sandbox %s: cannot rejoin %s yet (%s)", self.sandbox_id, c.id, e)
                time.sleep(REJOIN_PAUSE * (attempt + 1))
                continue
            proc.guest = gp
            log.info("sandbox %s: container %s rejoined on a new guest channel", self.sandbox_id, c.id)
            return gp
        return None

    def detach(self) -> None:
        """``vmsandbox serve`` stops: let go of every process, answering no Wait; a kept
        init runs on in its guest (its output stays in its files, its record stays).
        Exec processes and inits that are not kept end with their channels."""
        self._detached = self._closed = True  # no /tasks/exit: the containers run on
        with self._lock:
            procs = [p for c in self._containers.values() for p in (c.init, *c.execs.values())]
            waiters = list(self._waiters)
        for p in procs:
            if p.output is not None:
                p.output.stop()
            p.stdio.cancel()
            if p.guest is not None:
                p.guest.abort()  # the session's vsbx-exec; a keeper has left that session
        for w in waiters:
            w.join(timeout=10)
        for p in procs:  # a kept init's holder keeps CRI's FIFOs open for the next serve
            p.stdio.let_go() if p.output is not None else p.stdio.close()
