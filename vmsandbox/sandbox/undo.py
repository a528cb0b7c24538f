"""Undo steps for rollbacks that must not hide the error being unwound."""

from __future__ import annotations

import logging
from collections.abc import Callable

__all__ = ["quietly"]

log = logging.getLogger(__name__)


def quietly(fn: Callable[..., object], *args: object) -> Callable[[], None]:
    """An undo step that logs its own failure instead of raising over the original error."""
    def run() -> None:
        try:
            fn(*args)
        except Exception:  # noqa: BLE001 - logged; the error being unwound is the one to report
            log.exception("rollback step %s%r failed", getattr(fn, "__name__", fn), args)
    return run
