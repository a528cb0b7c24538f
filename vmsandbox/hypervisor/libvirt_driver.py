"""The only module that imports libvirt: define/start/stop domains, stats, lifecycle events.

libvirt errors are translated once, here, into vmsandbox errors. One process-wide thread
runs libvirt's default event loop (needed for lifecycle events and keepalive); the
connection is reopened transparently after libvirtd restarts, and ``on_reconnect`` lets the
controller reconcile what happened while it was gone.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any as _Any

import libvirt
from tenacity import retry, retry_if_exception_type, stop_after_delay, wait_exponential

from ..errors import AlreadyExists, FailedPrecondition, Internal, NotFound, Unavailable, VmSandboxError
from ..sandbox.ports import DomainInfo, DomainState, StopReason
from .domain import METADATA_NS, parse_metadata, plan_memory_change
from .memtrim import ZeroMap, punch_ranges, punch_zero_pages, zero_ranges
from .pidfile import process_cpu_ns, qemu_pid
from .savefile import read_save_image, save_header

__all__ = ["LibvirtHypervisor", "DomainState", "StopReason", "DomainInfo"]

log = logging.getLogger(__name__)

# libvirt prints every error to stderr by default; we translate and log them ourselves.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


_EVENT_STOP_DETAIL = {
    libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN: StopReason.SHUTDOWN,
    libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED: StopReason.DESTROYED,
    libvirt.VIR_DOMAIN_EVENT_STOPPED_CRASHED: StopReason.CRASHED,
    libvirt.VIR_DOMAIN_EVENT_STOPPED_FAILED: StopReason.FAILED,
}
_SHUTOFF_REASON = {
    libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN: StopReason.SHUTDOWN,
    libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED: StopReason.DESTROYED,
    libvirt.VIR_DOMAIN_SHUTOFF_CRASHED: StopReason.CRASHED,
    libvirt.VIR_DOMAIN_SHUTOFF_FAILED: StopReason.FAILED,
}
_STATE = {
    libvirt.VIR_DOMAIN_RUNNING: DomainState.RUNNING,
    libvirt.VIR_DOMAIN_PAUSED: DomainState.PAUSED,
    libvirt.VIR_DOMAIN_SHUTOFF: DomainState.SHUTOFF,
}
_UNAVAILABLE_CODES = {
    libvirt.VIR_ERR_NO_CONNECT,
    libvirt.VIR_ERR_RPC,
    libvirt.VIR_ERR_OPERATION_TIMEOUT,
    libvirt.VIR_ERR_AGENT_UNRESPONSIVE,
}
_INVALID_STATE_CODES = {libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_ERR_OPERATION_FAILED}
# Refusals a retry cannot cure (Unavailable would have containerd retry them forever).
_REFUSED_CODES = {libvirt.VIR_ERR_AUTH_FAILED, libvirt.VIR_ERR_AUTH_CANCELLED, libvirt.VIR_ERR_ACCESS_DENIED}


def translate(e: libvirt.libvirtError, what: str) -> VmSandboxError:
    """Map a libvirt error to our hierarchy (the one table for this adapter)."""
    code = e.get_error_code()
    msg = f"{what}: {e.get_error_message() or e}"
    if code == libvirt.VIR_ERR_NO_DOMAIN:
        return NotFound(msg)
    # A system error is transient only when it is about reaching libvirtd (socket, RPC);
    # inside the daemon it is a real failure (e.g. a missing tap).
    transport = e.get_error_domain() in (libvirt.VIR_FROM_RPC, libvirt.VIR_FROM_REMOTE)
    if code in _UNAVAILABLE_CODES or (code == libvirt.VIR_ERR_SYSTEM_ERROR and transport):
        return Unavailable(msg)
    if code == libvirt.VIR_ERR_OPERATION_FAILED and "already exists" in msg:
        return AlreadyExists(msg)  # e.g. a domain name or UUID another definition holds
    if code in _INVALID_STATE_CODES or code in _REFUSED_CODES:
        return FailedPrecondition(msg)
    return Internal(msg)


def start_refused(e: libvirt.libvirtError) -> bool:
    """Whether a failed virDomainCreate is the VM refusing to start (QEMU's own error, or a
    system error inside the daemon, e.g. a disk file gone), not a broken connection."""
    transport = e.get_error_domain() in (libvirt.VIR_FROM_RPC, libvirt.VIR_FROM_REMOTE)
    return e.get_error_code() == libvirt.VIR_ERR_INTERNAL_ERROR or (
        e.get_error_code() == libvirt.VIR_ERR_SYSTEM_ERROR and not transport)


_loop_lock = threading.Lock()
_loop_started = False


def _ensure_event_loop() -> None:
    """Register libvirt's default event implementation and run it on one daemon thread.

    Must happen before the first connection is opened; it is process-wide by design of
    libvirt-python (one event loop per process).
    """
    global _loop_started
    with _loop_lock:
        if _loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                try:
                    libvirt.virEventRunDefaultImpl()
                except Exception:  # pragma: no cover - keep the loop alive
                    log.exception("libvirt event loop iteration failed")

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _loop_started = True


class LibvirtHypervisor:
    """A libvirt connection with lifecycle events, translated errors and reconnection.

    ``on_stop(name, reason)`` runs on the event thread when a domain stops;
    ``on_reconnect()`` runs (on the caller's thread) after the connection was reopened.
    Both must be quick and must not call back into blocking libvirt operations.
    """

    def __init__(
        self,
        uri: str,
        *,
        on_stop: Callable[[str, StopReason], None] | None = None,
        on_reconnect: Callable[[], None] | None = None,
        connect_timeout: float = 15.0,
    ) -> None:
        self.uri = uri
        self._on_stop = on_stop
        self._on_reconnect = on_reconnect
        self._connect_timeout = connect_timeout
        self._lock = threading.RLock()
        self._conn: _Any = None
        self._callback_id: int | None = None
        self._closed = False
        self._ever_connected = False
        _ensure_event_loop()
        self._connection()

    # ------------------------------------------------------------------ connection
    def _open(self) -> _Any:
        @retry(
            retry=retry_if_exception_type(Unavailable),
            wait=wait_exponential(multiplier=0.1, max=2),
            stop=stop_after_delay(self._connect_timeout),
            reraise=True,
        )
        def attempt() -> _Any:
            try:
                return libvirt.open(self.uri)
            except libvirt.libvirtError as e:
                raise translate(e, f"connecting to libvirt at {self.uri}") from e

        conn = attempt()
        try:
            conn.setKeepAlive(5, 3)
        except libvirt.libvirtError:  # test:///default has no keepalive
            pass
        self._callback_id = conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._lifecycle, None
        )
        return conn

    def _connection(self) -> _Any:
        with self._lock:
            if self._closed:
                raise FailedPrecondition("the libvirt connection was closed")
            if self._conn is not None:
                try:
                    if self._conn.isAlive():
                        return self._conn
                except libvirt.libvirtError:
                    pass
                log.warning("libvirt connection to %s lost; reconnecting", self.uri)
                self._drop()
            reopened = self._ever_connected
            self._conn = self._open()
            self._ever_connected = True
            if reopened and self._on_reconnect is not None:
                # Events may have been missed while we were disconnected (however we
                # noticed it: a dead connection here, or an RPC error that dropped it).
                self._on_reconnect()
            return self._conn

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            if self._callback_id is not None:
                conn.domainEventDeregisterAny(self._callback_id)
        except libvirt.libvirtError:
            pass
        try:
            conn.close()
        except libvirt.libvirtError:
            pass
        self._callback_id = None

    def close(self) -> None:
        """Close the connection (idempotent). The process-wide event thread stays."""
        with self._lock:
            self._drop()
            self._closed = True

    @contextmanager
    def _call(self, what: str) -> Iterator[_Any]:
        conn = self._connection()
        try:
            yield conn
        except libvirt.libvirtError as e:
            err = translate(e, what)
            if isinstance(err, Unavailable):
                with self._lock:
                    if self._conn is conn and not _alive(conn):
                        self._drop()
            raise err from e

    def _lifecycle(self, _conn: _Any, dom: _Any, event: int, detail: int, _opaque: _Any) -> None:
        if event != libvirt.VIR_DOMAIN_EVENT_STOPPED or self._on_stop is None:
            return
        try:
            self._on_stop(dom.name(), _EVENT_STOP_DETAIL.get(detail, StopReason.UNKNOWN))
        except Exception:
            log.exception("stop handler failed for domain %s", dom.name())

    # ------------------------------------------------------------------ domains
    def host_info(self) -> dict[str, str]:
        with self._call("reading host information") as conn:
            lib = conn.getLibVersion()
            hv = conn.getVersion()
            return {
                "libvirt_version": _version(lib),
                "hypervisor_version": _version(hv),
                "hypervisor": conn.getType(),
            }

    def host_memory_mib(self) -> int:
        with self._call("reading the host's memory size") as conn:
            return int(conn.getInfo()[1])  # virNodeInfo.memory, in MiB

    def define(self, xml: str) -> None:
        with self._call("defining domain") as conn:
            conn.defineXML(xml)

    def start(self, name: str) -> None:
        """Boot the domain. QEMU refusing to start (e.g. it cannot allocate the guest's
        memory) is FailedPrecondition with QEMU's own words, which reach the kubelet."""
        with self._call(f"starting domain {name}") as conn:
            dom = conn.lookupByName(name)
            try:
                dom.create()
            except libvirt.libvirtError as e:
                if not start_refused(e):
                    raise
                raise FailedPrecondition(f"the VM of domain {name} did not start: {e.get_error_message()}") from e

    def create_transient(self, xml: str) -> None:
        """Boot a domain that is gone once it stops (a template being made)."""
        with self._call("starting a transient domain") as conn:
            try:
                conn.createXML(xml, 0)
            except libvirt.libvirtError as e:
                if not start_refused(e):
                    raise
                raise FailedPrecondition(f"the VM did not start: {e.get_error_message()}") from e

    def save(self, name: str, path: str) -> None:
        """Save the running domain's memory and device state to ``path``; it is off afterwards."""
        with self._call(f"saving domain {name}") as conn:
            conn.lookupByName(name).save(path)

    def restore(self, image: str, xml: str, scratch_dir: str) -> None:
        """Start a domain from the save image ``image`` as the domain ``xml`` (another name
        and UUID may be given: the header is rewritten on the way, the image is only read),
        left paused. The rewritten image streams through a FIFO in ``scratch_dir``, so no
        copy is written. ValueError when ``image`` is not a usable save image."""
        saved = read_save_image(Path(image))
        head = save_header(saved, xml)
        fifo = os.path.join(tempfile.mkdtemp(prefix=".restore-", dir=scratch_dir), "image")
        os.mkfifo(fifo, 0o600)
        feeder = _Feeder(fifo, head, image, saved.stream_offset)
        try:
            with self._call("restoring a domain from a template") as conn:
                feeder.start()
                try:
                    conn.restoreFlags(fifo, None, libvirt.VIR_DOMAIN_SAVE_PAUSED)
                except libvirt.libvirtError as e:
                    if not start_refused(e):
                        raise
                    raise FailedPrecondition(f"the VM did not restore: {e.get_error_message()}") from e
        finally:
            feeder.finish()
            os.unlink(fifo)
            os.rmdir(os.path.dirname(fifo))

    def resume(self, name: str) -> None:
        with self._call(f"resuming domain {name}") as conn:
            conn.lookupByName(name).resume()

    def pause(self, name: str) -> None:
        with self._call(f"pausing domain {name}") as conn:
            conn.lookupByName(name).suspend()

    def zero_map(self, name: str) -> ZeroMap:
        """The all-zero pages of a *paused* domain's RAM, per memfd ({} when its QEMU is not
        local or cannot be read)."""
        pid = qemu_pid(self.uri, name)
        try:
            return zero_ranges(pid) if pid else {}
        except OSError as e:
            log.warning("domain %s: reading its RAM for zero pages failed: %s", name, e)
            return {}

    def attach(self, name: str, device_xml: str) -> None:
        """Plug a device into the running domain (not into its persistent definition)."""
        with self._call(f"attaching a device to domain {name}") as conn:
            conn.lookupByName(name).attachDeviceFlags(device_xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)

    def trim_memory(self, name: str, zeros: ZeroMap | None = None) -> int:
        """Punch the all-zero pages out of a *paused* domain's RAM (see :mod:`.memtrim`):
        ``zeros`` when given (pages known to be zero: those of the template it was restored
        from), else the ones a scan finds; the bytes freed, 0 when its QEMU is not local or
        cannot be reached."""
        pid = qemu_pid(self.uri, name)
        if not pid:
            return 0
        try:
            return punch_ranges(pid, zeros) if zeros else punch_zero_pages(pid)
        except OSError as e:
            log.warning("domain %s: giving its zero pages back failed: %s", name, e)
            return 0

    def destroy(self, name: str) -> None:
        """Force the domain off; succeeds when it is missing or already off."""
        with self._call(f"destroying domain {name}") as conn:
            try:
                dom = conn.lookupByName(name)
                if dom.isActive():
                    dom.destroyFlags(libvirt.VIR_DOMAIN_DESTROY_DEFAULT)
            except libvirt.libvirtError as e:
                if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return
                if e.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID:  # raced to off
                    return
                raise

    def undefine(self, name: str) -> None:
        """Remove the domain definition; succeeds when it is missing."""
        with self._call(f"undefining domain {name}") as conn:
            try:
                conn.lookupByName(name).undefineFlags(
                    libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
                )
            except libvirt.libvirtError as e:
                if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise

    def info(self, name: str) -> DomainInfo | None:
        """State, stop reason and our metadata of ``name``; None when it does not exist."""
        with self._call(f"reading domain {name}") as conn:
            try:
                dom = conn.lookupByName(name)
                return self._info(dom)
            except libvirt.libvirtError as e:
                if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return None
                raise

    def _info(self, dom: _Any) -> DomainInfo:
        state, reason = dom.state()
        st = _STATE.get(state, DomainState.OTHER)
        stop = _SHUTOFF_REASON.get(reason, StopReason.UNKNOWN) if st is DomainState.SHUTOFF else StopReason.UNKNOWN
        try:
            meta = parse_metadata(dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS))
        except libvirt.libvirtError:
            meta = {}
        return DomainInfo(dom.name(), st, stop, meta)

    def list_tagged(self) -> list[DomainInfo]:
        """Every domain (running or not) that carries our metadata element."""
        with self._call("listing domains") as conn:
            out = []
            for dom in conn.listAllDomains(0):
                try:
                    info = self._info(dom)
                except libvirt.libvirtError:
                    continue  # vanished while we looked
                if info.metadata:
                    out.append(info)
            return out

    def xml(self, name: str) -> str:
        with self._call(f"reading XML of domain {name}") as conn:
            return str(conn.lookupByName(name).XMLDesc(0))

    def pid(self, name: str) -> int:
        """The QEMU process id of a running domain, 0 when unknown or not running (or its
        QEMU runs on another host). Read from the pid file of the daemon ``uri`` names:
        the system one's or the session one's, and checked against the process."""
        return qemu_pid(self.uri, name)

    def stats(self, names: list[str]) -> dict[str, dict[str, _Any]]:
        """Bulk domain stats (one libvirt call) for the named running domains."""
        with self._call("reading domain stats") as conn:
            doms = []
            for n in names:
                try:
                    doms.append(conn.lookupByName(n))
                except libvirt.libvirtError as e:
                    if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                        raise
            if not doms:
                return {}
            flags = libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE
            out = {dom.name(): dict(st) for dom, st in conn.domainListGetStats(doms, 0, flags)}
        for name, st in out.items():
            # libvirt counts its cgroup; a QEMU placed in the pod's cgroup has left it.
            cpu = process_cpu_ns(qemu_pid(self.uri, name))
            if cpu is not None:
                user, system = cpu
                st["cpu.user"] = max(int(st.get("cpu.user", 0)), user)
                st["cpu.system"] = max(int(st.get("cpu.system", 0)), system)
                st["cpu.time"] = max(int(st.get("cpu.time", 0)), user + system)
        return out

    def set_memory(self, name: str, mib: int) -> None:
        """Give the running guest ``mib`` of memory: virtio-mem above its boot size, the
        balloon below it. FailedPrecondition when that is over the domain's maximum."""
        with self._call(f"setting memory of domain {name}") as conn:
            dom = conn.lookupByName(name)
            try:
                change = plan_memory_change(str(dom.XMLDesc(0)), mib)
            except ValueError as e:
                raise FailedPrecondition(f"domain {name}: {e}") from e
            live = libvirt.VIR_DOMAIN_AFFECT_LIVE
            if change.device_xml is not None and change.balloon_kib < mib * 1024:
                dom.updateDeviceFlags(change.device_xml, live)  # unplug first, then the balloon
                dom.setMemoryFlags(change.balloon_kib, live)
            else:
                dom.setMemoryFlags(change.balloon_kib, live)  # deflate first, then plug
                if change.device_xml is not None:
                    dom.updateDeviceFlags(change.device_xml, live)

    def set_vcpus(self, name: str, count: int) -> None:
        with self._call(f"setting vCPUs of domain {name}") as conn:
            conn.lookupByName(name).setVcpusFlags(count, libvirt.VIR_DOMAIN_AFFECT_LIVE)


