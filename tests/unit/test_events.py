"""Lifecycle events: the steps an observer sees, in order, and an observer that breaks."""

from __future__ import annotations

import pytest

from vmsandbox import SandboxMetadata
from vmsandbox.errors import DeadlineExceeded
from vmsandbox.sandbox.events import Emitter, LifecycleEvent, Step

from tests.unit.rig import Rig


def test_a_sandbox_reports_each_step_of_its_life_in_order(rig: Rig) -> None:
    plan = rig.pod_netns()
    rig.ctl.create(SandboxMetadata(id="ev"), netns_path=plan.netns_path)
    rig.ctl.start("ev")
    rig.ctl.shutdown("ev")
    assert rig.steps("ev") == ["creating", "defined", "created", "starting", "booted", "wired", "agent-ready",
                               "running", "stopping", "stopped", "removed"]
    times = [ev.monotonic for ev in rig.events]
    assert times == sorted(times)


def test_a_guest_that_ends_by_itself_reports_stopped_with_the_reason(rig: Rig) -> None:
    rig.ctl.create(SandboxMetadata(id="ev"))
    rig.ctl.start("ev")
    rig.hv.guest_poweroff(rig.domain("ev").name)
    rig.ctl.wait("ev", timeout=2)
    stopped = [ev for ev in rig.events if ev.step is Step.STOPPED]
    assert [(ev.sandbox_id, ev.detail) for ev in stopped] == [("ev", "shutdown")]


def test_a_failed_start_reports_why_and_the_removal(quick_rig: Rig) -> None:
    quick_rig.guests.fp.fail("connect", DeadlineExceeded("no agent"))
    quick_rig.ctl.create(SandboxMetadata(id="ev"))
    with pytest.raises(DeadlineExceeded):
        quick_rig.ctl.start("ev")
    assert quick_rig.steps("ev") == ["creating", "defined", "created", "starting", "booted", "start-failed", "removed"]
    failed = next(ev for ev in quick_rig.events if ev.step is Step.START_FAILED)
    assert "no agent" in failed.detail


def test_an_observer_that_raises_does_not_fail_the_operation(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    def broken(ev: LifecycleEvent) -> None:
        raise RuntimeError("observer bug")

    rig.ctl.close()
    rig.ctl = rig.new_controller()
    rig.ctl._emit = Emitter(broken)  # the emitter the controller calls
    rig.ctl.create(SandboxMetadata(id="ev"))
    rig.ctl.start("ev")
    assert rig.ctl.exec("ev", ["true"]).exit_code == 0
    assert "lifecycle observer failed" in caplog.text
