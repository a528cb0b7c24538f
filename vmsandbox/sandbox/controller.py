"""SandboxController: containerd's sandbox Controller over the ports in :mod:`.ports`.

The only code that knows the sandbox lifecycle (created -> running -> stopped -> removed).
Each operation takes the sandbox's own lock (never a global one across sandboxes); exits are
observed through libvirt lifecycle events and wake ``wait()``. Every state change is saved
to the sandbox's record, so a new controller on the same state dir recovers all sandboxes.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack, suppress
from pathlib import Path

from ..config import Config, VirtType
from ..errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from ..hypervisor.domain import build_domain_xml
from ..image import GuestImage
from ..model import (
    AnyMessage,
    ControllerInstance,
    ControllerStatus,
    ExecResult,
    ExitStatus,
    Metric,
    Mount,
    Phase,
    Platform,
    SandboxMetadata,
    SandboxSummary,
    utcnow,
)
from ..payloads.cgroupsv2 import CgroupV2Metrics
from ..payloads.podconfig import parse_pod_config
from .ports import DomainState, GuestChannel, GuestFactory, HostMounts, HypervisorFactory, Images, Network, StopReason
from .resources import plan_update, updated_fields
from . import mounts as mountplan
from .cgroups import cgroup_relpath, libvirt_partition, place_process
from .guestconfig import guest_settings, write_guest_files
from .agents import Agents
from .guestops import GuestOps
from .bringup import COLD, TEMPLATE, BringUp
from .events import Emitter, EventSink, Step
from .exits import DOMAIN_PREFIX, EXIT_CLEAN, EXIT_FAILED, EXIT_KILLED, Exits
from .netsteps import NetSteps
from .ocimount import OciRoots
from .recovery import Recovery
from .registry import Entry, Registry
from .share import Shares
from .status import StatusView, instance_of
from .spec import check_fits_host, domain_spec, size_sandbox
from .templates import TemplateInfo, Templates, wants_template
from .statedir import LOCK_FILE, StateDir, agent_socket_path, state_dir_owner
from .store import SandboxRecord, Store
from .undo import quietly
from .validate import ANNOTATION_MEMORY_MIB, ANNOTATION_VCPUS, check_sandbox_id

__all__ = ["SandboxController", "DOMAIN_PREFIX", "EXIT_CLEAN", "EXIT_KILLED", "EXIT_FAILED", "LOCK_FILE",
           "state_dir_owner"]

log = logging.getLogger(__name__)


class SandboxController(GuestOps):
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
        mounts: HostMounts,
        progress: Callable[[str], None] | None = None,
        events: EventSink | None = None,
    ) -> None:
        self.config = config
        self._emit = Emitter(events)
        self.virt_type = virt_type
        self._net = network
        self._guest = guest
        self._images = images
        self._progress = progress
        self._store = Store(config.state_dir)
        self._netsteps = NetSteps(network, self._store)
        self._shares = Shares(mounts, self._store, self.config.virtiofsd)
        self._registry = Registry(self._store)
        self._oci = OciRoots(config.state_dir, self._store.root, progress)
        self._exits = Exits(self._registry, self._emit)
        self._image: GuestImage | None = None
        self._image_lock = threading.Lock()
        self._closed = False
        self._state_dir = StateDir(config.state_dir)
        self.owner = self._state_dir.owner
        try:
            self._hv = hypervisor(self._exits.on_domain_stop, lambda: self._recovery.reconcile())
        except BaseException:
            self._state_dir.release()
            raise
        self._exits.bind(self._hv)
        self._agents = Agents(guest, self._store, self._hv)
        self._templates = Templates(config, virt_type, self._hv, guest, progress)
        self._bringup = BringUp(config, self._hv, self._templates, self._agents, self._store, network, self._emit)
        self._view = StatusView(self._registry, self._exits, self._hv, network, virt_type)
        self._recovery = Recovery(config, self._registry, self._exits, self._hv, owner=self.owner,
                                  netsteps=self._netsteps, shares=self._shares)
        try:
            self._recovery.recover()
        except BaseException:
            self._hv.close()
            self._state_dir.release()
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
        for e in self._registry.visible():
            self._agents.drop(e)
        self._hv.close()
        self._state_dir.release()

    def image(self) -> GuestImage:
        """The guest image for this controller, built on first use."""
        with self._image_lock:
            if self._image is None:
                self._image = self._images.ensure(self._progress)
                if self.owner:
                    self._templates.clean(self._image)  # those of other images can never be used
            return self._image

    def warm_template(self, *, vcpus: int | None = None, memory_mib: int | None = None,
                      progress: Callable[[str], None] | None = None) -> TemplateInfo:
        """The template for sandboxes of this shape (default size unless given), built now if
        missing (``progress`` hears of it). InvalidArgument for a bad size; a failed build raises."""
        asked = {k: str(v) for k, v in ((ANNOTATION_VCPUS, vcpus), (ANNOTATION_MEMORY_MIB, memory_mib)) if v is not None}
        return self._templates.warm(self.image(), size_sandbox(asked, None, self.config), progress)

    # ------------------------------------------------------------------ create
    def create(
        self,
        sandbox: SandboxMetadata,
        *,
        rootfs: Iterable[Mount] = (),
        options: AnyMessage | None = None,
        netns_path: str = "",
        annotations: Mapping[str, str] | None = None,
    ) -> None:
        """Prepare a sandbox: disks, keys, config disk and the libvirt domain definition.

        Nothing boots yet. Raises InvalidArgument for a bad id, mount or annotation (or more
        memory than the host has) and AlreadyExists for a taken id; on any failure nothing is
        left behind.
        """
        if not isinstance(sandbox, SandboxMetadata):
            raise InvalidArgument("sandbox must be a vmsandbox.Sandbox")
        sid = check_sandbox_id(sandbox.id)
        mounts = tuple(rootfs)
        pod = parse_pod_config(options)
        # CRI passes pod annotations inside the PodSandboxConfig; explicit ones win.
        annotations = {**(pod.annotations if pod is not None else {}), **dict(annotations or {})}
        size = size_sandbox(annotations, pod, self.config)
        wants_template(annotations, self.config)  # validates vmsandbox.io/start
        check_fits_host(size, self._hv.host_memory_mib())
        settings = guest_settings(sandbox, annotations, pod)
        if pod is not None and pod.cgroup_parent:
            cgroup_relpath(pod.cgroup_parent)  # validate now; placement happens at start
        netplan = self._net.inspect_netns(netns_path) if netns_path else None
        sdir = self._store.dir(sid)
        plans = mountplan.plan_mounts(mounts, sdir)
        mountplan.check_not_shared(mounts, [(e.record.id, e.record.rootfs) for e in self._registry.visible()
                                            if e.record.phase is not Phase.STOPPED])

        domain = DOMAIN_PREFIX + sid
        entry = self._registry.reserve(sid)
        self._emit(sid, Step.CREATING)
        try:
            with ExitStack() as undo:
                # Undo steps never replace the error that made us undo (they log their own).
                undo.callback(quietly(self._registry.forget, sid))
                # The cheap checks first. Domain names are host-wide: the name may belong to
                # another state dir's sandbox.
                if self._hv.info(domain) is not None:
                    raise AlreadyExists(f"a libvirt domain named {domain} already exists", sandbox_id=sid)
                image = self.image()
                try:
                    sdir.mkdir(parents=True)
                except OSError as err:
                    raise FailedPrecondition(f"cannot create the sandbox folder {sdir}: {err.strerror}",
                                             sandbox_id=sid) from err
                undo.callback(quietly(self._store.remove, sid))
                os.chmod(sdir, 0o711)
                # Held until the record is written: another process's recovery waits for it.
                lock = self._store.hold(sid)
                undo.callback(os.close, lock)
                image_config = None
                for plan in plans:
                    if plan.build_from == mountplan.OCI:
                        image_config = self._oci.materialize(plan)
                    else:
                        mountplan.materialize(plan)
                share = self._shares.make(sid)
                taps = self._netsteps.make_taps(sid, netns_path, netplan, undo)
                host_key = write_guest_files(sdir, settings=settings, disks=plans, network=netplan)
                now = utcnow()
                spec = domain_spec(
                    sandbox_id=sid, domain=domain, config=self.config, virt_type=self.virt_type, image=image,
                    sandbox_dir=sdir, agent_socket=agent_socket_path(self.config.state_dir, sid), size=size, disks=plans, taps=taps,
                    network=netplan, partition=libvirt_partition(pod.cgroup_parent) if pod is not None else "",
                    share=share,
                )
                self._hv.define(build_domain_xml(spec))
                undo.callback(quietly(self._hv.undefine, domain))
                self._emit(sid, Step.DEFINED)
                record = SandboxRecord(
                    id=sid,
                    domain=domain,
                    phase=Phase.CREATED,
                    created_at=now,
                    sandbox=sandbox,
                    vcpus=size.vcpus,
                    memory_mib=size.memory_mib,
                    max_memory_mib=size.max_memory_mib,
                    image_dir=str(image.directory),
                    agent_socket=spec.agent_socket,
                    host_key=host_key,
                    rootfs=mounts,
                    options=options,
                    netns_path=netns_path,
                    annotations=annotations,
                    taps=tuple(taps),
                    network=netplan,
                    pod=pod,
                    platform=image.platform,
                    image=image_config,
                )
                self._store.save(record)
                entry.record = record
                undo.pop_all()
                os.close(lock)
            self._store.forget_taps(sid)  # the record holds them now
            self._emit(sid, Step.CREATED)
            log.info("sandbox %s: created (%d vCPU, %d MiB, %d disk(s))", sid, size.vcpus, size.memory_mib, len(plans))
        finally:
            entry.op_lock.release()

    # ------------------------------------------------------------------ start
    def start(self, sandbox_id: str) -> ControllerInstance:
        """Boot the guest and return once its agent answers (see Controller.start)."""
        e = self._registry.get(sandbox_id)
        with e.op_lock:
            e.check_live()
            rec = e.record
            if rec.phase is Phase.RUNNING:
                return instance_of(rec)
            if rec.phase is Phase.STOPPED:
                raise FailedPrecondition("sandbox is stopped; a stopped sandbox cannot be restarted", sandbox_id=sandbox_id)
            self._emit(sandbox_id, Step.STARTING)
            try:
                self._shares.mount(sandbox_id)  # before the boot: virtiofsd takes its mount then
                info = self._hv.info(rec.domain)
                if info is None:
                    raise NotFound(f"domain {rec.domain} of sandbox {sandbox_id} is gone", sandbox_id=sandbox_id)
                tpl, started, agent = self._bringup.bring_up(e, info.state is DomainState.RUNNING, self.image())
                self._emit(sandbox_id, Step.AGENT_READY)
                if rec.rootfs:
                    self._agents.check_mounts(agent, rec)
                pid = self._hv.pid(rec.domain)
                if rec.pod is not None and rec.pod.cgroup_parent and pid and not libvirt_partition(rec.pod.cgroup_parent):
                    place_process(pid, rec.pod.cgroup_parent)  # libvirt cannot (see libvirt_partition)
                with e.state_lock:
                    rec = self._registry.save(e, phase=Phase.RUNNING, started_at=started, pid=pid,
                                              start_path=TEMPLATE if tpl is not None else COLD)
            except BaseException as err:
                # containerd drops a sandbox whose Start failed and never calls Shutdown (the
                # kubelet retries with a new id): remove everything now, keep the first error.
                self._emit(sandbox_id, Step.START_FAILED, f"{type(err).__name__}: {err}")
                self._remove_after_failed_start(e, err)
                raise
            self._emit(sandbox_id, Step.RUNNING)
            log.info("sandbox %s: running (pid %d) after %.2fs", sandbox_id, rec.pid, (utcnow() - started).total_seconds())
            return instance_of(rec)

    def _remove_after_failed_start(self, e: Entry, err: BaseException) -> None:
        log.warning("sandbox %s: start failed (%s: %s); removing the sandbox", e.record.id, type(err).__name__, err)
        try:
            self._remove_locked(e)
        except Exception:  # noqa: BLE001 - the start's own error is the one to report
            log.exception("sandbox %s: removing it after a failed start failed; its record is kept", e.record.id)

    # ------------------------------------------------------------------ stop / wait
    def stop(self, sandbox_id: str, *, timeout: float | None = None) -> None:
        """Power the guest off cleanly; force it off after ``timeout`` seconds.

        ``timeout=None`` uses the configured grace period; 0 forces at once. Succeeds for
        unknown, created and stopped sandboxes. Afterwards wait() returns.
        """
        if timeout is not None and timeout < 0:
            raise InvalidArgument("stop timeout must not be negative")
        try:
            e = self._registry.get(sandbox_id)
        except NotFound:
            return
        grace = self.config.stop_timeout if timeout is None else timeout
        with e.op_lock:
            if e.removed:
                return
            self._stop_locked(e, grace)

    def _stop_locked(self, e: Entry, grace: float) -> None:
        rec = e.record
        if rec.phase is not Phase.RUNNING:
            # Never started, an interrupted boot, or the guest already ended by itself: make
            # sure the VM is off and the namespace has its interfaces back.
            self._hv.destroy(rec.domain)
            if rec.phase is Phase.CREATED:
                with e.state_lock:
                    self._registry.save(e, phase=Phase.STOPPED, exit_status=EXIT_CLEAN, exited_at=utcnow(), pid=0)
                    e.exited.notify_all()
            self._agents.drop(e)
            self._netsteps.unwire(rec)
            return
        deadline = time.monotonic() + grace
        self._emit(rec.id, Step.STOPPING)
        if grace > 0:
            # On its own thread: a guest that hangs mid-request must not hold Stop past its
            # grace period (forcing the VM off below ends the request too).
            asker = threading.Thread(target=self._agents.request_poweroff, args=(e, deadline), daemon=True,
                                     name=f"vsbx-poweroff-{rec.id}")
            asker.start()
            asker.join(max(0.0, deadline - time.monotonic()))
            self._exits.wait(e, deadline, poll_every=0.25)
        if e.record.phase is Phase.RUNNING:
            log.info("sandbox %s: forcing the VM off after %.1fs", rec.id, grace)
            self._hv.destroy(rec.domain)
            self._exits.record(e, StopReason.DESTROYED)
        self._agents.drop(e)
        self._netsteps.unwire(rec)

    def wait(self, sandbox_id: str, timeout: float | None = None) -> ExitStatus:
        """Block until the guest is gone (see Controller.wait)."""
        e = self._registry.get(sandbox_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._exits.wait(e, deadline, poll_every=5.0):
            raise DeadlineExceeded(f"sandbox {sandbox_id} still running after {timeout}s", sandbox_id=sandbox_id)
        rec = e.record
        assert rec.exited_at is not None and rec.exit_status is not None
        return ExitStatus(rec.exit_status, rec.exited_at)

    # ------------------------------------------------------------------ status & co (StatusView)
    def status(self, sandbox_id: str, *, verbose: bool = False) -> ControllerStatus:
        """State, VMM pid and times of the sandbox (see Controller.status)."""
        return self._view.status(sandbox_id, verbose=verbose)

    def platform(self, sandbox_id: str) -> Platform:
        """The guest's OS/architecture in OCI names, as recorded at create from the guest image."""
        return self._view.platform(sandbox_id)

    def resource_metrics(self, sandbox_id: str) -> CgroupV2Metrics:
        """The sandbox's figures as a typed object (what :meth:`metrics` encodes); zeros
        when it is not running. One hypervisor stats call plus netns counters."""
        return self._view.resource_metrics(sandbox_id)

    def resource_metrics_many(self, sandbox_ids: Iterable[str]) -> dict[str, CgroupV2Metrics]:
        """Figures of many sandboxes with one bulk stats call. Raises NotFound."""
        return self._view.resource_metrics_many(sandbox_ids)

    def metrics(self, sandbox_id: str) -> Metric:
        """containerd's Metric: an Any of ``io.containerd.cgroups.v2.Metrics`` (bare URL)."""
        return self._view.metrics(sandbox_id)

    def list(self) -> list[SandboxSummary]:
        """Every sandbox this controller knows, sorted by id."""
        return self._view.list()

    def console_log(self, sandbox_id: str) -> Path:
        """The file the guest's console is written to."""
        return self._view.console_log(sandbox_id)

    def read_console_log(self, sandbox_id: str, max_bytes: int = 0) -> bytes:
        """The console log's last ``max_bytes`` bytes (all when 0; empty before the first boot)."""
        return self._view.read_console_log(sandbox_id, max_bytes)

    def update(self, sandbox_id: str, sandbox: SandboxMetadata, *fields: str) -> None:
        """Apply the named fields of ``sandbox`` (all updatable ones when none are named).

        labels, extensions, spec, runtime and sandboxer are stored (and shown by verbose
        status); the OCI spec's annotations become the sandbox's annotations. Resources reach
        the running guest: our vcpus/memory-mib annotations or labels, and CRI's
        ``updated-resources`` extension; memory through the balloon (up to the boot-time
        maximum), vCPUs only to the count the guest booted with, else FailedPrecondition.
        Unknown fields raise InvalidArgument. Nothing is changed when any part fails.
        """
        e = self._registry.get(sandbox_id)
        names = updated_fields(sandbox, fields, sandbox_id)
        with e.op_lock:
            e.check_live()
            rec = e.record
            plan = plan_update(rec, sandbox, names, self.config)
            with e.state_lock:
                self._registry.save(e, sandbox=plan.sandbox, annotations=plan.annotations,
                                    vcpus=plan.vcpus, memory_mib=plan.memory_mib)
            # The record first: a controller that dies now recovers the new size, not the old.
            if plan.memory_mib != rec.memory_mib:
                try:
                    self._hv.set_memory(rec.domain, plan.memory_mib)
                except BaseException:
                    with e.state_lock:
                        self._registry.save(e, sandbox=rec.sandbox, annotations=rec.annotations,
                                            vcpus=rec.vcpus, memory_mib=rec.memory_mib)
                    raise

    # ------------------------------------------------------------------ shutdown
    def shutdown(self, sandbox_id: str) -> None:
        """Stop the sandbox if needed and remove everything it owns. Idempotent."""
        try:
            e = self._registry.get(sandbox_id)
        except NotFound:
            return
        with e.op_lock:
            if e.removed:
                return
            self._stop_locked(e, self.config.stop_timeout)
            self._remove_locked(e)

    def _remove_locked(self, e: Entry) -> None:
        rec = e.record
        self._hv.destroy(rec.domain)
        self._hv.undefine(rec.domain)
        self._netsteps.remove(rec)
        self._agents.drop(e)
        with suppress(FileNotFoundError):
            os.unlink(rec.agent_socket)
        self._shares.release(rec.id)  # raises while a mount stays: no rmtree through it
        self._store.remove(rec.id)
        with e.state_lock:
            e.removed = True
            e.exited.notify_all()  # waiters learn it is gone (NotFound) instead of waiting on
        self._registry.forget(rec.id)
        self._emit(rec.id, Step.REMOVED)
        log.info("sandbox %s: removed", rec.id)
