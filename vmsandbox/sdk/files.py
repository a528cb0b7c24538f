"""Files in a sandbox (:attr:`vmsandbox.Sandbox.files`), moved through its virtio-fs share.

Bytes never cross the SSH channel (about 3 MB/s under TCG): the host stages them in a
private folder of the sandbox's share (``<share>/.vsbx-files/<token>``, ``/run/vsbx/shared``
in the guest), and one command in the sandbox copies between there and the path. That
command runs in the sandbox's own root, so paths and symlinks mean what they mean to its
processes, with the guest's busybox reached through ``/proc/1/root`` (PID 1 is the agent in
the guest's root): it works for images without a shell or coreutils. Memory stays constant
whatever the size: the host streams files in 1 MiB pieces.
"""

from __future__ import annotations

import os
import posixpath
import secrets
import shutil
import stat
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO, Protocol

from ..errors import FailedPrecondition, InvalidArgument, NotFound
from ..model import ExecResult, ImageConfig

__all__ = ["Files", "FileInfo", "FileOps", "ControllerFileOps", "files_of", "STAGING_DIR", "GUEST_BUSYBOX",
           "GUEST_SHARE"]

STAGING_DIR = ".vsbx-files"
"""The share's folder where transfers are staged (removed with the sandbox)."""
GUEST_BUSYBOX = "/proc/1/root/bin/busybox"
GUEST_SHARE = "/proc/1/root/run/vsbx/shared"
_CHUNK = 1 << 20
_NOT_FOUND, _IS_DIR, _NOT_DIR, _NOT_EMPTY = 44, 45, 46, 47


class FileOps(Protocol):
    """What :class:`Files` needs of the sandbox: a command in its root, the share's host folder."""

    def run_root(self, argv: Sequence[str]) -> ExecResult:
        """Run ``argv`` as root in the sandbox's root (the rootfs, else the guest's root)."""

    def share(self) -> Path: ...


class _Controller(Protocol):
    def exec(self, sandbox_id: str, argv: Sequence[str], *, cwd: str | None = None,
             user: str | None = None) -> ExecResult: ...

    def share_path(self, sandbox_id: str) -> Path: ...


class ControllerFileOps:
    """:class:`FileOps` of one sandbox of a controller (ours, or `serve`'s over its admin socket)."""

    def __init__(self, controller: _Controller, sandbox_id: str, *, image_user: str = "") -> None:
        self._c, self._id = controller, sandbox_id
        # As root whatever the image's User is: the guest's busybox is reached through
        # /proc/1/root, which only root may follow.
        self._user = "0:0" if image_user else None

    def run_root(self, argv: Sequence[str]) -> ExecResult:
        return self._c.exec(self._id, argv, cwd="/", user=self._user)

    def share(self) -> Path:
        return self._c.share_path(self._id)


def files_of(controller: _Controller, sandbox_id: str, *, image: ImageConfig | None = None) -> Files:
    """The :class:`Files` of ``sandbox_id`` (relative paths from the image's WorkingDir)."""
    return Files(ControllerFileOps(controller, sandbox_id, image_user=image.user if image else ""),
                 sandbox_id=sandbox_id, cwd=(image.working_dir if image else "") or "/")


@dataclass(frozen=True)
class FileInfo:
    """One entry of :meth:`Files.list` (a symlink is described itself, not its target)."""

    name: str
    path: str
    type: str
    """``file``, ``dir``, ``symlink`` or ``other`` (device, fifo, socket)."""
    size: int
    mode: int
    """Permission bits (``0o755``)."""
    mtime: datetime
    uid: int
    gid: int


_TYPES = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink"}

