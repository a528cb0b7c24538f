"""Recovery: what a new controller makes of the records, domains and strays it finds.

Every controller rebuilds its entries from the records and notices exits it missed. Only
the owner of the state dir cleans up interrupted work: a boot cut short is powered off and
unwired, a half-made folder, the taps it noted, a domain of ours without a record and host
mounts left in the folder of a sandbox without a record are removed (a quarantined record's
domain and folder are left alone). After the hypervisor connection comes back,
:meth:`Recovery.reconcile` looks for sandboxes that stopped meanwhile.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

from ..config import Config
from ..errors import VmSandboxError
from ..model import Phase, utcnow
from .exits import DOMAIN_PREFIX, EXIT_FAILED, Exits
from .netsteps import NetSteps
from .ports import DomainState, Hypervisor
from .registry import Entry, Registry
from .share import Shares
from .store import Store

__all__ = ["Recovery", "RECONCILE_WORKERS"]

log = logging.getLogger(__name__)

CREATE_WAIT = 120.0
"""How long recovery waits for another process's create in flight before leaving it alone."""
RECONCILE_WORKERS = 4
"""Threads that ask the hypervisor about running sandboxes after a reconnect."""


class Recovery:
    def __init__(self, config: Config, registry: Registry, exits: Exits, hv: Hypervisor, *, owner: bool,
                 netsteps: NetSteps, shares: Shares) -> None:
        self.config = config
        self.owner = owner
        self._registry = registry
        self._store: Store = registry.store
        self._exits = exits
        self._hv = hv
        self._net = netsteps
        self._shares = shares

    def recover(self) -> None:
        """Rebuild in-memory state from records and libvirt; the owner also cleans up
        interrupted work (a boot cut short, a half-made folder, a domain with no record)."""
        records, strays = self._store.load_all(quarantine=self.owner)
        known = {r.domain for r in records}
        for rec in records:
            e = self._registry.add(rec)
            if rec.phase is Phase.RUNNING:
                self._exits.check(e)
                continue
            if not self.owner or rec.phase is not Phase.CREATED:
                continue
            info = self._hv.info(rec.domain)
            # Running, or still paused by libvirt mid-start (we were killed in between):
            # either way a boot nobody finished, which would otherwise run as an orphan.
            if info is not None and info.state is not DomainState.SHUTOFF:
                log.warning("sandbox %s: a boot was interrupted; powering the VM off", rec.id)
                self._hv.destroy(rec.domain)
                self._net.unwire(rec)
            elif info is None:
                log.warning("sandbox %s: its domain vanished; marking it stopped", rec.id)
                with e.state_lock:
                    self._registry.save(e, phase=Phase.STOPPED, exit_status=EXIT_FAILED, exited_at=utcnow())
        if not self.owner:
            return
        for d in strays:
            # A folder another process is still creating: wait for it, then take its record.
            if not self._store.wait_unheld(d.name, CREATE_WAIT):
                log.warning("leaving %s alone: a create that holds it has not finished in %.0fs", d, CREATE_WAIT)
                known.add(DOMAIN_PREFIX + d.name)
                continue
            if (late := self._store.load(d.name)) is not None:
                self._registry.add(late)
                known.add(late.domain)
                continue
            log.warning("removing %s: left by an interrupted create", d)
            self._hv.destroy(DOMAIN_PREFIX + d.name)
            self._hv.undefine(DOMAIN_PREFIX + d.name)
            try:
                self._shares.release(d.name)
            except VmSandboxError as err:  # never rmtree through a mount: the next start-up tries again
                log.warning("keeping %s: unmounting what is under it failed: %s", d, err)
                continue
            self._store.remove(d.name)
        self._drop_noted_taps()
        # A quarantined record's VM may be running someone's pod: leave it for a person.
        known |= {DOMAIN_PREFIX + sid for sid in self._store.quarantined()}
        self._shares.release_strays(keep={d.removeprefix(DOMAIN_PREFIX) for d in known})
        for info in self._hv.list_tagged():
            if info.metadata.get("state-dir") == str(self.config.state_dir) and info.name not in known:
                log.warning("removing domain %s: ours, but it has no record", info.name)
                self._hv.destroy(info.name)
                self._hv.undefine(info.name)

    def _drop_noted_taps(self) -> None:
        """Remove the taps of creates that were cut short or could not roll them back."""
        for sid in self._store.noted_tap_ids():
            if self._store.load(sid) is not None:
                self._store.forget_taps(sid)  # the record took them over
                continue
            noted = self._store.noted_taps(sid)
            if noted is None or self._store.exists(sid):  # a create still holds its folder
                continue
            log.warning("sandbox %s: removing taps %s left by a create that did not finish", sid, ", ".join(noted[1]))
            try:
                self._net.drop_taps(sid, *noted)
            except VmSandboxError as err:  # the note stays: the next start-up or create tries again
                log.warning("sandbox %s: removing its taps failed: %s", sid, err)

    def reconcile(self) -> None:
        """After libvirtd came back: notice sandboxes that stopped while it was away."""
        running = [e for e in self._registry.visible() if e.record.phase is Phase.RUNNING]
        if not running:
            return
        # On its own thread (this runs inside the hypervisor's reconnect), a bounded pool for
        # however many sandboxes there are.
        def run() -> None:
            with ThreadPoolExecutor(max_workers=RECONCILE_WORKERS, thread_name_prefix="vsbx-reconcile") as pool:
                list(pool.map(self._safe_check_exit, running))

        threading.Thread(target=run, name="vsbx-reconcile", daemon=True).start()

    def _safe_check_exit(self, e: Entry) -> None:
        try:
            self._exits.check(e)
        except VmSandboxError as err:
            log.warning("sandbox %s: reconciling after reconnect failed: %s", e.record.id, err)
