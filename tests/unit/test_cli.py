"""The ``vmsandbox`` command over fakes: arguments, output, exit codes, and whom it talks to.

``vmsandbox.host.LibvirtController`` is replaced by a factory that wires the rig's fakes, so
every command runs the real CLI code and the real orchestration without libvirtd. When a
process owns the state dir, the CLI must go through its admin socket or refuse; here that
process is a controller over the same fakes in this test process, served by a real
``vmsandbox.server.serve`` where a test needs the admin socket.
"""

from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.unit.rig import Rig
from vmsandbox import errors
from vmsandbox.cli import main
from vmsandbox.guest.fake import ExecCall, FakeGuests, FakeProcess
from vmsandbox.model import ExecResult, Phase, SandboxMetadata
from vmsandbox.sandbox.controller import LOCK_FILE, SandboxController
from vmsandbox.server import ControllerServer, serve


def play_handler(guests: FakeGuests) -> Callable[[FakeProcess], None]:
    """``exec`` streams through spawn: a spawned process plays the guests' exec ``handler``
    once its stdin is closed (recording the call in ``guests.execs``, as the exec path does)."""
    def on_spawn(proc: FakeProcess) -> None:
        def play() -> None:
            proc.wait_stdin(lambda p: p.stdin_closed, timeout=30)
            c = proc.call
            call = ExecCall(c.socket_path, c.argv, c.env, c.cwd, bytes(proc.stdin) or None, None, c.in_guest_root,
                            c.user)
            guests.execs.append(call)
            res = guests.handler(call)
            proc.emit(res.stdout, 1)
            proc.emit(res.stderr, 2)
            proc.exit(res.exit_code)

        threading.Thread(target=play, daemon=True).start()
    return on_spawn


@dataclass
class Cli:
    rig: Rig
    capsys: pytest.CaptureFixture[str]

    @property
    def state_dir(self) -> Path:
        return self.rig.config.state_dir

    def __call__(self, *argv: str) -> tuple[int, str, str]:
        """Run ``vmsandbox --state-dir STATE ARGV...``: (exit code, stdout, stderr)."""
        self.capsys.readouterr()
        code = main(["--state-dir", str(self.state_dir), *argv])
        out, err = self.capsys.readouterr()
        return code, out, err

    def json(self, *argv: str) -> object:
        code, out, err = self("--json", *argv)
        assert code == 0, err
        return json.loads(out)


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Iterator[Cli]:
    for var in ("VMSANDBOX_URI", "VMSANDBOX_STATE_DIR", "VMSANDBOX_VIRT_TYPE", "VMSANDBOX_IMAGES_DIR",
                "VMSANDBOX_PROGRESS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("VMSANDBOX_TEMPLATES", "0")  # as the Rig: the fake guest scripts cold boots
    levels = {n: logging.getLogger(n).level for n in ("vmsandbox.config", "paramiko")}
    # main() calls logging.basicConfig: with a handler on the root logger that is a no-op, so
    # log records never mix into the stderr a test compares (with or without pytest's logging).
    quiet = logging.NullHandler()
    logging.getLogger().addHandler(quiet)
    rig = Rig(tmp_path)
    rig.ctl.close()  # each CLI command makes (and owns, while it runs) its own controller
    rig.guests.on_spawn = play_handler(rig.guests)
    monkeypatch.setattr("vmsandbox.host.LibvirtController", rig.controller_factory())
    yield Cli(rig, capsys)
    rig.close()
    logging.getLogger().removeHandler(quiet)
    for n, level in levels.items():
        logging.getLogger(n).setLevel(level)


@pytest.fixture
def holder(cli: Cli) -> SandboxController:
    """Another controller owns the state dir (as `vmsandbox serve` would), with no admin socket."""
    ctl = cli.rig.new_controller()
    assert ctl.owner
    ctl.create(SandboxMetadata("held"))
    ctl.start("held")
    return ctl


@pytest.fixture
def served(cli: Cli, holder: SandboxController, tmp_path: Path,
           monkeypatch: pytest.MonkeyPatch) -> Iterator[ControllerServer]:
    """The owner serves its admin socket in the state dir; the CLI must not make a controller."""
    srv = serve(holder, str(tmp_path / "ctl.sock"), wait_poll_interval=0.05,
                admin=holder, admin_socket_path=str(cli.state_dir / "admin.sock"))

    def no_local_controller(*args: object, **kwargs: object) -> object:
        raise AssertionError("the CLI made its own controller while serve owns the state dir")

    monkeypatch.setattr("vmsandbox.host.LibvirtController", no_local_controller)
    try:
        yield srv
    finally:
        srv.stop()


# --------------------------------------------------------------------------- usage
@pytest.mark.parametrize("argv", [
    pytest.param([], id="no-command"),
    pytest.param(["bogus"], id="unknown-command"),
    pytest.param(["exec"], id="exec-without-id"),
    pytest.param(["stop", "a", "--timeout", "soon"], id="timeout-not-a-number"),
    pytest.param(["create", "a", "--vcpus", "two"], id="vcpus-not-a-number"),
    pytest.param(["status"], id="status-without-id"),
    pytest.param(["image"], id="image-without-subcommand"),
    pytest.param(["run"], id="run-without-id"),
    pytest.param(["list", "--", "x"], id="double-dash-for-list"),
    pytest.param(["logs", "a", "--tail-bytes", "x"], id="tail-bytes-not-a-number"),
    pytest.param(["serve", "--max-workers", "many"], id="max-workers-not-a-number"),
    pytest.param(["doctor", "--bogus"], id="unknown-option"),
])
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as ei:
        main(argv)
    assert ei.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from vmsandbox import __version__

    with pytest.raises(SystemExit) as ei:
        main(["--version"])
    assert ei.value.code == 0 and capsys.readouterr().out.strip() == f"vmsandbox {__version__}"


@pytest.mark.parametrize("module", ["vmsandbox", "vmsandbox.cli"])
def test_python_dash_m_runs_the_cli(module: str) -> None:
    from vmsandbox import __version__

    done = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[2])
    assert (done.returncode, done.stdout.strip()) == (0, f"vmsandbox {__version__}"), done.stderr


