"""LibvirtController on real guests: exec, status, stop, wait, shutdown and the error contract.

One sandbox (busybox rootfs image, 2 vCPUs, 384 MiB) is booted for the whole module and
serves every read-only check; tests that change a sandbox's state boot their own small
guest. Guests boot in a few seconds even under TCG.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any as _Any

import pytest

from tests.conftest import unique
from vmsandbox import (
    AlreadyExists,
    DeadlineExceeded,
    ExitStatus,
    FailedPrecondition,
    InvalidArgument,
    LibvirtController,
    Mount,
    NotFound,
    Phase,
    Platform,
    SandboxMetadata,
    SandboxState,
    Unavailable,
)
from vmsandbox.hypervisor.domain import DomainSpec, build_domain_xml, parse_metadata
from vmsandbox.model import utcnow

pytestmark = pytest.mark.integration

READY = SandboxState.READY.value
NOTREADY = SandboxState.NOTREADY.value
VCPUS = "vmsandbox.io/vcpus"
MEMORY = "vmsandbox.io/memory-mib"


# ---------------------------------------------------------------- helpers (shared by the other modules)


def domain_name(sid: str) -> str:
    return f"vmsandbox-{sid}"


def qemu_pids(sid: str) -> list[int]:
    """Host processes whose command line names the sandbox's domain (``-name guest=...``)."""
    name = f"guest={domain_name(sid)}".encode()
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            args = Path("/proc", d, "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a == name or a.startswith(name + b",") for a in args):
            out.append(int(d))
    return out


def _libvirt() -> _Any:
    """A connection to qemu:///system, waiting out a libvirtd restart (other suites do that)."""
    import libvirt

    deadline = time.monotonic() + 30
    while True:
        try:
            return libvirt.open("qemu:///system")
        except libvirt.libvirtError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _no_domain(err: Exception) -> bool:
    import libvirt

    return isinstance(err, libvirt.libvirtError) and err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN


def domain_xml(sid: str) -> str | None:
    """The domain's XML, None when it does not exist (any other libvirt error is raised:
    a "nothing left" check must not pass because libvirtd was unreachable)."""
    conn = _libvirt()
    try:
        return str(conn.lookupByName(domain_name(sid)).XMLDesc(0))
    except Exception as e:
        if _no_domain(e):
            return None
        raise
    finally:
        conn.close()


def agent_socket(sid: str) -> str:
    """The host end of the guest agent channel, as libvirt knows it."""
    xml = domain_xml(sid)
    assert xml is not None, f"no domain for {sid}"
    src = ET.fromstring(xml).find("devices/channel/source")
    assert src is not None
    return str(src.get("path"))


def tagged_domains(state_dir: Path) -> list[str]:
    """Names of libvirt domains whose metadata names ``state_dir`` (read from the full XML)."""
    conn = _libvirt()
    try:
        out = []
        for dom in conn.listAllDomains(0):
            try:
                meta = parse_metadata(dom.XMLDesc(0))
            except Exception as e:
                if _no_domain(e):
                    continue  # vanished while listing
                raise
            if meta.get("state-dir") == str(state_dir):
                out.append(dom.name())
        return sorted(out)
    finally:
        conn.close()


def footprint(controller: LibvirtController) -> tuple[list[str], list[str], list[str]]:
    """What a sandbox leaves on the host: folders, agent sockets, libvirt domains."""
    sd = controller.config.state_dir
    return (
        sorted(p.name for p in (sd / "sandboxes").iterdir()),
        sorted(p.name for p in (sd / "sock").iterdir()),
        tagged_domains(sd),
    )


def wait_until(pred: _Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def assert_left_nothing(state_dir: Path, sid: str, socket_path: str | None = None) -> None:
    """No domain, folder, agent socket or QEMU process of the sandbox remains."""
    assert domain_xml(sid) is None, f"domain {domain_name(sid)} still defined"
    assert domain_name(sid) not in tagged_domains(state_dir)
    assert not (state_dir / "sandboxes" / sid).exists(), "sandbox folder left behind"
    if socket_path is not None:
        assert not os.path.exists(socket_path), f"agent socket {socket_path} left behind"
    wait_until(lambda: not qemu_pids(sid), 10, f"the QEMU process of {sid} to exit")


def qemu_dir(test_root: Path) -> Path:
    d = Path(tempfile.mkdtemp(dir=test_root))
    os.chmod(d, 0o711)
    return d


def oci_arch() -> str:
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)


def boot(controller: LibvirtController, sandbox_ids: list[str], name: str, **create: _Any) -> str:
    """Create and start a sandbox (registered for cleanup first); returns its id."""
    sid = unique(name)
    sandbox_ids.append(sid)
    controller.create(SandboxMetadata(sid), **create)
    controller.start(sid)
    return sid


# ---------------------------------------------------------------- the shared guest


@pytest.fixture(scope="module")
def guest(controller: LibvirtController, test_root: Path, rootfs_image: Path) -> Iterator[str]:
    """A running sandbox on a private copy of the busybox rootfs, 2 vCPUs and 384 MiB."""
    sid = unique("life")
    d = qemu_dir(test_root)
    img = d / "rootfs.img"
    shutil.copyfile(rootfs_image, img)
    sock = None
    try:
        controller.create(SandboxMetadata(sid), rootfs=[Mount("ext4", str(img))], annotations={VCPUS: "2", MEMORY: "384"})
        controller.start(sid)
        sock = agent_socket(sid)
        yield sid
    finally:
        controller.shutdown(sid)
        shutil.rmtree(d, ignore_errors=True)
    assert_left_nothing(controller.config.state_dir, sid, sock)


def sh(controller: LibvirtController, sid: str, script: str, **kw: _Any) -> _Any:
    return controller.exec(sid, ["sh", "-c", script], **kw)


def test_exec_runs_in_the_rootfs_image(controller: LibvirtController, guest: str) -> None:
    r = controller.exec(guest, ["cat", "/etc/os-release"])
    assert r.exit_code == 0, r.stderr
    assert "ID=vsbxrootfs" in r.stdout.decode().splitlines()
    # The guest's own initramfs is not what exec sees.
    assert controller.exec(guest, ["test", "-e", "/etc/vmsandbox-release"]).exit_code == 1
    assert controller.exec(guest, ["hostname"]).stdout.decode().strip() == guest


def test_exec_exit_codes(controller: LibvirtController, guest: str) -> None:
    assert sh(controller, guest, "exit 7").exit_code == 7
    assert controller.exec(guest, ["true"]).exit_code == 0
    assert controller.exec(guest, ["false"]).exit_code == 1
    assert sh(controller, guest, "kill -9 $$").exit_code == 128 + 9


def test_exec_keeps_stdout_and_stderr_apart(controller: LibvirtController, guest: str) -> None:
    r = sh(controller, guest, "echo out1; echo err1 >&2; echo out2; echo err2 >&2; exit 3")
    assert (r.exit_code, r.stdout, r.stderr) == (3, b"out1\nout2\n", b"err1\nerr2\n")
    big = controller.exec(guest, ["head", "-c", "1048576", "/dev/zero"])
    assert big.stdout == b"\0" * 1048576 and big.stderr == b""


def test_exec_environment_and_working_directory(controller: LibvirtController, guest: str) -> None:
    r = controller.exec(guest, ["env"], env={"FOO": "bar baz", "EQ": "a=b"})
    env = dict(line.split("=", 1) for line in r.stdout.decode().splitlines())
    assert env["FOO"] == "bar baz" and env["EQ"] == "a=b"
    assert env["HOME"] == "/root" and "/bin" in env["PATH"].split(":")
    assert "PYTEST_CURRENT_TEST" not in env, "the host environment leaked into the guest"
    assert controller.exec(guest, ["pwd"]).stdout == b"/\n"
    assert controller.exec(guest, ["pwd"], cwd="/etc").stdout == b"/etc\n"
    missing = controller.exec(guest, ["pwd"], cwd="/no/such/dir")
    assert missing.exit_code == 126 and b"/no/such/dir" in missing.stderr
    with pytest.raises(InvalidArgument):
        controller.exec(guest, ["pwd"], cwd="etc")


def test_exec_echoing_a_large_stdin_does_not_deadlock(controller: LibvirtController, guest: str) -> None:
    """cat echoes 4 MiB back: more than the SSH windows hold, so input and output must flow together."""
    import os as _os

    data = _os.urandom(4 << 20)
    r = controller.exec(guest, ["cat"], stdin=data, timeout=120)
    assert r.exit_code == 0 and r.stdout == data


def test_a_command_dies_with_its_dropped_session(controller: LibvirtController, guest: str) -> None:
    """If the host connection goes away mid-exec, the guest command must not run on."""
    import threading as _threading

    from vmsandbox import Unavailable

    errors: list[object] = []

    def run() -> None:
        try:  # what the caller sees: an error, never a made-up exit code
            errors.append(controller.exec(guest, ["sleep", "417"]))
        except BaseException as e:  # noqa: BLE001 - recorded for the assertion
            errors.append(e)

    t = _threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 30
    while b"sleep 417" not in controller.exec(guest, ["ps"]).stdout:
        assert time.monotonic() < deadline, "the command never started"
        time.sleep(0.2)
    controller._registry.get(guest).agent.close()  # the host side drops the session
    t.join(timeout=30)
    assert not t.is_alive() and errors and isinstance(errors[0], Unavailable)
    deadline = time.monotonic() + 10
    while b"sleep 417" in controller.exec(guest, ["ps"]).stdout:  # reconnects
        assert time.monotonic() < deadline, "the command outlived its session"
        time.sleep(0.2)


def test_exec_passes_stdin(controller: LibvirtController, guest: str) -> None:
    assert controller.exec(guest, ["cat"], stdin=b"hello\0world\n").stdout == b"hello\0world\n"
    assert controller.exec(guest, ["cat"]).stdout == b""  # no stdin: EOF at once, no hang
    data = os.urandom(256 * 1024)
    r = controller.exec(guest, ["sha256sum"], stdin=data)
    assert r.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()


def test_exec_passes_argv_verbatim_without_a_shell(controller: LibvirtController, guest: str) -> None:
    args = ["two words", "'single'", '"double"', "$(id -u)", "`hostname`", "a;b && c", "*", "~", "$HOME",
            "back\\slash", "", "ünï ✓"]
    r = controller.exec(guest, ["printf", "%s|\n", *args])
    assert r.exit_code == 0, r.stderr
    assert r.stdout.decode() == "".join(f"{a}|\n" for a in args)
    with pytest.raises(InvalidArgument):
        controller.exec(guest, "echo hi")  # type: ignore[arg-type]  # one string is not an argv


def test_exec_of_a_missing_command_is_127(controller: LibvirtController, guest: str) -> None:
    r = controller.exec(guest, ["no-such-command", "x"])
    assert r.exit_code == 127
    assert b"no-such-command" in r.stderr


def test_exec_timeout_raises_and_kills_the_process(controller: LibvirtController, guest: str) -> None:
    t0 = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        controller.exec(guest, ["sh", "-c", "sleep 1234 & sleep 4321"], timeout=1)
    assert time.monotonic() - t0 < 15
    ps = controller.exec(guest, ["ps", "-o", "pid,args"]).stdout.decode()
    assert "sleep 4321" not in ps and "sleep 1234" not in ps, ps


def test_concurrent_execs_each_get_their_own_result(controller: LibvirtController, guest: str) -> None:
    results: dict[int, _Any] = {}

    def one(i: int) -> None:
        results[i] = sh(controller, guest, f"sleep 0.5; echo {i}; echo e{i} >&2; exit {i}")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(1, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert {i: (r.exit_code, r.stdout, r.stderr) for i, r in results.items()} == {
        i: (i, f"{i}\n".encode(), f"e{i}\n".encode()) for i in range(1, 5)
    }


def test_resource_annotations_reach_the_guest(controller: LibvirtController, guest: str) -> None:
    assert controller.exec(guest, ["nproc"]).stdout.strip() == b"2"
    meminfo = controller.exec(guest, ["cat", "/proc/meminfo"]).stdout.decode()
    total_kib = int(next(line for line in meminfo.splitlines() if line.startswith("MemTotal:")).split()[1])
    assert 300 * 1024 < total_kib <= 384 * 1024, f"MemTotal {total_kib} KiB for a 384 MiB guest"
    info = controller.status(guest, verbose=True).info
    assert (info["vcpus"], info["memory_mib"]) == ("2", "384")


def test_platform_is_the_hosts(controller: LibvirtController, guest: str) -> None:
    p = controller.platform(guest)
    assert isinstance(p, Platform)
    assert (p.os, p.architecture) == ("linux", oci_arch())
    if oci_arch() == "amd64":
        assert str(p) == "linux/amd64"


def test_status_of_a_running_sandbox(controller: LibvirtController, guest: str) -> None:
    st = controller.status(guest)
    assert (st.sandbox_id, st.state, st.exited_at) == (guest, READY, None)
    assert st.pid > 0 and qemu_pids(guest) == [st.pid]
    assert f"guest={domain_name(guest)}".encode() in Path(f"/proc/{st.pid}/cmdline").read_bytes()
    assert st.created_at <= utcnow()
    assert st.info["phase"] == "running"
    row = next(r for r in controller.list() if r.id == guest)
    assert (row.phase, row.state, row.pid) == (Phase.RUNNING, SandboxState.READY, st.pid)


def test_wait_with_a_timeout_on_a_running_sandbox(controller: LibvirtController, guest: str) -> None:
    t0 = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        controller.wait(guest, timeout=0.5)
    assert 0.4 < time.monotonic() - t0 < 5
    assert controller.status(guest).state == READY


def test_duplicate_create_leaves_the_first_sandbox_alone(controller: LibvirtController, guest: str) -> None:
    pid = controller.status(guest).pid
    before = footprint(controller)
    with pytest.raises(AlreadyExists):
        controller.create(SandboxMetadata(guest))
    assert footprint(controller) == before
    st = controller.status(guest)
    assert (st.state, st.pid) == (READY, pid)
    assert controller.exec(guest, ["cat", "/etc/os-release"]).exit_code == 0


# ---------------------------------------------------------------- state changes (own guests)


def test_lifecycle_created_running_stopped_removed(controller: LibvirtController, sandbox_ids: list[str]) -> None:
    sid = unique("cycle")
    sandbox_ids.append(sid)
    controller.create(SandboxMetadata(sid))
    st = controller.status(sid)
    assert (st.state, st.pid, st.exited_at) == (NOTREADY, 0, None)
    assert st.info["phase"] == "created"
    assert qemu_pids(sid) == []
    with pytest.raises(FailedPrecondition):
        controller.exec(sid, ["true"])

    inst = controller.start(sid)
    assert inst.sandbox_id == sid and inst.pid > 0 and qemu_pids(sid) == [inst.pid]
    assert controller.status(sid).state == READY
    assert controller.start(sid).pid == inst.pid  # idempotent on a running sandbox
    sock = agent_socket(sid)
    assert os.path.exists(sock)

    waited: list[ExitStatus] = []
    waiter = threading.Thread(target=lambda: waited.append(controller.wait(sid)), daemon=True)
    waiter.start()
    time.sleep(0.5)
    assert waiter.is_alive(), "wait() returned while the guest was running"

    before = utcnow()
    controller.stop(sid, timeout=30)
    after = utcnow()
    waiter.join(30)
    assert not waiter.is_alive(), "stop() did not release wait()"
    (ex,) = waited
    assert ex.exit_status == 0, "a clean power-off is exit status 0"
    assert before <= ex.exited_at <= after
    assert controller.wait(sid) == ex
    wait_until(lambda: not qemu_pids(sid), 10, "QEMU to exit after stop")

    st = controller.status(sid)
    assert (st.state, st.pid, st.exited_at) == (NOTREADY, 0, ex.exited_at)
    assert st.info["phase"] == "stopped"
    with pytest.raises(FailedPrecondition):
        controller.start(sid)
    with pytest.raises(FailedPrecondition):
        controller.exec(sid, ["true"])
    controller.stop(sid)  # stopping a stopped sandbox is fine
    assert controller.wait(sid) == ex

    controller.shutdown(sid)
    controller.shutdown(sid)
    for op in (controller.status, controller.wait, controller.start, controller.platform):
        with pytest.raises(NotFound):
            op(sid)
    assert sid not in [r.id for r in controller.list()]
    assert_left_nothing(controller.config.state_dir, sid, sock)


def test_stop_with_zero_timeout_forces_the_guest_off(controller: LibvirtController, sandbox_ids: list[str]) -> None:
    sid = boot(controller, sandbox_ids, "force")
    pid = controller.status(sid).pid
    t0 = time.monotonic()
    before = utcnow()
    controller.stop(sid, timeout=0)
    assert time.monotonic() - t0 < 10
    ex = controller.wait(sid, timeout=10)
    assert ex.exit_status == 137
    assert before <= ex.exited_at <= utcnow()
    wait_until(lambda: not os.path.exists(f"/proc/{pid}"), 10, "the QEMU process to be gone")
    assert controller.status(sid).state == NOTREADY


def test_a_guest_that_ignores_poweroff_is_forced_after_the_grace_period(
    controller: LibvirtController, sandbox_ids: list[str]
) -> None:
    sid = boot(controller, sandbox_ids, "stubborn")
    # Without a rootfs, exec runs in the guest's own root: take away its power-off helper.
    assert controller.exec(sid, ["rm", "/sbin/vsbx-poweroff"]).exit_code == 0
    t0 = time.monotonic()
    controller.stop(sid, timeout=3)
    elapsed = time.monotonic() - t0
    assert 3 <= elapsed < 20, f"stop took {elapsed:.1f}s for a 3s grace period"
    assert controller.wait(sid, timeout=5).exit_status == 137


def test_a_guest_that_powers_itself_off(controller: LibvirtController, sandbox_ids: list[str]) -> None:
    sid = boot(controller, sandbox_ids, "selfoff")
    before = utcnow()
    try:
        controller.exec(sid, ["poweroff", "-f"], timeout=20)
    except (Unavailable, DeadlineExceeded):
        pass  # the guest may vanish before the exec reports back
    ex = controller.wait(sid, timeout=60)
    assert ex.exit_status == 0
    assert before <= ex.exited_at <= utcnow() + timedelta(seconds=1)
    st = controller.status(sid)
    assert (st.state, st.pid, st.exited_at) == (NOTREADY, 0, ex.exited_at)
    wait_until(lambda: not qemu_pids(sid), 10, "QEMU to exit")


# ---------------------------------------------------------------- the error contract (no boot)


def test_operations_on_an_unknown_sandbox(controller: LibvirtController) -> None:
    sid = unique("ghost")
    for call in (
        lambda: controller.status(sid),
        lambda: controller.wait(sid, timeout=1),
        lambda: controller.start(sid),
        lambda: controller.exec(sid, ["true"]),
        lambda: controller.platform(sid),
        lambda: controller.metrics(sid),
        lambda: controller.update(sid, SandboxMetadata(sid)),
    ):
        with pytest.raises(NotFound) as err:
            call()
        assert err.value.sandbox_id == sid
    controller.stop(sid)
    controller.stop(sid, timeout=0)
    controller.shutdown(sid)


@pytest.mark.parametrize("bad_id", ["a/b", "..", "x" * 129, "bad\n", "", "-x", "a b"])
def test_bad_ids_are_refused_and_leave_nothing(controller: LibvirtController, bad_id: str) -> None:
    before = footprint(controller)
    with pytest.raises(InvalidArgument):
        controller.create(SandboxMetadata(bad_id))
    assert footprint(controller) == before
    assert not (controller.config.state_dir / "sandboxes" / "a").exists()


@pytest.mark.parametrize(
    "annotations",
    [{VCPUS: "0"}, {VCPUS: "abc"}, {VCPUS: "-2"}, {MEMORY: "1"}, {MEMORY: "lots"}, {VCPUS: "2", MEMORY: "0"}],
)
def test_bad_resource_annotations_are_refused_and_leave_nothing(
    controller: LibvirtController, sandbox_ids: list[str], annotations: dict[str, str]
) -> None:
    sid = unique("annot")
    sandbox_ids.append(sid)
    before = footprint(controller)
    with pytest.raises(InvalidArgument, match="annotation"):
        controller.create(SandboxMetadata(sid), annotations=annotations)
    assert footprint(controller) == before
    with pytest.raises(NotFound):
        controller.status(sid)


def test_create_leaves_a_foreign_domain_of_the_same_name_alone(
    controller: LibvirtController, sandbox_ids: list[str], test_root: Path
) -> None:
    """libvirt domain names are host-wide: another controller (another state dir) may hold
    ours. Create must refuse the id, roll back, and never undefine the other's domain."""
    sid = unique("taken")
    sandbox_ids.append(sid)
    other_state = str(test_root / "another-controller")
    xml = build_domain_xml(DomainSpec(
        name=domain_name(sid), sandbox_id=sid, state_dir=other_state, virt_type="qemu",
        arch=os.uname().machine, machine="q35" if os.uname().machine == "x86_64" else "virt",
        vcpus=1, max_vcpus=1, memory_mib=64, max_memory_mib=64, kernel="/nonexistent/vmlinuz",
        initrd="/nonexistent/initrd", cmdline="", console_log=f"{other_state}/console.log",
        agent_socket=f"{other_state}/agent.sock",
    ))
    conn = _libvirt()
    try:
        conn.defineXML(xml)
        before = footprint(controller)
        with pytest.raises(AlreadyExists):
            controller.create(SandboxMetadata(sid))
        assert footprint(controller) == before
        theirs = domain_xml(sid)
        assert theirs is not None, "create's rollback removed another controller's domain"
        assert parse_metadata(theirs)["state-dir"] == other_state
        with pytest.raises(NotFound):
            controller.status(sid)
    finally:
        try:
            conn.lookupByName(domain_name(sid)).undefine()
        finally:
            conn.close()


def test_stop_with_a_negative_timeout_is_refused(controller: LibvirtController) -> None:
    with pytest.raises(InvalidArgument):
        controller.stop(unique("neg"), timeout=-1)



def test_exec_output_is_capped_and_the_command_stopped(controller: LibvirtController, guest: str) -> None:
    """Output is collected in memory: `cat /dev/zero` must not take the controller down."""
    from vmsandbox import FailedPrecondition

    with pytest.raises(FailedPrecondition, match="passed 1000000 bytes"):
        controller.exec(guest, ["cat", "/dev/zero"], max_output=1_000_000)
    deadline = time.monotonic() + 10
    while b"cat /dev/zero" in controller.exec(guest, ["ps"]).stdout:  # stopped with its session
        assert time.monotonic() < deadline, "the command went on after its output was cut"
        time.sleep(0.2)
    assert controller.exec(guest, ["echo", "still fine"]).stdout == b"still fine\n"
