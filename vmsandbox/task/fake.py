"""An in-memory BundleStager for the unit tier: records what was staged and the files put."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .._failpoints import Failpoints
from ..errors import AlreadyExists, InvalidArgument
from ..model import Mount
from .outfile import open_guest_file
from .ports import StagedBundle

__all__ = ["FakeStager", "GUEST_BASE"]

GUEST_BASE = "/run/vsbx/shared"


@dataclass
class FakeStager:
    """Stages into ``/run/vsbx/shared/<cid>`` (guest paths only; nothing on the host), or,
    with ``host``, also makes ``host/<cid>`` the host's view of that guest dir (``guest_file``)."""

    host: Path | None = None

    fp: Failpoints = field(default_factory=Failpoints)
    staged: dict[str, tuple[tuple[Mount, ...], tuple[str, ...]]] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)  # guest path -> content
    unstaged: list[str] = field(default_factory=list)

    def stage(self, container_id: str, rootfs: Sequence[Mount], binds: Sequence[str]) -> StagedBundle:
        self.fp.hit("stage")
        if container_id in self.staged:
            raise AlreadyExists(f"container {container_id!r} is staged already")
        base = f"{GUEST_BASE}/{container_id}"
        self.staged[container_id] = (tuple(rootfs), tuple(binds))
        if self.host is not None:
            (self.host / container_id).mkdir(parents=True, exist_ok=True)
        return StagedBundle(base, f"{base}/rootfs", {b: f"{base}/binds/{i}" for i, b in enumerate(binds)})

    def put_file(self, container_id: str, name: str, data: bytes) -> str:
        self.fp.hit("put_file")
        if "/" in name or name in ("", ".", ".."):
            raise InvalidArgument(f"bad file name {name!r}")
        path = f"{GUEST_BASE}/{container_id}/{name}"
        self.files[path] = data
        return path

    def guest_file(self, container_id: str, name: str, *, create: bool = False) -> int | None:
        if self.host is None:
            return None
        try:
            return open_guest_file(self.host, [container_id, name], create=create)
        except FileNotFoundError:
            return None

    def unstage(self, container_id: str) -> None:
        self.fp.hit("unstage")
        if self.staged.pop(container_id, None) is not None:
            self.unstaged.append(container_id)
        prefix = f"{GUEST_BASE}/{container_id}/"
        for k in [k for k in self.files if k.startswith(prefix)]:
            del self.files[k]