# --------------------------------------------------------------------------- a sandbox's life through the CLI
def test_create_start_exec_stop_wait_shutdown(cli: Cli) -> None:
    cli.rig.guests.handler = lambda call: ExecResult(0, b"hello\n", b"")
    assert cli("create", "a", "--vcpus", "2", "--memory-mib", "384", "--annotation", "team=x") == (0, "created a\n", "")
    info = cli.json("status", "a", "--verbose")["info"]  # type: ignore[index]
    assert (info["vcpus"], info["memory_mib"], json.loads(info["annotations"])["team"]) == ("2", "384", "x")
    code, out, err = cli("start", "a")
    pid = cli.rig.domain("a").pid
    assert code == 0 and out == f"started a (VMM pid {pid})\n"
    code, out, _ = cli("list")
    assert code == 0 and out.split() == ["a", "running", "SANDBOX_READY", f"pid={pid}"]
    assert cli("exec", "a", "--", "echo", "hello") == (0, "hello\n", "")
    assert cli.rig.guests.execs[-1].argv == ("echo", "hello")
    assert cli("stop", "a") == (0, "stopped a\n", "")
    code, out, _ = cli("wait", "a", "--timeout", "1")
    assert code == 0 and out.startswith("a: exit status 0 at ")
    assert cli("shutdown", "a") == (0, "removed a\n", "")
    assert cli("list") == (0, "no sandboxes\n", "")
    assert cli.rig.leftovers("a") == []


def test_exec_passes_env_cwd_stdin_and_timeout_and_exits_with_the_command_code(
        cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    def handler(call: ExecCall) -> ExecResult:
        return ExecResult(7, b"got " + (call.stdin or b""), b"warning\n")

    cli.rig.guests.handler = handler
    cli("create", "a")
    cli("start", "a")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"input")))
    code, out, err = cli("exec", "--env", "K=V", "--env", "E=x=y", "--cwd", "/srv", "--timeout", "9",
                         "--stdin", "a", "--", "cat")
    assert (code, out, err) == (7, "got input", "warning\n")
    call = cli.rig.guests.execs[-1]
    # The timeout is the CLI's own now (the output streams): see test_exec_timeout_stops_the_command.
    assert (call.argv, call.env, call.cwd, call.stdin) == (("cat",), {"K": "V", "E": "x=y"}, "/srv", b"input")


@pytest.mark.parametrize("argv", [
    pytest.param(["exec", "a", "--env", "K=V", "--", "true"], id="exec"),
    pytest.param(["run", "a", "--rm", "--", "true"], id="run"),
])
def test_options_may_come_between_the_id_and_the_command(cli: Cli, argv: list[str]) -> None:
    if argv[0] == "exec":
        cli("create", "a")
        cli("start", "a")
    assert cli(*argv)[0] == 0
    commands = [c.argv for c in cli.rig.guests.execs if c.argv != ("/sbin/vsbx-poweroff",)]  # run --rm powers off
    assert commands[-1] == ("true",)


