"""The exec request format shared by the host (encode_exec_request) and the guest (vsbx-exec).

The first half decodes requests in Python the way images/agent/agent.c does. The second half
compiles the real agent and runs its ``vsbx-exec`` personality on the host (with the "run in
the guest root" token, so it never chroots), proving both sides agree byte for byte.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
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
    user: str | None = None


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
        elif kind == "u":
            out.user = val
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


def test_home_defaults_to_root_only_without_a_user() -> None:
    r = decode(encode_exec_request(["id"], user="alice"))
    assert (r.user, r.env) == ("alice", [f"PATH={DEFAULT_PATH}", "TERM=dumb"])  # the guest sets HOME
    assert "HOME=/srv" in decode(encode_exec_request(["id"], user="alice", env={"HOME": "/srv"})).env
    with pytest.raises(InvalidArgument):
        encode_exec_request(["crun"], user="alice", supervise_pidfile="/run/p.pid")


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


# ---------------------------------------------------------------- signals sent to vsbx-exec
# dropbear delivers an SSH "signal" request to vsbx-exec itself with kill(2), as these do.


def started(exe: Path, request: str) -> subprocess.Popen[bytes]:
    """vsbx-exec running ``request``, once its command printed its first line ("ready")."""
    p = subprocess.Popen([str(exe), "-c", request], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    assert p.stdout is not None
    ready, _, _ = select.select([p.stdout], [], [], 20)
    assert ready and p.stdout.readline() == b"ready\n"
    return p


TRAPS = [(sig, f'trap "echo got {sig.name}; exit 3" {sig.name[3:]}; echo ready; while :; do sleep 0.1; done')
         for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)]


@pytest.mark.parametrize(("sig", "script"), TRAPS, ids=[s.name for s, _ in TRAPS])
def test_guest_forwards_a_signal_to_its_command_and_ends_with_the_commands_status(
        vsbx_exec: Path, sig: signal.Signals, script: str) -> None:
    p = started(vsbx_exec, req(["sh", "-c", script]))
    p.send_signal(sig)
    out, err = p.communicate(timeout=20)
    assert (p.returncode, out) == (3, f"got {sig.name}\n".encode()), err


def test_guest_command_killed_by_a_forwarded_signal_is_128_plus_n(vsbx_exec: Path) -> None:
    p = started(vsbx_exec, req(["sh", "-c", "echo ready; exec sleep 100"]))
    p.send_signal(signal.SIGTERM)
    assert p.wait(20) == 128 + signal.SIGTERM


def test_guest_forwards_to_the_whole_process_group(vsbx_exec: Path) -> None:
    p = started(vsbx_exec, req(["sh", "-c", "sleep 100 & echo ready; wait"]))
    t0 = time.monotonic()
    p.send_signal(signal.SIGTERM)
    assert p.wait(20) == 128 + signal.SIGTERM
    assert time.monotonic() - t0 < 10


def test_guest_killed_takes_its_command_along(vsbx_exec: Path) -> None:
    p = started(vsbx_exec, req(["sh", "-c", "echo ready; echo $$; exec sleep 100"]))
    assert p.stdout is not None
    pid = int(p.stdout.readline())
    p.kill()
    assert p.wait(20) == -signal.SIGKILL
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]:
        assert time.monotonic() < deadline, "the command outlived its killed vsbx-exec"
        time.sleep(0.05)


def test_a_supervising_guest_still_ends_on_a_signal(vsbx_exec: Path, tmp_path: Path) -> None:
    """Token p keeps its semantics: a signal ends vsbx-exec, not the daemon."""
    pidfile = tmp_path / "init.pid"
    script = 'sh -c "sleep 30" & echo $! > "$0"; echo ready'
    p = started(vsbx_exec, req(["sh", "-c", script, str(pidfile)], supervise_pidfile=str(pidfile)))
    deadline = time.monotonic() + 10
    while not (tmp_path / "init.pid.ready").exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    assert p.wait(20) == -signal.SIGTERM
    daemon = int(pidfile.read_text())
    try:
        assert Path(f"/proc/{daemon}").exists(), "the daemon went with its supervisor"
    finally:
        os.kill(daemon, signal.SIGKILL)


# ---------------------------------------------------------------- the user (token u), in a chroot
# The guest resolves the user in the root the command runs in; a chroot with a static
# vsbx-exec and busybox stands in for it (root only: chroot(2) and setuid(2)).

PASSWD = """root:x:0:0:root:/root:/sbin/vsbx-exec
alice:x:1000:1000:Alice:/home/alice:/bin/sh
bob:x:1001:1001::/home/bob:/bin/sh
nohome:x:1002:1002::::
"""
GROUP = """root:x:0:
alice:x:1000:
staff:x:50:bob,alice
audio:x:29:alice
bob:x:1001:
"""


@pytest.fixture(scope="module")
def user_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.geteuid() != 0:
        pytest.skip("needs root to chroot and to change ids")
    busybox = Path("/bin/busybox")
    if shutil.which("gcc") is None or not busybox.exists():
        pytest.skip("needs gcc and a static /bin/busybox")
    root = tmp_path_factory.mktemp("guestroot")
    root.chmod(0o755)  # pytest's are 0700: no user but root could reach /bin
    for d in ("sbin", "bin", "etc", "home/alice", "tmp"):
        (root / d).mkdir(parents=True, exist_ok=True)
    subprocess.run(["gcc", "-static", "-O1", "-o", str(root / "sbin" / "vsbx-agent"),
                    str(REPO / "images" / "agent" / "agent.c")], check=True, capture_output=True)
    (root / "sbin" / "vsbx-exec").symlink_to("vsbx-agent")
    shutil.copy(busybox, root / "bin" / "busybox")
    for applet in ("sh", "id", "pwd", "sleep"):
        (root / "bin" / applet).symlink_to("busybox")
    (root / "etc" / "passwd").write_text(PASSWD)
    (root / "etc" / "group").write_text(GROUP)
    os.chown(root / "home" / "alice", 1000, 1000)
    os.chmod(root / "home" / "alice", 0o700)
    return root


SHOW_IDS = ["sh", "-c", 'id -u; id -g; id -G; echo "$HOME"; pwd']


def as_user(root: Path, user: str | None, argv: Sequence[str] = SHOW_IDS, **kw: object) -> tuple[int, list[str], str]:
    p = subprocess.run(["chroot", str(root), "/sbin/vsbx-exec", "-c", req(argv, user=user, **kw)],
                       capture_output=True, timeout=20)
    lines = p.stdout.decode().splitlines()
    return p.returncode, lines, p.stderr.decode()


@pytest.mark.parametrize(("user", "uid", "gid", "groups", "home"), [
    ("alice", "1000", "1000", {"1000", "50", "29"}, "/home/alice"),  # + the groups that list alice
    ("1000", "1000", "1000", {"1000", "50", "29"}, "/home/alice"),  # a uid with an entry is that entry
    ("alice:staff", "1000", "50", {"50"}, "/home/alice"),  # an explicit group: no supplementary ones
    ("1000:29", "1000", "29", {"29"}, "/home/alice"),
    ("alice:4343", "1000", "4343", {"4343"}, "/home/alice"),  # a numeric group needs no entry
    ("4242", "4242", "0", {"0"}, "/"),  # no entry: gid 0, HOME / (runc's defaults)
    ("4242:4343", "4242", "4343", {"4343"}, "/"),
    ("nohome", "1002", "1002", {"1002"}, "/"),
    ("root", "0", "0", {"0"}, "/root"),
])
def test_guest_user_ids_groups_and_home(user_root: Path, user: str, uid: str, gid: str, groups: set[str],
                                        home: str) -> None:
    code, lines, err = as_user(user_root, user)
    assert code == 0, err
    assert (lines[0], lines[1], set(lines[2].split()), lines[3], lines[4]) == (uid, gid, groups, home, "/")


def test_guest_user_keeps_an_explicit_home_and_runs_in_its_cwd(user_root: Path) -> None:
    code, lines, err = as_user(user_root, "alice", env={"HOME": "/tmp"}, cwd="/home/alice")
    assert code == 0, err
    assert lines[3:] == ["/tmp", "/home/alice"]


def test_guest_without_a_user_is_root_with_home_root(user_root: Path) -> None:
    code, lines, err = as_user(user_root, None)
    assert (code, lines[0], lines[1], lines[3]) == (0, "0", "0", "/root"), err


@pytest.mark.parametrize(("user", "message"), [
    ("nosuch", "vsbx-exec: no user nosuch in /etc/passwd"),
    ("nosuch:staff", "vsbx-exec: no user nosuch in /etc/passwd"),
    ("alice:nosuch", "vsbx-exec: no group nosuch in /etc/group"),
])
def test_guest_unknown_user_or_group_is_126_with_a_message(user_root: Path, user: str, message: str) -> None:
    code, lines, err = as_user(user_root, user)
    assert (code, lines, err.strip()) == (126, [], message)


def test_guest_refuses_a_user_for_a_supervised_command(user_root: Path) -> None:
    request = req(["true"], supervise_pidfile="/tmp/p.pid") + " u" + b"alice".hex()
    p = subprocess.run(["chroot", str(user_root), "/sbin/vsbx-exec", "-c", request], capture_output=True, timeout=20)
    assert p.returncode == 126 and b"not for supervised" in p.stderr


def test_guest_user_command_still_dies_with_vsbx_exec(user_root: Path) -> None:
    """setuid(2) clears the parent-death signal; vsbx-exec sets it again."""
    p = subprocess.Popen(["chroot", str(user_root), "/sbin/vsbx-exec", "-c",
                          req(["sh", "-c", "echo ready; echo $$; exec sleep 100"], user="alice")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None
    assert select.select([p.stdout], [], [], 20)[0] and p.stdout.readline() == b"ready\n"
    pid = int(p.stdout.readline())
    assert Path(f"/proc/{pid}/status").read_text().count("\t1000\t") >= 1  # Uid: line, as alice
    p.kill()  # chroot exec()s vsbx-exec: this is vsbx-exec
    p.wait(20)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]:
        assert time.monotonic() < deadline, "the user's command outlived its killed vsbx-exec"
        time.sleep(0.05)
