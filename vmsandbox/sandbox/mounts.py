"""How containerd mounts become guest disks.

A mount whose source is a regular file (raw or qcow2, detected) or a block device is
attached directly as a virtio disk. An ``oci`` mount (the root only) is an OCI image: a
qcow2 overlay on its cached, shared, never-written ext4 (:mod:`.ocimount`). A directory source (``bind``, or an ``overlay`` from a
snapshotter) is copied into an ext4 image in the sandbox's folder: the guest sees the
content, but its writes stay in that image (no write-back to the snapshot). The first
mount is the sandbox root; later ones are mounted at their target inside it.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import FailedPrecondition, Internal, InvalidArgument
from ..ext4 import mkfs_from
from ..model import Mount

__all__ = ["DiskPlan", "plan_mounts", "materialize", "attached_disks", "check_not_shared", "GUEST_FILESYSTEMS", "OCI"]

# Filesystems the default guest kernel can mount (ext2/3 are served by the ext4 driver).
GUEST_FILESYSTEMS = frozenset({"ext4", "ext3", "ext2"})
DIRECTORY_TYPES = frozenset({"bind", "rbind", "overlay"})
# Mount options the guest honours (flags) or that only matter on the host (ignored).
GUEST_FLAGS = frozenset({"ro", "rw", "nosuid", "nodev", "noexec", "noatime", "relatime", "nodiratime",
                         "strictatime", "sync", "async", "dirsync", "discard", "lazytime"})
HOST_ONLY = frozenset({"bind", "rbind", "private", "rprivate", "slave", "rslave", "shared", "rshared", "loop",
                       "suid", "dev", "exec", "defaults"})
OVERLAY_KEYS = frozenset({"lowerdir", "upperdir", "workdir", "index", "userxattr", "redirect_dir", "metacopy",
                          "volatile", "xino", "nfs_export"})
_SAFE_TARGET = re.compile(r"/[A-Za-z0-9._@+=,:/-]*")
QCOW2_MAGIC = b"QFI\xfb"
OCI = "oci"  # an OCI image as the root: a qcow2 overlay on its cached ext4 (see .ocimount)


@dataclass(frozen=True)
class DiskPlan:
    """One mount turned into a disk. ``build_from`` is set when an image must be made."""

    index: int
    mount: Mount
    serial: str
    fstype: str
    target: str  # "" for the root
    readonly: bool
    guest_options: tuple[str, ...]
    source: str  # the disk file or device (for built images: the path to create)
    block: bool
    format: str
    build_from: str = ""  # a directory to copy, or "overlay"

    def mounts_line(self) -> str:
        opts = ",".join(self.guest_options) or "-"
        return f"{self.serial} {self.fstype} {'ro' if self.readonly else 'rw'} {self.target or '/'} {opts}\n"


def _detect_format(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return "qcow2" if f.read(4) == QCOW2_MAGIC else "raw"
    except OSError as e:
        raise InvalidArgument(f"mount source {path} cannot be read: {e.strerror}") from e


def _split_options(m: Mount) -> tuple[bool, tuple[str, ...], dict[str, str]]:
    readonly = False
    flags: list[str] = []
    kv: dict[str, str] = {}
    for opt in m.options:
        if not isinstance(opt, str) or not opt or any(c in opt for c in "\0\n ") or not opt.isprintable():
            raise InvalidArgument(f"mount of {m.source}: bad option {opt!r}")
        if "=" in opt:
            k, v = opt.split("=", 1)
            if m.type != "overlay" or k not in OVERLAY_KEYS:
                raise InvalidArgument(f"mount of {m.source}: unsupported option {opt!r}")
            kv[k] = v
        elif opt == "ro":
            readonly = True
        elif opt == "rw":
            readonly = False
        elif opt in GUEST_FLAGS:
            flags.append(opt)
        elif opt not in HOST_ONLY:
            raise InvalidArgument(f"mount of {m.source}: unsupported option {opt!r}")
    return readonly, tuple(flags), kv


def _overlay_dirs(key: str, value: str) -> list[str]:
    """The layer paths of one overlay option (``lowerdir``: ``:``-separated), each checked.

    A path with ``,``, ``:`` or ``\\`` is refused rather than escaped: containerd hands us
    option strings as it would pass them to mount(2), so such a character may be a path's
    own or already an escape; and how an escape is read depends on the host (libmount's
    option splitting, overlayfs' legacy parser before Linux 6.5 and its fs_context one
    after). Guessing wrong would merge directories nobody asked for; containerd's
    snapshotters never make such paths (and its own mount would break on them too).
    """
    dirs = value.split(":") if key == "lowerdir" else [value]
    for d in dirs:
        if any(c in d for c in ",:\\"):
            raise InvalidArgument(f"overlay {key} {d!r}: a layer path containing ',', ':' or '\\' is not supported")
        if not os.path.isabs(d):
            raise InvalidArgument(f"overlay {key} {d!r} is not an absolute path")
        if not os.path.isdir(d):
            raise InvalidArgument(f"overlay {key} {d} does not exist")
    return dirs


def _overlay_option(kv: dict[str, str]) -> str:
    """The ``lowerdir=`` option that merges an overlay read-only: upperdir on top of the
    lower layers. The only way layer paths reach the mount option string."""
    if "lowerdir" not in kv:
        raise InvalidArgument("overlay mount without lowerdir")
    layers = _overlay_dirs("upperdir", kv["upperdir"]) if "upperdir" in kv else []
    return "lowerdir=" + ":".join(layers + _overlay_dirs("lowerdir", kv["lowerdir"]))


def plan_mounts(mounts: Sequence[Mount], sandbox_dir: Path) -> list[DiskPlan]:
    """Validate the mounts and decide how each becomes a disk. Touches nothing.

    Raises InvalidArgument for a missing source, an unknown type, bad options or targets.
    """
    plans: list[DiskPlan] = []
    targets: set[str] = set()
    for i, m in enumerate(mounts):
        if not isinstance(m, Mount):
            raise InvalidArgument(f"rootfs[{i}] is not a Mount")
        readonly, flags, kv = _split_options(m)
        if i == 0:
            if m.target not in ("", "/"):
                raise InvalidArgument(f"the first mount is the sandbox root; its target must be empty, not {m.target!r}")
            target = ""
        else:
            # Refuse a climb instead of normalising it away: "/data/../../etc" must not become /etc.
            climbs = ".." in m.target.split("/")
            target = os.path.normpath(m.target) if m.target else ""
            if climbs or not target.startswith("/") or target == "/" or not _SAFE_TARGET.fullmatch(target):
                raise InvalidArgument(f"mount target {m.target!r} must be an absolute path of safe characters below /")
            if target in targets:
                raise InvalidArgument(f"two mounts share the target {target}")
            targets.add(target)
        serial = f"vsbx-m{i}"
        if m.type == OCI:
            if i != 0:
                raise InvalidArgument(f"an oci mount ({m.source}) can only be the first mount (the sandbox root)")
            if not os.path.exists(m.source):
                raise InvalidArgument(f"OCI image {m.source!r} does not exist")
            plans.append(DiskPlan(i, m, serial, "ext4", target, readonly, flags,
                                  str(sandbox_dir / "disks" / f"m{i}.qcow2"), False, "qcow2", OCI))
            continue
        if m.type == "overlay":
            _overlay_option(kv)
            if "workdir" in kv:
                _overlay_dirs("workdir", kv["workdir"])
            plans.append(DiskPlan(i, m, serial, "ext4", target, readonly, flags,
                                  str(sandbox_dir / "disks" / f"m{i}.img"), False, "raw", "overlay"))
            continue
        try:
            st = os.stat(m.source)
        except OSError as e:
            raise InvalidArgument(f"mount source {m.source!r} does not exist or cannot be read ({e.strerror})") from e
        if stat.S_ISDIR(st.st_mode):
            if m.type not in ("bind", "rbind"):
                raise InvalidArgument(f"mount of directory {m.source} needs type bind, rbind or overlay, not {m.type!r}")
            plans.append(DiskPlan(i, m, serial, "ext4", target, readonly, flags,
                                  str(sandbox_dir / "disks" / f"m{i}.img"), False, "raw", m.source))
        elif stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode):
            if m.type not in GUEST_FILESYSTEMS:
                raise InvalidArgument(
                    f"mount type {m.type!r} of {m.source} is not supported (guest filesystems: "
                    f"{', '.join(sorted(GUEST_FILESYSTEMS))}; directories: bind, overlay)"
                )
            block = stat.S_ISBLK(st.st_mode)
            fmt = "raw" if block else _detect_format(m.source)
            if not os.access(m.source, os.R_OK if readonly else os.R_OK | os.W_OK):
                raise InvalidArgument(f"mount source {m.source} is not {'readable' if readonly else 'writable'}")
            plans.append(DiskPlan(i, m, serial, m.type, target, readonly, flags, m.source, block, fmt))
        else:
            raise InvalidArgument(f"mount source {m.source} is neither a file, a block device nor a directory")
    return plans


def attached_disks(mounts: Sequence[Mount]) -> dict[str, bool]:
    """The host files and devices ``mounts`` attach as they are (real path -> writable);
    copied directories are not among them."""
    out: dict[str, bool] = {}
    for m in mounts:
        if m.type in GUEST_FILESYSTEMS and os.path.exists(m.source) and not os.path.isdir(m.source):
            out[os.path.realpath(m.source)] = not _split_options(m)[0]
    return out


def check_not_shared(mounts: Sequence[Mount], others: Sequence[tuple[str, Sequence[Mount]]]) -> None:
    """FailedPrecondition naming the holder when a disk of ``mounts`` is attached to one of
    ``others`` (sandbox id, its mounts) and either side writes it: QEMU would refuse the
    second VM its image lock at start, with no word on who holds it."""
    mine = attached_disks(mounts)
    for holder, theirs in others:
        for path, writable in attached_disks(theirs).items():
            if path in mine and (writable or mine[path]):
                raise FailedPrecondition(
                    f"disk {path} is attached to sandbox {holder}; a disk one VM writes cannot be shared")


def materialize(plan: DiskPlan) -> None:
    """Create the image of a directory-backed mount (no-op for file/device mounts; an
    ``oci`` mount's overlay is made by :class:`~.ocimount.OciRoots`)."""
    if not plan.build_from:
        return
    if plan.build_from == OCI:
        raise Internal("an oci mount is materialized by OciRoots")
    os.makedirs(os.path.dirname(plan.source), mode=0o711, exist_ok=True)
    if plan.build_from != "overlay":
        mkfs_from(plan.build_from, plan.source)
        return
    # Merge the overlay exactly as the kernel would (whiteouts, opaque dirs) by mounting it
    # read-only on a private temporary mountpoint, then copy the merged view.
    _, _, kv = _split_options(plan.mount)
    opts = _overlay_option(kv)
    mnt = tempfile.mkdtemp(prefix="vsbx-overlay-")
    try:
        r = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"ro,{opts}", mnt], capture_output=True, text=True)
        if r.returncode != 0:
            raise Internal(f"mounting the overlay to copy it failed: {r.stderr.strip()}")
        try:
            mkfs_from(mnt, plan.source)
        finally:
            subprocess.run(["umount", mnt], capture_output=True)
    finally:
        shutil.rmtree(mnt, ignore_errors=True)