def test_json_outputs(cli: Cli) -> None:
    cli.rig.guests.handler = lambda call: ExecResult(3, b"out", b"err")
    assert cli.json("create", "a") == {"id": "a"}
    inst = cli.json("start", "a")
    assert inst["sandbox_id"] == "a" and inst["pid"] == cli.rig.domain("a").pid  # type: ignore[index]
    rows = cli.json("list")
    assert [(r["id"], r["phase"], r["state"]) for r in rows] == [("a", "running", "SANDBOX_READY")]  # type: ignore[union-attr, index]
    st = cli.json("status", "a")
    assert (st["state"], st["pid"], st["exited_at"]) == ("SANDBOX_READY", cli.rig.domain("a").pid, None)  # type: ignore[index]
    code, out, _ = cli("--json", "exec", "a", "--", "x")
    assert code == 3 and json.loads(out) == {"exit_code": 3, "stdout": "out", "stderr": "err"}
    assert cli.json("platform", "a") == {"os": "linux", "architecture": "amd64", "variant": "", "os_version": ""}
    m = cli.json("metrics", "a")
    assert m["id"] == "a" and m["data"]["cpu"]["usage_usec"] == 5_000_000  # type: ignore[index]
    assert cli.json("stop", "a", "--timeout", "0") == {"id": "a"}
    assert cli.json("wait", "a")["exit_status"] == 137  # type: ignore[index]
    assert cli.json("shutdown", "a") == {"id": "a"}


def test_status_platform_metrics_and_logs_as_text(cli: Cli) -> None:
    cli("create", "a")
    cli("start", "a")
    code, out, _ = cli("status", "a", "--verbose")
    first, *rest = out.splitlines()
    assert code == 0 and first.startswith("a: SANDBOX_READY pid=")
    assert "  phase: running" in rest and not any("<domain" in line for line in rest)  # no multi-line values
    assert cli("platform", "a") == (0, "linux/amd64\n", "")
    code, out, _ = cli("metrics", "a")
    assert code == 0 and json.loads(out)["cpu"]["usage_usec"] == 5_000_000
    (cli.rig.sandbox_dir("a") / "console.log").write_bytes(b"boot\nready\n")
    assert cli("logs", "a") == (0, "boot\nready\n", "")
    assert cli("logs", "a", "--tail-bytes", "6") == (0, "ready\n", "")


def test_run_with_rm_exits_with_the_command_code_and_leaves_nothing(cli: Cli, tmp_path: Path) -> None:
    cli.rig.guests.handler = lambda call: ExecResult(4, b"", b"failed\n")
    rootfs = tmp_path / "rootfs.img"
    rootfs.write_bytes(b"\0" * 4096)
    code, out, err = cli("run", "--rootfs", f"{rootfs}:ro", "--rm", "a", "--", "false")
    assert code == 4 and "started a" in err and err.endswith("failed\n")
    assert cli.rig.leftovers("a") == [] and cli("list") == (0, "no sandboxes\n", "")


def test_run_without_a_command_leaves_the_sandbox_running(cli: Cli) -> None:
    inst = cli.json("run", "a")
    assert inst["sandbox_id"] == "a"  # type: ignore[index]
    assert cli.json("list")[0]["phase"] == "running"  # type: ignore[index]


def test_run_json_with_a_command(cli: Cli) -> None:
    cli.rig.guests.handler = lambda call: ExecResult(0, b"hi", b"")
    doc = cli.json("run", "--rm", "a", "--", "echo", "hi")
    assert doc["exec"] == {"exit_code": 0, "stdout": "hi", "stderr": ""}  # type: ignore[index]
    assert doc["instance"]["sandbox_id"] == "a"  # type: ignore[index]
    assert cli.rig.leftovers("a") == []


