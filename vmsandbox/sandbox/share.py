"""The sandbox's virtio-fs share on the host: ``<sandbox dir>/shared``, a folder only root
reads, made a shared mount before each boot (so host mounts made under it later reach the
guest) and unmounted, with everything under it, before the sandbox folder is removed.
Over the HostMounts port; the guest mounts it at /run/vsbx/shared (images/README.md)."""

from __future__ import annotations

import logging
import os
import shlex
from collections.abc import Collection
from pathlib import Path

from ..errors import FailedPrecondition, VmSandboxError
from .ports import HostMounts
from .store import Store

__all__ = ["SHARE_DIR", "SHARE_TAG", "VIRTIOFSD_OPTIONS", "Shares", "virtiofsd_wrapper"]

log = logging.getLogger(__name__)

SHARE_DIR = "shared"
SHARE_TAG = "vsbx-shared"
"""The virtio-fs tag the guest mounts (images/init)."""


VIRTIOFSD_OPTIONS = ("announce_submounts",)
"""Given to virtiofsd by :func:`virtiofsd_wrapper`: a host filesystem mounted under the share
is a filesystem of its own in the guest (its own st_dev), so inode numbers of the snapshot,
the volumes and the share never collide there."""


def virtiofsd_wrapper(state_dir: Path) -> Path:
    """The virtiofsd the domains name (``<binary path>``): ``<state_dir>/bin/virtiofsd``."""
    return state_dir / "bin" / "virtiofsd"


class Shares:
    def __init__(self, mounts: HostMounts, store: Store, virtiofsd: str = "") -> None:
        self._mounts = mounts
        self._store = store
        self._virtiofsd = virtiofsd

    def path(self, sandbox_id: str) -> Path:
        return self._store.dir(sandbox_id) / SHARE_DIR

    def make(self, sandbox_id: str) -> Path:
        """The share folder, mode 0700 whatever the umask (created when missing), and the
        virtiofsd wrapper its domain will name."""
        if self._virtiofsd:
            self.write_wrapper()
        p = self.path(sandbox_id)
        try:
            p.mkdir(mode=0o700, exist_ok=True)
            os.chmod(p, 0o700)
        except OSError as err:
            raise FailedPrecondition(f"cannot create the share folder {p}: {err.strerror}", sandbox_id=sandbox_id) from err
        return p

    def write_wrapper(self) -> Path:
        """Write :func:`virtiofsd_wrapper` (when its content changed): a script that runs the
        configured virtiofsd with libvirt's arguments plus :data:`VIRTIOFSD_OPTIONS`, which
        libvirt 9.0 has no XML for. Replaced atomically, so a starting domain never runs half
        of it."""
        path = virtiofsd_wrapper(self._store.root.parent)
        opts = " ".join(f"-o {shlex.quote(o)}" for o in VIRTIOFSD_OPTIONS)
        text = ("#!/bin/sh\n# Written by vmsandbox (vmsandbox/sandbox/share.py): libvirt has no XML for these options.\n"
                f'exec {shlex.quote(self._virtiofsd)} "$@" {opts}\n')
        try:
            if path.exists() and path.read_text() == text:
                return path
            path.parent.mkdir(mode=0o711, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.write_text(text)
            tmp.chmod(0o700)  # libvirtd (root) runs it
            os.replace(tmp, path)
        except OSError as err:
            raise FailedPrecondition(f"cannot write {path}: {err.strerror}") from err
        return path

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
