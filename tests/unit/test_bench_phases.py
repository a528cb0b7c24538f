"""The bench's start phases come from the controller's lifecycle events (hack/vsbench)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from vsbench.bare import config_disk_of, host_key_line_from_config
from vsbench.phases import PHASES, EventLog, Start, phase_durations, stamps_from_events

from vmsandbox import SandboxMetadata
from vmsandbox.errors import DeadlineExceeded
from vmsandbox.sandbox.events import LifecycleEvent, Step

from tests.unit.rig import Rig


def _ev(step: Step, t: float, sid: str = "s1", detail: str = "") -> LifecycleEvent:
    return LifecycleEvent(sid, step, monotonic=t, detail=detail)


# One start as the controller reports it, from create() at t=50.0 to RUNNING.
EVENTS = [
    _ev(Step.CREATING, 50.001), _ev(Step.DEFINED, 50.004), _ev(Step.CREATED, 50.006),
    _ev(Step.STARTING, 50.007), _ev(Step.BOOTED, 50.387), _ev(Step.AGENT_READY, 53.1), _ev(Step.RUNNING, 53.105),
]


def test_the_phases_of_a_start_come_from_its_events() -> None:
    stamps = {"t0": 50.0, **stamps_from_events(EVENTS), "init_line": 52.357, "agent_line": 52.738,
              "exec_start": 53.106, "exec_done": 53.173}
    ph = phase_durations(stamps)
    assert ph == pytest.approx({
        "define": 6.0,  # create() until CREATED
        "domain_start": 381.0,  # CREATED until BOOTED (libvirt's create() returned)
        "kernel_to_init": 1970.0,  # BOOTED until the console's 'init started'
        "init_script": 381.0,
        "agent_ready": 362.0,  # 'agent ready' line until AGENT_READY (the SSH handshake)
        "running": 5.0,  # AGENT_READY until RUNNING
        "first_exec": 68.0,
        "total": 3173.0,
    })
    assert [k for k, _label, _end in PHASES] == list(ph)[:-1]


def test_the_first_event_of_a_step_counts_and_other_steps_are_no_stamps() -> None:
    later = [*EVENTS, _ev(Step.RUNNING, 60.0), _ev(Step.STOPPING, 61.0), _ev(Step.STOPPED, 62.0),
             _ev(Step.REMOVED, 63.0)]
    stamps = stamps_from_events(later)
    assert stamps["running"] == 53.105
    assert set(stamps) == {"creating", "defined", "created", "starting", "booted", "agent_ready", "running"}


def test_a_start_without_a_console_line_or_agent_keeps_the_known_phases_adding_up() -> None:
    events = [e for e in EVENTS if e.step not in (Step.AGENT_READY, Step.RUNNING)]
    events.append(_ev(Step.START_FAILED, 55.0, detail="DeadlineExceeded: no agent"))
    stamps = {"t0": 50.0, **stamps_from_events(events), "agent_line": 52.738}
    ph = phase_durations(stamps)
    assert ph["define"] == pytest.approx(6.0) and ph["domain_start"] == pytest.approx(381.0)
    assert ph["kernel_to_init"] is None
    assert ph["init_script"] == pytest.approx((52.738 - 50.387) * 1000)  # from BOOTED: the line was missed
    assert ph["agent_ready"] is None and ph["running"] is None and ph["total"] is None
    assert stamps["start_failed"] == 55.0


def test_a_sample_keeps_every_event_relative_to_create() -> None:
    stamps = {"t0": 50.0, **stamps_from_events(EVENTS), "exec_start": 53.106, "exec_done": 53.173}
    s = Start(id="s1", stamps=dict(stamps), exit_code=0, uptime=None, dmesg=[], others=0, events=EVENTS).sample()
    assert [e["step"] for e in s["events_ms"]] == ["creating", "defined", "created", "starting", "booted",
                                                   "agent-ready", "running"]
    assert s["events_ms"][4]["ms"] == pytest.approx(387.0)
    assert list(s["stamps_ms"])[:2] == ["t0", "creating"] and s["stamps_ms"]["exec_done"] == pytest.approx(3173.0)
    assert s["phases_ms"]["kernel_to_init"] is None and s["phases_ms"]["total"] == pytest.approx(3173.0)


def test_the_event_log_keeps_events_by_sandbox_from_many_threads() -> None:
    log = EventLog()

    def emit(sid: str) -> None:
        for i in range(200):
            log(_ev(Step.CREATING, float(i), sid))

    threads = [threading.Thread(target=emit, args=(f"s{k}",)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = log.take("s2")
    assert [e.monotonic for e in got] == [float(i) for i in range(200)]
    assert {e.sandbox_id for e in got} == {"s2"}
    assert log.take("s2") == []
    assert len(log.take("s0")) == 200


def _observe(rig: Rig) -> EventLog:
    """An EventLog fed by the rig's controller (the rig keeps its own list as well)."""
    log = EventLog()
    rig.ctl.close()
    rig.events = _Tee(log)  # type: ignore[assignment]
    rig.ctl = rig.new_controller()
    return log


class _Tee(list[LifecycleEvent]):
    def __init__(self, log: EventLog) -> None:
        super().__init__()
        self.log = log

    def append(self, ev: LifecycleEvent) -> None:
        super().append(ev)
        self.log(ev)


def test_a_controller_start_gives_every_event_stamp_in_order(rig: Rig) -> None:
    log = _observe(rig)
    rig.ctl.create(SandboxMetadata(id="b1"))
    rig.ctl.start("b1")
    stamps = stamps_from_events(log.take("b1"))
    order = ["creating", "defined", "created", "starting", "booted", "agent_ready", "running"]
    assert list(stamps) == order
    assert [stamps[k] for k in order] == sorted(stamps.values())
    ph = phase_durations({"t0": stamps["creating"], **stamps, "exec_done": stamps["running"]})
    for key in ("define", "domain_start", "agent_ready", "running"):
        assert ph[key] is not None and ph[key] >= 0  # type: ignore[operator]


def test_a_failed_controller_start_is_stamped(quick_rig: Rig) -> None:
    log = _observe(quick_rig)
    quick_rig.guests.fp.fail("connect", DeadlineExceeded("no agent"))
    quick_rig.ctl.create(SandboxMetadata(id="b2"))
    with pytest.raises(DeadlineExceeded):
        quick_rig.ctl.start("b2")
    stamps = stamps_from_events(log.take("b2"))
    assert "booted" in stamps and "start_failed" in stamps and "running" not in stamps


def test_the_template_gives_the_bare_baseline_its_xml_config_disk_and_host_key(rig: Rig) -> None:
    # What Bench.setup takes from the public API: the verbose status of a created sandbox.
    rig.ctl.create(SandboxMetadata(id="tmpl"))
    info = rig.ctl.status("tmpl", verbose=True).info
    disk = Path(config_disk_of(info["domain_xml"]))
    sdir = Path(info["console_log"]).parent
    assert disk.parent == sdir and (sdir / "id_ed25519").is_file()
    assert host_key_line_from_config(disk.read_bytes()) == rig.record("tmpl")["host_key"]