def test_a_run_whose_boot_fails_reports_it_and_leaves_nothing(cli: Cli) -> None:
    cli.rig.guests.fp.fail("connect", errors.DeadlineExceeded("guest agent did not answer in time"))
    code, out, err = cli("run", "--rm", "a", "--", "true")
    assert code == 1 and "vmsandbox: DeadlineExceeded: " in err and "did not answer" in err
    assert cli.rig.leftovers("a") == []


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("argv, message", [
    pytest.param(["status", "nope"], "vmsandbox: NotFound: sandbox nope not found", id="unknown-sandbox"),
    pytest.param(["exec", "nope"], "vmsandbox: error: exec needs a command after --", id="exec-without-argv"),
    pytest.param(["exec", "--env", "NOEQUALS", "a", "--", "x"], "vmsandbox: InvalidArgument: --env must be KEY=VALUE",
                 id="bad-env"),
    pytest.param(["create", "b", "--mount", "/tmp:/data"], "vmsandbox: error: --mount needs --rootfs", id="mount-no-root"),
    pytest.param(["create", "b", "--annotation", "x"], "vmsandbox: InvalidArgument: --annotation must be KEY=VALUE",
                 id="bad-annotation"),
    pytest.param(["create", "../b"], "vmsandbox: InvalidArgument: sandbox id", id="bad-id"),
    pytest.param(["create", "a"], "vmsandbox: AlreadyExists: sandbox a already exists", id="taken-id"),
    pytest.param(["--virt-type", "xen", "list"], "vmsandbox: InvalidArgument: virt type must be", id="bad-virt-type"),
    pytest.param(["exec", "a", "--", "x"], "vmsandbox: FailedPrecondition: ", id="exec-not-running"),
    pytest.param(["start", "nope"], "vmsandbox: NotFound: ", id="start-unknown"),
])
def test_errors_exit_1_with_one_line_naming_their_class(cli: Cli, argv: list[str], message: str) -> None:
    cli("create", "a")
    code, out, err = cli(*argv)
    assert code == 1 and out == ""
    assert err.startswith(message) and err.count("\n") == 1, err
    assert sorted(p.name for p in (cli.state_dir / "sandboxes").iterdir()) == ["a"]  # nothing else made


def test_stop_and_shutdown_of_an_unknown_sandbox_succeed(cli: Cli) -> None:
    assert cli("stop", "nope") == (0, "stopped nope\n", "")
    assert cli("shutdown", "nope") == (0, "removed nope\n", "")


def test_wait_with_a_timeout_on_a_running_sandbox(cli: Cli) -> None:
    cli("create", "a")
    cli("start", "a")
    code, _, err = cli("wait", "a", "--timeout", "0.1")
    assert code == 1 and err.startswith("vmsandbox: DeadlineExceeded: ")


def test_an_interrupted_command_exits_130(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*args: object, **kwargs: object) -> object:
        raise KeyboardInterrupt

    monkeypatch.setattr("vmsandbox.host.LibvirtController", interrupted)
    assert cli("list")[0] == 130


# --------------------------------------------------------------------------- a state dir owned by another process
@pytest.mark.parametrize("argv, how", [
    pytest.param(["exec", "held", "--", "true"], "admin socket", id="exec"),
    pytest.param(["stop", "held"], "admin socket", id="stop"),
    pytest.param(["shutdown", "held"], "admin socket", id="shutdown"),
    pytest.param(["create", "new"], "through containerd", id="create"),
    pytest.param(["start", "held"], "through containerd", id="start"),
    pytest.param(["run", "new", "--", "true"], "through containerd", id="run"),
])
def test_commands_that_change_sandboxes_are_refused_when_another_process_owns_the_state_dir(
        cli: Cli, holder: SandboxController, argv: list[str], how: str) -> None:
    execs = len(cli.rig.guests.execs)
    code, out, err = cli(*argv)
    assert code == 1 and out == ""
    assert err.startswith("vmsandbox: FailedPrecondition: ")
    assert f"owned by process {os.getpid()}" in err and how in err
    # Nothing happened to the owner's sandboxes.
    assert [(r.id, r.phase) for r in holder.list()] == [("held", Phase.RUNNING)]
    assert len(cli.rig.guests.execs) == execs and not cli.rig.sandbox_dir("new").exists()


def test_reading_commands_are_allowed_next_to_an_owner(cli: Cli, holder: SandboxController) -> None:
    code, out, _ = cli("list")
    assert code == 0 and out.split()[:3] == ["held", "running", "SANDBOX_READY"]
    assert cli.json("status", "held")["state"] == "SANDBOX_READY"  # type: ignore[index]
    assert cli("platform", "held") == (0, "linux/amd64\n", "")
    assert holder.owner and [r.id for r in holder.list()] == ["held"]