class _Feeder(threading.Thread):
    """Writes a save image's new header, then its stream, into the FIFO libvirt reads."""

    def __init__(self, fifo: str, head: bytes, image: str, offset: int) -> None:
        super().__init__(name="vsbx-restore-feed", daemon=True)
        self.fifo, self.head, self.image, self.offset = fifo, head, image, offset
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with open(self.fifo, "wb", buffering=0) as out, open(self.image, "rb", buffering=0) as src:
                out.write(self.head)
                at = self.offset
                while n := os.splice(src.fileno(), out.fileno(), 1 << 20, offset_src=at):
                    at += n
        except BrokenPipeError:
            pass  # libvirt stopped reading: its own error says why
        except BaseException as e:  # noqa: BLE001 - reported by finish()
            self.error = e

    def finish(self) -> None:
        """Unblock and join the writer (opening the FIFO's read end ends a writer still
        waiting for a reader)."""
        if self.is_alive():
            try:
                fd = os.open(self.fifo, os.O_RDONLY | os.O_NONBLOCK)
                os.close(fd)
            except OSError:
                pass
            self.join(10.0)
        if self.error is not None:
            log.warning("feeding the save image to libvirt failed: %s", self.error)


def _alive(conn: _Any) -> bool:
    try:
        return bool(conn.isAlive())
    except libvirt.libvirtError:
        return False


def _version(v: int) -> str:
    return f"{v // 1000000}.{v // 1000 % 1000}.{v % 1000}"
