"""Recovery over fakes: what a new controller on the same state dir decides for each sandbox.

``rig.restart()`` closes the controller and makes a new one on the same state dir and the
same fakes, as a restart of `vmsandbox serve`. What a controller killed mid-way leaves
behind is set up directly on the fakes (a domain started, a folder without a record, ...).
"""

from __future__ import annotations

import json
import shutil
import threading
import time

import pytest

from tests.unit.rig import Rig
from vmsandbox import errors
from vmsandbox.model import Phase, SandboxMetadata, SandboxState
from vmsandbox.sandbox.controller import EXIT_CLEAN, EXIT_FAILED, EXIT_KILLED
from vmsandbox.sandbox.ports import DomainState

READY, NOTREADY = SandboxState.READY.value, SandboxState.NOTREADY.value


def running(rig: Rig, sid: str = "a", *, netns: bool = False) -> str:
    rig.ctl.create(SandboxMetadata(sid), netns_path=rig.pod_netns(sid).netns_path if netns else "")
    rig.ctl.start(sid)
    return sid


def phases(rig: Rig) -> dict[str, Phase]:
    return {r.id: r.phase for r in rig.ctl.list()}


def wait_until(cond: object, timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return False


# --------------------------------------------------------------------------- running sandboxes
def test_a_running_sandbox_is_taken_over(rig: Rig) -> None:
    sid = running(rig, netns=True)
    pid = rig.domain(sid).pid
    rig.restart()
    row, = rig.ctl.list()
    assert (row.id, row.phase, row.pid) == (sid, Phase.RUNNING, pid)
    assert rig.ctl.start(sid).pid == pid  # idempotent across the restart, no second boot
    assert rig.domain(sid).starts == 1
    assert rig.ctl.exec(sid, ["true"]).exit_code == 0  # a new agent connection
    rig.ctl.stop(sid)  # clean: the new controller hears the guest power off
    assert rig.ctl.wait(sid, timeout=1).exit_status == EXIT_CLEAN
    rig.ctl.shutdown(sid)
    assert rig.leftovers(sid) == [] and rig.netns(sid).has_addresses


def test_events_after_a_restart_reach_the_new_controller(rig: Rig) -> None:
    sid = running(rig)
    rig.restart()
    rig.hv.crash("vmsandbox-a")
    assert rig.ctl.wait(sid, timeout=1).exit_status == EXIT_FAILED


@pytest.mark.parametrize("end, code", [
    pytest.param(lambda rig: rig.hv.guest_poweroff("vmsandbox-a"), EXIT_CLEAN, id="powered-off"),
    pytest.param(lambda rig: rig.hv.crash("vmsandbox-a"), EXIT_FAILED, id="crashed"),
    pytest.param(lambda rig: rig.hv.destroy("vmsandbox-a"), EXIT_KILLED, id="destroyed"),
    pytest.param(lambda rig: rig.hv.domains.pop("vmsandbox-a"), EXIT_FAILED, id="vanished"),
])
def test_a_sandbox_that_ended_while_the_controller_was_down_is_stopped(rig: Rig, end: object, code: int) -> None:
    sid = running(rig, netns=True)
    rig.ctl.close()
    end(rig)  # type: ignore[operator]
    rig.restart()
    assert phases(rig) == {sid: Phase.STOPPED}
    st = rig.ctl.wait(sid, timeout=0.1)
    assert st.exit_status == code
    assert rig.record(sid)["phase"] == "stopped" and rig.record(sid)["exit_status"] == code
    rig.ctl.shutdown(sid)
    assert rig.leftovers(sid) == []


def test_a_stopped_sandbox_stays_stopped_with_its_exit_status(rig: Rig) -> None:
    sid = running(rig)
    rig.ctl.stop(sid, timeout=0)
    before = rig.ctl.wait(sid, timeout=1)
    rig.restart()
    assert rig.ctl.wait(sid, timeout=0.1) == before and before.exit_status == EXIT_KILLED
    with pytest.raises(errors.FailedPrecondition):
        rig.ctl.start(sid)


# --------------------------------------------------------------------------- created sandboxes
def test_a_created_sandbox_can_still_be_started(rig: Rig) -> None:
    rig.ctl.create(SandboxMetadata("a"))
    rig.restart()
    assert phases(rig) == {"a": Phase.CREATED}
    assert rig.ctl.start("a").pid > 0


def _interrupted_boot(rig: Rig, sid: str) -> None:
    """What a controller killed in the middle of start() leaves: the VM up, the pod wired."""
    plan = rig.pod_netns(sid)
    rig.ctl.create(SandboxMetadata(sid), netns_path=plan.netns_path)
    rig.ctl.close()
    rig.hv.start("vmsandbox-" + sid)
    rig.net.attach(plan, rig.net.tap_names(sid, 1))


def test_an_interrupted_boot_is_powered_off_and_unwired(rig: Rig) -> None:
    _interrupted_boot(rig, "a")
    rig.restart()
    assert rig.domain("a").state is DomainState.SHUTOFF
    assert rig.netns("a").has_addresses and rig.netns("a").taps == set(rig.net.tap_names("a", 1))
    assert phases(rig) == {"a": Phase.CREATED} and rig.ctl.status("a").state == NOTREADY
    # A retried start works, and a shutdown after it leaves nothing.
    assert rig.ctl.start("a").pid > 0
    rig.ctl.shutdown("a")
    assert rig.leftovers("a") == []


def test_an_interrupted_boot_can_be_shut_down_at_once(rig: Rig) -> None:
    _interrupted_boot(rig, "a")
    rig.restart()
    rig.ctl.shutdown("a")
    assert rig.leftovers("a") == [] and rig.net.all_taps() == set()


def test_an_interrupted_boot_left_paused_is_powered_off(rig: Rig) -> None:
    rig.ctl.create(SandboxMetadata("a"))
    rig.ctl.close()
    rig.hv.pause("vmsandbox-a")  # libvirt still holds the new domain paused
    rig.restart()
    assert rig.domain("a").state is DomainState.SHUTOFF
    assert rig.ctl.start("a").pid > 0


def test_a_created_sandbox_whose_domain_vanished_is_stopped(rig: Rig) -> None:
    rig.ctl.create(SandboxMetadata("a"), netns_path=rig.pod_netns("a").netns_path)
    rig.ctl.close()
    del rig.hv.domains["vmsandbox-a"]
    rig.restart()
    assert phases(rig) == {"a": Phase.STOPPED}
    assert rig.ctl.wait("a", timeout=0.1).exit_status == EXIT_FAILED
    rig.ctl.shutdown("a")
    assert rig.leftovers("a") == []


# --------------------------------------------------------------------------- leftovers without a record
def test_a_folder_without_a_record_is_removed_with_its_domain(rig: Rig) -> None:
    rig.ctl.close()
    stray = rig.sandbox_dir("half")
    stray.mkdir()
    (stray / "id_ed25519").write_text("key")
    rig.tagged_domain("half", rig.config.state_dir, running=True)  # defined before the record was saved
    rig.restart()
    assert rig.leftovers("half") == [] and rig.ctl.list() == []


def test_the_taps_of_an_interrupted_create_are_removed_and_the_create_can_be_retried(rig: Rig) -> None:
    plan = rig.pod_netns("half")
    rig.ctl.close()
    # A create killed after it made its taps and noted them, before it saved the record.
    taps = rig.net.tap_names("half", 1)
    rig.sandbox_dir("half").mkdir()
    notes = rig.config.state_dir / "taps"
    notes.mkdir()
    (notes / "half.json").write_text(json.dumps({"netns_path": plan.netns_path, "taps": taps}))
    rig.net.host_taps.update(taps)
    rig.net.host_taps.add("vsbx0a1b2c3d0")  # someone else's: not noted, so never touched
    rig.restart()
    assert rig.leftovers("half") == [] and rig.net.host_taps == {"vsbx0a1b2c3d0"}
    rig.ctl.create(SandboxMetadata("half"), netns_path=plan.netns_path)
    rig.ctl.start("half")
    assert rig.netns("half").taps == set(taps)


def test_taps_a_failed_rollback_could_not_remove_are_removed_at_the_next_start_up(rig: Rig) -> None:
    plan = rig.pod_netns()
    rig.hv.fp.fail("define", errors.Unavailable("libvirtd went away"))
    rig.net.fp.fail("detach", errors.Internal("netlink failed while undoing"))
    with pytest.raises(errors.Unavailable):
        rig.ctl.create(SandboxMetadata("a"), netns_path=plan.netns_path)
    assert rig.net.host_taps == set(rig.net.tap_names("a", 1))  # the rollback could not remove it
    rig.restart()
    assert rig.net.all_taps() == set() and rig.leftovers("a") == []
    assert not list((rig.config.state_dir / "taps").iterdir())


def test_a_domain_of_this_state_dir_without_a_record_is_destroyed_and_undefined(rig: Rig) -> None:
    sid = running(rig)
    rig.ctl.close()
    shutil.rmtree(rig.sandbox_dir(sid))  # its folder is gone, the VM still runs
    rig.restart()
    assert rig.leftovers(sid) == [] and rig.ctl.list() == []


def test_domains_of_another_state_dir_or_of_nobody_are_left_alone(rig: Rig) -> None:
    rig.tagged_domain("theirs", "/var/lib/someone-else", running=True)
    rig.hv.define("<domain><name>plain-vm</name></domain>")  # not ours at all (no metadata)
    rig.hv.start("plain-vm")
    untagged = rig.hv.domains["plain-vm"]
    rig.restart()
    assert rig.hv.domains["vmsandbox-theirs"].state is DomainState.RUNNING
    assert rig.hv.domains["plain-vm"] is untagged and untagged.state is DomainState.RUNNING
    assert rig.ctl.list() == []


def test_an_unreadable_record_is_quarantined_and_its_vm_left_running(rig: Rig) -> None:
    running(rig, "bad")
    running(rig, "good")
    rig.ctl.close()
    (rig.sandbox_dir("bad") / "record.json").write_text("{ truncated")
    rig.restart()
    assert phases(rig) == {"good": Phase.RUNNING}
    assert rig.domain("bad").state is DomainState.RUNNING  # someone's pod may still run in it
    assert not rig.sandbox_dir("bad").exists()
    assert list((rig.config.state_dir / "quarantine" / "bad").iterdir())
    with pytest.raises(errors.NotFound):
        rig.ctl.status("bad")
    rig.restart()  # and the next restart still leaves it alone
    assert rig.domain("bad").state is DomainState.RUNNING


# --------------------------------------------------------------------------- a second controller
def _work_in_progress(rig: Rig) -> None:
    """Things the owner's recovery would clean up, were it to run now."""
    rig.ctl.create(SandboxMetadata("boot"), netns_path=rig.pod_netns("boot").netns_path)
    rig.hv.start("vmsandbox-boot")  # the owner is booting it right now
    rig.ctl.create(SandboxMetadata("gone"))
    del rig.hv.domains["vmsandbox-gone"]
    stray = rig.sandbox_dir("half")
    stray.mkdir()  # the owner is creating it right now
    rig.tagged_domain("orphan", rig.config.state_dir, running=True)


def test_a_second_controller_on_an_owned_state_dir_changes_nothing(rig: Rig) -> None:
    _work_in_progress(rig)
    records = {sid: rig.record(sid) for sid in ("boot", "gone")}
    domains = {n: (d.state, d.xml) for n, d in rig.hv.domains.items()}
    observer = rig.new_controller()
    assert not observer.owner and rig.ctl.owner
    assert {r.id: r.phase for r in observer.list()} == {"boot": Phase.CREATED, "gone": Phase.CREATED}
    observer.close()
    assert {n: (d.state, d.xml) for n, d in rig.hv.domains.items()} == domains
    assert {sid: rig.record(sid) for sid in ("boot", "gone")} == records
    assert rig.sandbox_dir("half").is_dir()
    # The owner carries on: its sandboxes answer and its events still reach it.
    rig.ctl.start("boot")
    rig.hv.crash("vmsandbox-boot")
    assert rig.ctl.wait("boot", timeout=1).exit_status == EXIT_FAILED


def test_a_second_controller_leaves_an_unreadable_record_where_it_is(rig: Rig) -> None:
    running(rig, "a")
    (rig.sandbox_dir("a") / "record.json").write_text("{ being repaired by hand")
    observer = rig.new_controller()
    observer.close()
    assert (rig.sandbox_dir("a") / "record.json").exists()


def test_recovery_leaves_another_controllers_create_in_flight_alone(rig: Rig) -> None:
    other = rig.new_controller()  # not the owner: e.g. a CLI command while serve runs
    release = threading.Event()
    rig.hv.fp.hang("define", release)
    failures: list[BaseException] = []

    def create() -> None:
        try:
            other.create(SandboxMetadata("x"))
        except BaseException as e:  # noqa: BLE001 - reported below
            failures.append(e)

    creator = threading.Thread(target=create)
    creator.start()
    assert wait_until(lambda: rig.hv.fp.calls["define"] == 1)
    restarter = threading.Thread(target=rig.restart)  # serve restarts; its recovery may wait for the create
    restarter.start()
    time.sleep(0.2)
    release.set()
    creator.join(3)
    restarter.join(3)
    assert failures == [] and (rig.sandbox_dir("x") / "record.json").exists()
    assert "vmsandbox-x" in rig.hv.domains
    assert "x" in [r.id for r in rig.ctl.list()]  # the restarted owner waited and took its record


# --------------------------------------------------------------------------- libvirtd coming back
def test_a_libvirt_reconnect_notices_exits_whose_events_were_lost(rig: Rig) -> None:
    running(rig, "a")
    running(rig, "b")
    rig.hv.events = "never"  # libvirtd was restarted: the events are gone
    rig.hv.guest_poweroff("vmsandbox-a")
    rig.hv.on_reconnect()  # type: ignore[misc]
    assert wait_until(lambda: phases(rig) == {"a": Phase.STOPPED, "b": Phase.RUNNING})
    assert rig.ctl.wait("a", timeout=0.1).exit_status == EXIT_CLEAN


def test_a_reconnect_with_nothing_running_changes_nothing(rig: Rig) -> None:
    rig.ctl.create(SandboxMetadata("a"))
    rig.hv.on_reconnect()  # type: ignore[misc]
    assert phases(rig) == {"a": Phase.CREATED}


def test_a_reconnect_while_libvirt_is_unreachable_again_changes_nothing(rig: Rig) -> None:
    running(rig, "a")
    rig.hv.unreachable = True
    rig.hv.on_reconnect()  # type: ignore[misc]
    time.sleep(0.1)
    rig.hv.unreachable = False
    assert phases(rig) == {"a": Phase.RUNNING} and rig.ctl.status("a").state == READY


def test_recovery_with_many_sandboxes(rig: Rig) -> None:
    for i in range(20):
        running(rig, f"s{i:02d}")
    rig.ctl.close()
    for i in range(0, 20, 2):
        rig.hv.crash(f"vmsandbox-s{i:02d}")
    rig.restart()
    got = phases(rig)
    assert sorted(got) == [f"s{i:02d}" for i in range(20)]
    assert [got[f"s{i:02d}"] for i in range(20)] == [Phase.STOPPED, Phase.RUNNING] * 10
    assert json.loads(rig.ctl.status("s00", verbose=True).info["info"])["vmsandbox"]["exit_status"] == str(EXIT_FAILED)
