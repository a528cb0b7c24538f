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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.unit.rig import Rig
from vmsandbox import errors
from vmsandbox.cli import main
from vmsandbox.guest.fake import ExecCall
from vmsandbox.model import ExecResult, Phase, Sandbox
from vmsandbox.sandbox.controller import LOCK_FILE, SandboxController
from vmsandbox.server import ControllerServer, serve


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
    levels = {n: logging.getLogger(n).level for n in ("vmsandbox.config", "paramiko")}
    # main() calls logging.basicConfig: with a handler on the root logger that is a no-op, so
    # log records never mix into the stderr a test compares (with or without pytest's logging).
    quiet = logging.NullHandler()
    logging.getLogger().addHandler(quiet)
    rig = Rig(tmp_path)
    rig.ctl.close()  # each CLI command makes (and owns, while it runs) its own controller
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
    ctl.create(Sandbox("held"))
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
    assert (call.argv, call.env, call.cwd, call.stdin, call.timeout) == (("cat",), {"K": "V", "E": "x=y"}, "/srv",
                                                                        b"input", 9.0)


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
