"""Value types of the sandbox Controller API: frozen dataclasses, no behaviour beyond checks.

They mirror containerd's ``core/sandbox`` types (``Sandbox``, ``CreateOptions``,
``ControllerInstance``, ``ControllerStatus``, ...) with Python names and types: durations are
seconds as ``float``, times are timezone-aware ``datetime`` in UTC, maps are ``dict``.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone

from .errors import InvalidArgument

__all__ = [
    "AnyMessage",
    "Runtime",
    "SandboxMetadata",
    "Mount",
    "CreateOptions",
    "StopOptions",
    "ControllerInstance",
    "ExitStatus",
    "ControllerStatus",
    "Platform",
    "Metric",
    "ExecResult",
    "PtySize",
    "SIGNAL_NAMES",
    "ImageConfig",
    "signal_name",
    "SandboxState",
    "Phase",
    "SandboxSummary",
    "utcnow",
]

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def utcnow() -> datetime:
    """The current time, timezone-aware in UTC."""
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class AnyMessage:
    """A protobuf ``google.protobuf.Any``: a type URL and the serialized value.

    containerd writes bare type URLs (``io.containerd.cgroups.v2.Metrics``); both the bare
    and the ``type.googleapis.com/`` forms are accepted everywhere. :attr:`type_name` is
    the part after the last ``/``.
    """

    type_url: str
    value: bytes = b""

    @property
    def type_name(self) -> str:
        return self.type_url.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class Runtime:
    """``Sandbox.Runtime``: the CRI runtime_type and its options."""

    name: str = ""
    options: AnyMessage | None = None


@dataclass(frozen=True)
class SandboxMetadata:
    """containerd's sandbox metadata object (``containerd.types.Sandbox``)."""

    id: str
    runtime: Runtime = field(default_factory=Runtime)
    spec: AnyMessage | None = None
    labels: dict[str, str] = field(default_factory=dict)
    extensions: dict[str, AnyMessage] = field(default_factory=dict)
    sandboxer: str = ""
    created_at: datetime | None = None
    updated_at: datetime | None = None


@dataclass(frozen=True)
class Mount:
    """A containerd mount (``containerd.types.Mount``).

    ``type`` is a filesystem type (ext4, ...), or ``bind``/``overlay`` for a directory from
    a snapshotter. ``options`` are mount options such as ``ro``.
    """

    type: str
    source: str
    target: str = ""
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class CreateOptions:
    """Options of ``Controller.Create`` (``sandbox.CreateOptions``)."""

    rootfs: tuple[Mount, ...] = ()
    options: AnyMessage | None = None
    netns_path: str = ""
    annotations: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class StopOptions:
    """Options of ``Controller.Stop``: the grace period in seconds (None: the default)."""

    timeout: float | None = None


@dataclass(frozen=True)
class ControllerInstance:
    """What ``start`` returns: the running sandbox's VMM pid and task-API endpoint."""

    sandbox_id: str
    pid: int
    created_at: datetime
    address: str = ""
    version: int = 0
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ExitStatus:
    """How and when a sandbox's guest ended.

    ``exit_status`` is 0 for a clean guest power-off, 137 when the VM was killed (forced
    stop or destroyed from outside), 255 when the guest crashed, failed or its end was not
    observed.
    """

    exit_status: int
    exited_at: datetime


class SandboxState(str, enum.Enum):
    """The state strings containerd's CRI understands in ``ControllerStatus.state``."""

    READY = "SANDBOX_READY"
    NOTREADY = "SANDBOX_NOTREADY"


class Phase(str, enum.Enum):
    """Our lifecycle: created -> running -> stopped; shutdown removes the sandbox."""

    CREATED = "created"
    RUNNING = "running"
    STOPPED = "stopped"


@dataclass(frozen=True)
class ControllerStatus:
    """What ``status`` returns (``sandbox.ControllerStatus``)."""

    sandbox_id: str
    pid: int
    state: str
    info: dict[str, str] = field(default_factory=dict)
    created_at: datetime = EPOCH
    exited_at: datetime | None = None
    extra: AnyMessage | None = None
    address: str = ""
    version: int = 0


@dataclass(frozen=True)
class Platform:
    """An OCI platform (``imagespec.Platform``): os, architecture, variant, os_version."""

    os: str
    architecture: str
    variant: str = ""
    os_version: str = ""

    def __str__(self) -> str:
        s = f"{self.os}/{self.architecture}"
        return f"{s}/{self.variant}" if self.variant else s


@dataclass(frozen=True)
class Metric:
    """``containerd.types.Metric``: a timestamped Any payload for one sandbox."""

    timestamp: datetime
    id: str
    data: AnyMessage


@dataclass(frozen=True)
class ExecResult:
    """The outcome of ``exec``: the exit code (128+N when killed by signal N) and output."""

    exit_code: int
    stdout: bytes
    stderr: bytes

    @property
    def text(self) -> str:
        """stdout as text (UTF-8, undecodable bytes replaced)."""
        return self.stdout.decode("utf-8", "replace")


@dataclass(frozen=True)
class PtySize:
    """A terminal's size in character cells."""

    width: int
    height: int


@dataclass(frozen=True)
class SandboxSummary:
    """One row of ``list()``."""

    id: str
    phase: Phase
    state: SandboxState
    pid: int
    created_at: datetime
    exited_at: datetime | None = None


SIGNAL_NAMES: dict[int, str] = {1: "HUP", 2: "INT", 3: "QUIT", 9: "KILL", 10: "USR1", 12: "USR2", 15: "TERM"}
"""The signals a guest process can be sent (RFC 4254 names), by their Linux number."""


def signal_name(signum: int) -> str:
    """The RFC 4254 name of ``signum``; InvalidArgument when it cannot be sent to a guest process."""
    try:
        return SIGNAL_NAMES[int(signum)]
    except (KeyError, ValueError, TypeError):
        raise InvalidArgument(f"signal {signum!r} cannot be sent to a guest process (one of "
                              f"{', '.join(f'SIG{n}' for n in SIGNAL_NAMES.values())})") from None


@dataclass(frozen=True)
class ImageConfig:
    """How an OCI image says its commands run (its config's ``config`` object).

    ``env`` is ``KEY=VALUE`` strings in the image's order; empty fields mean the image set
    none. exec applies ``env``, ``working_dir`` and ``user`` as ``docker exec`` does;
    :meth:`command` is what ``docker run IMAGE [ARGS]`` would run.
    """

    digest: str
    """The image manifest's digest (``sha256:...``): the image's identity and cache key."""
    env: tuple[str, ...] = ()
    working_dir: str = ""
    user: str = ""
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    os: str = "linux"
    architecture: str = "amd64"

    def environ(self) -> dict[str, str]:
        """``env`` as a mapping (a later duplicate wins, as in the runtime spec)."""
        out: dict[str, str] = {}
        for item in self.env:
            key, _, value = item.partition("=")
            out[key] = value
        return out

    def command(self, args: Sequence[str] | None = None) -> list[str]:
        """Entrypoint followed by ``args``, or by the image's Cmd when ``args`` is empty or None.
        InvalidArgument when that leaves nothing to run."""
        argv = list(self.entrypoint) + (list(args) if args else list(self.cmd))
        if not argv:
            raise InvalidArgument(f"image {self.digest} has no Entrypoint or Cmd: give a command")
        return argv
