"""The guest image: build it from the recipe in ``images/`` and cache it under the state dir.

An image lives in ``<state_dir>/images/<name>/<recipe digest>/`` (vmlinuz, initramfs.img,
manifest.json); a changed recipe yields a new folder, so domains defined from an older
image keep valid paths. Builds are serialized with a file lock across processes.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any as _Any

from .errors import FailedPrecondition, Internal
from .model import Platform

__all__ = ["GuestImage", "RecipeImages", "ensure_image", "find_image", "recipe_digest"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GuestImage:
    name: str
    directory: Path
    manifest: dict[str, _Any]

    @property
    def kernel(self) -> Path:
        return self.directory / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.directory / "initramfs.img"

    @property
    def kernel_version(self) -> str:
        return str(self.manifest.get("kernel_version", ""))

    @property
    def platform(self) -> Platform:
        m = self.manifest
        return Platform(os=str(m.get("os", "linux")), architecture=str(m["architecture"]), variant=str(m.get("variant", "")))


def recipe_digest(images_dir: Path) -> str:
    """A digest of every file of the recipe: a change in any of them means a new image."""
    h = hashlib.sha256()
    for p in sorted(images_dir.rglob("*")):
        if p.is_file() and p.suffix != ".md":
            h.update(str(p.relative_to(images_dir)).encode() + b"\0")
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _load(directory: Path, name: str) -> GuestImage | None:
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    img = GuestImage(name, directory, manifest)
    if not (img.kernel.is_file() and img.initrd.is_file()):
        return None
    return img


def find_image(state_dir: Path, images_dir: Path, name: str = "default") -> GuestImage | None:
    """The cached image built from the current recipe, or None."""
    if not images_dir.is_dir():
        return None
    return _load(state_dir / "images" / name / recipe_digest(images_dir), name)


def ensure_image(
    state_dir: Path,
    images_dir: Path,
    name: str = "default",
    *,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> GuestImage:
    """Return the image for the current recipe, building it first when it is missing.

    Raises FailedPrecondition when the recipe is missing or the build fails (the build's
    output is in the error and the log).
    """
    if not (images_dir / "build.sh").is_file():
        raise FailedPrecondition(f"guest image recipe not found at {images_dir} (set VMSANDBOX_IMAGES_DIR)")
    digest = recipe_digest(images_dir)
    base = state_dir / "images" / name
    target = base / digest
    if not force and (img := _load(target, name)) is not None:
        return img
    with _locked(base / ".lock"):
        if not force and (img := _load(target, name)) is not None:
            return img
        base.mkdir(parents=True, exist_ok=True)
        os.chmod(state_dir, 0o711)
        for d in (state_dir / "images", base):
            os.chmod(d, 0o755)
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=base))
        try:
            _run_build(images_dir / "build.sh", tmp, progress)
            manifest = json.loads((tmp / "manifest.json").read_text())
            manifest["recipe_digest"] = digest
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
            os.chmod(tmp, 0o755)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    img = _load(target, name)
    if img is None:
        raise Internal(f"image build left no usable image in {target}")
    log.info("guest image %s built in %s (kernel %s)", name, target, img.kernel_version)
    return img


class RecipeImages:
    """The images port: the image built from the recipe in ``images_dir``, cached under the
    state dir (:func:`ensure_image`)."""

    def __init__(self, state_dir: Path, images_dir: Path, name: str = "default") -> None:
        self.state_dir, self.images_dir, self.name = state_dir, images_dir, name

    def ensure(self, progress: Callable[[str], None] | None = None) -> GuestImage:
        return ensure_image(self.state_dir, self.images_dir, self.name, progress=progress)


def _run_build(script: Path, out: Path, progress: Callable[[str], None] | None) -> None:
    proc = subprocess.Popen(
        ["bash", str(script), str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        lines.append(line)
        log.debug("image build: %s", line)
        if progress is not None:
            progress(line)
    if proc.wait() != 0:
        tail = "\n".join(lines[-20:])
        raise FailedPrecondition(f"guest image build failed (exit {proc.returncode}):\n{tail}")
