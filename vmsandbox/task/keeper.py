"""The host's side of a kept container init (vsbx-exec token ``k``): its files in the guest dir.

The keeper appends the init's stdout/stderr to ``init.out``/``init.err`` and writes its exit
code to ``init.exit`` when it ends (images/README.md, "Keeper"); the host reaches them through
the stager (:meth:`BundleStager.guest_file`, never following a guest symlink).
"""

from __future__ import annotations

import os
from datetime import datetime, timezone

from ..errors import InvalidArgument
from .outfile import Follower, read_offsets
from .ports import BundleStager
from .process import TaskProcess
from .records import TaskRecords

__all__ = ["KEEP_NAME", "kept_files", "kept_exit", "follow"]

KEEP_NAME = "init"
"""The prefix name in the container's guest dir: init.out, init.err, init.exit."""


def kept_files(stager: BundleStager, cid: str, *, create: bool = False) -> list[int] | None:
    """Read+write fds of init.out and init.err (``create``: new empty ones); None when the
    guest dir is not visible to the host or the files are gone."""
    out = stager.guest_file(cid, f"{KEEP_NAME}.out", create=create)
    if out is None:
        return None
    try:
        err = stager.guest_file(cid, f"{KEEP_NAME}.err", create=create)
    except BaseException:
        os.close(out)
        raise
    if err is None:
        os.close(out)
        return None
    return [out, err]


def kept_exit(stager: BundleStager, cid: str) -> tuple[int, datetime] | None:
    """The kept init's exit code and when the keeper wrote it; None while it runs (or when
    what the guest wrote there is not an exit code)."""
    try:
        fd = stager.guest_file(cid, f"{KEEP_NAME}.exit")
    except InvalidArgument:
        return None
    if fd is None:
        return None
    try:
        data, mtime = os.read(fd, 32), os.fstat(fd).st_mtime
    finally:
        os.close(fd)
    text = data.strip()
    if not text.isdigit() or not 0 <= int(text) <= 255:
        return None
    return int(text), datetime.fromtimestamp(mtime, timezone.utc)


def follow(stager: BundleStager, records: TaskRecords, proc: TaskProcess, *, create: bool) -> Follower | None:
    """Follow the init's files into its stdio sinks (``create``: new files from offset 0,
    else from the offsets saved by the last follower); None when they are not visible."""
    fds = kept_files(stager, proc.container_id, create=create)
    if fds is None:
        return None
    try:
        saved = records.offsets_file(proc.container_id)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return Follower(fds, [proc.stdio.stdout, proc.stdio.stderr], offsets_file=saved,
                    offsets=() if create else read_offsets(saved), name=f"vsbx-out-{proc.container_id[:12]}").start()
