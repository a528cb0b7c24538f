"""LibvirtController: the orchestration wired to this host's real parts.

libvirt (:mod:`vmsandbox.hypervisor`), pyroute2 (:mod:`vmsandbox.network`), paramiko
(:mod:`vmsandbox.guest`), mount(8) (:mod:`vmsandbox.hostmount`) and the guest image recipe (:mod:`vmsandbox.image`), plugged into
:class:`~vmsandbox.sandbox.controller.SandboxController`. The only place outside the CLI
where concrete adapters meet.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from .config import Config, VirtType, detect_virt_type
from .guest.agent import GuestAgent
from .hostmount import SystemHostMounts
from .hypervisor.libvirt_driver import LibvirtHypervisor
from .image import RecipeImages
from .network import NetlinkNetwork
from .sandbox.controller import SandboxController
from .sandbox.events import EventSink
from .sandbox.ports import GuestChannel, Hypervisor, StopReason

__all__ = ["LibvirtController"]


class LibvirtController(SandboxController):
    """containerd's sandbox Controller where each sandbox is a libvirt domain.

    ``LibvirtController(uri="qemu:///system", state_dir="/var/lib/vmsandbox")``. The guest
    image is built on first use (or by ``vmsandbox image build``). Use as a context
    manager, or call :meth:`close`; running sandboxes keep running after close and are
    recovered by the next controller on the same state dir.
    """

    def __init__(
        self,
        uri: str | None = None,
        state_dir: str | os.PathLike[str] | None = None,
        *,
        virt_type: str | VirtType | None = None,
        config: Config | None = None,
        progress: Callable[[str], None] | None = None,
        events: EventSink | None = None,
    ) -> None:
        if config is None:
            config = Config.from_env(
                uri=uri,
                state_dir=Path(state_dir) if state_dir is not None else None,
                virt_type=VirtType(virt_type) if virt_type is not None else None,
            )
        cfg = config

        def hypervisor(on_stop: Callable[[str, StopReason], None], on_reconnect: Callable[[], None]) -> Hypervisor:
            return LibvirtHypervisor(cfg.uri, on_stop=on_stop, on_reconnect=on_reconnect)

        def guest(socket_path: str, key: bytes, host_key: str, sandbox_id: str) -> GuestChannel:
            return GuestAgent(socket_path, key, host_key, sandbox_id=sandbox_id)

        super().__init__(
            cfg,
            virt_type=detect_virt_type(cfg.virt_type),
            hypervisor=hypervisor,
            network=NetlinkNetwork(),
            guest=guest,
            images=RecipeImages(cfg.state_dir, cfg.images_dir, cfg.image_name),
            mounts=SystemHostMounts(),
            progress=progress,
            events=events,
        )
