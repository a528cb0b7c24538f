"""What the orchestration needs from the outside world, as small Protocols (ports).

The lifecycle code in this package talks to the hypervisor, the pod's network namespace, the
guest's agent channel and the guest image only through these; the adapters (libvirt in
:mod:`vmsandbox.hypervisor`, pyroute2 in :mod:`vmsandbox.network`, paramiko in
:mod:`vmsandbox.guest`, mount(8) in :mod:`vmsandbox.hostmount`) implement them, and in-memory fakes (``*/fake.py``) implement them
for the unit tier. This module imports none of those libraries. Every method raises only
:mod:`vmsandbox.errors` classes.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any as _Any
from typing import Protocol

from ..image import GuestImage
from ..model import ExecResult, PtySize
from ..network._model import InterfaceCounters, NetworkPlan

__all__ = [
    "StopReason",
    "DomainState",
    "DomainInfo",
    "Hypervisor",
    "HypervisorFactory",
    "Network",
    "GuestChannel",
    "GuestProcess",
    "OutputSink",
    "PtySize",
    "GuestFactory",
    "Images",
    "HostMounts",
]


class StopReason(str, enum.Enum):
    """Why a domain stopped, from the hypervisor's lifecycle event or shut-off reason."""

    SHUTDOWN = "shutdown"  # the guest powered itself off
    DESTROYED = "destroyed"  # forced off by us or someone else
    CRASHED = "crashed"
    FAILED = "failed"
    UNKNOWN = "unknown"


class DomainState(str, enum.Enum):
    RUNNING = "running"
    PAUSED = "paused"
    SHUTOFF = "shutoff"
    OTHER = "other"


@dataclass(frozen=True)
class DomainInfo:
    name: str
    state: DomainState
    stop_reason: StopReason
    metadata: dict[str, str]


class Hypervisor(Protocol):
    """Persistent domains by name. Lifecycle events arrive through the factory's callbacks."""

    def define(self, xml: str) -> None: ...

    def start(self, name: str) -> None: ...

    def destroy(self, name: str) -> None:
        """Force the domain off; succeeds when it is missing or already off."""

    def undefine(self, name: str) -> None:
        """Remove the definition; succeeds when it is missing."""

    def info(self, name: str) -> DomainInfo | None: ...

    def list_tagged(self) -> list[DomainInfo]:
        """Every domain that carries our metadata."""

    def xml(self, name: str) -> str: ...

    def pid(self, name: str) -> int: ...

    def stats(self, names: list[str]) -> dict[str, dict[str, _Any]]: ...

    def set_memory(self, name: str, mib: int) -> None: ...

    def host_memory_mib(self) -> int:
        """The host's physical memory (what one guest can ever get)."""

    def host_info(self) -> dict[str, str]:
        """``libvirt_version``, ``hypervisor_version`` and ``hypervisor`` (what a saved
        template depends on)."""

    def create_transient(self, xml: str) -> None:
        """Boot a domain that is gone once it stops (a template being made)."""

    def save(self, name: str, path: str) -> None:
        """Save the running domain's memory and device state to ``path``; it is off after."""

    def restore(self, image: str, xml: str, scratch_dir: str) -> None:
        """Start the domain ``xml`` (its name and UUID may differ from the saved one's) from
        the save image ``image``, paused. ValueError when ``image`` is not a save image."""

    def resume(self, name: str) -> None: ...

    def attach(self, name: str, device_xml: str) -> None:
        """Plug a device into the running domain (its persistent definition is unchanged)."""

    def pause(self, name: str) -> None: ...

    def zero_map(self, name: str) -> dict[str, list[tuple[int, int]]]:
        """Where a paused domain's RAM is all zero: per memory file, (offset, length) runs."""

    def trim_memory(self, name: str, zeros: dict[str, list[tuple[int, int]]] | None = None) -> int:
        """Give back the all-zero pages of a paused domain's RAM (``zeros``: those known to be
        zero, else it looks); the bytes freed."""

    def close(self) -> None: ...


HypervisorFactory = Callable[[Callable[[str, StopReason], None], Callable[[], None]], Hypervisor]
"""``factory(on_stop, on_reconnect)``: ``on_stop(domain, reason)`` when a domain stops,
``on_reconnect()`` after the connection to the hypervisor was reopened."""


class Network(Protocol):
    """Taps wired into a CNI network namespace (see :mod:`vmsandbox.network`)."""

    def inspect_netns(self, netns_path: str) -> NetworkPlan: ...

    def tap_names(self, sandbox_id: str, count: int) -> list[str]: ...

    def create_taps(self, names: list[str]) -> None: ...

    def attach(self, plan: NetworkPlan, taps: list[str]) -> None: ...

    def detach(self, netns_path: str, taps: list[str], plan: NetworkPlan | None = None) -> None: ...

    def read_counters(self, netns_path: str, names: list[str]) -> dict[str, InterfaceCounters]: ...


OutputSink = Callable[[bytes], None]
"""Receives a process's output as it arrives, in order, from one thread; ``b""`` once at EOF."""


