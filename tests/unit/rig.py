"""The orchestration wired to in-memory fakes: a SandboxController that boots nothing.

``Rig(tmp_path)`` gives a controller (``rig.ctl``) over a FakeHypervisor, a FakeNetwork and
FakeGuests that agree with each other: an agent answers once its domain runs, and the
guest's power-off request powers the fake domain off. ``rig.restart()`` makes a new
controller on the same state dir and the same fakes (a restart of `serve`).
"""

from __future__ import annotations

import json
from pathlib import Path

from vmsandbox.config import Config, VirtType
from vmsandbox.guest.fake import FakeGuests
from vmsandbox.hypervisor.fake import FakeHypervisor
from vmsandbox.image import GuestImage
from vmsandbox.network import Address, Interface, NetworkPlan, Route
from vmsandbox.network.fake import FakeNetwork
from vmsandbox.sandbox.controller import SandboxController
from vmsandbox.sandbox.ports import DomainState


class FakeImages:
    def __init__(self, root: Path) -> None:
        self.dir = root / "image"
        self.dir.mkdir(parents=True, exist_ok=True)
        for f in ("vmlinuz", "initramfs.img"):
            (self.dir / f).write_bytes(b"fake")
        self.manifest = {"kernel_version": "6.1.0-fake", "architecture": "amd64", "os": "linux"}
        (self.dir / "manifest.json").write_text(json.dumps(self.manifest))
        self.builds = 0

    def ensure(self, progress: object = None) -> GuestImage:
        self.builds += 1
        return GuestImage("default", self.dir, dict(self.manifest))


class Rig:
    def __init__(self, tmp_path: Path, **config: object) -> None:
        self.root = tmp_path
        self.config = Config(state_dir=tmp_path / "state", stop_timeout=2.0, boot_timeout=2.0, **config)  # type: ignore[arg-type]
        self.hv = FakeHypervisor()
        self.net = FakeNetwork()
        self.guests = FakeGuests(vm_running=self._vm_running, on_poweroff=self._poweroff)
        self.images = FakeImages(tmp_path)
        self.controllers: list[SandboxController] = []
        self.ctl = self.new_controller()

    def _vm_running(self, socket_path: str) -> bool:
        d = self.hv.by_socket(socket_path)
        return d is not None and d.state is DomainState.RUNNING

    def _poweroff(self, socket_path: str) -> None:
        d = self.hv.by_socket(socket_path)
        if d is not None:
            self.hv.guest_poweroff(d.name)

    def new_controller(self) -> SandboxController:
        c = SandboxController(self.config, virt_type=VirtType.QEMU, hypervisor=self.hv.factory, network=self.net,
                              guest=self.guests, images=self.images)
        self.controllers.append(c)
        return c

    def restart(self) -> SandboxController:
        self.ctl.close()
        self.ctl = self.new_controller()
        return self.ctl

    def close(self) -> None:
        for c in self.controllers:
            c.close()

    def pod_netns(self, name: str = "pod") -> NetworkPlan:
        plan = NetworkPlan(
            netns_path=str(self.root / "netns" / name),
            interfaces=(Interface("eth0", "0a:58:0a:f4:01:05", 1500, (Address("10.244.1.5", 24, 2),)),),
            routes=(Route("default", "10.244.1.1", 2, "eth0"),),
        )
        self.net.add_netns(plan)
        return plan

    def leftovers(self, sandbox_id: str) -> list[str]:
        """Whatever of ``sandbox_id`` still exists anywhere; [] when it left nothing."""
        from vmsandbox.sandbox.controller import DOMAIN_PREFIX

        out = []
        if DOMAIN_PREFIX + sandbox_id in self.hv.domains:
            out.append(f"domain {DOMAIN_PREFIX + sandbox_id}")
        if (self.config.state_dir / "sandboxes" / sandbox_id).exists():
            out.append("state folder")
        taps = set(self.net.tap_names(sandbox_id, 4)) & self.net.all_taps()
        if taps:
            out.append(f"taps {sorted(taps)}")
        return out
