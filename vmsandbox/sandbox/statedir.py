"""The state dir: its folders, and which controller owns it.

The first controller on a state dir owns it: an exclusive flock on ``controller.lock`` for
its lifetime, with its pid inside for messages. Others (a CLI command while `serve` runs)
only observe: they never destroy or remove anything during recovery, which could be the
owner's work in flight.
"""

from __future__ import annotations

import hashlib
import fcntl
import logging
import os
from pathlib import Path

__all__ = ["LOCK_FILE", "StateDir", "agent_socket_path", "state_dir_owner"]

log = logging.getLogger(__name__)

LOCK_FILE = "controller.lock"
"""The owning controller holds an exclusive flock on this file in the state dir (its pid inside)."""


class StateDir:
    """Prepare ``path`` (sandboxes/ and sock/ in it) and take ownership when it is free."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # Only what we create gets our modes: an existing state dir (say /var/tmp, sticky)
        # keeps its own.
        for d in (path, path / "sandboxes", path / "sock"):
            if not d.is_dir():
                d.mkdir(parents=True, exist_ok=True)
                os.chmod(d, 0o711)
        _warn_if_unreachable(path)
        self._fd: int | None = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.owner = True
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)
        except BlockingIOError:
            self.owner = False
            log.info("state dir %s is owned by another controller; this one only observes during recovery", path)

    def release(self) -> None:
        """Give up ownership (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def state_dir_owner(state_dir: Path) -> int | None:
    """The pid of the controller that owns ``state_dir`` now (0 if it wrote none), else None."""
    try:
        fd = os.open(state_dir / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else 0
        return None
    finally:
        os.close(fd)  # also drops the shared lock we may have taken


def _warn_if_unreachable(path: Path) -> None:
    """QEMU usually runs unprivileged (libvirt-qemu): it must traverse every parent folder."""
    for parent in path.resolve().parents:
        try:
            mode = parent.stat().st_mode
        except OSError:
            continue
        if not mode & 0o001:
            log.warning("state dir %s: %s is mode %o, which an unprivileged QEMU user cannot traverse; "
                        "guests will fail to open their disks (use a folder like /var/lib/vmsandbox)",
                        path, parent, mode & 0o7777)
            return


def agent_socket_path(state_dir: Path, sandbox_id: str) -> str:
    """Where QEMU listens for the guest agent of ``sandbox_id``: ``<state_dir>/sock/<hash>.sock``.

    Unix socket paths are limited to 107 bytes and ids may be 128 characters long, hence a hash.
    """
    h = hashlib.sha256(sandbox_id.encode()).hexdigest()[:20]
    return str(state_dir / "sock" / f"{h}.sock")
