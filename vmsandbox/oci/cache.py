"""The image cache: ``<root>/<manifest digest hex>/`` holds the unpacked image as rootfs.ext4 and its config.

An entry is built once (under an flock per digest, in ``<hex>.partial`` renamed into place,
so a crash leaves no half entry a later create would use) and shared read-only by every
sandbox of the image. At most ``keep`` entries that no sandbox uses are kept (least
recently used removed first).
"""

from __future__ import annotations

import fcntl
import gzip
import json
import logging
import os
import re
import shutil
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, cast

from ..errors import InvalidArgument
from ..ext4 import mkfs_from
from ..model import ImageConfig
from .image import Image, Layer, config_to_json, read_image
from .layers import apply_layer
from .source import HashingReader, Source, check_digest, open_source

__all__ = ["CachedImage", "ImageCache", "ROOTFS", "CONFIG", "unpack"]

log = logging.getLogger(__name__)
ROOTFS = "rootfs.ext4"
CONFIG = "config.json"
USED = "last-used"
KEEP = 8
HEADROOM = 256 << 20  # free space for the sandbox's own writes (the file is sparse)
_ENTRY = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class CachedImage:
    """A cache entry: the image's ext4 root (never written: sandboxes use overlays) and config."""

    digest: str
    directory: Path
    rootfs: Path
    config: ImageConfig
    built: bool  # unpacked by this call (False: it was cached)


def _layer(src: Source, layer: Layer, tree: Path, what: str) -> None:
    compression = layer.compression
    if compression == "auto":
        with src.open(layer.name) as f:
            compression = "gzip" if f.read(2) == b"\x1f\x8b" else ""
    raw = HashingReader(src.open(layer.name))
    plain = HashingReader(cast(IO[bytes], gzip.GzipFile(fileobj=cast(IO[bytes], raw), mode="rb"))) if compression else raw
    failure: BaseException | None = None
    try:
        apply_layer(tree, cast(IO[bytes], plain), what=what)
        diff = plain.drain()
    except (InvalidArgument, gzip.BadGzipFile, zlib.error, EOFError) as e:
        failure, diff = e, ""
    blob = raw.drain() if layer.digest else ""
    if layer.digest and blob != check_digest(layer.digest):
        raise InvalidArgument(f"image {src.where}: blob {layer.digest} does not match its digest (corrupt or altered)")
    if failure is not None:
        if isinstance(failure, InvalidArgument):
            raise failure
        raise InvalidArgument(f"{what} is not readable ({compression or 'tar'}): {failure}") from failure
    if layer.diff_id and diff != check_digest(layer.diff_id):
        raise InvalidArgument(f"image {src.where}: {what} does not match its diff_id {layer.diff_id} (corrupt or altered)")


def unpack(src: Source, image: Image, tree: Path) -> None:
    """Apply the image's layers in order into the folder ``tree``, checking every digest."""
    for i, layer in enumerate(image.layers):
        _layer(src, layer, tree, f"layer {i + 1}/{len(image.layers)} ({layer.digest or layer.name})")


