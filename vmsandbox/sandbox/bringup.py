"""How a created sandbox's VM comes up: restored from a template when one fits, else booted.

The template path is the default (Config.templates, the ``vmsandbox.io/start`` annotation);
whatever keeps a template from being used (none can be built, it does not fit the sandbox,
its image is corrupt) falls back to a cold boot, which is logged and shown by verbose Status.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import suppress
from datetime import datetime

from ..config import Config
from ..errors import VmSandboxError
from ..image import GuestImage
from ..model import utcnow
from .agents import Agents
from .events import Emitter, Step
from .ports import GuestChannel, Hypervisor, Network
from .registry import Entry
from .spec import Size
from .store import Store
from .templates import Template, Templates, wants_template

__all__ = ["BringUp", "COLD", "TEMPLATE"]

log = logging.getLogger(__name__)

COLD, TEMPLATE = "cold", "template"


class BringUp:
    def __init__(self, config: Config, hv: Hypervisor, templates: Templates, agents: Agents, store: Store,
                 network: Network, emit: Emitter) -> None:
        self.config, self._hv, self._templates, self._agents, self._store = config, hv, templates, agents, store
        self._net, self._emit = network, emit
        # Starts at once far past the host's CPUs only share them (under TCG a start is
        # CPU-bound: ten at once on two cores each took about a quarter more QEMU CPU than one
        # alone), while one per CPU left a core idle in a start's waits (libvirt, round trips).
        limit = config.max_parallel_starts or 2 * (os.cpu_count() or 1)
        self._slots = threading.BoundedSemaphore(limit) if limit > 0 else None

    def bring_up(self, e: Entry, running: bool, image: GuestImage) -> tuple[Template | None, datetime, GuestChannel]:
        """Power the VM on (unless ``running``), wire its netns, and reach its agent: the
        template it was restored from (None: booted), when it started, the connected channel.
        Waits for a start slot first (Config.max_parallel_starts); the boot timeout counts from then."""
        rec = e.record
        with self._slots if self._slots is not None else suppress():
            tpl = None
            if not running:
                with suppress(FileNotFoundError):
                    os.unlink(rec.agent_socket)
                tpl = self.power_on(e, image)
            deadline = time.monotonic() + self.config.boot_timeout
            started = utcnow()
            self._emit(rec.id, Step.BOOTED, TEMPLATE if tpl is not None else COLD)
            if rec.network is not None:
                self._net.attach(rec.network, list(rec.taps))
                self._emit(rec.id, Step.WIRED)
            return tpl, started, self.first_contact(e, tpl, deadline)

    def power_on(self, e: Entry, image: GuestImage) -> Template | None:
        """Start the shut-off domain of ``e``; the template it was restored from (None: booted)."""
        rec = e.record
        tpl = self._template_for(e, image)
        if tpl is not None:
            try:
                self._templates.restore(tpl, rec.domain, self._store.dir(rec.id))
                return tpl
            except ValueError as err:
                log.info("sandbox %s: template %s not used (%s); booting instead", rec.id, tpl.key, err)
            except VmSandboxError as err:
                log.warning("sandbox %s: restoring template %s failed (%s); booting instead", rec.id, tpl.key, err)
        self._hv.start(rec.domain)
        return None

    def _template_for(self, e: Entry, image: GuestImage) -> Template | None:
        rec = e.record
        if not wants_template(rec.annotations, self.config):
            return None
        if rec.image_dir != str(image.directory):
            log.info("sandbox %s: made for another guest image; booting it", rec.id)
            return None
        try:
            return self._templates.get(image, Size(rec.vcpus, rec.memory_mib, rec.max_memory_mib or rec.memory_mib))
        except VmSandboxError as err:
            log.warning("sandbox %s: no template (%s); booting instead", rec.id, err)
            return None

    def first_contact(self, e: Entry, tpl: Template | None, deadline: float) -> GuestChannel:
        """The connected agent channel: for a restored guest after its personalization."""
        if tpl is None:
            return self._agents.connect(e, deadline, booting=True)
        rec = e.record
        agent = self._templates.personalize(
            tpl, sandbox_id=rec.id, sandbox_dir=self._store.dir(rec.id), socket=rec.agent_socket,
            host_key=rec.host_key, deadline=deadline, alive=lambda: self._agents.running(rec.domain))
        self._agents.adopt(e, agent)
        return agent

