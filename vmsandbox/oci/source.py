"""Where an image's files come from: a layout folder or a tarball, read by relative name."""

from __future__ import annotations

import hashlib
import os
import re
import stat
import tarfile
from pathlib import Path
from typing import IO, Protocol

from ..errors import InvalidArgument

__all__ = ["Source", "open_source", "HashingReader", "MAX_JSON", "check_digest", "blob_name"]

MAX_JSON = 4 << 20  # an index, manifest or config larger than this is not an image's
_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")


def check_digest(digest: object) -> str:
    """The hex of a ``sha256:<64 hex>`` digest; InvalidArgument for anything else."""
    m = _DIGEST.fullmatch(digest) if isinstance(digest, str) else None
    if m is None:
        raise InvalidArgument(f"unsupported or malformed digest {digest!r} (only sha256 is supported)")
    return m.group(1)


def blob_name(digest: object) -> str:
    return f"blobs/sha256/{check_digest(digest)}"


def _clean(name: str) -> str:
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise InvalidArgument(f"image file name {name!r} is not a plain relative path")
    return "/".join(parts)


class Source(Protocol):
    """The files of an image layout (or of a docker save), by relative name."""

    where: str

    def exists(self, name: str) -> bool: ...

    def open(self, name: str) -> IO[bytes]:
        """The file's bytes as a stream; InvalidArgument when it is missing."""
        ...

    def close(self) -> None: ...


class HashingReader:
    """A read-only stream that hashes (sha256) every byte read through it."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self._h = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        self._h.update(data)
        self.size += len(data)
        return data

    def readable(self) -> bool:
        return True

    def drain(self) -> str:
        """Read what is left; the hex digest of everything."""
        while self.read(1 << 20):
            pass
        return self._h.hexdigest()


class _DirSource:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.where = str(root)

    def _path(self, name: str) -> Path:
        return self.root / _clean(name)

    def exists(self, name: str) -> bool:
        return self._path(name).is_file()

    def open(self, name: str) -> IO[bytes]:
        try:
            return open(self._path(name), "rb")
        except OSError as e:
            raise InvalidArgument(f"image {self.where}: {name} cannot be read ({e.strerror})") from e

    def close(self) -> None:
        pass


class _TarSource:
    def __init__(self, path: Path) -> None:
        self.where = str(path)
        try:
            self._tar = tarfile.open(path, "r:*")
            self._members = {}
            for m in self._tar.getmembers():
                try:
                    self._members[_clean(m.name)] = m
                except InvalidArgument:
                    continue  # a "./" entry, or a name we would never ask for
        except (OSError, tarfile.TarError, EOFError) as e:
            raise InvalidArgument(f"image {path} is not a readable tarball: {e}") from e

    def exists(self, name: str) -> bool:
        m = self._members.get(_clean(name))
        return m is not None and (m.isfile() or m.issym() or m.islnk())

    def open(self, name: str) -> IO[bytes]:
        m = self._members.get(_clean(name))
        try:
            # Symlinks (newer docker save links <id>/layer.tar to blobs/) are followed inside the tar.
            for _ in range(8):
                if m is None or not m.issym():
                    break
                m = self._members.get(_clean(os.path.normpath(os.path.join(os.path.dirname(m.name), m.linkname))))
            f = self._tar.extractfile(m) if m is not None else None
        except (KeyError, InvalidArgument, tarfile.TarError) as e:
            raise InvalidArgument(f"image {self.where}: {name} cannot be read ({e})") from e
        if f is None:
            raise InvalidArgument(f"image {self.where} has no file {name}")
        return f

    def close(self) -> None:
        self._tar.close()


def open_source(path: str | os.PathLike[str]) -> Source:
    """A layout folder, or a tarball (oci-archive, docker save; gzip allowed) of one.

    InvalidArgument when the path is missing or neither a folder nor a readable tarball.
    """
    p = Path(path)
    try:
        st = p.stat()
    except OSError as e:
        raise InvalidArgument(f"image {p} does not exist or cannot be read ({e.strerror})") from e
    if stat.S_ISDIR(st.st_mode):
        return _DirSource(p)
    if stat.S_ISREG(st.st_mode):
        return _TarSource(p)
    raise InvalidArgument(f"image {p} is neither an OCI layout folder nor a tarball")
