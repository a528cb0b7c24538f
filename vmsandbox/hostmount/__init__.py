"""Host mounts through mount(8) and umount(8): a sandbox's virtio-fs share root made a shared
mount, and everything at or under it taken down again. Mount points come from
/proc/self/mountinfo. The :class:`~vmsandbox.sandbox.ports.HostMounts` adapter."""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Sequence

from ..errors import FailedPrecondition, Internal

__all__ = ["SystemHostMounts", "mount_points", "under"]

log = logging.getLogger(__name__)

MOUNTINFO = "/proc/self/mountinfo"
RELEASE_ROUNDS = 4
"""Passes over the mounts under a share: one pass takes one layer off a stacked mount point."""


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes."""
    for code, ch in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, ch)
    return field


def mount_points(mountinfo: str = MOUNTINFO) -> list[str]:
    """Every mount point of this process's mount namespace, in mount order (repeats kept)."""
    with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
        return [_unescape(line.split(" ")[4]) for line in f if line.strip()]


def under(points: list[str], path: str) -> list[str]:
    """The distinct ``points`` at or below ``path``, deepest first."""
    root = os.path.normpath(path)
    prefix = root.rstrip("/") + "/"
    found = {p for p in points if p == root or p.startswith(prefix)}
    return sorted(found, key=lambda p: (p.count("/"), p), reverse=True)


class SystemHostMounts:
    """The HostMounts port over mount(8)/umount(8) in the caller's mount namespace (root only)."""

    def __init__(self, mountinfo: str = MOUNTINFO, timeout: float = 30.0) -> None:
        self._mountinfo = mountinfo
        self._timeout = timeout

    def share(self, path: str) -> None:
        if not os.path.isdir(path):
            raise FailedPrecondition(f"cannot share {path}: not a folder")
        path = os.path.normpath(path)
        if path not in mount_points(self._mountinfo):
            self._run("mount", "--bind", path, path)
        # This host's / may be private: a bind of a private mount is private, and mounts
        # made under it later would never reach virtiofsd's (slave) namespace.
        self._run("mount", "--make-shared", path)

    def release(self, path: str) -> None:
        for _ in range(RELEASE_ROUNDS):
            points = self.mounted_under(path)
            if not points:
                return
            for p in points:
                try:
                    self._run("umount", p)
                except Internal as err:
                    log.warning("umount %s failed (%s); detaching it lazily", p, err)
                    self._run("umount", "--lazy", p)
        if left := self.mounted_under(path):
            raise Internal(f"mounts under {path} stay after {RELEASE_ROUNDS} passes: {', '.join(left)}")

    def mounted_under(self, path: str) -> list[str]:
        return under(mount_points(self._mountinfo), path)

    def mount_at(self, fstype: str, source: str, target: str, options: Sequence[str]) -> None:
        opts = list(options)
        if fstype == "bind":
            self._run("mount", "--rbind" if "rbind" in opts else "--bind", "--", source, target)
            if "ro" in opts:  # a bind takes no options of its own: read-only is a remount
                self._run("mount", "-o", "remount,bind,ro", "--", target)
            return
        argv = ["mount", "-t", fstype] + (["-o", ",".join(opts)] if opts else [])
        self._run(*argv, "--", source, target)

    def _run(self, *argv: str) -> None:
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=self._timeout)
        except FileNotFoundError as err:
            raise FailedPrecondition(f"{argv[0]} is not installed (util-linux)") from err
        except subprocess.TimeoutExpired as err:
            raise Internal(f"{' '.join(argv)} did not finish in {self._timeout:.0f}s") from err
        if r.returncode != 0:
            raise Internal(f"{' '.join(argv)} failed: {(r.stderr or r.stdout).strip() or f'exit {r.returncode}'}")
