"""Host-only records of a sandbox's kept containers, so a restarted ``vmsandbox serve`` finds them.

One JSON file per container in the sandbox's ``tasks/`` dir (``<state_dir>/sandboxes/<id>/
tasks``, never on the share: the guest must not be able to change what the host opens),
written atomically (temp + ``os.replace``) at create and at start; beside it
``<cid>.offsets``, the output :class:`~vmsandbox.task.outfile.Follower`'s consumed offsets.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from .ports import StagedBundle
from .process import IoSpec

__all__ = ["TaskRecord", "TaskRecords"]

log = logging.getLogger(__name__)

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


@dataclass(frozen=True)
class TaskRecord:
    id: str
    bundle: str
    io: IoSpec
    guest_dir: str
    guest_rootfs: str
    pid: int
    started: bool
    holder_pid: int = 0
    namespace: str = ""  # containerd's, for the events

    @property
    def staged(self) -> StagedBundle:
        return StagedBundle(self.guest_dir, self.guest_rootfs)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes) -> TaskRecord:
        d = json.loads(data)
        return cls(str(d["id"]), str(d["bundle"]), IoSpec(**d["io"]), str(d["guest_dir"]),
                   str(d["guest_rootfs"]), int(d["pid"]), bool(d["started"]), int(d.get("holder_pid", 0)),
                   str(d.get("namespace", "")))


class TaskRecords:
    """The records of one sandbox in ``folder`` (made on the first save)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _path(self, cid: str, suffix: str) -> Path:
        if not _ID.fullmatch(cid):
            raise ValueError(f"bad container id {cid!r}")
        return self.folder / f"{cid}{suffix}"

    def offsets_file(self, cid: str) -> Path:
        """Where the output follower saves its offsets (the folder is made here)."""
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        return self._path(cid, ".offsets")

    def save(self, rec: TaskRecord) -> None:
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self._path(rec.id, ".json")
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(rec.to_json())
        os.replace(tmp, path)

    def remove(self, cid: str) -> None:
        for suffix in (".json", ".offsets", ".json.tmp"):
            self._path(cid, suffix).unlink(missing_ok=True)

    def load(self) -> list[TaskRecord]:
        """Every readable record (an unreadable one is logged and skipped)."""
        out = []
        for path in sorted(self.folder.glob("*.json")) if self.folder.is_dir() else ():
            try:
                out.append(TaskRecord.from_json(path.read_bytes()))
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.error("task record %s is unreadable (%s); skipped", path, e)
        return out
