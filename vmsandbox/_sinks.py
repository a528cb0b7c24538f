"""The two output sinks of a streaming process (stdout, stderr), each dropped on its first failure.

Shared by the guest adapter's SSH processes and the admin client's remote ones: a sink that
raises is logged once and its stream discarded from then on, so a dead reader never stops
the pump that feeds the other stream. Imports nothing of ours.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

__all__ = ["Sinks"]

log = logging.getLogger(__name__)


class Sinks:
    """``deliver(i, data)`` hands ``data`` to sink ``i`` (0 stdout, 1 stderr) while it works."""

    def __init__(self, stdout: Callable[[bytes], None], stderr: Callable[[bytes], None], *, sandbox_id: str,
                 what: str) -> None:
        self._sinks: list[Callable[[bytes], None] | None] = [stdout, stderr]
        self._sandbox_id, self._what = sandbox_id, what

    def deliver(self, i: int, data: bytes) -> None:
        sink = self._sinks[i]
        if sink is None:
            return
        try:
            sink(data)
        except Exception:  # noqa: BLE001 - a sink's failure must not stop the pump
            log.warning("sandbox %s: the %s sink of %r failed; discarding that stream", self._sandbox_id,
                        ("stdout", "stderr")[i], self._what, exc_info=True)
            self._sinks[i] = None
