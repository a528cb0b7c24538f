"""A new LibvirtController on the same state dir takes over what an earlier one left.

Each test makes its own "first" controller, closes it (as a restart of the service would),
then checks what a "second" controller reports and can do. The session ``controller``
provides the state dir and the prerequisites; a finalizer with yet another controller
removes whatever a failing test left.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import unique
from tests.integration.test_controller_lifecycle import (
    _libvirt,
    _no_domain,
    agent_socket,
    assert_left_nothing,
    domain_name,
    domain_xml,
    footprint,
    qemu_pids,
    wait_until,
)
from vmsandbox import Config, ExitStatus, FailedPrecondition, LibvirtController, NotFound, Phase, SandboxMetadata, SandboxState
from vmsandbox.model import utcnow

pytestmark = pytest.mark.integration

READY = SandboxState.READY.value
NOTREADY = SandboxState.NOTREADY.value


@pytest.fixture(scope="module")
def recovery_config(controller: LibvirtController, test_root: Path) -> Config:
    """A state dir of this module's own (the guest image copied in): the session controller
    owns its state dir, and a second controller there would only observe."""
    d = test_root / "recovery-state"
    d.mkdir()
    shutil.copytree(controller.config.state_dir / "images", d / "images")
    return dataclasses.replace(controller.config, state_dir=d)


@pytest.fixture
def fresh(recovery_config: Config) -> Iterator[tuple[list[str], object]]:
    """(ids to clean up, a factory of new controllers on this module's state dir)."""
    ids: list[str] = []
    made: list[LibvirtController] = []

    def new() -> LibvirtController:
        c = LibvirtController(config=recovery_config)
        made.append(c)
        return c

    yield ids, new
    for c in made:
        c.close()
    with LibvirtController(config=recovery_config) as cleaner:
        for sid in ids:
            cleaner.shutdown(sid)
    for sid in ids:
        assert_left_nothing(recovery_config.state_dir, sid)


def test_a_running_sandbox_is_taken_over(fresh: tuple[list[str], object]) -> None:
    ids, new = fresh
    first: LibvirtController = new()  # type: ignore[operator]
    sid = unique("takeover")
    ids.append(sid)
    first.create(SandboxMetadata(sid, labels={"app": "kept"}))
    pid = first.start(sid).pid
    assert first.exec(sid, ["sh", "-c", "echo before-restart > /tmp/marker"]).exit_code == 0
    sock = agent_socket(sid)
    first.close()
    assert qemu_pids(sid) == [pid], "closing a controller must not stop its sandboxes"

    second: LibvirtController = new()  # type: ignore[operator]
    st = second.status(sid)
    assert (st.state, st.pid, st.exited_at) == (READY, pid, None)
    assert [(r.id, r.phase) for r in second.list() if r.id == sid] == [(sid, Phase.RUNNING)]
    r = second.exec(sid, ["cat", "/tmp/marker"])
    assert (r.exit_code, r.stdout) == (0, b"before-restart\n")
    assert second.start(sid).pid == pid  # still idempotent after the takeover

    waited: list[ExitStatus] = []
    waiter = threading.Thread(target=lambda: waited.append(second.wait(sid)), daemon=True)
    waiter.start()
    time.sleep(0.3)
    assert waiter.is_alive()
    before = utcnow()
    second.stop(sid, timeout=30)
    after = utcnow()
    waiter.join(30)
    assert waited and waited[0].exit_status == 0
    assert before <= waited[0].exited_at <= after
    assert second.status(sid).state == NOTREADY
    second.shutdown(sid)
    second.shutdown(sid)
    with pytest.raises(NotFound):
        second.status(sid)
    assert_left_nothing(second.config.state_dir, sid, sock)


def _exec_then_die(config: Config, sid: str) -> None:
    """A controller in another process that execs in ``sid`` and is SIGKILLed, connected."""
    script = ("import os, signal, sys\n"
              "from vmsandbox import LibvirtController\n"
              "c = LibvirtController(state_dir=sys.argv[1], virt_type=sys.argv[2])\n"
              "assert c.exec(sys.argv[3], ['true']).exit_code == 0\n"
              "os.kill(os.getpid(), signal.SIGKILL)\n")
    p = subprocess.run([sys.executable, "-c", script, str(config.state_dir), config.virt_type.value, sid],
                       capture_output=True, timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr.decode()[-2000:]


def _pid1_wakeups(c: LibvirtController, sid: str) -> int:
    r = c.exec(sid, ["cat", "/proc/1/status"])
    fields = dict(line.split(":", 1) for line in r.stdout.decode().splitlines() if ":" in line)
    return int(fields["voluntary_ctxt_switches"]) + int(fields["nonvoluntary_ctxt_switches"])


def test_after_each_restart_the_first_exec_reconnects_promptly_and_the_idle_agent_sleeps(
        fresh: tuple[list[str], object]) -> None:
    """Six restarts in a row, three after a controller was SIGKILLed while connected (issue
    10: the first exec after a restart took 10.5 s twice in seven, one wedged connection
    waited out whole). Between two controllers no host is connected: the guest agent (PID 1)
    woke 100 times a second then; now it sleeps."""
    ids, new = fresh
    first: LibvirtController = new()  # type: ignore[operator]
    sid = unique("reconnect")
    ids.append(sid)
    first.create(SandboxMetadata(sid))
    first.start(sid)
    before = _pid1_wakeups(first, sid)
    config = first.config
    first.close()
    firsts: list[float] = []
    idle: list[int] = []
    last: int | None = before
    for i in range(6):
        time.sleep(3.0)  # no controller, no host on the agent's port
        c: LibvirtController = new()  # type: ignore[operator]
        t0 = time.monotonic()
        after = _pid1_wakeups(c, sid)
        firsts.append(time.monotonic() - t0)
        if last is not None:
            idle.append(after - last)
        last = _pid1_wakeups(c, sid)
        c.close()
        if i % 2:  # every other restart follows a crash: a controller SIGKILLed while connected
            _exec_then_die(config, sid)
            last = None  # the crashed controller's session counts too: not an idle gap
    print(f"first exec after restart: {[round(f, 2) for f in firsts]} s; PID 1 wake-ups per 3 s gap + reconnect: {idle}")
    # Bounded: one wedged connection costs a 1 s banner wait, not the 15 s deadline.
    assert max(firsts) < 5.0, firsts
    # The reconnect's own session takes some; 3 s of 100 Hz polling alone was 300.
    assert max(idle) < 150, idle


@pytest.mark.parametrize(("how", "expected_exit"), [("destroyed", 137), ("powered-off", 0)])
def test_a_sandbox_that_stopped_while_no_controller_ran(
    fresh: tuple[list[str], object], how: str, expected_exit: int
) -> None:
    ids, new = fresh
    first: LibvirtController = new()  # type: ignore[operator]
    sid = unique("whiledown")
    ids.append(sid)
    first.create(SandboxMetadata(sid))
    started = first.start(sid).created_at
    before = utcnow()
    if how == "powered-off":
        # The guest powers itself off a moment after the exec returned.
        r = first.exec(sid, ["sh", "-c", "(sleep 1; poweroff -f) </dev/null >/dev/null 2>&1 &"])
        assert r.exit_code == 0
    first.close()
    if how == "destroyed":
        conn = _libvirt()  # someone else (an operator, the OOM killer) ends the VM
        try:
            conn.lookupByName(domain_name(sid)).destroy()
        finally:
            conn.close()
    wait_until(lambda: not qemu_pids(sid), 60, "the VM to end")

    second: LibvirtController = new()  # type: ignore[operator]
    st = second.status(sid)
    assert (st.state, st.pid) == (NOTREADY, 0)
    assert st.exited_at is not None
    ex = second.wait(sid, timeout=5)
    assert ex.exit_status == expected_exit
    assert ex.exited_at == st.exited_at
    # The exact moment is unknown to a controller that was not running: it is the guest's
    # last console output (a silently killed guest: the end of its boot) or, when libvirt
    # had not yet noticed, the moment the new controller saw it end.
    assert started <= ex.exited_at <= utcnow()
    if how == "powered-off":
        assert ex.exited_at >= before
    with pytest.raises(FailedPrecondition):
        second.start(sid)
    second.shutdown(sid)
    assert_left_nothing(second.config.state_dir, sid)


def test_a_created_sandbox_stays_created_and_can_be_removed(fresh: tuple[list[str], object]) -> None:
    ids, new = fresh
    first: LibvirtController = new()  # type: ignore[operator]
    sid = unique("created")
    ids.append(sid)
    first.create(SandboxMetadata(sid))
    first.close()
    second: LibvirtController = new()  # type: ignore[operator]
    st = second.status(sid)
    assert (st.state, st.pid, st.exited_at, st.info["phase"]) == (NOTREADY, 0, None, "created")
    assert domain_xml(sid) is not None
    second.shutdown(sid)
    assert_left_nothing(second.config.state_dir, sid)


def test_a_folder_left_by_an_interrupted_create_is_removed(
    fresh: tuple[list[str], object], recovery_config: Config
) -> None:
    ids, new = fresh
    sid = unique("stray")
    ids.append(sid)
    stray = recovery_config.state_dir / "sandboxes" / sid
    (stray / "disks").mkdir(parents=True)
    (stray / "id_ed25519").write_text("half-made")
    new()  # type: ignore[operator]
    assert not stray.exists()


def test_a_domain_of_ours_without_a_record_is_removed(fresh: tuple[list[str], object]) -> None:
    ids, new = fresh
    first: LibvirtController = new()  # type: ignore[operator]
    sid = unique("orphan")
    first.create(SandboxMetadata(sid))
    first.close()
    # The sandbox's folder is lost (e.g. wiped by hand); only the libvirt domain remains.
    shutil.rmtree(first.config.state_dir / "sandboxes" / sid)
    try:
        new()  # type: ignore[operator]
        assert domain_xml(sid) is None, "the orphan domain is still defined"
    finally:
        conn = _libvirt()
        try:
            conn.lookupByName(domain_name(sid)).undefine()
        except Exception as e:
            if not _no_domain(e):  # already gone is fine
                raise
        finally:
            conn.close()


def test_an_unreadable_record_is_quarantined_and_everything_else_recovers(fresh: tuple[list[str], object]) -> None:
    ids, new = fresh
    first: LibvirtController = new()  # type: ignore[operator]
    good, bad = unique("good"), unique("damaged")
    ids.append(good)
    first.create(SandboxMetadata(good))
    first.create(SandboxMetadata(bad))
    first.close()
    sd = first.config.state_dir
    (sd / "sandboxes" / bad / "record.json").write_text("{truncated")
    try:
        for _ in range(2):  # and again: the quarantined sandbox's domain is not an orphan
            second: LibvirtController = new()  # type: ignore[operator]
            assert [r.id for r in second.list()] == [good]
            assert second.status(good).info["phase"] == "created"
            assert domain_xml(bad) is not None, "the VM of a damaged record was destroyed"
            second.close()
        assert (sd / "quarantine" / bad / "1" / "record.json").read_text() == "{truncated"
    finally:
        shutil.rmtree(sd / "quarantine", ignore_errors=True)
        conn = _libvirt()
        try:
            conn.lookupByName(domain_name(bad)).undefine()
        except Exception as e:
            if not _no_domain(e):
                raise
        finally:
            conn.close()


def test_a_second_controller_on_an_owned_state_dir_only_observes(controller: LibvirtController) -> None:
    """While one controller owns a state dir (say `serve`), another (say a CLI command) must
    not destroy what looks interrupted: it may be the owner's create or boot in flight."""
    sid = unique("inflight")
    half_made = controller.config.state_dir / "sandboxes" / sid
    (half_made / "disks").mkdir(parents=True)
    try:
        with LibvirtController(config=controller.config) as observer:
            assert controller.owner and not observer.owner
            assert half_made.exists()
    finally:
        shutil.rmtree(half_made)


def test_the_cli_refuses_to_race_an_owner_it_cannot_reach(controller: LibvirtController) -> None:
    """A state dir owned by a process with no admin socket (here: this test session): the CLI
    reads, but refuses what would race the owner (a second agent connection, stop, create)."""
    import subprocess
    import sys

    from tests.conftest import REPO
    from vmsandbox.sandbox.controller import state_dir_owner

    assert state_dir_owner(controller.config.state_dir) == os.getpid()

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "vmsandbox.cli", "--state-dir", str(controller.config.state_dir),
                               *args], cwd=REPO, capture_output=True, text=True, timeout=60)

    assert cli("list").returncode == 0
    for args in (["exec", "whatever", "--", "true"], ["stop", "whatever"], ["create", unique("cli")]):
        done = cli(*args)
        assert done.returncode == 1 and f"owned by process {os.getpid()}" in done.stderr, (args, done.stderr)
    assert [p.name for p in (controller.config.state_dir / "sandboxes").iterdir() if p.name.endswith("-cli")] == []


def test_nothing_is_left_behind(controller: LibvirtController) -> None:
    """After the tests above: no folder, socket, domain or QEMU process beyond the sandboxes
    the session controller still knows (normally none)."""
    sd: Path = controller.config.state_dir
    known = {r.id for r in controller.list()}
    folders, sockets, domains = footprint(controller)
    assert set(folders) <= known
    assert len(sockets) <= len(known)
    assert set(domains) <= {domain_name(k) for k in known}
    needle = str(sd / "sandboxes").encode()
    qemus = []
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            if needle in Path("/proc", d, "cmdline").read_bytes():
                qemus.append(int(d))
        except OSError:
            continue
    assert len(qemus) <= len(known), f"QEMU processes still using {sd}: {qemus}"
