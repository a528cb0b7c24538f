"""`vmsandbox cp`: files and folders between the host and a sandbox, as `docker cp` does.

``cp SRC ID:DST`` and ``cp ID:SRC DST``. A destination folder that exists receives the
source under its own name (``SRC/.`` copies a folder's content instead); modes and
symlinks are kept. The bytes go through the sandbox's virtio-fs share
(:mod:`vmsandbox.sdk.files`), never through the agent's SSH channel.
"""

from __future__ import annotations

import argparse
import os
import posixpath
from pathlib import Path

from ..errors import InvalidArgument, NotFound
from ..sdk.files import files_of
from . import wiring
from .output import Output

__all__ = ["cp", "split_target"]


def split_target(word: str) -> tuple[str | None, str]:
    """(sandbox id, path) for ``ID:PATH``; (None, word) for a host path. As docker's rule: a
    host path with a colon must start with ``/`` or ``.`` (``./a:b``)."""
    if ":" in word and not word.startswith(("/", ".")):
        sid, _, path = word.partition(":")
        if sid and "/" not in sid:
            return sid, path or "."
    return None, word


def _into(dest: str, src: str, dest_is_dir: bool) -> tuple[str, bool]:
    """The path the source lands at, and whether a folder's content is merged there."""
    if src.rstrip("/").endswith("/.") or src == ".":
        return dest, True
    if dest_is_dir:
        return posixpath.join(dest, posixpath.basename(src.rstrip("/")) or "."), False
    return dest, False


def cp(args: argparse.Namespace, out: Output) -> int:
    src_id, src = split_target(args.src)
    dst_id, dst = split_target(args.dst)
    if (src_id is None) == (dst_id is None):
        raise InvalidArgument("cp copies between the host and one sandbox: cp SRC ID:DST, or cp ID:SRC DST")
    sandbox_id = src_id or dst_id
    assert sandbox_id is not None
    with wiring.sandboxes(wiring.config_from(args), out.progress.line, mutates=True) as c:
        image_of = getattr(c, "image_config", None)
        files = files_of(c, sandbox_id, image=image_of(sandbox_id) if image_of is not None else None)
        if dst_id is not None:  # host -> sandbox
            local = Path(src)
            if not local.exists() and not local.is_symlink():
                raise NotFound(f"{src} does not exist on the host")
            try:
                dest_is_dir = files.stat(dst).type == "dir"  # one command in the sandbox, not two
            except NotFound:
                dest_is_dir = False
            target, _ = _into(dst, src, dest_is_dir)
            with out.progress.during(f"copying {src} to {sandbox_id}:{target}"):
                files.upload(local, target)
            text = f"copied {src} to {sandbox_id}:{target}"
        else:  # sandbox -> host
            info = files.stat(src)
            target, _ = _into(dst, src, os.path.isdir(dst))
            if info.type != "dir" and os.path.isdir(target):
                raise InvalidArgument(f"{target} is a directory on the host")
            with out.progress.during(f"copying {sandbox_id}:{src} to {target}"):
                files.download(src, target)
            text = f"copied {sandbox_id}:{src} to {target}"
    out.emit({"source": args.src, "destination": target}, text)
    return 0
