"""Apply a layer tar to a root folder: whiteouts, links, devices, owners, modes, times; never outside it.

Each member's parent is resolved from the root one component at a time with
``O_PATH | O_NOFOLLOW | O_DIRECTORY``: a symlink (made by an earlier layer or member) is never
followed, so no member can reach outside the root; a path through one is refused.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
import tarfile
from typing import IO

from ..errors import InvalidArgument

__all__ = ["apply_layer", "WHITEOUT", "OPAQUE"]

log = logging.getLogger(__name__)
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
_DIR = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _parts(name: str, what: str) -> tuple[str, ...]:
    """A member name as path components below the root (a leading ``/`` is dropped);
    InvalidArgument for ``..`` (a climb is refused, never clamped)."""
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise InvalidArgument(f"{what}: member {name!r} climbs out of the root with '..'")
    return parts


class _Applier:
    def __init__(self, root: str, what: str) -> None:
        self.what = what
        self.root = os.open(root, _DIR)
        self.as_root = os.geteuid() == 0
        self.added: set[str] = set()
        self.dirs: list[tuple[tuple[str, ...], tarfile.TarInfo]] = []

    def close(self) -> None:
        os.close(self.root)

    def _dir(self, parts: tuple[str, ...], *, create: bool, member: str) -> int | None:
        """An O_PATH fd of the folder ``parts`` (made 0755 when missing and ``create``; None
        when missing otherwise). InvalidArgument when a component is not a folder."""
        fd = os.dup(self.root)
        try:
            for i, comp in enumerate(parts):
                try:
                    nfd = os.open(comp, _DIR, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        return None
                    os.mkdir(comp, 0o755, dir_fd=fd)
                    nfd = os.open(comp, _DIR, dir_fd=fd)
                except OSError as e:
                    if e.errno not in (errno.ENOTDIR, errno.ELOOP):
                        raise
                    raise InvalidArgument(f"{self.what}: member {member!r} goes through /{'/'.join(parts[:i + 1])}, "
                                          "which is not a folder (a symlink is never followed)") from e
                os.close(fd)
                fd = nfd
            out, fd = fd, -1
            return out
        finally:
            if fd >= 0:
                os.close(fd)

    def _remove(self, pfd: int, name: str) -> None:
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(name, dir_fd=pfd)  # fd-based: never follows a symlink inside
        else:
            os.unlink(name, dir_fd=pfd)

    def _meta(self, fd: int | None, pfd: int, name: str, m: tarfile.TarInfo) -> None:
        """Owner, mode, xattrs and times: through ``fd`` when given, else by name (no follow)."""
        if self.as_root:
            if fd is not None:
                os.fchown(fd, m.uid, m.gid)
            else:
                os.chown(name, m.uid, m.gid, dir_fd=pfd, follow_symlinks=False)
        if fd is not None:
            os.fchmod(fd, m.mode & 0o7777)
            for key, value in m.pax_headers.items():
                if key.startswith("SCHILY.xattr."):
                    try:
                        os.setxattr(fd, key[len("SCHILY.xattr."):], value.encode("utf-8", "surrogateescape"))
                    except OSError as e:
                        log.debug("%s: xattr %s of %s not set: %s", self.what, key, m.name, e)
        elif not m.issym():  # Linux has no lchmod; a symlink's mode means nothing
            os.chmod(name, m.mode & 0o7777, dir_fd=pfd)
        ns = int(m.mtime * 1_000_000_000)
        if fd is not None:
            os.utime(fd, ns=(ns, ns))
        else:
            os.utime(name, ns=(ns, ns), dir_fd=pfd, follow_symlinks=False)

    def _whiteout(self, parts: tuple[str, ...], member: str) -> None:
        name = parts[-1][len(WHITEOUT):]
        if name in ("", ".", ".."):
            raise InvalidArgument(f"{self.what}: bad whiteout {member!r}")
        target = parts[:-1] + (name,)
        if "/".join(target) in self.added:
            return  # a whiteout hides the lower layers only
        pfd = self._dir(parts[:-1], create=False, member=member)
        if pfd is not None:
            try:
                self._remove(pfd, name)
            finally:
                os.close(pfd)

    def _opaque(self, parts: tuple[str, ...], member: str) -> None:
        """Empty the folder ``parts`` of what lower layers put there (this layer's entries stay)."""
        fd = self._dir(parts, create=True, member=member)
        assert fd is not None
        try:
            self._clear_lower(fd, "/".join(parts))
        finally:
            os.close(fd)

    def _clear_lower(self, fd: int, path: str) -> None:
        lfd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
        try:
            names = os.listdir(lfd)
        finally:
            os.close(lfd)
        for child in names:
            cpath = f"{path}/{child}" if path else child
            if cpath in self.added:
                if any(a.startswith(cpath + "/") for a in self.added) or stat.S_ISDIR(
                        os.stat(child, dir_fd=fd, follow_symlinks=False).st_mode):
                    cfd = os.open(child, _DIR, dir_fd=fd)
                    try:
                        self._clear_lower(cfd, cpath)
                    finally:
                        os.close(cfd)
                continue
            self._remove(fd, child)

    def member(self, tar: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        parts = _parts(m.name, self.what)
        if not parts:
            return  # the root itself: its owner and mode are the guest's business
        base = parts[-1]
        if base == OPAQUE:
            return self._opaque(parts[:-1], m.name)
        if any(p.startswith(WHITEOUT + WHITEOUT) for p in parts):
            return  # aufs' own metadata (.wh..wh.plnk/..., .wh..wh.aufs): never part of the tree
        if base.startswith(WHITEOUT):
            return self._whiteout(parts, m.name)
        pfd = self._dir(parts[:-1], create=True, member=m.name)
        assert pfd is not None
        try:
            self._entry(tar, m, parts, pfd, base)
        finally:
            os.close(pfd)
        self.added.add("/".join(parts))

    def _entry(self, tar: tarfile.TarFile, m: tarfile.TarInfo, parts: tuple[str, ...], pfd: int, base: str) -> None:
        if m.isdir():
            try:
                if not stat.S_ISDIR(os.stat(base, dir_fd=pfd, follow_symlinks=False).st_mode):
                    self._remove(pfd, base)
                    os.mkdir(base, 0o700, dir_fd=pfd)
            except FileNotFoundError:
                os.mkdir(base, 0o700, dir_fd=pfd)
            self.dirs.append((parts, m))  # owner, mode and times once the layer is in
            return
        if m.islnk():
            tparts = _parts(m.linkname, self.what)
            tfd = self._dir(tparts[:-1], create=False, member=m.name) if tparts else None
            if tfd is None:
                raise InvalidArgument(f"{self.what}: hard link {m.name!r} to missing {m.linkname!r}")
            try:
                tst = os.stat(tparts[-1], dir_fd=tfd, follow_symlinks=False)
                if stat.S_ISDIR(tst.st_mode):
                    raise InvalidArgument(f"{self.what}: hard link {m.name!r} to the folder {m.linkname!r}")
                if tparts == parts:
                    return
                self._remove(pfd, base)
                os.link(tparts[-1], base, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
            except FileNotFoundError as e:
                raise InvalidArgument(f"{self.what}: hard link {m.name!r} to missing {m.linkname!r}") from e
            finally:
                os.close(tfd)
            return
        self._remove(pfd, base)
        if m.isreg():
            fd = os.open(base, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=pfd)
            with os.fdopen(fd, "wb") as out:
                src = tar.extractfile(m)
                if src is not None:
                    shutil.copyfileobj(src, out, 1 << 20)
                out.flush()
                self._meta(out.fileno(), pfd, base, m)
        elif m.issym():
            os.symlink(m.linkname, base, dir_fd=pfd)
            self._meta(None, pfd, base, m)
        elif m.ischr() or m.isblk() or m.isfifo():
            kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK if m.isblk() else stat.S_IFIFO
            try:
                os.mknod(base, kind | 0o600, os.makedev(m.devmajor, m.devminor), dir_fd=pfd)
            except PermissionError:
                if self.as_root:
                    raise
                log.warning("%s: device %s skipped (creating devices needs root)", self.what, m.name)
                return
            self._meta(None, pfd, base, m)
        else:
            log.debug("%s: member %s of tar type %r skipped", self.what, m.name, m.type)

    def finish(self) -> None:
        """The layer's folders get their owner, mode and times now that their content is in."""
        for parts, m in reversed(self.dirs):
            fd = self._dir(parts, create=False, member=m.name)
            if fd is None:
                continue  # removed later in the same layer
            try:
                rfd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
                try:
                    self._meta(rfd, fd, ".", m)
                finally:
                    os.close(rfd)
            finally:
                os.close(fd)


def apply_layer(root: str | os.PathLike[str], stream: IO[bytes], *, what: str = "layer") -> None:
    """Apply the uncompressed layer tar read from ``stream`` (once, in order) on top of ``root``.

    ``.wh.NAME`` removes NAME of the lower layers, ``.wh..wh..opq`` empties its folder of
    their content; owners are kept when running as root (devices need root: skipped with a
    warning otherwise). InvalidArgument (naming ``what`` and the member) for a ``..`` name,
    a path through a symlink or a non-folder, a bad hard link, or a broken tar.
    """
    a = _Applier(os.fspath(root), what)
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for m in tar:
                a.member(tar, m)
        a.finish()
    except (tarfile.TarError, EOFError) as e:
        raise InvalidArgument(f"{what} is not a readable tar: {e}") from e
    finally:
        a.close()