class ImageCache:
    """Cached images under ``root``; ``in_use`` names the digests (hex) sandboxes still use."""

    def __init__(self, root: Path, *, keep: int = KEEP, in_use: Callable[[], set[str]] = set,
                 progress: Callable[[str], None] | None = None) -> None:
        self.root = root
        self.keep = keep
        self._in_use = in_use
        self._progress = progress

    @contextmanager
    def use(self, source: str | os.PathLike[str]) -> Iterator[CachedImage]:
        """The cache entry of the image at ``source``, unpacked first unless cached; held
        (the entry's flock) while the block runs, so a prune cannot remove it before the
        caller's overlay points at it. InvalidArgument for a bad or unsupported image."""
        src = open_source(source)
        try:
            image = read_image(src)
            self.root.mkdir(mode=0o711, parents=True, exist_ok=True)
            hexd = check_digest(image.digest)
            lock = os.open(self.root / f"{hexd}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(lock, fcntl.LOCK_EX)
                entry = self.root / hexd
                built = not (entry / ROOTFS).is_file() or not (entry / CONFIG).is_file()
                if built:
                    self._build(src, image, entry)
                else:
                    log.info("image %s: cached in %s, not unpacked again", image.digest, entry)
                (entry / USED).touch()
                yield CachedImage(image.digest, entry, entry / ROOTFS, image.config, built)
            finally:
                os.close(lock)
        finally:
            src.close()
        self.prune(spare=hexd)

    def _build(self, src: Source, image: Image, entry: Path) -> None:
        partial = entry.with_name(entry.name + ".partial")
        if partial.exists():
            log.info("image %s: removing %s left by an interrupted unpack", image.digest, partial)
            shutil.rmtree(partial)
        if entry.exists():
            shutil.rmtree(entry)  # incomplete: never made by the rename below
        partial.mkdir(mode=0o700)
        try:
            tree = partial / "tree"
            tree.mkdir(mode=0o755)
            msg = f"unpacking image {image.digest[:19]}… ({len(image.layers)} layer{'s' * (len(image.layers) != 1)})"
            log.info("%s from %s", msg, src.where)
            if self._progress is not None:
                self._progress(msg)
            unpack(src, image, tree)
            mkfs_from(str(tree), str(partial / ROOTFS), factor=1.3, headroom=HEADROOM,
                      why="OCI images are unpacked into ext4 images with it")
            shutil.rmtree(tree)
            (partial / CONFIG).write_text(json.dumps(config_to_json(image.config), indent=1, sort_keys=True))
            os.chmod(partial, 0o711)
            os.rename(partial, entry)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise

    def entries(self) -> list[Path]:
        """The complete entries, most recently used first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if _ENTRY.fullmatch(p.name) and (p / ROOTFS).is_file()]

        def used(p: Path) -> float:
            try:
                return (p / USED).stat().st_mtime
            except OSError:
                return 0.0
        return sorted(found, key=used, reverse=True)

    def _sweep_partials(self) -> None:
        """Remove what interrupted builds left (a build in flight holds its lock)."""
        for p in self.root.glob("*.partial") if self.root.is_dir() else ():
            hexd = p.name.removesuffix(".partial")
            if not _ENTRY.fullmatch(hexd):
                continue
            lock = os.open(self.root / f"{hexd}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                log.info("image cache: removing %s left by an interrupted unpack", p)
                shutil.rmtree(p, ignore_errors=True)
            except BlockingIOError:
                pass
            finally:
                os.close(lock)

    def prune(self, spare: str = "") -> list[str]:
        """Remove the least recently used entries past ``keep`` that no sandbox uses (nor
        ``spare``); an entry another process holds is left. Returns the removed digests (hex).
        Never raises: when what is in use cannot be told, nothing is removed."""
        try:
            busy = self._in_use() | {spare}
        except Exception:  # noqa: BLE001 - be conservative: keep everything
            log.warning("image cache: cannot tell which images are in use; nothing pruned", exc_info=True)
            return []
        self._sweep_partials()
        unused = [p for p in self.entries() if p.name not in busy]
        removed: list[str] = []
        for p in unused[self.keep:]:
            lock = os.open(self.root / f"{p.name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if p.name in self._in_use():  # a create may have taken it since
                    continue
                log.info("image cache: removing unused image sha256:%s", p.name)
                shutil.rmtree(p)
                removed.append(p.name)
            except (BlockingIOError, OSError) as e:
                log.warning("image cache: sha256:%s not removed (%s)", p.name, e)
            except Exception:  # noqa: BLE001
                log.warning("image cache: cannot tell whether sha256:%s is in use; kept", p.name, exc_info=True)
            finally:
                os.close(lock)
        return removed
