"""ext4 images made from host folders with ``mkfs.ext4 -d`` (sparse, sized from the tree)."""

from __future__ import annotations

import os
import shutil
import subprocess

from .errors import FailedPrecondition, Internal

__all__ = ["tree_size", "mkfs_from"]


def tree_size(root: str) -> int:
    """Bytes the files of ``root`` take, plus a block per entry (a rough ext4 estimate)."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + dirnames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size + 4096
            except OSError:
                pass
    return total


def mkfs_from(directory: str, image: str, *, factor: float = 1.3, headroom: int = 32 << 20,
              minimum: int = 64 << 20, why: str = "directory mounts are copied into ext4 images with it") -> None:
    """Make ``image`` (mode 0600, sparse) an ext4 filesystem holding a copy of ``directory``,
    of ``factor`` times the tree's size plus ``headroom`` bytes (at least ``minimum``).

    FailedPrecondition when mkfs.ext4 is missing (``why`` says what needs it), Internal when it fails.
    """
    size = max(minimum, int(tree_size(directory) * factor) + headroom)
    # 0600: the copy may be a Kubernetes secret volume (libvirt gives QEMU its own access).
    fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.truncate(size)
    mkfs = shutil.which("mkfs.ext4")
    if mkfs is None:
        raise FailedPrecondition(f"mkfs.ext4 is missing (package e2fsprogs): {why}")
    r = subprocess.run([mkfs, "-q", "-F", "-E", "lazy_itable_init=1", "-d", directory, image],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise Internal(f"making a disk image from {directory} failed: {r.stderr.strip()}")
