"""What the task engine needs besides the guest channel: a way to show a container's files to the guest.

The real stager (virtio-fs share: host ``<state_dir>/sandboxes/<id>/shared`` is
``/run/vsbx/shared`` in the guest, mounts made on the host under it per container) lands
with the share; :class:`vmsandbox.task.fake.FakeStager` stands in for unit tests.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ..model import Mount

__all__ = ["CRUN", "GUEST_CALL_TIMEOUT", "BundleStager", "StagedBundle"]

CRUN = "crun"
"""The guest's OCI runtime (images/README.md)."""
GUEST_CALL_TIMEOUT = 60.0
"""How long one short guest command (crun start, kill, delete, update, a cgroup read) may take."""


@dataclass(frozen=True)
class StagedBundle:
    """A container's bundle as the guest sees it."""

    guest_dir: str
    """A guest directory private to the container (config.json and process files go here)."""
    guest_rootfs: str
    """The container's root filesystem, mounted, in the guest."""
    sources: Mapping[str, str] = field(default_factory=dict)
    """Host directory or file -> guest path, for every bind source that was staged."""


class BundleStager(Protocol):
    """Makes a container's rootfs, bind sources and files visible in one sandbox's guest."""

    def stage(self, container_id: str, rootfs: Sequence[Mount], binds: Sequence[str]) -> StagedBundle:
        """Mount ``rootfs`` (containerd's snapshot mounts; empty: the bundle's rootfs/ is
        already mounted) and share each host path of ``binds`` with the guest. Undoes its
        own steps on failure. AlreadyExists when the container is staged already;
        InvalidArgument for a mount it cannot handle."""

    def put_file(self, container_id: str, name: str, data: bytes) -> str:
        """Write ``name`` (a plain file name) into the container's guest dir; its guest path."""

    def guest_file(self, container_id: str, name: str, *, create: bool = False) -> int | None:
        """A read+write fd of the regular file ``name`` in the container's guest dir, as the
        host sees it (the guest is untrusted: no symlink is followed; InvalidArgument for
        anything but a regular file). ``create``: a new empty file replaces what was there.
        None when the file does not exist, or when this stager's guest dir is not visible
        to the host at all (then a container's output cannot be kept across restarts)."""

    def unstage(self, container_id: str) -> None:
        """Unmount and remove everything :meth:`stage` and :meth:`put_file` made. Idempotent."""