class GuestProcess(Protocol):
    """One process spawned in the guest whose stdio streams while it runs (:meth:`GuestChannel.spawn`)."""

    def write_stdin(self, data: bytes) -> None:
        """Send bytes to its stdin (blocks while the guest is not reading). Unavailable when
        the connection is gone, FailedPrecondition after :meth:`close_stdin`."""

    def close_stdin(self) -> None:
        """EOF on its stdin (for a tty process: no more input, but no EOF: a terminal has
        none). Idempotent; succeeds after the process ended."""

    def resize(self, size: PtySize) -> None:
        """Change the terminal size of a tty process (SIGWINCH in the guest).
        FailedPrecondition for a process without a tty; a no-op once it ended."""

    def wait(self, timeout: float | None = None) -> int:
        """Block until the process ended and all its output reached the sinks; its exit
        status (128+N when killed by signal N, 137 after :meth:`signal` KILL). Unavailable when
        the connection dropped before an exit status came (or after :meth:`abort` killed
        it, or when a supervising process was killed: its daemon runs on),
        DeadlineExceeded when ``timeout`` seconds pass first."""

    @property
    def done(self) -> bool:
        """True once :meth:`wait` would return (or raise Unavailable) at once."""

    def signal(self, signum: int) -> None:
        """Send signal ``signum`` (SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGKILL, SIGUSR1, SIGUSR2)
        to the process's group in the guest; its exit status then tells what it did with it
        (a trap's own status, or 128+N). A no-op once it ended; InvalidArgument for another
        signal. Not for a supervised process: its vsbx-exec ends, the daemon runs on."""

    def abort(self) -> None:
        """Close the channel: the guest ends the process with its session. Idempotent; a
        later :meth:`wait` raises Unavailable unless the exit status had already come."""


class GuestChannel(Protocol):
    """The guest agent's channel of one sandbox: one connection, many concurrent execs."""

    @property
    def connected(self) -> bool: ...

    def connect(self, deadline: float, alive: Callable[[], bool] | None = None, *, booting: bool = False) -> None:
        """``booting``: the guest may not run its agent yet (wait long per attempt); else a
        silent connection is replaced quickly."""

    def exec(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | None = None,
        timeout: float | None = None,
        in_guest_root: bool = False,
        max_output: int | None = None,
        user: str | None = None,
    ) -> ExecResult:
        """FailedPrecondition when the output passes ``max_output`` bytes (None: the
        adapter's default cap). ``user``: as :meth:`spawn`."""

    def spawn(
        self,
        argv: Sequence[str],
        *,
        stdout: OutputSink,
        stderr: OutputSink,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        tty: bool = False,
        size: PtySize | None = None,
        in_guest_root: bool = False,
        supervise_pidfile: str | None = None,
        keep: str | None = None,
        rejoin: str | None = None,
        console_socket: str | None = None,
        user: str | None = None,
    ) -> GuestProcess:
        """Start argv (no shell) on its own channel and return at once; output streams to the
        sinks (a tty process has one stream, to ``stdout``). ``supervise_pidfile``: argv is a
        command that leaves a daemon behind and writes its pid there (``crun create
        --pid-file``); the process then ends with that daemon's exit status, and the pid is
        published in ``<pidfile>.ready`` once argv exited 0 (images/README.md, token ``p``).
        ``keep`` (a guest path prefix, with ``supervise_pidfile``): a detached keeper does the
        supervision and survives the connection: the daemon's stdout/stderr go to
        ``<keep>.out``/``.err``, its exit code to ``<keep>.exit`` (the sinks get vsbx-exec's own
        messages only). ``rejoin`` (empty argv): a process that ends with the exit code of
        the keeper of that prefix (255 when it was killed without one).
        ``console_socket`` (with a pid file): a guest unix socket path where argv (``crun
        --console-socket``) sends the terminal's pty master; the process's terminal is then
        pumped to and from this channel (token ``y``). ``user``: ``NAME|UID[:GROUP|GID]``, resolved
        in the root argv runs in (its /etc/passwd and /etc/group; token ``u``; HOME from the
        user's entry unless ``env`` sets it; not with a pid file); None is root.
        Unavailable when there is no live connection; InvalidArgument for a bad request."""

    def rekey(self, client_key_pem: bytes, host_key_line: str) -> None:
        """Authenticate later connections with these keys (the live one stays): a guest
        restored from a template was reached with the template's keys and now has its own."""

    def close(self) -> None: ...


GuestFactory = Callable[[str, bytes, str, str], GuestChannel]
"""``factory(socket_path, client_key_pem, host_key_line, sandbox_id)``."""


class Images(Protocol):
    """The guest image (kernel, initramfs, manifest), built on first use."""

    def ensure(self, progress: Callable[[str], None] | None = None) -> GuestImage: ...


class HostMounts(Protocol):
    """Mounts in the host's mount namespace: the sandbox's virtio-fs share root and what is
    later mounted under it (see :mod:`vmsandbox.hostmount`)."""

    def share(self, path: str) -> None:
        """Make the folder ``path`` a mount point of its own in a shared peer group, so host
        mounts made under it later propagate into virtiofsd's namespace. Idempotent."""

    def release(self, path: str) -> None:
        """Unmount ``path`` and everything under it (detaching busy ones lazily). Succeeds
        when nothing is mounted there; raises Internal when a mount stays."""

    def mounted_under(self, path: str) -> list[str]:
        """The mount points at or below ``path``, deepest first."""

    def mount_at(self, fstype: str, source: str, target: str, options: Sequence[str]) -> None:
        """Mount ``source`` on the existing ``target``: ``bind`` (``rbind`` and ``ro`` in
        options honoured) or a filesystem type with its options (overlay from a
        snapshotter). Internal with mount(8)'s message when it fails."""
