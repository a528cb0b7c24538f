"""What a running sandbox offers besides the lifecycle: commands in its guest, its share.

A mixin of :class:`~vmsandbox.sandbox.controller.SandboxController` (kept apart so that the
lifecycle module stays the lifecycle): exec with collected output, spawn with streamed output,
the agent channel the task engine uses, the virtio-fs share's host folder.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..errors import FailedPrecondition, InvalidArgument
from ..model import ExecResult, ImageConfig, Phase, PtySize
from .agents import CONNECT_TIMEOUT, Agents
from .ports import GuestChannel, GuestProcess, OutputSink
from .registry import Entry, Registry
from .share import Shares

__all__ = ["GuestOps"]


class GuestOps:
    """exec, spawn, guest_channel and share_path of a controller (see the class using it)."""

    _registry: Registry
    _agents: Agents
    _shares: Shares

    def _running(self, sandbox_id: str, argv: Sequence[str] | None = None) -> Entry:
        if isinstance(argv, str):
            raise InvalidArgument("argv must be a sequence of strings, not one string")
        e = self._registry.get(sandbox_id)
        if e.record.phase is not Phase.RUNNING:
            raise FailedPrecondition(f"sandbox is {e.record.phase.value}, not running", sandbox_id=sandbox_id)
        return e

    def image_config(self, sandbox_id: str) -> ImageConfig | None:
        """The OCI image config of the sandbox's ``oci`` root (None for other roots); NotFound
        for an unknown sandbox."""
        return self._registry.get(sandbox_id).record.image

    @staticmethod
    def _image_defaults(e: Entry, env: Mapping[str, str] | None, cwd: str | None, user: str | None,
                        in_guest_root: bool) -> tuple[Mapping[str, str] | None, str | None, str | None]:
        """env, cwd and user as ``docker exec`` has them: the image's Env under the caller's,
        its WorkingDir and User unless the caller gives theirs (not in the guest's own root)."""
        img = e.record.image
        if img is None or in_guest_root:
            return env, cwd, user
        return {**img.environ(), **(env or {})}, cwd or img.working_dir or None, user or img.user or None

    def exec(self, sandbox_id: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
             cwd: str | None = None, stdin: bytes | None = None, timeout: float | None = None,
             max_output: int | None = None, user: str | None = None,
             in_guest_root: bool = False) -> ExecResult:
        """Run ``argv`` (no shell) inside the sandbox's rootfs and return its result.

        Without rootfs mounts (or with ``in_guest_root``) it runs in the guest's own root.
        ``user``: ``NAME|UID[:GROUP|GID]`` from that root's /etc/passwd and /etc/group (default
        root). An OCI image root's Env, WorkingDir and User are the defaults of ``env`` (the
        caller's entries win), ``cwd`` and ``user``. Raises FailedPrecondition when the sandbox is not running or the output passes
        ``max_output`` bytes (default 32 MiB; the command is stopped), DeadlineExceeded after
        ``timeout`` seconds, NotFound for an unknown sandbox.
        """
        e = self._running(sandbox_id, argv)
        env, cwd, user = self._image_defaults(e, env, cwd, user, in_guest_root)
        return self._agents.exec(e, argv, env=env, cwd=cwd, stdin=stdin, timeout=timeout, max_output=max_output,
                                 user=user, in_guest_root=in_guest_root)

    def spawn(self, sandbox_id: str, argv: Sequence[str], *, stdout: OutputSink, stderr: OutputSink,
              env: Mapping[str, str] | None = None, cwd: str | None = None, user: str | None = None,
              tty: bool = False, size: PtySize | None = None, in_guest_root: bool = False) -> GuestProcess:
        """Start ``argv`` (no shell) where :meth:`exec` would and return at once; its output
        streams to the sinks while it runs (``b""`` once each stream ended; a tty process has
        one stream, to ``stdout``). As :meth:`exec` for the errors; the process ends with the
        sandbox, or when aborted (:class:`~vmsandbox.sandbox.ports.GuestProcess`)."""
        e = self._running(sandbox_id, argv)
        env, cwd, user = self._image_defaults(e, env, cwd, user, in_guest_root)
        agent = self._agents.connect(e, time.monotonic() + CONNECT_TIMEOUT)
        return agent.spawn(argv, stdout=stdout, stderr=stderr, env=env, cwd=cwd, user=user, tty=tty, size=size,
                           in_guest_root=in_guest_root)

    def guest_channel(self, sandbox_id: str) -> GuestChannel:
        """The running sandbox's connected agent channel (the task engine's); as exec's errors."""
        e = self._running(sandbox_id)
        return self._agents.connect(e, time.monotonic() + CONNECT_TIMEOUT)

    def share_path(self, sandbox_id: str) -> Path:
        """The host folder of the sandbox's virtio-fs share (``/run/vsbx/shared`` in its guest)."""
        return self._shares.path(self._registry.get(sandbox_id).record.id)
