"""SandboxController: containerd's sandbox Controller over the ports in :mod:`.ports`.

The only code that knows the sandbox lifecycle (created -> running -> stopped -> removed).
Each operation takes the sandbox's own lock (never a global one across sandboxes); exits are
observed through libvirt lifecycle events and wake ``wait()``. Every state change is saved
to the sandbox's record, so a new controller on the same state dir recovers all sandboxes.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any as _Any

from ..config import Config, VirtType
from ..errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
    VmSandboxError,
)
from ..guest.keys import dropbear_private_key, generate_keypair, write_private
from ..hypervisor.domain import DiskSpec, DomainSpec, NicSpec, build_domain_xml
from ..image import GuestImage
from ..network._model import InterfaceCounters, NetworkPlan
from ..model import (
    Any,
    ControllerInstance,
    ControllerStatus,
    ExecResult,
    ExitStatus,
    Metric,
    Mount,
    Phase,
    Platform,
    Sandbox,
    SandboxState,
    SandboxSummary,
    utcnow,
)
from ..cgroupsv2 import CgroupV2Metrics, to_any
from ..podconfig import memory_mib_from, parse_pod_config, vcpus_from
from .metrics import from_domain_stats
from .ports import DomainState, GuestChannel, GuestFactory, HypervisorFactory, Images, Network, StopReason
from .resources import ResourceChange, resources_from_update
from . import mounts as mountplan
from .cgroups import cgroup_relpath, place_process
from .guestconfig import config_archive, guest_settings
from .store import SandboxRecord, Store
from .validate import MIN_MEMORY_MIB, check_sandbox_id, resources_from_annotations

__all__ = ["SandboxController", "EXIT_CLEAN", "EXIT_KILLED", "EXIT_FAILED", "LOCK_FILE", "state_dir_owner"]

log = logging.getLogger(__name__)

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
DOMAIN_PREFIX = "vmsandbox-"
LOCK_FILE = "controller.lock"
"""The owning controller holds an exclusive flock on this file in the state dir (its pid inside)."""
UPDATABLE_FIELDS = frozenset({"labels", "extensions", "spec", "annotations", "runtime", "sandboxer"})


@dataclass
class _Entry:
    """In-memory companion of a record: locks, the exit condition, the agent connection."""

    record: SandboxRecord
    op_lock: threading.RLock = field(default_factory=threading.RLock)
    state_lock: threading.Lock = field(default_factory=threading.Lock)
    agent: GuestChannel | None = None
    removed: bool = False
    agent_lock: threading.Lock = field(default_factory=threading.Lock)
    last_exit_check: float = 0.0

    def __post_init__(self) -> None:
        self.exited = threading.Condition(self.state_lock)


class SandboxController:
    """containerd's sandbox Controller where each sandbox is a domain of ``hypervisor``.

    The orchestration: records, locks, the lifecycle, exits and recovery, over the ports it is
    given (:class:`vmsandbox.LibvirtController` wires the real ones; the unit tests wire
    fakes). Use as a context manager, or call :meth:`close`; running sandboxes keep running
    after close and are recovered by the next controller on the same state dir.
    """

    def __init__(
        self,
        config: Config,
        *,
        virt_type: VirtType,
        hypervisor: HypervisorFactory,
        network: Network,
        guest: GuestFactory,
        images: Images,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.virt_type = virt_type
        self._net = network
        self._guest = guest
        self._images = images
        self._progress = progress
        self._store = Store(config.state_dir)
        self._entries: dict[str, _Entry] = {}
        self._entries_lock = threading.Lock()
        self._image: GuestImage | None = None
        self._image_lock = threading.Lock()
        self._manifests: dict[str, dict[str, _Any]] = {}
        self._closed = False
        config.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(config.state_dir, 0o711)
        for sub in ("sandboxes", "sock"):
            (config.state_dir / sub).mkdir(exist_ok=True)
        os.chmod(config.state_dir / "sock", 0o711)
        _warn_if_unreachable(config.state_dir)
        # The first controller on a state dir owns it (an exclusive lock for its lifetime);
        # others (e.g. a CLI command while `serve` runs) only observe: they never destroy or
        # remove anything during recovery, which could be another controller's work in flight.
        self._lock_fd = os.open(config.state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.owner = True
            os.ftruncate(self._lock_fd, 0)
            os.pwrite(self._lock_fd, f"{os.getpid()}\n".encode(), 0)  # who owns it, for messages
        except BlockingIOError:
            self.owner = False
            log.info("state dir %s is owned by another controller; this one only observes during recovery",
                     config.state_dir)
        try:
            self._hv = hypervisor(self._on_domain_stop, self._reconcile)
        except BaseException:
            os.close(self._lock_fd)
            raise
        try:
            self._recover()
        except BaseException:
            self._hv.close()
            os.close(self._lock_fd)
            raise

    # ------------------------------------------------------------------ plumbing
    def __enter__(self) -> SandboxController:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Drop agent connections and the libvirt connection. Sandboxes keep running."""
        if self._closed:
            return
        self._closed = True
        with self._entries_lock:
            entries = list(self._entries.values())
        for e in entries:
            if e.agent is not None:
                e.agent.close()
        self._hv.close()
        os.close(self._lock_fd)  # releases the ownership lock

    def _locked_entry(self, e: _Entry) -> None:
        """Call with e.op_lock held: the sandbox may have been removed while we queued."""
        if e.removed:
            raise NotFound(f"sandbox {e.record.id} not found", sandbox_id=e.record.id)

    def _entry(self, sandbox_id: str) -> _Entry:
        check_sandbox_id(sandbox_id)
        with self._entries_lock:
            e = self._entries.get(sandbox_id)
        if e is None or e.removed or e.record is None:  # record is None while being created
            raise NotFound(f"sandbox {sandbox_id} not found", sandbox_id=sandbox_id)
        return e

    def _save(self, e: _Entry, **changes: _Any) -> SandboxRecord:
        """Apply changes to the record and persist them (caller holds e.state_lock)."""
        rec = e.record.evolve(**changes)
        self._store.save(rec)
        e.record = rec
        return rec

    def image(self) -> GuestImage:
        """The guest image for this controller, built on first use."""
        with self._image_lock:
            if self._image is None:
                self._image = self._images.ensure(self._progress)
            return self._image

    def _socket_path(self, sandbox_id: str) -> str:
        # Unix socket paths are limited to 107 bytes; ids may be 128 characters long.
        h = hashlib.sha256(sandbox_id.encode()).hexdigest()[:20]
        return str(self.config.state_dir / "sock" / f"{h}.sock")

    # ------------------------------------------------------------------ create
    def create(
        self,
        sandbox: Sandbox,
        *,
        rootfs: Iterable[Mount] = (),
        options: Any | None = None,
        netns_path: str = "",
        annotations: Mapping[str, str] | None = None,
    ) -> None:
        """Prepare a sandbox: disks, keys, config disk and the libvirt domain definition.

        Nothing boots yet. Raises InvalidArgument for a bad id, mount or annotation and
        AlreadyExists for a taken id; on any failure nothing is left behind.
        """
        if not isinstance(sandbox, Sandbox):
            raise InvalidArgument("sandbox must be a vmsandbox.Sandbox")
        sid = check_sandbox_id(sandbox.id)
        mounts = tuple(rootfs)
        pod = parse_pod_config(options)
        # CRI passes pod annotations inside the PodSandboxConfig; explicit ones win.
        annotations = {**(pod.annotations if pod is not None else {}), **dict(annotations or {})}
        vcpus, mem = resources_from_annotations(
            annotations, max_vcpus=self.config.max_vcpus, max_memory_mib=self.config.max_memory_mib
        )
        if pod is not None:
            vcpus = vcpus or _clamp(vcpus_from(pod), 1, self.config.max_vcpus)
            mem = mem or _clamp(memory_mib_from(pod), MIN_MEMORY_MIB, self.config.max_memory_mib)
        vcpus = vcpus or self.config.default_vcpus
        mem = mem or self.config.default_memory_mib
        settings = guest_settings(sandbox, annotations, pod)
        if pod is not None and pod.cgroup_parent:
            cgroup_relpath(pod.cgroup_parent)  # validate now; placement happens at start
        netplan = self._net.inspect_netns(netns_path) if netns_path else None
        sdir = self._store.dir(sid)
        plans = mountplan.plan_mounts(mounts, sdir)

        entry = _Entry(record=None)  # type: ignore[arg-type]  # filled below, before anyone sees it
        with self._entries_lock:
            if sid in self._entries or self._store.exists(sid):
                raise AlreadyExists(f"sandbox {sid} already exists", sandbox_id=sid)
            self._entries[sid] = entry
            entry.op_lock.acquire()
        try:
            with ExitStack() as undo:
                undo.callback(self._forget, sid)
                image = self.image()
                sdir.mkdir(parents=True)
                undo.callback(self._store.remove, sid)
                os.chmod(sdir, 0o711)
                client, hostkey = generate_keypair(), generate_keypair()
                write_private(sdir / "id_ed25519", client.openssh_private())
                for plan in plans:
                    mountplan.materialize(plan)
                domain = DOMAIN_PREFIX + sid
                # Domain names are host-wide: the name may belong to another state dir's sandbox.
                if self._hv.info(domain) is not None:
                    raise AlreadyExists(f"a libvirt domain named {domain} already exists", sandbox_id=sid)
                taps: list[str] = []
                if netplan is not None:
                    taps = self._net.tap_names(sid, len(netplan.interfaces))
                    undo.callback(self._net.detach, netns_path, taps, None)
                    self._net.create_taps(taps)
                config = config_archive(
                    settings=settings,
                    authorized_key=client.public_line,
                    hostkey=dropbear_private_key(hostkey),
                    disks=plans,
                    network=netplan,
                )
                write_private(sdir / "config.tar", config)
                now = utcnow()
                spec = DomainSpec(
                    name=domain,
                    sandbox_id=sid,
                    state_dir=str(self.config.state_dir),
                    virt_type=self.virt_type.value,
                    arch=os.uname().machine,
                    machine=self.config.machine_type(),
                    loader=self.config.loader(),
                    rng=self.config.rng,
                    vcpus=vcpus,
                    max_vcpus=vcpus,
                    memory_mib=mem,
                    max_memory_mib=max(mem, min(self.config.max_memory_mib, mem * self.config.memory_headroom)),
                    kernel=str(image.kernel),
                    initrd=str(image.initrd),
                    cmdline=self.config.kernel_cmdline,
                    console_log=str(sdir / "console.log"),
                    agent_socket=self._socket_path(sid),
                    disks=(DiskSpec(str(sdir / "config.tar"), "vsbx-config", readonly=True),)
                    + tuple(DiskSpec(p.source, p.serial, p.format, p.block, p.readonly) for p in plans),
                    nics=tuple(NicSpec(t, i.mac, i.mtu) for t, i in zip(taps, netplan.interfaces)) if netplan else (),
                )
                self._hv.define(build_domain_xml(spec))
                undo.callback(self._hv.undefine, domain)
                record = SandboxRecord(
                    id=sid,
                    domain=domain,
                    phase=Phase.CREATED,
                    created_at=now,
                    sandbox=sandbox,
                    vcpus=vcpus,
                    memory_mib=mem,
                    image_dir=str(image.directory),
                    agent_socket=spec.agent_socket,
                    host_key=hostkey.public_line,
                    rootfs=mounts,
                    options=options,
                    netns_path=netns_path,
                    annotations=annotations,
                    taps=tuple(taps),
                    network=netplan.to_json() if netplan is not None else None,
                )
                self._store.save(record)
                entry.record = record
                undo.pop_all()
            log.info("sandbox %s: created (%d vCPU, %d MiB, %d disk(s))", sid, vcpus, mem, len(plans))
        finally:
            entry.op_lock.release()

    def _forget(self, sid: str) -> None:
        with self._entries_lock:
            self._entries.pop(sid, None)

    # ------------------------------------------------------------------ start
    def start(self, sandbox_id: str) -> ControllerInstance:
        """Boot the guest and return once its agent answers (see Controller.start)."""
        e = self._entry(sandbox_id)
        with e.op_lock:
            self._locked_entry(e)
            rec = e.record
            if rec.phase is Phase.RUNNING:
                return self._instance(rec)
            if rec.phase is Phase.STOPPED:
                raise FailedPrecondition("sandbox is stopped; a stopped sandbox cannot be restarted", sandbox_id=sandbox_id)
            deadline = time.monotonic() + self.config.boot_timeout
            try:
                info = self._hv.info(rec.domain)
                if info is None:
                    raise NotFound(f"domain {rec.domain} of sandbox {sandbox_id} is gone", sandbox_id=sandbox_id)
                if info.state is not DomainState.RUNNING:
                    try:
                        os.unlink(rec.agent_socket)
                    except FileNotFoundError:
                        pass
                    self._hv.start(rec.domain)
                started = utcnow()
                agent = self._agent(e)
                plan = self._plan(rec)
                if plan is not None:
                    self._net.attach(plan, list(rec.taps))
                agent.connect(deadline, alive=lambda: self._domain_running(rec.domain))
                if rec.rootfs:
                    self._check_guest_mounts(agent, rec)
                pid = self._hv.pid(rec.domain)
                pod = parse_pod_config(rec.options)
                if pod is not None and pod.cgroup_parent and pid:
                    place_process(pid, pod.cgroup_parent)
                with e.state_lock:
                    rec = self._save(e, phase=Phase.RUNNING, started_at=started, pid=pid)
            except BaseException as err:
                # containerd drops a sandbox whose Start failed and never calls Shutdown (the
                # kubelet retries with a new id): remove everything now, keep the first error.
                self._remove_after_failed_start(e, err)
                raise
            log.info("sandbox %s: running (pid %d) after %.2fs", sandbox_id, rec.pid, (utcnow() - started).total_seconds())
            return self._instance(rec)

    def _remove_after_failed_start(self, e: _Entry, err: BaseException) -> None:
        log.warning("sandbox %s: start failed (%s: %s); removing the sandbox", e.record.id, type(err).__name__, err)
        try:
            self._remove_locked(e)
        except Exception:  # noqa: BLE001 - the start's own error is the one to report
            log.exception("sandbox %s: removing it after a failed start failed; its record is kept", e.record.id)

    def _check_guest_mounts(self, agent: GuestChannel, rec: SandboxRecord) -> None:
        """A disk the guest could not mount fails the start (init lists them)."""
        r = agent.exec(["cat", "/run/vsbx/mount-errors"], in_guest_root=True, timeout=30)
        failed = r.stdout.decode(errors="replace").split()
        if r.exit_code == 0 and failed:
            tail = _console_tail(self._store.dir(rec.id))
            raise FailedPrecondition(
                f"the guest could not mount disk(s) {', '.join(failed)} (see mounts; console: {tail})",
                sandbox_id=rec.id)

    def _plan(self, rec: SandboxRecord) -> NetworkPlan | None:
        return NetworkPlan.from_json(rec.network) if rec.network is not None else None

    def _unwire(self, rec: SandboxRecord) -> None:
        """Give the netns its interfaces back (addresses, no redirects); taps stay for a restart."""
        if rec.network is None:
            return
        try:
            self._net.detach(rec.netns_path, [], self._plan(rec))
        except VmSandboxError as err:
            log.warning("sandbox %s: restoring its network namespace failed: %s", rec.id, err)

    def _instance(self, rec: SandboxRecord) -> ControllerInstance:
        return ControllerInstance(
            sandbox_id=rec.id,
            pid=rec.pid,
            created_at=rec.started_at or rec.created_at,
            address="",
            version=0,
            labels={"vmsandbox.io/domain": rec.domain},
        )

    def _agent(self, e: _Entry) -> GuestChannel:
        # One agent object per sandbox: QEMU serves one connection on the channel at a time.
        with e.agent_lock:
            if e.agent is None:
                key = (self._store.dir(e.record.id) / "id_ed25519").read_bytes()
                e.agent = self._guest(e.record.agent_socket, key, e.record.host_key, e.record.id)
            return e.agent

    def _domain_running(self, domain: str) -> bool:
        info = self._hv.info(domain)
        return info is not None and info.state is DomainState.RUNNING

    # ------------------------------------------------------------------ exit tracking
    def _on_domain_stop(self, domain: str, reason: StopReason) -> None:
        if not domain.startswith(DOMAIN_PREFIX):
            return
        with self._entries_lock:
            e = self._entries.get(domain[len(DOMAIN_PREFIX):])
        if e is not None and e.record is not None:
            self._record_exit(e, reason)

    def _record_exit(self, e: _Entry, reason: StopReason, at: datetime | None = None) -> None:
        """Mark a running sandbox stopped (once) and wake every waiter."""
        with e.state_lock:
            if e.record.phase is not Phase.RUNNING:
                return
            self._save(
                e, phase=Phase.STOPPED, exit_status=_EXIT_FOR_REASON[reason], exited_at=at or utcnow(), pid=0
            )
            e.exited.notify_all()
        log.info("sandbox %s: stopped (%s, exit status %s)", e.record.id, reason.value, e.record.exit_status)

    def _check_exit(self, e: _Entry) -> None:
        """Catch an exit whose event we missed (libvirtd restarted, or we were down)."""
        if e.record.phase is not Phase.RUNNING:
            return
        info = self._hv.info(e.record.domain)
        if info is None or info.state is DomainState.SHUTOFF:
            reason = info.stop_reason if info is not None else StopReason.UNKNOWN
            self._record_exit(e, reason, at=_console_mtime(self._store.dir(e.record.id)))

    # ------------------------------------------------------------------ stop / wait
    def stop(self, sandbox_id: str, *, timeout: float | None = None) -> None:
        """Power the guest off cleanly; force it off after ``timeout`` seconds.

        ``timeout=None`` uses the configured grace period; 0 forces at once. Succeeds for
        unknown, created and stopped sandboxes. Afterwards wait() returns.
        """
        if timeout is not None and timeout < 0:
            raise InvalidArgument("stop timeout must not be negative")
        try:
            e = self._entry(sandbox_id)
        except NotFound:
            return
        grace = self.config.stop_timeout if timeout is None else timeout
        with e.op_lock:
            if e.removed:
                return
            self._stop_locked(e, grace)

    def _stop_locked(self, e: _Entry, grace: float) -> None:
        rec = e.record
        if rec.phase is not Phase.RUNNING:
            # Never started, an interrupted boot, or the guest already ended by itself: make
            # sure the VM is off and the namespace has its interfaces back.
            self._hv.destroy(rec.domain)
            if rec.phase is Phase.CREATED:
                with e.state_lock:
                    self._save(e, phase=Phase.STOPPED, exit_status=EXIT_CLEAN, exited_at=utcnow(), pid=0)
                    e.exited.notify_all()
            if e.agent is not None:
                e.agent.close()
            self._unwire(rec)
            return
        deadline = time.monotonic() + grace
        if grace > 0:
            # On its own thread: a guest that hangs mid-request must not hold Stop past its
            # grace period (forcing the VM off below ends the request too).
            asker = threading.Thread(target=self._request_poweroff, args=(e, deadline), daemon=True,
                                     name=f"vsbx-poweroff-{rec.id}")
            asker.start()
            asker.join(max(0.0, deadline - time.monotonic()))
            self._await_exit(e, deadline, poll_every=0.25)
        if e.record.phase is Phase.RUNNING:
            log.info("sandbox %s: forcing the VM off after %.1fs", rec.id, grace)
            self._hv.destroy(rec.domain)
            self._record_exit(e, StopReason.DESTROYED)
        if e.agent is not None:
            e.agent.close()
        self._unwire(rec)

    def _request_poweroff(self, e: _Entry, deadline: float) -> None:
        """Ask the guest to power itself off; failures just mean we force it later."""
        try:
            agent = self._agent(e)
            if not agent.connected:
                agent.connect(min(deadline, time.monotonic() + 5.0), alive=lambda: self._domain_running(e.record.domain))
            agent.exec(["/sbin/vsbx-poweroff"], in_guest_root=True, timeout=max(1.0, min(5.0, deadline - time.monotonic())))
        except VmSandboxError as err:
            log.info("sandbox %s: clean power-off request failed (%s); will force", e.record.id, err)

    def _await_exit(self, e: _Entry, deadline: float | None, *, poll_every: float) -> bool:
        """Block until the sandbox is stopped (True) or ``deadline`` passes (False).

        Lifecycle events wake us; every ``poll_every`` seconds libvirt is also asked directly,
        in case an event was lost. The clock is per sandbox, so callers that wait in short
        slices (the gRPC server) still poll. Call without e.state_lock held.
        """
        with e.state_lock:
            while e.record.phase is not Phase.STOPPED:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                slice_ = min(poll_every, 1.0) if remaining is None else min(poll_every, 1.0, remaining)
                e.exited.wait(slice_)
                if e.record.phase is Phase.RUNNING and time.monotonic() - e.last_exit_check >= poll_every:
                    e.last_exit_check = time.monotonic()
                    e.state_lock.release()
                    try:
                        self._check_exit(e)
                    except Unavailable:
                        pass  # libvirtd away: keep waiting for its event or the next poll
                    finally:
                        e.state_lock.acquire()
            return True

    def wait(self, sandbox_id: str, timeout: float | None = None) -> ExitStatus:
        """Block until the guest is gone (see Controller.wait)."""
        e = self._entry(sandbox_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._await_exit(e, deadline, poll_every=5.0):
            raise DeadlineExceeded(f"sandbox {sandbox_id} still running after {timeout}s", sandbox_id=sandbox_id)
        rec = e.record
        assert rec.exited_at is not None and rec.exit_status is not None
        return ExitStatus(rec.exit_status, rec.exited_at)

    # ------------------------------------------------------------------ status & co
    def status(self, sandbox_id: str, *, verbose: bool = False) -> ControllerStatus:
        """State, VMM pid and times of the sandbox (see Controller.status)."""
        e = self._entry(sandbox_id)
        try:
            self._check_exit(e)
        except Unavailable as err:  # libvirtd away: the record is still the best answer
            log.warning("sandbox %s: status from the record only: %s", sandbox_id, err)
        rec = e.record
        ready = rec.phase is Phase.RUNNING
        info: dict[str, str] = {"phase": rec.phase.value, "domain": rec.domain, "virt_type": self.virt_type.value}
        if verbose:
            info.update(self._verbose_info(rec))
        return ControllerStatus(
            sandbox_id=rec.id,
            pid=rec.pid if ready else 0,
            state=(SandboxState.READY if ready else SandboxState.NOTREADY).value,
            info=info,
            created_at=rec.started_at or rec.created_at,
            exited_at=rec.exited_at,
        )

    def _verbose_info(self, rec: SandboxRecord) -> dict[str, str]:
        sdir = self._store.dir(rec.id)
        out = {
            "console_log": str(sdir / "console.log"),
            "image": rec.image_dir,
            "kernel_version": self._manifest(rec.image_dir).get("kernel_version", ""),
            "vcpus": str(rec.vcpus),
            "memory_mib": str(rec.memory_mib),
            "netns_path": rec.netns_path,
            "taps": ",".join(rec.taps),
            "labels": json.dumps(rec.sandbox.labels, sort_keys=True),
            "annotations": json.dumps(rec.annotations, sort_keys=True),
            "extensions": ",".join(sorted(rec.sandbox.extensions)),
        }
        if rec.exit_status is not None:
            out["exit_status"] = str(rec.exit_status)
        try:
            info = self._hv.info(rec.domain)
        except Unavailable:
            info = None
            out["libvirt_state"] = "unreachable"
        if info is not None:
            out["libvirt_state"] = info.state.value
            if info.state is DomainState.SHUTOFF:
                out["libvirt_reason"] = info.stop_reason.value
            try:
                out["domain_xml"] = self._hv.xml(rec.domain)
            except (NotFound, Unavailable):
                pass
        # CRI parses info["info"] as JSON (its SandboxInfo shape; unknown keys are ignored).
        out["info"] = json.dumps({"pid": rec.pid, "vmsandbox": {k: v for k, v in out.items() if k != "domain_xml"}})
        return out

    def _manifest(self, image_dir: str) -> dict[str, _Any]:
        with self._image_lock:
            m = self._manifests.get(image_dir)
        if m is None:
            try:
                m = json.loads((Path(image_dir) / "manifest.json").read_text())
            except (OSError, ValueError) as err:
                raise FailedPrecondition(f"guest image manifest in {image_dir} is unreadable: {err}") from err
            with self._image_lock:
                self._manifests[image_dir] = m
        return m

    def platform(self, sandbox_id: str) -> Platform:
        """The guest's OS/architecture in OCI names, from the image manifest (cached)."""
        e = self._entry(sandbox_id)
        return GuestImage("", Path(e.record.image_dir), self._manifest(e.record.image_dir)).platform

    def resource_metrics(self, sandbox_id: str) -> CgroupV2Metrics:
        """The sandbox's figures as a typed object (what :meth:`metrics` encodes).

        One libvirt stats call plus netns counters; no guest round trip. A sandbox that is
        not running reports zeros.
        """
        return self.resource_metrics_many([sandbox_id])[sandbox_id]

    def resource_metrics_many(self, sandbox_ids: Iterable[str]) -> dict[str, CgroupV2Metrics]:
        """Figures of many sandboxes with one bulk libvirt stats call. Raises NotFound."""
        recs = [self._entry(sid).record for sid in sandbox_ids]
        running = [r.domain for r in recs if r.phase is Phase.RUNNING]
        stats = self._hv.stats(running) if running else {}
        out = {}
        for rec in recs:
            st = stats.get(rec.domain, {})
            limit = rec.memory_mib * 1024 * 1024 if st else 0
            out[rec.id] = from_domain_stats(st, self._tap_counters(rec), limit_bytes=limit)
        return out

    def _tap_counters(self, rec: SandboxRecord) -> list[tuple[str, InterfaceCounters]]:
        if rec.phase is not Phase.RUNNING or not rec.taps or rec.network is None:
            return []
        plan = self._plan(rec)
        assert plan is not None
        try:
            counters = self._net.read_counters(rec.netns_path, list(rec.taps))
        except VmSandboxError as err:
            log.warning("sandbox %s: reading interface counters failed: %s", rec.id, err)
            return []
        return [(i.name, counters[t]) for t, i in zip(rec.taps, plan.interfaces) if t in counters]

    def metrics(self, sandbox_id: str) -> Metric:
        """containerd's Metric: an Any of ``io.containerd.cgroups.v2.Metrics`` (bare URL)."""
        return Metric(utcnow(), sandbox_id, to_any(self.resource_metrics(sandbox_id)))

    def update(self, sandbox_id: str, sandbox: Sandbox, *fields: str) -> None:
        """Apply the named fields of ``sandbox`` (all updatable ones when none are named).

        labels, extensions, spec, runtime and sandboxer are stored (and shown by verbose
        status); the OCI spec's annotations become the sandbox's annotations. Resources reach
        the running guest: our vcpus/memory-mib annotations or labels, and CRI's
        ``updated-resources`` extension; memory through the balloon (up to the boot-time
        maximum), vCPUs only to the count the guest booted with, else FailedPrecondition.
        Unknown fields raise InvalidArgument. Nothing is changed when any part fails.
        """
        e = self._entry(sandbox_id)
        if not isinstance(sandbox, Sandbox):
            raise InvalidArgument("sandbox must be a vmsandbox.Sandbox")
        unknown = set(fields) - UPDATABLE_FIELDS
        if unknown:
            raise InvalidArgument(
                f"cannot update field(s) {', '.join(sorted(unknown))}; updatable: {', '.join(sorted(UPDATABLE_FIELDS))}",
                sandbox_id=sandbox_id,
            )
        names = set(fields) or set(UPDATABLE_FIELDS)
        with e.op_lock:
            self._locked_entry(e)
            rec = e.record
            attrs = {n: getattr(sandbox, n) for n in names if n != "annotations"}
            new_sandbox = replace(rec.sandbox, **attrs, updated_at=utcnow())
            annotations = dict(rec.annotations)
            if names & {"spec", "annotations"}:
                annotations.update(_spec_annotations(sandbox.spec))
            change = resources_from_update(
                new_sandbox, annotations, names,
                max_vcpus=self.config.max_vcpus, max_memory_mib=self.config.max_memory_mib,
                pod=parse_pod_config(rec.options),
            )
            self._apply_resources(e, change)
            with e.state_lock:
                self._save(
                    e, sandbox=new_sandbox, annotations=annotations,
                    vcpus=change.vcpus or rec.vcpus, memory_mib=change.memory_mib or rec.memory_mib,
                )

    def _apply_resources(self, e: _Entry, change: ResourceChange) -> None:
        rec = e.record
        if change.vcpus is not None and change.vcpus != rec.vcpus:
            raise FailedPrecondition(
                f"cannot change vCPUs from {rec.vcpus} to {change.vcpus}: vCPU hot-plug is not supported; "
                "set vmsandbox.io/vcpus at create", sandbox_id=rec.id)
        if change.memory_mib is None or change.memory_mib == rec.memory_mib:
            return
        if rec.phase is Phase.RUNNING:
            xml_max = self._max_memory_mib(rec)
            if change.memory_mib > xml_max:
                raise FailedPrecondition(
                    f"cannot grow memory to {change.memory_mib} MiB: the guest booted with at most {xml_max} MiB "
                    "(the balloon cannot go past it)", sandbox_id=rec.id)
            self._hv.set_memory(rec.domain, change.memory_mib)
        else:
            raise FailedPrecondition(f"sandbox is {rec.phase.value}: memory can only change while it runs",
                                     sandbox_id=rec.id)

    def _max_memory_mib(self, rec: SandboxRecord) -> int:
        import xml.etree.ElementTree as ET

        el = ET.fromstring(self._hv.xml(rec.domain)).find("memory")
        assert el is not None and el.text is not None
        unit = el.get("unit", "KiB")
        return int(el.text) // (1024 if unit == "KiB" else 1)

    # ------------------------------------------------------------------ shutdown
    def shutdown(self, sandbox_id: str) -> None:
        """Stop the sandbox if needed and remove everything it owns. Idempotent."""
        try:
            e = self._entry(sandbox_id)
        except NotFound:
            return
        with e.op_lock:
            if e.removed:
                return
            self._stop_locked(e, self.config.stop_timeout)
            self._remove_locked(e)

    def _remove_locked(self, e: _Entry) -> None:
        rec = e.record
        self._hv.destroy(rec.domain)
        self._hv.undefine(rec.domain)
        if rec.taps or rec.network is not None:
            self._net.detach(rec.netns_path, list(rec.taps), self._plan(rec))
        if e.agent is not None:
            e.agent.close()
        try:
            os.unlink(rec.agent_socket)
        except FileNotFoundError:
            pass
        self._store.remove(rec.id)
        e.removed = True
        self._forget(rec.id)
        log.info("sandbox %s: removed", rec.id)

    # ------------------------------------------------------------------ extras
    def exec(
        self,
        sandbox_id: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | None = None,
        timeout: float | None = None,
    ) -> ExecResult:
        """Run ``argv`` (no shell) inside the sandbox's rootfs and return its result.

        Without rootfs mounts it runs in the guest's own root. Raises FailedPrecondition
        when the sandbox is not running, DeadlineExceeded after ``timeout`` seconds.
        """
        if isinstance(argv, str):
            raise InvalidArgument("argv must be a sequence of strings, not one string")
        e = self._entry(sandbox_id)
        if e.record.phase is not Phase.RUNNING:
            raise FailedPrecondition(f"sandbox is {e.record.phase.value}, not running", sandbox_id=sandbox_id)
        agent = self._agent(e)
        if not agent.connected:
            agent.connect(time.monotonic() + 15.0, alive=lambda: self._domain_running(e.record.domain))
        return agent.exec(argv, env=env, cwd=cwd, stdin=stdin, timeout=timeout)

    def list(self) -> list[SandboxSummary]:
        """Every sandbox this controller knows, sorted by id."""
        with self._entries_lock:
            entries = [e for e in self._entries.values() if e.record is not None and not e.removed]
        out = []
        for e in sorted(entries, key=lambda e: e.record.id):
            r = e.record
            out.append(SandboxSummary(
                id=r.id,
                phase=r.phase,
                state=SandboxState.READY if r.phase is Phase.RUNNING else SandboxState.NOTREADY,
                pid=r.pid,
                created_at=r.created_at,
                exited_at=r.exited_at,
            ))
        return out

    def console_log(self, sandbox_id: str) -> Path:
        """The file the guest's console is written to."""
        return self._store.dir(self._entry(sandbox_id).record.id) / "console.log"

    def read_console_log(self, sandbox_id: str, max_bytes: int = 0) -> bytes:
        """The console log's last ``max_bytes`` bytes (all when 0; empty before the first boot)."""
        try:
            with open(self.console_log(sandbox_id), "rb") as f:
                if max_bytes > 0:
                    f.seek(max(0, f.seek(0, os.SEEK_END) - max_bytes))
                return f.read()
        except FileNotFoundError:
            return b""

    # ------------------------------------------------------------------ recovery
    def _recover(self) -> None:
        """Rebuild in-memory state from records and libvirt; the owner also cleans up
        interrupted work (a boot cut short, a half-made folder, a domain with no record)."""
        records, strays = self._store.load_all()
        known = {r.domain for r in records}
        for rec in records:
            e = _Entry(record=rec)
            with self._entries_lock:
                self._entries[rec.id] = e
            if rec.phase is Phase.RUNNING:
                self._check_exit(e)
                continue
            if not self.owner or rec.phase is not Phase.CREATED:
                continue
            info = self._hv.info(rec.domain)
            if info is not None and info.state is DomainState.RUNNING:
                log.warning("sandbox %s: a boot was interrupted; powering the VM off", rec.id)
                self._hv.destroy(rec.domain)
                self._unwire(rec)
            elif info is None:
                log.warning("sandbox %s: its domain vanished; marking it stopped", rec.id)
                with e.state_lock:
                    self._save(e, phase=Phase.STOPPED, exit_status=EXIT_FAILED, exited_at=utcnow())
        if not self.owner:
            return
        for d in strays:
            log.warning("removing %s: left by an interrupted create", d)
            self._hv.destroy(DOMAIN_PREFIX + d.name)
            self._hv.undefine(DOMAIN_PREFIX + d.name)
            self._store.remove(d.name)
        # A quarantined record's VM may be running someone's pod: leave it for a person.
        known |= {DOMAIN_PREFIX + sid for sid in self._store.quarantined()}
        for info in self._hv.list_tagged():
            if info.metadata.get("state-dir") == str(self.config.state_dir) and info.name not in known:
                log.warning("removing domain %s: ours, but it has no record", info.name)
                self._hv.destroy(info.name)
                self._hv.undefine(info.name)

    def _reconcile(self) -> None:
        """After libvirtd came back: notice sandboxes that stopped while it was away."""
        with self._entries_lock:
            entries = list(self._entries.values())
        for e in entries:
            if e.record is not None and e.record.phase is Phase.RUNNING:
                threading.Thread(target=self._safe_check_exit, args=(e,), daemon=True).start()

    def _safe_check_exit(self, e: _Entry) -> None:
        try:
            self._check_exit(e)
        except VmSandboxError as err:
            log.warning("sandbox %s: reconciling after reconnect failed: %s", e.record.id, err)


def state_dir_owner(state_dir: Path) -> int | None:
    """The pid of the controller that owns ``state_dir`` now (0 if it wrote none), else None."""
    try:
        fd = os.open(state_dir / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else 0
        return None
    finally:
        os.close(fd)  # also drops the shared lock we may have taken


def _spec_annotations(spec: Any | None) -> dict[str, str]:
    """The annotations of an OCI runtime spec held in an Any (JSON, as containerd writes it)."""
    if spec is None:
        return {}
    try:
        doc = json.loads(spec.value)
    except ValueError:
        return {}
    ann = doc.get("annotations") if isinstance(doc, dict) else None
    return {str(k): str(v) for k, v in ann.items()} if isinstance(ann, dict) else {}


def _warn_if_unreachable(path: Path) -> None:
    """QEMU usually runs unprivileged (libvirt-qemu): it must traverse every parent folder."""
    for parent in path.resolve().parents:
        try:
            mode = parent.stat().st_mode
        except OSError:
            continue
        if not mode & 0o001:
            log.warning("state dir %s: %s is mode %o, which an unprivileged QEMU user cannot traverse; "
                        "guests will fail to open their disks (use a folder like /var/lib/vmsandbox)",
                        path, parent, mode & 0o7777)
            return


def _clamp(v: int | None, lo: int, hi: int) -> int | None:
    return None if v is None else max(lo, min(hi, v))


def _console_tail(sdir: Path, lines: int = 3) -> str:
    try:
        text = (sdir / "console.log").read_text(errors="replace")
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text.splitlines()[-lines:] if line.strip())


def _console_mtime(sdir: Path) -> datetime:
    try:
        return datetime.fromtimestamp((sdir / "console.log").stat().st_mtime, timezone.utc)
    except OSError:
        return utcnow()
