"""The guest agent of each sandbox: one channel object per sandbox, connected on demand.

QEMU serves one connection on a sandbox's agent channel at a time, so every caller shares
the entry's one channel. A channel whose transport died is reconnected by the next caller;
a command that lost its connection mid-way drops the channel so the next one reconnects at
once instead of failing too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..errors import FailedPrecondition, Unavailable, VmSandboxError
from ..model import ExecResult
from .guestconfig import CLIENT_KEY
from .ports import DomainState, GuestChannel, GuestFactory, Hypervisor
from .registry import Entry
from .store import SandboxRecord, Store

__all__ = ["Agents", "POWEROFF", "MOUNT_ERRORS", "CONNECT_TIMEOUT"]

log = logging.getLogger(__name__)

POWEROFF = "/sbin/vsbx-poweroff"
MOUNT_ERRORS = "/run/vsbx/mount-errors"
CONNECT_TIMEOUT = 15.0
"""How long an exec waits for the agent of a running sandbox to (re)connect."""


class Agents:
    def __init__(self, factory: GuestFactory, store: Store, hv: Hypervisor) -> None:
        self._factory, self._store, self._hv = factory, store, hv

    def of(self, e: Entry) -> GuestChannel:
        with e.agent_lock:
            if e.agent is None:
                key = (self._store.dir(e.record.id) / CLIENT_KEY).read_bytes()
                e.agent = self._factory(e.record.agent_socket, key, e.record.host_key, e.record.id)
            return e.agent

    def adopt(self, e: Entry, agent: GuestChannel) -> None:
        """Make ``agent`` (connected by someone else) the entry's channel."""
        with e.agent_lock:
            old, e.agent = e.agent, agent
        if old is not None and old is not agent:
            old.close()

    def drop(self, e: Entry) -> None:
        if e.agent is not None:
            e.agent.close()

    def running(self, domain: str) -> bool:
        info = self._hv.info(domain)
        return info is not None and info.state is DomainState.RUNNING

    def connect(self, e: Entry, deadline: float, *, booting: bool = False) -> GuestChannel:
        """The entry's channel, connected before ``deadline`` (FailedPrecondition if the VM dies).

        ``booting`` only for the start's first contact; later contacts reconnect promptly."""
        agent = self.of(e)
        if not agent.connected:
            domain = e.record.domain
            agent.connect(deadline, alive=lambda: self.running(domain), booting=booting)
        return agent

    def exec(self, e: Entry, argv: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: str | None = None,
             stdin: bytes | None = None, timeout: float | None = None, in_guest_root: bool = False,
             max_output: int | None = None, user: str | None = None) -> ExecResult:
        agent = self.connect(e, time.monotonic() + CONNECT_TIMEOUT)
        try:
            return agent.exec(argv, env=env, cwd=cwd, stdin=stdin, timeout=timeout, in_guest_root=in_guest_root,
                              max_output=max_output, user=user)
        except Unavailable:
            agent.close()  # the transport is gone: the next call reconnects
            raise

    def request_poweroff(self, e: Entry, deadline: float) -> None:
        """Ask the guest to power itself off; failures just mean the caller forces it later."""
        try:
            for attempt in (1, 2):
                agent = self.connect(e, min(deadline, time.monotonic() + 5.0))
                try:
                    agent.exec([POWEROFF], in_guest_root=True, timeout=max(1.0, min(5.0, deadline - time.monotonic())))
                    return
                except Unavailable:
                    agent.close()  # a half-dead transport: once more on a fresh connection
                    if attempt == 2 or time.monotonic() >= deadline:
                        raise
        except VmSandboxError as err:
            log.info("sandbox %s: clean power-off request failed (%s); will force", e.record.id, err)

    def check_mounts(self, agent: GuestChannel, rec: SandboxRecord) -> None:
        """A disk the guest could not mount fails the start (its init lists them)."""
        r = agent.exec(["cat", MOUNT_ERRORS], in_guest_root=True, timeout=30)
        failed = r.stdout.decode(errors="replace").split()
        if r.exit_code == 0 and failed:
            tail = _console_tail(self._store.dir(rec.id))
            raise FailedPrecondition(
                f"the guest could not mount disk(s) {', '.join(failed)} (see mounts; console: {tail})",
                sandbox_id=rec.id)


def _console_tail(sdir: Path, lines: int = 3) -> str:
    try:
        text = (sdir / "console.log").read_text(errors="replace")
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text.splitlines()[-lines:] if line.strip())
