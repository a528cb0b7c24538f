"""Giving back the zero pages of a restored guest's RAM: holes punched in QEMU's memfd.

No libvirt import. QEMU 7.2 loads a save image by writing every page it holds, and for the
zero pages it first reads the target page (``ram_handle_compressed``): in shared memfd RAM
that read allocates it, so a restored 256 MiB guest starts with all 256 MiB resident (a cold
boot of the same guest: about 110). A hole in a memfd reads as zeros, so punching out pages
that are all zero changes nothing the guest can see, provided nothing writes them meanwhile:
call it only while the domain is paused, before its devices run.
"""

from __future__ import annotations

import ctypes
import errno
import os

__all__ = ["punch_zero_pages", "memfd_paths", "zero_ranges", "punch_ranges", "ZeroMap"]

ZeroMap = dict[str, list[tuple[int, int]]]
"""Per memfd (by its name, ``/memfd:...``): the (offset, length) runs of all-zero pages."""

PAGE = 4096
_CHUNK = 2 << 20
_ZERO_CHUNK = bytes(_CHUNK)
_ZERO_PAGE = bytes(PAGE)
_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def memfd_paths(pid: int) -> dict[str, str]:
    """Each memfd the process holds (QEMU's RAM and virtio-mem's): its name -> ``/proc/<pid>/fd/N``."""
    out: dict[str, str] = {}
    base = f"/proc/{pid}/fd"
    for fd in os.listdir(base):
        try:
            link = os.readlink(f"{base}/{fd}")
        except OSError:
            continue  # closed while we looked
        if link.startswith("/memfd:"):
            out.setdefault(link, f"{base}/{fd}")
    return out


def _punch(fd: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _zero_runs(data: bytes, base: int) -> list[tuple[int, int]]:
    if data == _ZERO_CHUNK[: len(data)]:
        return [(base, len(data))]
    runs: list[tuple[int, int]] = []
    start = -1
    for i in range(0, len(data), PAGE):
        if data[i:i + PAGE] == _ZERO_PAGE:
            if start < 0:
                start = i
        elif start >= 0:
            runs.append((base + start, i - start))
            start = -1
    if start >= 0:
        runs.append((base + start, len(data) - start))
    return runs


def zero_ranges(pid: int) -> ZeroMap:
    """The all-zero pages of the memfds of process ``pid``, holes included (only the data
    regions are read: SEEK_DATA/SEEK_HOLE). OSError when one cannot be read."""
    out: ZeroMap = {}
    for name, path in memfd_paths(pid).items():
        runs: list[tuple[int, int]] = []
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            pos = 0
            while pos < size:
                try:
                    data_at = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError as e:
                    if e.errno == errno.ENXIO:  # only a hole is left
                        data_at = size
                    else:
                        raise
                if data_at > pos:
                    runs.append((pos, data_at - pos))  # a hole reads as zeros (a restore fills it)
                if data_at >= size:
                    break
                hole_at = os.lseek(fd, data_at, os.SEEK_HOLE)
                for at in range(data_at, hole_at, _CHUNK):
                    runs += _zero_runs(os.pread(fd, min(_CHUNK, hole_at - at), at), at)
                pos = hole_at
        finally:
            os.close(fd)
        out[name] = _merged(runs)
    return out


def _merged(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, length in runs:
        if out and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + length)
        else:
            out.append((start, length))
    return out


def punch_ranges(pid: int, zeros: ZeroMap) -> int:
    """Punch the given runs out of the memfds of process ``pid`` (by name; others are left
    alone); the bytes freed. Only for runs known to be zero now (see the module docstring)."""
    freed = 0
    for name, path in memfd_paths(pid).items():
        runs = zeros.get(name)
        if not runs:
            continue
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            for start, length in runs:
                length = min(length, size - start)
                if length > 0:
                    _punch(fd, start, length)
                    freed += length
        finally:
            os.close(fd)
    return freed


def punch_zero_pages(pid: int) -> int:
    """Find and punch every all-zero page out of the memfds of process ``pid``; the bytes
    freed. OSError when a memfd cannot be read or punched (nothing is lost either way)."""
    return punch_ranges(pid, zero_ranges(pid))
