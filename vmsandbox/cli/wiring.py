"""Where concrete parts meet: the config from the command line, the controller a command
talks to (ours, or the running `vmsandbox serve` over its admin socket), the libvirt
adapter doctor asks, the image recipe, and `serve`'s controller and server.

Concrete modules are imported when a command needs them, not when the CLI starts.
"""

from __future__ import annotations

import argparse
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ..config import Config, parse_virt_type
from ..errors import FailedPrecondition, Unavailable
from ..model import ControllerStatus, ExecResult, ExitStatus, Metric, Platform, PtySize, SandboxSummary

if TYPE_CHECKING:
    from ..sandbox.ports import GuestProcess, OutputSink
    from ..host import LibvirtController
    from ..image import GuestImage

__all__ = ["ADMIN_SOCKET", "Sandboxes", "config_from", "sandboxes", "own_controller", "hypervisor_info",
           "build_image", "serve"]

log = logging.getLogger("vmsandbox")

ADMIN_SOCKET = "admin.sock"
"""`vmsandbox serve` listens for the CLI on this socket in its state dir (root only)."""

ProgressLine = Callable[[str], None]
"""Where slow steps report (:meth:`vmsandbox.cli.output.Progress.line`)."""


class Sandboxes(Protocol):
    """What the reading and stopping commands need of a controller, local or remote."""

    def __enter__(self) -> Sandboxes: ...

    def __exit__(self, *exc: object) -> None: ...

    def status(self, sandbox_id: str, *, verbose: bool = False) -> ControllerStatus: ...

    def platform(self, sandbox_id: str) -> Platform: ...

    def metrics(self, sandbox_id: str) -> Metric: ...

    def stop(self, sandbox_id: str, *, timeout: float | None = None) -> None: ...

    def wait(self, sandbox_id: str, *, timeout: float | None = None) -> ExitStatus: ...

    def shutdown(self, sandbox_id: str) -> None: ...

    def list(self) -> list[SandboxSummary]: ...

    def exec(self, sandbox_id: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
             cwd: str | None = None, stdin: bytes | None = None, timeout: float | None = None,
             user: str | None = None, in_guest_root: bool = False) -> ExecResult: ...

    def spawn(self, sandbox_id: str, argv: Sequence[str], *, stdout: OutputSink, stderr: OutputSink,
              env: Mapping[str, str] | None = None, cwd: str | None = None, user: str | None = None,
              tty: bool = False, size: PtySize | None = None, in_guest_root: bool = False) -> GuestProcess: ...

    def share_path(self, sandbox_id: str) -> Path: ...

    def read_console_log(self, sandbox_id: str, max_bytes: int = 0) -> bytes: ...


def config_from(args: argparse.Namespace) -> Config:
    """The global options over the environment over the defaults (InvalidArgument if bad)."""
    return Config.from_env(
        uri=args.uri,
        state_dir=Path(args.state_dir) if args.state_dir else None,
        virt_type=parse_virt_type(args.virt_type) if args.virt_type else None,
        containerd_address=getattr(args, "containerd_address", None),
    )


def _owner(cfg: Config) -> int | None:
    from ..sandbox.controller import state_dir_owner

    return state_dir_owner(cfg.state_dir)


def _refuse(cfg: Config, owner: int, how: str) -> FailedPrecondition:
    who = f"process {owner}" if owner else "another process"
    return FailedPrecondition(f"state dir {cfg.state_dir} is owned by {who} (vmsandbox serve?); {how}")


def sandboxes(cfg: Config, progress: ProgressLine, *, mutates: bool = False) -> Sandboxes:
    """The running `vmsandbox serve` that owns the state dir (through its admin socket)
    when there is one, else a controller of our own.

    One controller per state dir: when another process owns it and cannot be reached, a
    command that changes sandboxes (``mutates``) is refused instead of racing that process;
    one that only reads gets our own controller, which then only observes.
    """
    admin = cfg.state_dir / ADMIN_SOCKET
    owner = _owner(cfg)
    if owner is not None and admin.exists():
        from ..server.client import RemoteController

        remote = RemoteController(str(admin))
        try:
            remote.ping()
            return remote
        except Unavailable:
            remote.close()  # a socket left behind by a server that died
    if owner is not None and mutates:
        raise _refuse(cfg, owner, f"it serves no admin socket at {admin}")
    return own_controller(cfg, progress, check_owner=False)


