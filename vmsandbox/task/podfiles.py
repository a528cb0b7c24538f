"""Which of the pod's hostname, hosts and resolv.conf a sandbox's guest holds (for the spec's
bind mounts of them, :func:`vmsandbox.task.spec.pod_file_mounts`)."""

from __future__ import annotations

import threading
from collections.abc import Callable

from ..sandbox.ports import GuestChannel
from .spec import GUEST_POD_FILES, POD_FILES

__all__ = ["PodFiles"]

_TIMEOUT = 60.0


class PodFiles:
    """Asks the guest once (its config disk does not change while it runs); thread-safe.
    A guest that cannot answer yet is asked again next time."""

    def __init__(self, channel: Callable[[], GuestChannel]) -> None:
        self._channel = channel
        self._lock = threading.Lock()
        self._known: frozenset[str] | None = None

    def __call__(self) -> frozenset[str]:
        with self._lock:
            if self._known is not None:
                return self._known
        r = self._channel().exec(["ls", GUEST_POD_FILES], in_guest_root=True, timeout=_TIMEOUT)
        if r.exit_code != 0:
            return frozenset()
        known = frozenset(POD_FILES) & frozenset(r.stdout.decode(errors="replace").split())
        with self._lock:
            self._known = known
        return known
