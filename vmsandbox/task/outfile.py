"""A kept container init's output: files the guest appends to on the share, followed by the host.

The keeper (images/agent/agent.c, token ``k``) appends the init's stdout/stderr to
``init.out``/``init.err`` in the container's guest dir. The host reads them straight from its
side of the share (no bulk output on the SSH channel) and writes what it read to CRI's FIFOs.

The guest is untrusted: :func:`open_guest_file` reaches a file from a dir fd of the share root,
refusing a symlink at every component and anything but a regular file (an ``O_PATH`` fd is
checked, then reopened through ``/proc/self/fd``, so the guest cannot swap in a device or a
FIFO between the check and the open). What was consumed is punched out of the file
(``fallocate(PUNCH_HOLE|KEEP_SIZE)``), so a file holds at most what is not yet delivered plus
a block; the consumed offsets go to a small host-only offsets file after every chunk, so a
restarted follower resumes where the last one stopped: after a crash between a FIFO write and
its offsets write, that one chunk (at most :data:`CHUNK` bytes per stream) is delivered twice.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import InvalidArgument

__all__ = ["open_guest_file", "Follower", "CHUNK", "read_offsets"]

log = logging.getLogger(__name__)

CHUNK = 65536
_BLOCK = 4096
_POLL_MIN, _POLL_MAX = 0.02, 0.2
_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]


def open_guest_file(root: Path, parts: Sequence[str], *, create: bool = False) -> int:
    """A read+write fd of the regular file ``root/parts...``, reached without following any
    symlink below ``root`` (which the host owns); ``create``: a new empty file replaces
    whatever was there. InvalidArgument for a symlink or anything but a regular file;
    FileNotFoundError as is."""
    for p in parts:
        if not p or p in (".", "..") or "/" in p:
            raise InvalidArgument(f"bad path component {p!r}")
    where = "/".join(parts)
    try:
        fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for p in parts[:-1]:
                nxt = os.open(p, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                os.close(fd)
                fd = nxt
            if create:
                try:
                    os.unlink(parts[-1], dir_fd=fd)
                except FileNotFoundError:
                    pass
                return os.open(parts[-1], os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                               0o600, dir_fd=fd)
            leaf = os.open(parts[-1], os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
        finally:
            os.close(fd)
    except (NotADirectoryError, IsADirectoryError, FileExistsError) as e:
        raise InvalidArgument(f"{where} in the share: {e.strerror}") from e
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        raise InvalidArgument(f"{where} in the share: a symlink") from e
    try:
        if not stat.S_ISREG(os.fstat(leaf).st_mode):
            raise InvalidArgument(f"{where} in the share is not a regular file")
        # The O_PATH fd pins the inode that was checked: a swap after the check is not opened.
        return os.open(f"/proc/self/fd/{leaf}", os.O_RDWR | os.O_CLOEXEC)
    finally:
        os.close(leaf)


def _punch(fd: int, offset: int, length: int) -> bool:
    if length <= 0:
        return True
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    e = ctypes.get_errno()
    log.warning("cannot punch consumed output out of the share (%s): it is kept", os.strerror(e))
    return e not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EBADF)


def read_offsets(path: Path) -> list[int]:
    """The consumed offsets saved at ``path`` ([] when there are none)."""
    try:
        return [int(x) for x in path.read_text().split()]
    except (OSError, ValueError):
        return []


class Follower:
    """Copies the files ``fds`` (read+write fds from :func:`open_guest_file`) to ``sinks`` as
    they grow, from ``offsets`` on, until :meth:`finish` (the writer ended: read to the end)
    or :meth:`stop` (give up now). ``on_data`` runs after each delivered chunk."""

    def __init__(self, fds: Sequence[int], sinks: Sequence[Callable[[bytes], None]], *,
                 offsets_file: Path | None = None, offsets: Sequence[int] = (), name: str = "vsbx-out") -> None:
        self._fds, self._sinks = list(fds), list(sinks)
        self.offsets = list(offsets) or [0] * len(self._fds)
        self._punched = [o - o % _BLOCK for o in self.offsets]
        self._can_punch = [True] * len(self._fds)
        self._file = offsets_file
        self._ofd = (os.open(offsets_file, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
                     if offsets_file else None)
        self._lock = threading.Lock()
        self._finish, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=name)

    def start(self) -> Follower:
        self._thread.start()
        return self

    def drain(self) -> None:
        """Deliver what the files hold now (for a failed create's message)."""
        while self._pass():
            pass

    def _pass(self) -> bool:
        moved = False
        with self._lock:
            for i, fd in enumerate(self._fds):
                if self._stop.is_set():
                    return False
                try:
                    data = os.pread(fd, CHUNK, self.offsets[i])
                except OSError as e:
                    log.warning("cannot read kept output: %s", e)
                    continue
                if not data:
                    continue
                self._sinks[i](data)
                self.offsets[i] += len(data)
                self._save()
                self._release(i)
                moved = True
        return moved

    def _save(self) -> None:
        if self._ofd is not None:
            line = " ".join(map(str, self.offsets)).encode().ljust(64) + b"\n"
            os.pwrite(self._ofd, line, 0)

    def _release(self, i: int) -> None:
        upto = self.offsets[i] - self.offsets[i] % _BLOCK
        if self._can_punch[i] and upto > self._punched[i]:
            self._can_punch[i] = _punch(self._fds[i], self._punched[i], upto - self._punched[i])
            self._punched[i] = upto

    def _run(self) -> None:
        idle = _POLL_MIN
        try:
            while not self._stop.is_set():
                finishing = self._finish.is_set()  # read before the pass: nothing written before it is missed
                if self._pass():
                    idle = _POLL_MIN
                    continue
                if finishing:
                    break
                self._finish.wait(idle)
                idle = min(idle * 2, _POLL_MAX)
        finally:
            self._close()

    def finish(self, timeout: float | None = None) -> None:
        """The writer ended: deliver the rest, then stop (blocks until done)."""
        self._finish.set()
        if self._thread.is_alive() or self._thread.ident is None:
            if self._thread.ident is None:
                self.start()
            self._thread.join(timeout)

    def stop(self) -> None:
        """Stop now (what is not delivered stays in the files, and the offsets say where)."""
        self._stop.set()
        self._finish.set()
        if self._thread.ident is not None and self._thread is not threading.current_thread():
            self._thread.join(10)
        else:
            self._close()

    def _close(self) -> None:
        with self._lock:
            fds, self._fds = self._fds, []
            ofd, self._ofd = self._ofd, None
        for fd in fds:
            os.close(fd)
        if ofd is not None:
            os.close(ofd)