def own_controller(cfg: Config, progress: ProgressLine, *, check_owner: bool = True) -> LibvirtController:
    """A controller of our own: what create, start and run need (`serve` offers no create or
    start to the CLI, so they are refused while another process owns the state dir)."""
    if check_owner and (owner := _owner(cfg)) is not None:
        raise _refuse(cfg, owner, "create and start sandboxes through containerd (CRI) or use another --state-dir")
    from ..host import LibvirtController

    return LibvirtController(config=cfg, progress=progress)


def hypervisor_info(uri: str) -> dict[str, str]:
    """libvirt's and the hypervisor's versions, through our libvirt adapter (VmSandboxError
    when libvirtd does not answer within a few seconds)."""
    from ..hypervisor.libvirt_driver import LibvirtHypervisor

    hv = LibvirtHypervisor(uri, connect_timeout=3.0)
    try:
        return hv.host_info()
    finally:
        hv.close()


def build_image(cfg: Config, progress: ProgressLine, *, force: bool) -> GuestImage:
    """The guest image from our recipe, built when missing or stale (or ``force``)."""
    from ..image import ensure_image

    return ensure_image(cfg.state_dir, cfg.images_dir, cfg.image_name, force=force, progress=progress)


def _warm_in_background(ctl: LibvirtController) -> None:
    """The default shape's start template, built while serve already answers (else the first
    pod's start builds it: about a cold boot and a save longer)."""
    def warm() -> None:
        try:
            info = ctl.warm_template()
            log.info("start template %s %s", info.key, f"built in {info.build_seconds:.1f}s" if info.built else "ready")
        except Exception as err:  # noqa: BLE001 - starts build it (or boot cold) themselves
            log.warning("building the start template failed (starts will try again): %s", err)

    threading.Thread(target=warm, name="vsbx-warm-template", daemon=True).start()


def serve(cfg: Config, progress: ProgressLine, *, socket: str, socket_group: str | None, max_workers: int,
          build_image: bool) -> None:
    """`vmsandbox serve`: our controller behind containerd's gRPC socket and the CLI's admin
    socket, until SIGTERM or SIGINT; the sandboxes keep running after it."""
    from ..host import LibvirtController
    from ..model import Phase
    from ..server import serve as serve_grpc
    from ..server.events import ContainerdEvents
    from ..task.events import NO_EVENTS
    from ..hostmount import SystemHostMounts
    from ..task.sockets import TaskServingController, TaskSockets
    from ..task.records import TaskRecords
    from ..task.stager import ShareStager

    mounts = SystemHostMounts()
    events = ContainerdEvents(cfg.containerd_address) if cfg.containerd_address else None
    # A container's host-only record lives beside the share, in <sandbox dir>/tasks.
    sockets = TaskSockets(cfg.run_dir, lambda sandbox_id: ctl.guest_channel(sandbox_id),
                          lambda sandbox_id: ShareStager(mounts, ctl.share_path(sandbox_id)),
                          records_of=lambda sandbox_id: TaskRecords(ctl.share_path(sandbox_id).parent / "tasks"),
                          events=events or NO_EVENTS, relay=True)
    # A removal by any path (containerd's Shutdown, the CLI's, a failed Start) closes its socket.
    ctl = LibvirtController(config=cfg, progress=progress, events=sockets.on_lifecycle)
    try:
        if build_image:
            ctl.image()
            if cfg.templates:
                _warm_in_background(ctl)
        # Every running sandbox serves containerd's task API; sockets of sandboxes that ran
        # before a restart come back here.
        tasks = TaskServingController(ctl, sockets, running=[r.id for r in ctl.list() if r.phase is Phase.RUNNING])
        srv = serve_grpc(tasks, socket, socket_group=socket_group, max_workers=max_workers,
                         admin=ctl, admin_socket_path=str(ctl.config.state_dir / ADMIN_SOCKET))
        srv.install_signal_handlers()
        log.info("serving containerd's sandbox Controller on %s (virt type %s)", srv.socket_path, ctl.virt_type.value)
        srv.wait()
    finally:
        sockets.close_all()
        ctl.close()
        if events is not None:
            events.close()
