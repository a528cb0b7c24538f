"""An in-memory mount table for the unit tier: the HostMounts port with failpoints.

``mounts`` lists mount points in mount order (a path twice is a stacked mount); a test adds
one under a share with :meth:`FakeHostMounts.mount` as a later per-container bind would.
Failpoints: ``share``, ``release``, ``mount_at``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence

from .._failpoints import Failpoints
from ..errors import FailedPrecondition, Internal
from . import under

__all__ = ["FakeHostMounts"]


class FakeHostMounts:
    def __init__(self) -> None:
        self.mounts: list[str] = []
        self.shared: set[str] = set()
        self.attached: list[tuple[str, str, str, tuple[str, ...]]] = []  # mount_at calls
        self.fp = Failpoints()
        self._lock = threading.Lock()

    def mount(self, path: str) -> None:
        with self._lock:
            self.mounts.append(os.path.normpath(path))

    def share(self, path: str) -> None:
        self.fp.hit("share")
        if not os.path.isdir(path):
            raise FailedPrecondition(f"cannot share {path}: not a folder")
        path = os.path.normpath(path)
        with self._lock:
            if path not in self.mounts:
                self.mounts.append(path)
            self.shared.add(path)

    def release(self, path: str) -> None:
        self.fp.hit("release")
        with self._lock:
            for p in under(self.mounts, path):
                self.mounts = [m for m in self.mounts if m != p]
                self.shared.discard(p)

    def mount_at(self, fstype: str, source: str, target: str, options: Sequence[str]) -> None:
        self.fp.hit("mount_at")
        if not os.path.exists(target):
            raise Internal(f"mount {source} {target}: mount point does not exist")
        with self._lock:
            self.mounts.append(os.path.normpath(target))
            self.attached.append((fstype, source, os.path.normpath(target), tuple(options)))

    def mounted_under(self, path: str) -> list[str]:
        with self._lock:
            return under(self.mounts, path)
