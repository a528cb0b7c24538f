"""The admin socket and RemoteController over a real unix socket, with the in-memory fake.

This is what the CLI on a node uses when `vmsandbox serve` owns the state dir: results come
back typed, errors come back as the vmsandbox.errors class the server raised, and the admin
socket is root-only even when containerd's socket is shared with a group.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.unit.test_server_rpc import T0, FakeController
from vmsandbox import errors
from vmsandbox.model import ExecResult, Phase, SandboxState, SandboxSummary
from vmsandbox.server import ControllerServer, serve
from vmsandbox.server.client import RemoteController


@dataclass
class FakeAdmin(FakeController):
    execs: list[tuple[str, list[str], dict[str, str], str | None, bytes | None, float | None]] = field(
        default_factory=list)
    console: bytes = b"line one\nline two\n"

    def list(self) -> list[SandboxSummary]:
        return [SandboxSummary(id=i, phase=Phase.RUNNING if r.phase == "running" else Phase.CREATED,
                               state=SandboxState.READY if r.phase == "running" else SandboxState.NOTREADY,
                               pid=4242, created_at=T0) for i, r in sorted(self.records.items())]

    def exec(self, sandbox_id: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
             cwd: str | None = None, stdin: bytes | None = None, timeout: float | None = None) -> ExecResult:
        self._get(sandbox_id)
        self.execs.append((sandbox_id, list(argv), dict(env or {}), cwd, stdin, timeout))
        if argv[0] == "slow":
            raise errors.DeadlineExceeded("command timed out", sandbox_id=sandbox_id)
        return ExecResult(exit_code=3, stdout=b"out" + (stdin or b""), stderr=b"err")

    def read_console_log(self, sandbox_id: str, max_bytes: int = 0) -> bytes:
        self._get(sandbox_id)
        return self.console[-max_bytes:] if max_bytes else self.console


@pytest.fixture
def admin(tmp_path: Path) -> Iterator[tuple[FakeAdmin, ControllerServer, RemoteController]]:
    fake = FakeAdmin()
    srv = serve(fake, str(tmp_path / "ctl.sock"), socket_group="0", wait_poll_interval=0.05,
                admin=fake, admin_socket_path=str(tmp_path / "admin.sock"))
    remote = RemoteController(str(tmp_path / "admin.sock"))
    try:
        yield fake, srv, remote
    finally:
        remote.close()
        srv.stop()


def test_admin_socket_is_root_only_and_removed_at_stop(admin, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, srv, _ = admin
    assert srv.admin_socket_path == str(tmp_path / "admin.sock")
    assert stat.S_IMODE(os.stat(tmp_path / "admin.sock").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "ctl.sock").st_mode) == 0o660  # containerd's may be shared
    srv.stop()
    assert not (tmp_path / "admin.sock").exists() and not (tmp_path / "ctl.sock").exists()


def test_list_exec_and_logs_through_the_admin_socket(admin) -> None:  # type: ignore[no-untyped-def]
    fake, _, remote = admin
    fake.add("a")
    fake.add("b", phase="created")
    remote.ping()
    rows = remote.list()
    assert [(r.id, r.phase, r.state, r.pid, r.created_at, r.exited_at) for r in rows] == [
        ("a", Phase.RUNNING, SandboxState.READY, 4242, T0, None),
        ("b", Phase.CREATED, SandboxState.NOTREADY, 4242, T0, None)]
    res = remote.exec("a", ["sh", "-c", "x"], env={"K": "V"}, cwd="/tmp", stdin=b"in", timeout=7.5)
    assert res == ExecResult(3, b"outin", b"err")
    assert fake.execs[-1] == ("a", ["sh", "-c", "x"], {"K": "V"}, "/tmp", b"in", 7.5)
    remote.exec("a", ["true"])
    assert fake.execs[-1] == ("a", ["true"], {}, None, None, None)  # no stdin is not empty stdin
    assert remote.read_console_log("a") == b"line one\nline two\n"
    assert remote.read_console_log("a", 9) == b"line two\n"


def test_controller_calls_through_the_admin_socket(admin) -> None:  # type: ignore[no-untyped-def]
    fake, _, remote = admin
    fake.add("a")
    st = remote.status("a", verbose=True)
    assert (st.state, st.pid, st.info, st.created_at, st.version) == ("SANDBOX_READY", 4242, {"verbose": "True"}, T0, 3)
    assert remote.platform("a").os == "linux"
    assert remote.metrics("a").id == "a"
    with pytest.raises(errors.DeadlineExceeded):
        remote.wait("a", timeout=0.3)
    remote.stop("a", timeout=4)
    assert fake.last("stop") == ("a", 4.0)
    assert remote.wait("a").exit_status == 0
    remote.shutdown("a")
    assert "a" not in fake.records


@pytest.mark.parametrize("call, cls", [
    (lambda r: r.exec("nope", ["true"]), errors.NotFound),
    (lambda r: r.exec("a", []), errors.InvalidArgument),
    (lambda r: r.exec("a", ["slow"]), errors.DeadlineExceeded),
    (lambda r: r.status("nope"), errors.NotFound),
    (lambda r: r.read_console_log("nope"), errors.NotFound),
])
def test_errors_come_back_as_their_class(admin, call, cls) -> None:  # type: ignore[no-untyped-def]
    fake, _, remote = admin
    fake.add("a")
    with pytest.raises(cls):
        call(remote)


def test_a_server_that_is_gone_is_unavailable(tmp_path: Path) -> None:
    remote = RemoteController(str(tmp_path / "admin.sock"))
    with pytest.raises(errors.Unavailable, match="does not answer"):
        remote.ping(timeout=1)
    remote.close()
