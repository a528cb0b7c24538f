"""The exec request format shared by the host (encode_exec_request) and the guest (vsbx-exec).

The first half decodes requests in Python the way images/agent/agent.c does. The second half
compiles the real agent and runs its ``vsbx-exec`` personality on the host (with the "run in
the guest root" token, so it never chroots), proving both sides agree byte for byte.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vmsandbox import InvalidArgument
from vmsandbox.guest.agent import DEFAULT_PATH, EXEC_TIMEOUT_EXIT, encode_exec_request

REPO = Path(__file__).resolve().parents[2]

TRICKY_ARGV = [
    "printf",
    "%s|\n",
    "two words",
    "'single'",
    '"double"',
    "$(id -u)",
    "`uname`",
    "a;b && c || d",
    "*",
    "~",
    "back\\slash",
    "new\nline",
    "tab\there",
    "",
    "-n",
    "ünïcødé ✓",
    "$HOME",
    "x=y",
]


@dataclass
class Request:
    argv: list[str] = field(default_factory=list)
    env: list[str] = field(default_factory=list)
    cwd: str | None = None
    timeout_ms: int | None = None
    in_root: bool = False
    pidfile: str | None = None
    console: str | None = None


def decode(request: str) -> Request:
    """Parse a request as vsbx-exec does: 'vsbx1', then <kind><hex> tokens split by spaces."""
    assert request.startswith("vsbx1 ")
    out = Request()
    for tok in request[len("vsbx1"):].split(" "):
        if not tok:
            continue
        kind, val = tok[0], bytes.fromhex(tok[1:]).decode()
        if kind == "a":
            out.argv.append(val)
        elif kind == "e":
            out.env.append(val)
        elif kind == "c":
            out.cwd = val
        elif kind == "t":
            out.timeout_ms = int(val)
        elif kind == "r":
            out.in_root = True
        elif kind == "p":
            out.pidfile = val
        elif kind == "y":
            out.console = val
        else:
            raise AssertionError(f"unknown token {tok!r}")
    return out


def test_argv_round_trips_verbatim() -> None:
    assert decode(encode_exec_request(TRICKY_ARGV)).argv == TRICKY_ARGV


def test_request_has_no_shell_or_ssh_sensitive_characters() -> None:
    req = encode_exec_request(TRICKY_ARGV, env={"A": "$(x); `y`"}, cwd="/tmp/a b", timeout=3)
    assert re.fullmatch(r"vsbx1( [aecrt][0-9a-f]*)+", req), req
    sup = encode_exec_request(["crun", "create"], supervise_pidfile="/run/a b/$(x)")
    assert re.fullmatch(r"vsbx1( [aecrtp][0-9a-f]*)+", sup), sup


def test_default_environment() -> None:
    r = decode(encode_exec_request(["true"]))
    assert r.env == [f"PATH={DEFAULT_PATH}", "HOME=/root", "TERM=dumb"]
    assert (r.cwd, r.timeout_ms, r.in_root) == (None, None, False)


def test_environment_overrides_and_additions_keep_values_verbatim() -> None:
    env = {"PATH": "/opt/bin", "EMPTY": "", "EQ": "a=b=c", "SPACE": "x y", "NL": "1\n2", "UNI": "ø"}
    r = decode(encode_exec_request(["env"], env=env))
    got = dict(e.split("=", 1) for e in r.env)
    assert got == {"HOME": "/root", "TERM": "dumb", **env}
    assert len(r.env) == len(got)  # PATH replaced, not duplicated


def test_cwd_timeout_and_guest_root_tokens() -> None:
    r = decode(encode_exec_request(["ls"], cwd="/srv/my dir", timeout=2.5, in_guest_root=True))
    assert (r.cwd, r.timeout_ms, r.in_root) == ("/srv/my dir", 2500, True)


def test_supervise_token_carries_the_pid_file_verbatim() -> None:
    assert decode(encode_exec_request(["crun"], supervise_pidfile="/run/vsbx/c/x y.pid")).pidfile == "/run/vsbx/c/x y.pid"
    assert decode(encode_exec_request(["crun"])).pidfile is None


def test_console_token_carries_the_socket_path_and_needs_a_pid_file() -> None:
    r = decode(encode_exec_request(["crun"], supervise_pidfile="/run/p.pid", console_socket="/run/vsbx/tty-1.sock"))
    assert (r.pidfile, r.console) == ("/run/p.pid", "/run/vsbx/tty-1.sock")
    for bad in ({"console_socket": "/run/x.sock"}, {"supervise_pidfile": "/p", "console_socket": "rel.sock"},
                {"supervise_pidfile": "/p", "console_socket": "/" + "x" * 107}):
        with pytest.raises(InvalidArgument):
            encode_exec_request(["crun"], **bad)  # type: ignore[arg-type]


def test_a_tiny_timeout_is_still_at_least_one_millisecond() -> None:
    assert decode(encode_exec_request(["true"], timeout=0.0001)).timeout_ms == 1


@pytest.mark.parametrize(
    ("argv", "kwargs"),
    [
        ([], {}),
        (["a", 1], {}),
        ([b"ls"], {}),
        (["a\0b"], {}),
        (["x"] * 1001, {}),
        (["ls"], {"env": {"": "x"}}),
        (["ls"], {"env": {"A=B": "x"}}),
        (["ls"], {"env": {"A": "x\0"}}),
        (["ls"], {"cwd": "relative"}),
        (["ls"], {"cwd": ""}),
        (["ls"], {"cwd": "/a\0b"}),
        (["ls"], {"supervise_pidfile": "relative.pid"}),
        (["ls"], {"supervise_pidfile": "/a\0b"}),
    ],
)
def test_malformed_requests_are_refused(argv: Sequence[object], kwargs: Mapping[str, object]) -> None:
    with pytest.raises(InvalidArgument):
        encode_exec_request(argv, **kwargs)  # type: ignore[arg-type]


def test_a_thousand_arguments_are_fine() -> None:
    assert len(decode(encode_exec_request(["x"] * 1000)).argv) == 1000


# ---------------------------------------------------------------- the real vsbx-exec


@pytest.fixture(scope="module")
def vsbx_exec(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("needs gcc to build the guest agent")
    if os.path.exists("/run/vsbx/rootfs-ready"):
        pytest.skip("this host looks like a vmsandbox guest")
    d = tmp_path_factory.mktemp("agent")
    subprocess.run(["gcc", "-O1", "-o", str(d / "vsbx-agent"), str(REPO / "images" / "agent" / "agent.c")],
                   check=True, capture_output=True)
    (d / "vsbx-exec").symlink_to("vsbx-agent")
    return d / "vsbx-exec"


def run(exe: Path, request: str, stdin: bytes = b"", timeout: float = 20) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(exe), "-c", request], input=stdin, capture_output=True, timeout=timeout)


def req(argv: Sequence[str], **kw: object) -> str:
    return encode_exec_request(argv, in_guest_root=True, **kw)  # type: ignore[arg-type]


def test_guest_passes_argv_verbatim_without_a_shell(vsbx_exec: Path) -> None:
    p = run(vsbx_exec, req(TRICKY_ARGV))
    assert p.returncode == 0, p.stderr
    assert p.stdout.decode() == "".join(f"{a}|\n" for a in TRICKY_ARGV[2:])


def test_guest_exit_codes_and_signals(vsbx_exec: Path) -> None:
    assert run(vsbx_exec, req(["sh", "-c", "exit 7"])).returncode == 7
    assert run(vsbx_exec, req(["sh", "-c", "kill -9 $$"])).returncode == 128 + 9
    missing = run(vsbx_exec, req(["/no/such/program"]))
    assert missing.returncode == 127
    assert b"/no/such/program" in missing.stderr


def test_guest_environment_is_exactly_the_requested_one(vsbx_exec: Path) -> None:
    p = run(vsbx_exec, req(["env"], env={"FOO": "bar baz", "EQ": "a=b"}))
    lines = set(p.stdout.decode().splitlines())
    assert {"FOO=bar baz", "EQ=a=b", "HOME=/root", "TERM=dumb", f"PATH={DEFAULT_PATH}"} <= lines
    assert not any(line.startswith(("PYTEST", "VIRTUAL_ENV")) for line in lines), "the host's env leaked"


def test_guest_cwd_stdin_and_stderr(vsbx_exec: Path, tmp_path: Path) -> None:
    d = tmp_path / "a dir"
    d.mkdir()
    assert run(vsbx_exec, req(["pwd"], cwd=str(d))).stdout == f"{d}\n".encode()
    data = bytes(range(256)) * 1000
    assert run(vsbx_exec, req(["cat"]), stdin=data).stdout == data
    p = run(vsbx_exec, req(["sh", "-c", "echo out; echo err >&2"]))
    assert (p.stdout, p.stderr) == (b"out\n", b"err\n")
    bad = run(vsbx_exec, req(["pwd"], cwd=str(tmp_path / "missing")))
    assert bad.returncode == 126 and b"chdir" in bad.stderr


def test_guest_timeout_kills_the_whole_process_group(vsbx_exec: Path, tmp_path: Path) -> None:
    marker = tmp_path / "survivor"
    t0 = time.monotonic()
    p = run(vsbx_exec, req(["sh", "-c", f"(sleep 3; touch '{marker}') & sleep 30"], timeout=1))
    assert p.returncode == EXEC_TIMEOUT_EXIT
    assert time.monotonic() - t0 < 10
    time.sleep(3.5)
    assert not marker.exists(), "a child of the timed-out command survived"


@pytest.mark.parametrize("request_text", ["ls -la", "vsbx1 aZZ", "vsbx1 a6", "vsbx1 q00", "vsbx1", "vsbx1 e41"])
def test_guest_refuses_anything_but_a_well_formed_request(vsbx_exec: Path, request_text: str) -> None:
    assert run(vsbx_exec, request_text).returncode == 126


# ---------------------------------------------------------------- supervision (token p)
# crun create forks the container init and exits; these helpers double-fork the same way.


def test_supervised_daemon_status_and_output_are_the_requests(vsbx_exec: Path, tmp_path: Path) -> None:
    pidfile = tmp_path / "init.pid"
    script = 'sh -c "sleep 1; echo late; exit 5" & echo $! > "$0"'
    t0 = time.monotonic()
    p = run(vsbx_exec, req(["sh", "-c", script, str(pidfile)], supervise_pidfile=str(pidfile)))
    assert p.returncode == 5, p.stderr
    assert time.monotonic() - t0 >= 1.0, "returned before the daemon ended"
    assert p.stdout == b"late\n"
    assert (tmp_path / "init.pid.ready").read_text() == pidfile.read_text()
    assert not (tmp_path / "init.pid.ready.tmp").exists()


def test_supervised_daemon_killed_by_a_signal_is_128_plus_n(vsbx_exec: Path, tmp_path: Path) -> None:
    pidfile = tmp_path / "init.pid"
    script = 'sh -c "sleep 0.3; kill -9 \\$\\$" & echo $! > "$0"'
    p = run(vsbx_exec, req(["sh", "-c", script, str(pidfile)], supervise_pidfile=str(pidfile)))
    assert p.returncode == 128 + 9, p.stderr


def test_supervision_of_a_failed_or_pidless_create(vsbx_exec: Path, tmp_path: Path) -> None:
    pidfile = tmp_path / "init.pid"
    failed = run(vsbx_exec, req(["sh", "-c", "echo no >&2; exit 4"], supervise_pidfile=str(pidfile)))
    assert (failed.returncode, failed.stderr) == (4, b"no\n")
    assert not (tmp_path / "init.pid.ready").exists()
    pidless = run(vsbx_exec, req(["true"], supervise_pidfile=str(pidfile)))
    assert pidless.returncode == 126 and b"no valid pid" in pidless.stderr


def test_supervised_daemon_is_killed_at_the_timeout(vsbx_exec: Path, tmp_path: Path) -> None:
    pidfile = tmp_path / "init.pid"
    script = 'sh -c "sleep 30" & echo $! > "$0"'
    t0 = time.monotonic()
    p = run(vsbx_exec, req(["sh", "-c", script, str(pidfile)], supervise_pidfile=str(pidfile), timeout=1))
    assert p.returncode == EXEC_TIMEOUT_EXIT
    assert time.monotonic() - t0 < 10
    pid = int(pidfile.read_text())
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


def test_user_is_token_u_in_hex_and_bad_users_are_refused():
    from vmsandbox.guest.agent import encode_exec_request

    cmd = encode_exec_request(["id"], user="nobody:nogroup")
    assert cmd.split()[-1] == "u" + b"nobody:nogroup".hex()
    assert encode_exec_request(["id"], user="1000").split()[-1] == "u" + b"1000".hex()
    for bad in ("", ":", "a:", ":b", "a:b:c", "a\nb", "a\0"):
        with pytest.raises(InvalidArgument):
            encode_exec_request(["id"], user=bad)


def test_signal_names_are_rfc4254_and_others_refused():
    import signal as sig

    from vmsandbox.model import signal_name

    assert signal_name(sig.SIGTERM) == "TERM" and signal_name(9) == "KILL" and signal_name(sig.SIGINT) == "INT"
    for bad in (0, 11, 64, "TERM"):
        with pytest.raises(InvalidArgument):
            signal_name(bad)  # type: ignore[arg-type]