# Each script runs as `busybox sh -c SCRIPT BUSYBOX ARGS...`: $0 is the busybox to call
# applets through (the sandbox's own tools may be missing or differ).
_PUT = r'''
src=$1 dst=$2 mode=$3
[ -d "$dst" ] && [ ! -L "$dst" ] && { echo "$dst is a directory" >&2; exit 45; }
dir=$("$0" dirname -- "$dst")
"$0" mkdir -p -- "$dir" || exit 1
tmp="$dir/.vsbx-tmp.$$"
"$0" cp -- "$src" "$tmp" && "$0" chmod "$mode" -- "$tmp" && "$0" mv -f -- "$tmp" "$dst" || { "$0" rm -f -- "$tmp"; exit 1; }
'''
_PUT_TREE = r'''
src=$1 dst=$2
[ -e "$dst" ] && [ ! -d "$dst" ] && { echo "$dst is not a directory" >&2; exit 46; }
"$0" mkdir -p -- "$dst" && "$0" cp -a -- "$src/." "$dst/"
'''
_GET = r'''
stage=$1 src=$2
if [ -d "$src" ]; then "$0" cp -a -- "$src" "$stage/d" && echo dir
elif [ -e "$src" ]; then "$0" cp -p -- "$src" "$stage/f" && echo file
else echo "no such file or directory: $src" >&2; exit 44; fi
'''
_LIST = r'''
[ -d "$1" ] || { [ -e "$1" ] && { echo "not a directory: $1" >&2; exit 46; }; echo "no such file or directory: $1" >&2; exit 44; }
exec "$0" find "$1" -mindepth 1 -maxdepth 1 -exec "$0" stat -c '%f %s %Y %u %g' {} ';' -print0
'''
_REMOVE = r'''
p=$1
[ -e "$p" ] || [ -L "$p" ] || { echo "no such file or directory: $p" >&2; exit 44; }
if [ -d "$p" ] && [ ! -L "$p" ]; then
  if [ "$2" = r ]; then exec "$0" rm -rf -- "$p"; fi
  "$0" rmdir -- "$p" 2>/dev/null || { echo "directory not empty: $p" >&2; exit 47; }
else exec "$0" rm -f -- "$p"; fi
'''
_STAT = r'''
[ -e "$1" ] || [ -L "$1" ] || { echo "no such file or directory: $1" >&2; exit 44; }
exec "$0" stat -c '%f %s %Y %u %g' -- "$1"
'''
_MKDIR = r'''
[ -e "$1" ] && [ ! -d "$1" ] && { echo "$1 exists and is not a directory" >&2; exit 46; }
exec "$0" mkdir -p -m "$2" -- "$1"
'''


def _info(path: str, meta: str) -> FileInfo:
    raw_mode, size, mtime, uid, gid = meta.split()
    mode = int(raw_mode, 16)
    return FileInfo(posixpath.basename(path), path, _TYPES.get(stat.S_IFMT(mode), "other"), int(size),
                    stat.S_IMODE(mode), datetime.fromtimestamp(int(mtime), timezone.utc), int(uid), int(gid))


