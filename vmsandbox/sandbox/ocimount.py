"""An ``oci`` root mount: the image unpacked once into the cache, a qcow2 overlay per sandbox.

The cache (``<state_dir>/oci``) holds each image's ext4 root; a sandbox's disk is
``<sandbox_dir>/disks/m0.qcow2`` backed read-only by it, so the guest's writes stay in the
overlay (removed with the sandbox's folder) and one base serves every sandbox of the image.
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

from ..errors import FailedPrecondition, Internal
from ..model import ImageConfig
from ..oci import ImageCache
from .mounts import QCOW2_MAGIC, DiskPlan

__all__ = ["OciRoots", "backing_file"]

log = logging.getLogger(__name__)


def backing_file(path: Path) -> str:
    """The backing file a qcow2 image names ("" for none); OSError/ValueError when unreadable."""
    with open(path, "rb") as f:
        head = f.read(20)
        if len(head) < 20 or head[:4] != QCOW2_MAGIC:
            raise ValueError(f"{path} is not a qcow2 image")
        offset, size = struct.unpack(">QI", head[8:20])
        if not offset:
            return ""
        f.seek(offset)
        return f.read(size).decode("utf-8", "surrogateescape")


class OciRoots:
    """Makes the disks of ``oci`` mounts; the cache it keeps spares every image that a
    sandbox folder under ``sandboxes_root`` has an overlay of."""

    def __init__(self, state_dir: Path, sandboxes_root: Path, progress: Callable[[str], None] | None = None) -> None:
        self._sandboxes = sandboxes_root
        self.cache = ImageCache(state_dir / "oci", in_use=self.in_use, progress=progress)

    def in_use(self) -> set[str]:
        """The digests (hex) backing a sandbox's overlay; raises when an overlay is unreadable
        (the cache then removes nothing)."""
        used: set[str] = set()
        root = os.path.realpath(self.cache.root)
        for overlay in self._sandboxes.glob("*/disks/*.qcow2"):
            try:
                base = backing_file(overlay)
            except FileNotFoundError:
                continue  # its sandbox was removed meanwhile
            if os.path.dirname(os.path.dirname(base)) == root:
                used.add(os.path.basename(os.path.dirname(base)))
        return used

    def materialize(self, plan: DiskPlan) -> ImageConfig:
        """The image unpacked into the cache unless it is there, and the sandbox's overlay
        on it at ``plan.source``; the image's config. InvalidArgument for a bad image."""
        qemu_img = shutil.which("qemu-img")
        if qemu_img is None:
            raise FailedPrecondition("qemu-img is missing (package qemu-utils): OCI image roots are qcow2 overlays")
        os.makedirs(os.path.dirname(plan.source), mode=0o711, exist_ok=True)
        with self.cache.use(plan.mount.source) as img:
            base = os.path.realpath(img.rootfs)
            r = subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-F", "raw", "-b", base, plan.source],
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise Internal(f"making the overlay {plan.source} on {base} failed: {r.stderr.strip()}")
            os.chmod(plan.source, 0o600)
        log.info("image %s: overlay %s on %s", img.digest, plan.source, base)
        return img.config
