"""Failpoints for the in-memory fakes: make a named step fail, or hang, a given number of times.

``fp.fail("start", Unavailable("libvirtd went away"))`` makes the next ``start`` raise it;
``fp.hang("exec", release)`` blocks the next ``exec`` until ``release`` is set. Each fake
calls :meth:`Failpoints.hit` with the step's name first thing in that step.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass


@dataclass
class _Point:
    exc: BaseException | None
    times: int
    release: threading.Event | None


class Failpoints:
    def __init__(self) -> None:
        self._points: dict[str, list[_Point]] = {}
        self._lock = threading.Lock()
        self.calls: Counter[str] = Counter()

    def fail(self, step: str, exc: BaseException, times: int = 1) -> None:
        """The next ``times`` calls of ``step`` raise ``exc`` (-1: every call)."""
        with self._lock:
            self._points.setdefault(step, []).append(_Point(exc, times, None))

    def hang(self, step: str, release: threading.Event, times: int = 1) -> None:
        """The next ``times`` calls of ``step`` block until ``release`` is set."""
        with self._lock:
            self._points.setdefault(step, []).append(_Point(None, times, release))

    def clear(self, step: str | None = None) -> None:
        with self._lock:
            if step is None:
                self._points.clear()
            else:
                self._points.pop(step, None)

    def hit(self, step: str) -> None:
        with self._lock:
            self.calls[step] += 1
            points = self._points.get(step) or []
            point = points[0] if points else None
            if point is not None and point.times > 0:
                point.times -= 1
                if point.times == 0:
                    points.pop(0)
        if point is None:
            return
        if point.release is not None:
            point.release.wait()
        if point.exc is not None:
            raise point.exc
