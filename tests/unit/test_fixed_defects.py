"""Defects found by reading the orchestration (issue "The lifecycle behind ports"), each
pinned by a test that failed before its fix. Over the fakes of tests/unit/rig.py."""

from __future__ import annotations

import os
import stat
import threading
import time
from pathlib import Path

import pytest

from tests.unit.rig import Rig
from vmsandbox import errors
from vmsandbox.model import SandboxMetadata
from vmsandbox.sandbox.controller import DOMAIN_PREFIX
from vmsandbox.sandbox.ports import DomainState
from vmsandbox.sandbox.store import Store


def test_a_domain_left_paused_by_an_interrupted_start_is_powered_off(rig: Rig) -> None:
    """libvirt holds a new domain paused while QEMU starts; a controller killed then left it
    to boot as an orphan (recovery only destroyed RUNNING domains)."""
    rig.ctl.create(SandboxMetadata("a"))
    rig.hv.domains[DOMAIN_PREFIX + "a"].state = DomainState.PAUSED
    ctl = rig.restart()
    assert rig.hv.domains[DOMAIN_PREFIX + "a"].state is DomainState.SHUTOFF
    assert ctl.status("a").info["phase"] == "created"
    ctl.start("a")  # and the retried start works
    assert ctl.status("a").state == "SANDBOX_READY"


def test_an_existing_state_dir_keeps_its_mode(tmp_path: Path) -> None:
    """`--state-dir /var/tmp` lost its sticky bit: only what we create gets 0711."""
    shared = tmp_path / "state"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    r = Rig(tmp_path)
    try:
        assert stat.S_IMODE(shared.stat().st_mode) == 0o1777
        assert stat.S_IMODE((shared / "sandboxes").stat().st_mode) == 0o711
    finally:
        r.close()
    fresh = Rig(tmp_path / "other")
    try:
        assert stat.S_IMODE(fresh.config.state_dir.stat().st_mode) == 0o711
    finally:
        fresh.close()


def test_update_saves_the_record_before_the_guest_changes_and_restores_it_on_failure(rig: Rig) -> None:
    rig.ctl.create(SandboxMetadata("a"), annotations={"vmsandbox.io/memory-mib": "256"})
    rig.ctl.start("a")
    store = Store(rig.config.state_dir)

    def on_disk() -> int:
        (rec,), _ = store.load_all()
        return rec.memory_mib

    release = threading.Event()
    rig.hv.fp.hang("set_memory", release)
    t = threading.Thread(target=rig.ctl.update, args=("a", SandboxMetadata("a", labels={"vmsandbox.io/memory-mib": "384"}),
                                                      "labels"))
    t.start()
    try:
        deadline = time.monotonic() + 5
        while rig.hv.fp.calls["set_memory"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert on_disk() == 384  # a controller that dies now recovers what the guest is getting
    finally:
        release.set()
        t.join(5)
    assert rig.hv.domains[DOMAIN_PREFIX + "a"].memory_mib == 384

    rig.hv.fp.fail("set_memory", errors.Unavailable("libvirtd went away"))
    with pytest.raises(errors.Unavailable):
        rig.ctl.update("a", SandboxMetadata("a", labels={"vmsandbox.io/memory-mib": "320"}), "labels")
    assert on_disk() == 384 and rig.ctl.status("a", verbose=True).info["memory_mib"] == "384"


def test_a_failing_rollback_step_does_not_replace_the_error_that_caused_it(rig: Rig) -> None:
    plan = rig.pod_netns()
    rig.hv.fp.fail("define", errors.InvalidArgument("the domain XML was refused"))
    rig.net.fp.fail("detach", errors.Unavailable("netlink busy"))
    with pytest.raises(errors.InvalidArgument, match="refused"):
        rig.ctl.create(SandboxMetadata("a"), netns_path=plan.netns_path)
    assert not (rig.config.state_dir / "sandboxes" / "a").exists()
    rig.ctl.create(SandboxMetadata("a"), netns_path=plan.netns_path)  # the id is free again