def test_a_stale_admin_socket_is_not_taken_for_a_server(cli: Cli, holder: SandboxController) -> None:
    (cli.state_dir / "admin.sock").write_text("")  # left behind by a server that died
    code, _, err = cli("stop", "held")
    assert code == 1 and "admin socket" in err and str(os.getpid()) in err
    assert holder.status("held").state == "SANDBOX_READY"


def test_an_owner_that_wrote_no_pid_is_named_another_process(cli: Cli) -> None:
    fd = os.open(cli.state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, _, err = cli("shutdown", "x")
    finally:
        os.close(fd)
    assert code == 1 and "owned by another process" in err


# --------------------------------------------------------------------------- through the owner's admin socket
def test_exec_goes_through_the_owners_admin_socket(cli: Cli, served: ControllerServer) -> None:
    cli.rig.guests.handler = lambda call: ExecResult(5, b"remote " + " ".join(call.argv).encode(), b"")
    assert cli("exec", "--env", "K=V", "held", "--", "uname", "-a") == (5, "remote uname -a", "")
    assert cli.rig.guests.execs[-1].env == {"K": "V"}
    code, out, _ = cli("--json", "exec", "held", "--", "x")
    assert code == 5 and json.loads(out)["stdout"] == "remote x"


def test_reading_commands_go_through_the_admin_socket(cli: Cli, holder: SandboxController,
                                                      served: ControllerServer) -> None:
    rows = cli.json("list")
    assert [(r["id"], r["phase"], r["state"]) for r in rows] == [("held", "running", "SANDBOX_READY")]  # type: ignore[union-attr, index]
    st = cli.json("status", "held", "--verbose")
    assert st["state"] == "SANDBOX_READY" and json.loads(st["info"]["info"])["pid"] == st["pid"]  # type: ignore[index]
    assert cli("platform", "held") == (0, "linux/amd64\n", "")
    assert cli.json("metrics", "held")["data"]["cpu"]["usage_usec"] == 5_000_000  # type: ignore[index]
    holder.console_log("held").write_bytes(b"one\ntwo\n")
    assert cli("logs", "held", "--tail-bytes", "4") == (0, "two\n", "")


def test_stop_wait_and_shutdown_go_through_the_admin_socket(cli: Cli, holder: SandboxController,
                                                            served: ControllerServer) -> None:
    cli.rig.guests.on_poweroff = lambda socket_path: None  # so that only a forced stop ends it
    # Over the wire 0 means "the server's default", so the client asks for the least it can: 1 s.
    assert cli("stop", "held", "--timeout", "0") == (0, "stopped held\n", "")
    assert holder.status("held").state == "SANDBOX_NOTREADY"
    assert cli.json("wait", "held", "--timeout", "2")["exit_status"] == 137  # type: ignore[index]
    assert cli("shutdown", "held") == (0, "removed held\n", "")
    assert holder.list() == [] and cli.rig.leftovers("held") == []


def test_errors_come_back_through_the_admin_socket_with_their_class(cli: Cli, served: ControllerServer) -> None:
    code, _, err = cli("exec", "nope", "--", "true")
    assert code == 1 and err.startswith("vmsandbox: NotFound: ")
    code, _, err = cli("wait", "held", "--timeout", "0.2")
    assert code == 1 and err.startswith("vmsandbox: DeadlineExceeded: ")


def test_create_is_refused_even_when_the_owner_serves_an_admin_socket(cli: Cli, holder: SandboxController,
                                                                      served: ControllerServer) -> None:
    code, _, err = cli("create", "new")
    assert code == 1 and "through containerd" in err
    assert [r.id for r in holder.list()] == ["held"]


# --------------------------------------------------------------------------- the `--` split
def test_everything_after_the_first_double_dash_is_the_command_verbatim(cli: Cli) -> None:
    cli("create", "a")
    cli("start", "a")
    assert cli("exec", "a", "--", "ls", "--help", "-v", "--", "--json")[0] == 0
    assert cli.rig.guests.execs[-1].argv == ("ls", "--help", "-v", "--", "--json")
    assert cli("exec", "a", "echo", "hi")[0] == 0  # without `--`, plain words are the command too
    assert cli.rig.guests.execs[-1].argv == ("echo", "hi")


def test_a_double_dash_for_a_command_that_takes_none_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as ei:
        main(["status", "a", "--", "x"])
    err = capsys.readouterr().err
    assert ei.value.code == 2 and err.startswith("usage:") and "'--' is only for exec and run, not status" in err


# --------------------------------------------------------------------------- create's disks, logs, image, serve
def test_create_makes_the_rootfs_the_first_disk_and_mounts_the_others_at_their_targets(
        cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("root.img", "data.img", "logs.img"):
        (tmp_path / name).write_bytes(b"\0" * 4096)
    monkeypatch.chdir(tmp_path)
    assert cli("create", "a", "--rootfs", "root.img:ro", "--mount", "data.img:/data",
               "--mount", f"{tmp_path}/logs.img:/logs:ro") == (0, "created a\n", "")
    assert cli.rig.record("a")["rootfs"] == [
        {"type": "ext4", "source": str(tmp_path / "root.img"), "target": "", "options": ["ro"]},
        {"type": "ext4", "source": str(tmp_path / "data.img"), "target": "/data", "options": []},
        {"type": "ext4", "source": str(tmp_path / "logs.img"), "target": "/logs", "options": ["ro"]},
    ]


def test_logs_are_the_raw_console_bytes_even_with_json(cli: Cli) -> None:
    cli("create", "a")
    (cli.rig.sandbox_dir("a") / "console.log").write_bytes(b"[    0.0] Linux\n")
    assert cli("--json", "logs", "a") == (0, "[    0.0] Linux\n", "")


def test_image_build_reports_the_image_and_passes_force(cli: Cli, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from vmsandbox.image import GuestImage

    builds: list[tuple[Path, bool]] = []
    manifest = {"kernel_version": "6.1.0-test", "architecture": "amd64", "os": "linux"}

    def ensure_image(state_dir: Path, images_dir: Path, name: str, *, force: bool, progress: object) -> GuestImage:
        builds.append((state_dir, force))
        return GuestImage(name, tmp_path / "img", manifest)

    monkeypatch.setattr("vmsandbox.image.ensure_image", ensure_image)
    assert cli("image", "build") == (0, f"image default: kernel 6.1.0-test, linux/amd64 in {tmp_path / 'img'}\n", "")
    assert cli.json("image", "build", "--force") == {"directory": str(tmp_path / "img"), "manifest": manifest}
    assert builds == [(cli.state_dir, False), (cli.state_dir, True)]


@pytest.mark.parametrize("build", [True, False])
def test_serve_wires_the_controller_to_the_server_with_the_admin_socket_and_closes_it(
        cli: Cli, monkeypatch: pytest.MonkeyPatch, build: bool) -> None:
    from vmsandbox.sandbox.controller import state_dir_owner
    from vmsandbox.task.sockets import TaskServingController

    calls: list[dict[str, object]] = []

    class Server:
        socket_path = "/run/test.sock"

        def install_signal_handlers(self) -> None:
            calls[-1]["signals"] = True

        def wait(self) -> None:
            calls[-1]["owner while serving"] = state_dir_owner(cli.state_dir)

    def serve(ctl: TaskServingController, socket: str, **kwargs: object) -> Server:
        # containerd gets the controller wrapped to serve the task API; the CLI's admin, the controller.
        assert isinstance(ctl, TaskServingController) and ctl.sockets.run_dir == cli.rig.config.run_dir
        calls.append({"socket": socket, "admin is the controller": kwargs.pop("admin") is ctl.inner, **kwargs})
        return Server()

    monkeypatch.setattr("vmsandbox.server.serve", serve)
    builds = cli.rig.images.builds
    argv = ["serve", "--socket", "/run/test.sock", "--socket-group", "kube", "--max-workers", "7"]
    assert cli(*argv, *([] if build else ["--no-build-image"])) == (0, "", "")
    assert calls == [{"socket": "/run/test.sock", "admin is the controller": True, "socket_group": "kube",
                      "max_workers": 7, "admin_socket_path": str(cli.state_dir / "admin.sock"), "signals": True,
                      "owner while serving": os.getpid()}]
    assert cli.rig.images.builds == builds + (1 if build else 0)
    assert state_dir_owner(cli.state_dir) is None  # the controller was closed: the state dir is free again


@pytest.mark.parametrize("given, want", [(None, "unix:///run/containerd/containerd.sock"),
                                         ("/run/c/containerd.sock", "unix:///run/c/containerd.sock"), ("", None)])
def test_serve_publishes_the_task_events_to_containerds_address(
        cli: Cli, monkeypatch: pytest.MonkeyPatch, given: str | None, want: str | None) -> None:
    import threading

    from vmsandbox.server.events import ContainerdEvents
    from vmsandbox.task.events import NO_EVENTS
    from vmsandbox.task.sockets import TaskServingController

    sinks: list[object] = []

    class Server:
        socket_path = "/run/test.sock"

        def install_signal_handlers(self) -> None:
            pass

        def wait(self) -> None:
            pass

    def serve(ctl: TaskServingController, socket: str, **kwargs: object) -> Server:
        sinks.append(ctl.sockets._events)
        return Server()

    monkeypatch.setattr("vmsandbox.server.serve", serve)
    monkeypatch.delenv("VMSANDBOX_CONTAINERD_ADDRESS", raising=False)
    given_args = [] if given is None else ["--containerd-address", given]
    assert cli("serve", "--socket", "/run/test.sock", "--no-build-image", *given_args) == (0, "", "")
    (sink,) = sinks
    if want is None:
        assert sink is NO_EVENTS
    else:
        assert isinstance(sink, ContainerdEvents) and sink.address == want
    assert not [t for t in threading.enumerate() if t.name == "vsbx-events"]  # closed with serve


# --------------------------------------------------------------------------- local or remote
def test_without_an_owner_a_leftover_admin_socket_is_ignored(cli: Cli) -> None:
    (cli.state_dir / "admin.sock").write_text("")
    assert cli("create", "a") == (0, "created a\n", "")
    assert cli("shutdown", "a") == (0, "removed a\n", "")


def test_reading_commands_next_to_an_owner_with_a_stale_admin_socket_read_the_state_dir(
        cli: Cli, holder: SandboxController) -> None:
    (cli.state_dir / "admin.sock").write_text("")
    code, out, _ = cli("list")
    assert code == 0 and out.split()[:3] == ["held", "running", "SANDBOX_READY"]


# --------------------------------------------------------------------------- doctor
class StubHypervisor:
    """Stands in for the libvirt adapter: answers as libvirtd would, or is ``down``."""

    down: Exception | None = None
    made: list[tuple[str, float]] = []

    def __init__(self, uri: str, *, connect_timeout: float) -> None:
        StubHypervisor.made.append((uri, connect_timeout))
        if self.down is not None:
            raise self.down

    def host_info(self) -> dict[str, str]:
        return {"libvirt_version": "9.0.0", "hypervisor": "QEMU", "hypervisor_version": "7.2.0"}

    def close(self) -> None:
        pass


@pytest.fixture
def host(monkeypatch: pytest.MonkeyPatch) -> type[StubHypervisor]:
    """A host with every tool doctor looks for, run as root, and a libvirtd that answers."""
    monkeypatch.setattr("vmsandbox.hypervisor.libvirt_driver.LibvirtHypervisor", StubHypervisor)
    monkeypatch.setattr(StubHypervisor, "down", None)
    monkeypatch.setattr(StubHypervisor, "made", [])
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr("shutil.which", lambda tool: f"/usr/bin/{tool}")
    return StubHypervisor


DOCTOR_CHECKS = ["root", "libvirtd", "accelerator", "/dev/kvm access", "network namespaces", "mkfs.ext4", "gcc",
                 "cpio", "busybox", "dropbear", "crun", "apt-get", "virtiofsd", "guest image"]


def test_doctor_on_a_ready_host(cli: Cli, host: type[StubHypervisor]) -> None:
    doc = cli.json("--uri", "test:///doctor", "--virt-type", "qemu", "doctor")
    assert isinstance(doc, dict) and doc["ok"] is True
    checks = {c["name"]: c for c in doc["checks"]}
    assert [c["name"] for c in doc["checks"]] == DOCTOR_CHECKS
    assert checks["libvirtd"] == {"name": "libvirtd", "ok": True, "required": True,
                                  "detail": "test:///doctor answers (libvirt 9.0.0, QEMU 7.2.0)"}
    assert checks["accelerator"]["detail"] == "TCG (software emulation; KVM not usable here)"
    assert checks["gcc"]["detail"] == "/usr/bin/gcc"
    assert (checks["guest image"]["ok"], checks["guest image"]["required"]) == (False, False)
    assert host.made == [("test:///doctor", 3.0)]
    code, out, _ = cli("--virt-type", "kvm", "doctor")
    assert code == 0 and "ok   accelerator          KVM\n" in out
    assert "warn  guest image          not built yet (vmsandbox image build)\n" in out


def test_doctor_exits_1_and_says_what_is_missing(cli: Cli, host: type[StubHypervisor],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    host.down = errors.Unavailable("cannot connect")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr("shutil.which", lambda tool: None if tool in ("gcc", "/usr/lib/qemu/virtiofsd") else f"/usr/bin/{tool}")
    code, out, err = cli("--uri", "test:///down", "doctor")
    lines = out.splitlines()
    assert code == 1 and err == "" and len(lines) == len(DOCTOR_CHECKS)
    assert "MISSING  root                 run as root (libvirt system, netns, taps)" in lines
    assert "MISSING  libvirtd             test:///down: cannot connect (start it: hack/setup.sh)" in lines
    assert "MISSING  gcc                  missing (hack/setup.sh installs it)" in lines
    assert "MISSING  virtiofsd            /usr/lib/qemu/virtiofsd missing (qemu-system-common; hack/setup.sh)" in lines
    assert "ok   cpio                 /usr/bin/cpio" in lines
    code, out, _ = cli("--json", "doctor")
    assert code == 1 and json.loads(out)["ok"] is False


def test_doctor_checks_containerd_when_asked(cli: Cli, host: type[StubHypervisor], tmp_path: Path) -> None:
    code, out, _ = cli("--json", "doctor", "--containerd", str(tmp_path / "no-such.sock"))
    doc = json.loads(out)
    assert code == 1 and doc["ok"] is False
    assert [c["name"] for c in doc["checks"]] == [*DOCTOR_CHECKS, "containerd"]
    last = doc["checks"][-1]
    assert last["required"] and not last["ok"] and last["detail"].startswith(f"no CRI answer on {tmp_path}/no-such.sock")


@pytest.mark.parametrize("words, split", [
    pytest.param(["list"], (["list"], None), id="none"),
    pytest.param(["exec", "a", "--"], (["exec", "a"], []), id="empty-command"),
    pytest.param(["exec", "a", "--env", "K=V", "--", "sh", "--", "-c"], (["exec", "a", "--env", "K=V"], ["sh", "--", "-c"]),
                 id="first-one-only"),
])
def test_split_command(words: list[str], split: tuple[list[str], list[str] | None]) -> None:
    from vmsandbox.cli.parser import split_command

    assert split_command(words) == split


def test_image_warm_builds_the_template_once_and_says_so(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("vmsandbox.sandbox.templates._SETTLE", 0.0)
    first = cli.json("image", "warm", "--memory-mib", "384")
    assert isinstance(first, dict) and first["built"] is True and first["build_seconds"] >= 0
    assert (Path(first["path"]) / "memory.save").is_file()
    code, out, _ = cli("image", "warm", "--memory-mib", "384")
    assert code == 0 and out == f"template {first['key']}: ready ({first['path']})\n"
    assert cli("image", "warm", "--memory-mib", "1")[0] != 0  # InvalidArgument: too small


# --------------------------------------------------------------------------- exec streams (see test_cli_stream.py)
def test_exec_options_env_file_user_and_workdir(cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cli("create", "a")
    cli("start", "a")
    (tmp_path / "env").write_text("# ours\nA=from-file\nB=file\nHOME_DIR\n")
    monkeypatch.setenv("HOME_DIR", "/root")
    assert cli("exec", "--env-file", str(tmp_path / "env"), "--env", "B=flag", "-u", "1000:100",
               "-w", "/srv", "a", "--", "env")[0] == 0
    (proc,) = cli.rig.guests.processes
    c = proc.call
    assert (c.argv, c.env, c.user, c.cwd, c.tty) == (("env",), {"A": "from-file", "B": "flag", "HOME_DIR": "/root"},
                                                     "1000:100", "/srv", False)
    code, _, err = cli("exec", "--env-file", str(tmp_path / "missing"), "a", "--", "env")
    assert code == 1 and err.startswith("vmsandbox: InvalidArgument: --env-file ")


def test_exec_with_a_tty_needs_a_terminal_on_stdin(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    cli("create", "a")
    cli("start", "a")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))
    code, out, err = cli("exec", "-it", "a", "--", "sh")
    assert (code, out) == (1, "") and err.startswith("vmsandbox: InvalidArgument: the input device is not a terminal")
    assert cli.rig.guests.processes == []


def test_exec_timeout_stops_the_command(cli: Cli) -> None:
    cli("create", "a")
    cli("start", "a")
    cli.rig.guests.on_spawn = lambda proc: None  # it never ends
    code, _, err = cli("exec", "--timeout", "0.3", "a", "--", "sleep", "100")
    assert code == 1 and err.startswith("vmsandbox: DeadlineExceeded: ")
    (proc,) = cli.rig.guests.processes
    assert proc.aborted  # nothing left running
