"""The real BundleStager: a container's files on the sandbox's virtio-fs share.

Host ``<sandbox dir>/shared`` is ``/run/vsbx/shared`` in the guest (a shared mount, so host
mounts made under it after boot reach the guest). Per container, in ``shared/<cid>/``:

- ``rootfs/``: containerd's snapshot mount (overlay or bind) mounted here by the host, as
  runc's shim mounts it on the bundle's rootfs/; the guest sees the merged tree;
- ``binds/<n>``: each host bind source of the spec (volumes, CRI's sandbox files) bound here,
  a file on a file, a folder on a folder;
- config.json and the engine's process files.

unstage unmounts everything under ``shared/<cid>/`` (busy mounts lazily) and removes it.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from ..errors import AlreadyExists, InvalidArgument, VmSandboxError
from ..model import Mount
from ..sandbox.ports import HostMounts
from ..sandbox.undo import quietly
from .outfile import open_guest_file
from .ports import StagedBundle

__all__ = ["ShareStager", "GUEST_SHARE"]

log = logging.getLogger(__name__)

GUEST_SHARE = "/run/vsbx/shared"
"""Where the guest mounts the share (images/init)."""
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_ROOTFS_TYPES = ("overlay", "bind")


class ShareStager:
    """Stages containers of one sandbox on its share folder ``share`` (a host path)."""

    def __init__(self, mounts: HostMounts, share: Path, guest_share: str = GUEST_SHARE) -> None:
        self._mounts, self._share, self._guest = mounts, share, guest_share

    def _dir(self, container_id: str) -> Path:
        if not _ID.fullmatch(container_id):
            raise InvalidArgument(f"container id {container_id!r} is not a valid containerd id")
        return self._share / container_id

    def stage(self, container_id: str, rootfs: Sequence[Mount], binds: Sequence[str]) -> StagedBundle:
        d = self._dir(container_id)
        if len(rootfs) != 1 or rootfs[0].type not in _ROOTFS_TYPES:
            kinds = ", ".join(m.type for m in rootfs) or "none"
            raise InvalidArgument(f"container {container_id}: the rootfs must be one overlay or bind mount "
                                  f"from a snapshotter (got {kinds}); block-device snapshotters are not supported yet")
        try:
            d.mkdir(mode=0o700)
        except FileExistsError as err:
            raise AlreadyExists(f"container {container_id} is staged already") from err
        guest_dir = f"{self._guest}/{container_id}"
        try:
            (d / "rootfs").mkdir(mode=0o755)
            m = rootfs[0]
            self._mounts.mount_at(m.type, m.source, str(d / "rootfs"), m.options)
            sources: dict[str, str] = {}
            if binds:
                (d / "binds").mkdir(mode=0o700)
            for n, src in enumerate(binds):
                target = d / "binds" / str(n)
                if os.path.isdir(src):
                    target.mkdir(mode=0o755)
                elif os.path.exists(src):
                    target.touch(mode=0o600)
                else:
                    raise InvalidArgument(f"container {container_id}: bind source {src} does not exist on the host")
                self._mounts.mount_at("bind", src, str(target), ["rbind"])
                sources[src] = f"{guest_dir}/binds/{n}"
        except BaseException:
            quietly(self._remove, container_id, d)()  # the mount error is the one to report
            raise
        return StagedBundle(guest_dir=guest_dir, guest_rootfs=f"{guest_dir}/rootfs", sources=sources)

    def put_file(self, container_id: str, name: str, data: bytes) -> str:
        if "/" in name or name in ("", ".", "..", "rootfs", "binds"):
            raise InvalidArgument(f"bad bundle file name {name!r}")
        d = self._dir(container_id)
        fd = os.open(d / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return f"{self._guest}/{container_id}/{name}"

    def guest_file(self, container_id: str, name: str, *, create: bool = False) -> int | None:
        self._dir(container_id)  # a valid id
        try:
            return open_guest_file(self._share, [container_id, name], create=create)
        except FileNotFoundError:
            return None

    def unstage(self, container_id: str) -> None:
        d = self._dir(container_id)
        if d.exists():
            self._remove(container_id, d)

    def _remove(self, container_id: str, d: Path) -> None:
        try:
            self._mounts.release(str(d))
        except VmSandboxError:
            log.warning("container %s: mounts stay under %s; keeping the folder", container_id, d)
            raise
        shutil.rmtree(d, ignore_errors=True)
