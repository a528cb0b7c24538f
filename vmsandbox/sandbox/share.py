"""The sandbox's virtio-fs share on the host: ``<sandbox dir>/shared``, a folder only root
reads, made a shared mount before each boot (so host mounts made under it later reach the
guest) and unmounted, with everything under it, before the sandbox folder is removed.
Over the HostMounts port; the guest mounts it at /run/vsbx/shared (images/README.md)."""

from __future__ import annotations

import logging
import os
from collections.abc import Collection
from pathlib import Path

from ..errors import FailedPrecondition, VmSandboxError
from .ports import HostMounts
from .store import Store

__all__ = ["SHARE_DIR", "SHARE_TAG", "Shares"]

log = logging.getLogger(__name__)

SHARE_DIR = "shared"
SHARE_TAG = "vsbx-shared"
"""The virtio-fs tag the guest mounts (images/init)."""


class Shares:
    def __init__(self, mounts: HostMounts, store: Store) -> None:
        self._mounts = mounts
        self._store = store

    def path(self, sandbox_id: str) -> Path:
        return self._store.dir(sandbox_id) / SHARE_DIR

    def make(self, sandbox_id: str) -> Path:
        """The share folder, mode 0700 whatever the umask (created when missing)."""
        p = self.path(sandbox_id)
        try:
            p.mkdir(mode=0o700, exist_ok=True)
            os.chmod(p, 0o700)
        except OSError as err:
            raise FailedPrecondition(f"cannot create the share folder {p}: {err.strerror}", sandbox_id=sandbox_id) from err
        return p

    def mount(self, sandbox_id: str) -> None:
        """Before a boot: the share folder made a shared mount (idempotent)."""
        self._mounts.share(str(self.make(sandbox_id)))

    def release(self, sandbox_id: str) -> None:
        """Everything mounted in the sandbox's folder taken down; raises when a mount stays,
        so the folder is never removed through a mount into someone's data."""
        self._mounts.release(str(self._store.dir(sandbox_id)))

    def release_strays(self, keep: Collection[str]) -> None:
        """Take down mounts in the folders of sandboxes not in ``keep`` (left by a controller
        that died between removing a record and its folder). Logs what fails."""
        for sid in sorted({self._sandbox_of(p) for p in self._mounts.mounted_under(str(self._store.root))} - {""}):
            if sid in keep:
                continue
            log.warning("sandbox %s: unmounting what it left under %s", sid, self._store.dir(sid))
            try:
                self.release(sid)
            except VmSandboxError as err:
                log.warning("sandbox %s: unmounting its leftovers failed: %s", sid, err)

    def _sandbox_of(self, mount_point: str) -> str:
        rel = Path(mount_point).relative_to(self._store.root).parts
        return rel[0] if rel else ""
