"""Console watcher: when the guest's marker lines appear in console log files."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ConsoleWatcher", "INIT_MARKER", "AGENT_MARKER", "MARKERS"]

INIT_MARKER = b"vmsandbox: init started"
AGENT_MARKER = b"vmsandbox: agent ready"
# Marker name -> the stamp it gives (phases.PHASES).
MARKERS = {"init_line": INIT_MARKER, "agent_line": AGENT_MARKER}


@dataclass
class _Watch:
    path: Path
    last: float
    offset: int = 0
    tail: bytes = b""
    found: dict[str, float] = field(default_factory=dict)


class ConsoleWatcher:
    """One thread that polls watched console logs for marker lines.

    A marker's time is the midpoint between the poll that first saw it and the poll
    before, so its error is half the poll interval.
    """

    def __init__(self, markers: Mapping[str, bytes], interval: float = 0.005) -> None:
        self.markers = dict(markers)
        self.interval = interval
        self._watches: dict[str, _Watch] = {}
        self._cond = threading.Condition()
        self._passes = 0
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="console-watcher", daemon=True)
        self._thread.start()

    def watch(self, key: str, path: Path) -> None:
        """Watch ``path`` (it may not exist yet) under ``key``."""
        with self._cond:
            self._watches[key] = _Watch(path, time.monotonic())

    def unwatch(self, key: str) -> dict[str, float]:
        """Stop watching after one more full poll; return {marker name: monotonic time}."""
        with self._cond:
            target = self._passes + 2
            while self._passes < target and not self._stop:
                self._cond.wait(1.0)
            w = self._watches.pop(key, None)
        return dict(w.found) if w else {}

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(2.0)

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._stop:
                    return
                watches = list(self._watches.values())
            for w in watches:
                self._poll(w)
            with self._cond:
                self._passes += 1
                self._cond.notify_all()
            time.sleep(self.interval)

    def _poll(self, w: _Watch) -> None:
        now = time.monotonic()
        last, w.last = w.last, now
        if len(w.found) == len(self.markers):
            return
        try:
            size = os.stat(w.path).st_size
            if size < w.offset:  # the file was truncated (QEMU opened it anew)
                w.offset, w.tail = 0, b""
            if size == w.offset:
                return
            with open(w.path, "rb") as f:
                f.seek(w.offset)
                data = f.read(size - w.offset)
        except OSError:
            return
        w.offset += len(data)
        text = w.tail + data
        for name, marker in self.markers.items():
            if name not in w.found and marker in text:
                w.found[name] = (last + now) / 2
        w.tail = text[-256:]
