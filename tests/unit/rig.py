"""The orchestration wired to in-memory fakes: a SandboxController that boots nothing.

``Rig(tmp_path)`` gives a controller (``rig.ctl``) over a FakeHypervisor, a FakeNetwork and
FakeGuests that agree with each other (and FakeHostMounts): an agent answers once its domain runs, and the
guest's power-off request powers the fake domain off. ``rig.restart()`` makes a new
controller on the same state dir and the same fakes (a restart of `serve`);
``rig.new_controller()`` makes one more at the same time (it does not own the state dir).
Keyword arguments override the rig's Config (``Rig(tmp_path, stop_timeout=0.3)``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vmsandbox._failpoints import Failpoints
from vmsandbox.config import Config, VirtType
from vmsandbox.guest.fake import FakeGuests
from vmsandbox.hostmount.fake import FakeHostMounts
from vmsandbox.hypervisor.fake import FakeDomain, FakeHypervisor
from vmsandbox.image import GuestImage
from vmsandbox.network import Address, Interface, NetworkPlan, Route
from vmsandbox.network.fake import FakeNetns, FakeNetwork
from vmsandbox.sandbox.controller import DOMAIN_PREFIX, SandboxController
from vmsandbox.sandbox.events import LifecycleEvent
from vmsandbox.sandbox.ports import DomainState


def command_on_path(tmp_path: Path, monkeypatch: Any, name: str, body: str) -> Path:
    """Put a shell script ``name`` first on PATH; ``body`` may write to ``$CALLS``, the file
    returned (``tmp_path/<name>-calls``), to note how it was called."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    calls = tmp_path / f"{name}-calls"
    script = bindir / name
    script.write_text(f"#!/bin/sh\nCALLS={calls}\n{body}\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    return calls


class FakeImages:
    """The Images port: a guest image folder with a manifest; ``fp`` step ``ensure``."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "image"
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "initramfs.img").write_bytes(b"fake")
        # a bzImage as far as its header goes: 2 setup sectors, "HdrS"
        kernel = bytearray(8192)
        kernel[0x1F1], kernel[0x202:0x206] = 2, b"HdrS"
        (self.dir / "vmlinuz").write_bytes(bytes(kernel))
        self.manifest = {"kernel_version": "6.1.0-fake", "architecture": "amd64", "os": "linux"}
        (self.dir / "manifest.json").write_text(json.dumps(self.manifest))
        self.builds = 0
        self.fp = Failpoints()

    def ensure(self, progress: object = None) -> GuestImage:
        self.fp.hit("ensure")
        self.builds += 1
        return GuestImage("default", self.dir, dict(self.manifest))


class Rig:
    def __init__(self, tmp_path: Path, **config: object) -> None:
        self.root = tmp_path
        # Cold boots unless a test asks for templates (test_templates.py): the lifecycle tests
        # script the boot path's failpoints.
        settings: dict[str, object] = {"state_dir": tmp_path / "state", "stop_timeout": 2.0, "boot_timeout": 2.0,
                                       "templates": False}
        settings.update(config)
        self.config = Config(**settings)  # type: ignore[arg-type]
        self.hv = FakeHypervisor()
        self.net = FakeNetwork()
        self.guests = FakeGuests(vm_running=self._vm_running, on_poweroff=self._poweroff)
        self.images = FakeImages(tmp_path)
        self.mounts = FakeHostMounts()
        self.controllers: list[SandboxController] = []
        self.events: list[LifecycleEvent] = []
        self.ctl = self.new_controller()

    def _vm_running(self, socket_path: str) -> bool:
        d = self.hv.by_socket(socket_path)
        return d is not None and d.state is DomainState.RUNNING

    def _poweroff(self, socket_path: str) -> None:
        d = self.hv.by_socket(socket_path)
        if d is not None:
            self.hv.guest_poweroff(d.name)

    def new_controller(self, config: Config | None = None, events: Any = None) -> SandboxController:
        def sink(event: Any) -> None:
            self.events.append(event)
            if events is not None:
                events(event)
        c = SandboxController(config or self.config, virt_type=VirtType.QEMU, hypervisor=self.hv.factory,
                              network=self.net, guest=self.guests, images=self.images,
                              mounts=self.mounts, events=sink)
        self.controllers.append(c)
        return c

    def controller_factory(self) -> Callable[..., SandboxController]:
        """A stand-in for ``vmsandbox.host.LibvirtController`` that wires this rig's fakes."""

        def make(uri: object = None, state_dir: object = None, *, virt_type: object = None,
                 config: Config | None = None, progress: Any = None, events: Any = None) -> SandboxController:
            assert config is not None
            return self.new_controller(config, events)

        return make

    def restart(self) -> SandboxController:
        self.ctl.close()
        self.ctl = self.new_controller()
        return self.ctl

    def close(self) -> None:
        for c in self.controllers:
            c.close()

    def pod_netns(self, name: str = "pod") -> NetworkPlan:
        """Register a fresh pod network namespace ``name`` (one interface, eth0) and its plan."""
        plan = NetworkPlan(
            netns_path=str(self.root / "netns" / name),
            interfaces=(Interface("eth0", "0a:58:0a:f4:01:05", 1500, (Address("10.244.1.5", 24, 2),)),),
            routes=(Route("default", "10.244.1.1", 2, "eth0"),),
        )
        self.net.add_netns(plan)
        return plan

    def tagged_domain(self, sandbox_id: str, state_dir: Path | str, *, running: bool = False) -> FakeDomain:
        """Define (and maybe start) a domain tagged as sandbox ``sandbox_id`` of ``state_dir``,
        as a controller on that state dir would have made it."""
        from vmsandbox.hypervisor.domain import DomainSpec, build_domain_xml

        name = DOMAIN_PREFIX + sandbox_id
        self.hv.define(build_domain_xml(DomainSpec(
            name=name, sandbox_id=sandbox_id, state_dir=str(state_dir), virt_type="qemu", arch="x86_64",
            machine="q35", vcpus=1, max_vcpus=1, memory_mib=256, max_memory_mib=256, kernel="/k", initrd="/i",
            cmdline="", console_log=f"/nonexistent/{sandbox_id}.log", agent_socket=f"/nonexistent/{sandbox_id}.sock")))
        if running:
            self.hv.start(name)
        return self.hv.domains[name]

    def steps(self, sandbox_id: str) -> list[str]:
        """The lifecycle steps the controllers reported for ``sandbox_id``, in order."""
        return [ev.step.value for ev in self.events if ev.sandbox_id == sandbox_id]

    def netns(self, name: str = "pod") -> FakeNetns:
        """The fake namespace :meth:`pod_netns` registered under ``name`` (without resetting it)."""
        return self.net.netns[str(self.root / "netns" / name)]

    def domain(self, sandbox_id: str) -> FakeDomain:
        """The fake libvirt domain of ``sandbox_id`` (KeyError when there is none)."""
        return self.hv.domains[DOMAIN_PREFIX + sandbox_id]

    def sandbox_dir(self, sandbox_id: str) -> Path:
        return self.config.state_dir / "sandboxes" / sandbox_id

    def record(self, sandbox_id: str) -> dict[str, Any]:
        """The sandbox's record as saved on disk (what the next controller will read)."""
        return json.loads((self.sandbox_dir(sandbox_id) / "record.json").read_text())  # type: ignore[no-any-return]

    def leftovers(self, sandbox_id: str) -> list[str]:
        """Whatever of ``sandbox_id`` still exists anywhere; [] when it left nothing."""
        out = []
        if DOMAIN_PREFIX + sandbox_id in self.hv.domains:
            out.append(f"domain {DOMAIN_PREFIX + sandbox_id}")
        if self.sandbox_dir(sandbox_id).exists():
            out.append("state folder")
        taps = set(self.net.tap_names(sandbox_id, 4)) & self.net.all_taps()
        if taps:
            out.append(f"taps {sorted(taps)}")
        if mounts := self.mounts.mounted_under(str(self.sandbox_dir(sandbox_id))):
            out.append(f"mounts {mounts}")
        return out