class Files:
    """Read, write, copy, list and remove files in the sandbox's root. Thread-safe.

    Relative paths are taken from ``cwd`` (the image's WorkingDir, else ``/``). Errors:
    NotFound for a missing path, InvalidArgument for a path of the wrong kind (a directory
    where a file is needed, say), FailedPrecondition when the sandbox's command fails
    otherwise (a read-only or full disk: its message is in the error).
    """

    def __init__(self, ops: FileOps, *, sandbox_id: str, cwd: str = "/") -> None:
        self._ops = ops
        self._id = sandbox_id
        self._cwd = cwd or "/"

    # ------------------------------------------------------------------ plumbing
    def _path(self, path: str | os.PathLike[str]) -> str:
        p = os.fspath(path)
        if not isinstance(p, str) or not p or "\0" in p:
            raise InvalidArgument(f"bad path {p!r} in the sandbox", sandbox_id=self._id)
        return posixpath.normpath(posixpath.join(self._cwd, p))

    def _script(self, script: str, *args: str, what: str) -> ExecResult:
        res = self._ops.run_root([GUEST_BUSYBOX, "sh", "-c", script, GUEST_BUSYBOX, *args])
        if res.exit_code == 0:
            return res
        msg = res.stderr.decode(errors="replace").strip() or f"exit status {res.exit_code}"
        if res.exit_code == _NOT_FOUND:
            raise NotFound(f"{what}: {msg}", sandbox_id=self._id)
        if res.exit_code in (_IS_DIR, _NOT_DIR, _NOT_EMPTY):
            raise InvalidArgument(f"{what}: {msg}", sandbox_id=self._id)
        if res.exit_code == 127 or "/proc/1/root" in msg:
            raise FailedPrecondition(f"{what}: the guest's tools are not reachable from the sandbox's root "
                                     f"(no /proc there?): {msg}", sandbox_id=self._id)
        raise FailedPrecondition(f"{what}: {msg}", sandbox_id=self._id)

    @contextmanager
    def _stage(self) -> Iterator[tuple[Path, str]]:
        """A fresh staging folder: (host path, guest path), removed afterwards."""
        token = secrets.token_hex(8)
        base = self._ops.share() / STAGING_DIR
        base.mkdir(mode=0o700, exist_ok=True)
        host = base / token
        host.mkdir(mode=0o700)
        try:
            yield host, f"{GUEST_SHARE}/{STAGING_DIR}/{token}"
        finally:
            shutil.rmtree(host, ignore_errors=True)

    # ------------------------------------------------------------------ writing
    def write(self, path: str | os.PathLike[str], data: bytes | str | BinaryIO, *, mode: int = 0o644) -> None:
        """Create or replace the file ``path`` (parents made) with ``data`` (str as UTF-8, or a
        binary file object read to its end), with permission bits ``mode``. Readers in the
        sandbox see the old content or the new, never a part (written beside it, then renamed)."""
        dst = self._path(path)
        with self._stage() as (host, guest):
            with open(host / "f", "wb") as f:
                if isinstance(data, str):
                    f.write(data.encode())
                elif isinstance(data, (bytes, bytearray, memoryview)):
                    f.write(data)
                else:
                    shutil.copyfileobj(data, f, _CHUNK)
            self._script(_PUT, f"{guest}/f", dst, f"{mode & 0o7777:o}", what=f"writing {dst}")

    def upload(self, local: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
        """Copy the host file or folder ``local`` to ``path``: a file replaces ``path``; a
        folder's content is merged into the folder ``path`` (made when missing). Permission
        bits, symlinks and modification times are kept; owners become root."""
        src = Path(local)
        dst = self._path(path)
        if not src.exists() and not src.is_symlink():
            raise NotFound(f"{src} does not exist on the host")
        with self._stage() as (host, guest):
            if src.is_dir():
                shutil.copytree(src, host / "d", symlinks=True)
                self._script(_PUT_TREE, f"{guest}/d", dst, what=f"uploading {src} to {dst}")
            else:
                shutil.copy2(src, host / "f")
                self._script(_PUT, f"{guest}/f", dst, f"{stat.S_IMODE(src.stat().st_mode):o}",
                             what=f"uploading {src} to {dst}")

    def mkdir(self, path: str | os.PathLike[str], *, mode: int = 0o755) -> None:
        """Make the folder ``path`` and its missing parents; succeeds when it exists."""
        dst = self._path(path)
        self._script(_MKDIR, dst, f"{mode & 0o7777:o}", what=f"making {dst}")

    def remove(self, path: str | os.PathLike[str], *, recursive: bool = False) -> None:
        """Remove a file, symlink or (empty, unless ``recursive``) folder; NotFound when missing."""
        p = self._path(path)
        if p == "/":
            raise InvalidArgument("refusing to remove the sandbox's root", sandbox_id=self._id)
        self._script(_REMOVE, p, "r" if recursive else "", what=f"removing {p}")

    # ------------------------------------------------------------------ reading
    def download(self, path: str | os.PathLike[str], local: str | os.PathLike[str]) -> None:
        """Copy the file or folder ``path`` to the host path ``local``: a file replaces
        ``local``; a folder's content is merged into the folder ``local``. Permission bits,
        owners (numeric), symlinks and modification times are kept."""
        src = self._path(path)
        dst = Path(local)
        with self._stage() as (host, guest):
            kind = self._script(_GET, guest, src, what=f"reading {src}").stdout.decode().strip()
            if kind == "dir":
                shutil.copytree(host / "d", dst, symlinks=True, dirs_exist_ok=True)
            else:
                if dst.is_dir():
                    raise InvalidArgument(f"{dst} is a directory on the host")
                tmp = dst.with_name(f".{dst.name}.vsbx-{secrets.token_hex(4)}")
                try:
                    shutil.copy2(host / "f", tmp)
                    os.replace(tmp, dst)
                finally:
                    tmp.unlink(missing_ok=True)

    def read(self, path: str | os.PathLike[str], *, max_bytes: int = 256 << 20) -> bytes:
        """The content of the file ``path``. FailedPrecondition when it is larger than
        ``max_bytes`` (use :meth:`download` for big files); InvalidArgument for a folder."""
        src = self._path(path)
        with self._stage() as (host, guest):
            kind = self._script(_GET, guest, src, what=f"reading {src}").stdout.decode().strip()
            if kind == "dir":
                raise InvalidArgument(f"reading {src}: it is a directory", sandbox_id=self._id)
            size = (host / "f").stat().st_size
            if size > max_bytes:
                raise FailedPrecondition(f"{src} has {size} bytes, more than max_bytes={max_bytes}; "
                                         "download it instead", sandbox_id=self._id)
            return (host / "f").read_bytes()

    def read_text(self, path: str | os.PathLike[str], encoding: str = "utf-8") -> str:
        """:meth:`read`, decoded."""
        return self.read(path).decode(encoding)

    def list(self, path: str | os.PathLike[str] = ".") -> list[FileInfo]:
        """The entries of the folder ``path`` (no ``.`` and ``..``), sorted by name."""
        p = self._path(path)
        out = self._script(_LIST, p, what=f"listing {p}").stdout
        entries = []
        for record in out.split(b"\0"):
            if not record.strip():
                continue
            meta, _, name = record.lstrip(b"\n").partition(b"\n")
            entries.append(_info(name.decode("utf-8", "surrogateescape"), meta.decode()))
        return sorted(entries, key=lambda e: e.name)

    def stat(self, path: str | os.PathLike[str]) -> FileInfo:
        """What :meth:`list` says of ``path`` itself; NotFound when it does not exist."""
        p = self._path(path)
        return _info(p, self._script(_STAT, p, what=f"looking at {p}").stdout.decode())

    def exists(self, path: str | os.PathLike[str]) -> bool:
        """Whether ``path`` exists (a dangling symlink does)."""
        try:
            self.stat(path)
            return True
        except NotFound:
            return False


