"""CRI's streaming Exec and Attach, as `kubectl exec -it`, `crictl exec -it` and `kubectl attach`
use them: RuntimeService.Exec / Attach give a URL on containerd's stream server, and the client
speaks remotecommand v4 over WebSocket to it (tests/cri/remotecommand.py).

One pod for all (a pod boot costs ~6-10 s under TCG): a plain container the execs run in, and
a tty + stdin container whose `sh` the attach types into.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cri.conftest import Pods
from tests.cri.harness import BUSYBOX_IMAGE, Containerd
from tests.cri.test_pod_containers import guest_ps, until
from tests.cri.remotecommand import STDERR, STDOUT, Session
from tests.serve import Serve
from vmsandbox.proto.k8s.runtime.v1 import api_pb2 as cri

pytestmark = pytest.mark.integration


class Pod:
    def __init__(self, ctd: Containerd, pod: str, cfg: cri.PodSandboxConfig) -> None:
        self.ctd, self.pod, self.cfg = ctd, pod, cfg
        self.plain = ""  # the container the execs run in
        self.netns = f"/run/netns/{ctd.node_ns}"  # where containerd's stream server listens

    def container(self, name: str, cmd: list[str], **kw: object) -> str:
        rt = self.ctd.runtime()
        ccfg = cri.ContainerConfig(metadata=cri.ContainerMetadata(name=name), image=cri.ImageSpec(image=BUSYBOX_IMAGE),
                                   command=cmd, log_path=f"{name}.log", **kw)  # type: ignore[arg-type]
        cid = str(rt.CreateContainer(cri.CreateContainerRequest(pod_sandbox_id=self.pod, config=ccfg,
                                                                sandbox_config=self.cfg), timeout=120).container_id)
        rt.StartContainer(cri.StartContainerRequest(container_id=cid), timeout=120)
        return cid

    def exec(self, cid: str, cmd: list[str], tty: bool = False, stdin: bool = False) -> Session:
        url = self.ctd.runtime().Exec(cri.ExecRequest(container_id=cid, cmd=cmd, tty=tty, stdin=stdin, stdout=True,
                                                      stderr=not tty), timeout=60).url
        return Session(url, netns=self.netns)

    def attach(self, cid: str) -> Session:
        url = self.ctd.runtime().Attach(cri.AttachRequest(container_id=cid, tty=True, stdin=True, stdout=True),
                                        timeout=60).url
        return Session(url, netns=self.netns)


@pytest.fixture(scope="module")
def pod(containerd: Containerd, cri_root: Path) -> Iterator[Pod]:
    pods = Pods(containerd, cri_root / "logs")
    try:
        cfg = pods.config(f"stream-{secrets.token_hex(2)}")
        p = Pod(containerd, pods.run(cfg), cfg)
        p.plain = p.container("plain", ["sleep", "3600"])
        yield p
    finally:
        pods.cleanup()


def test_exec_without_tty_or_stdin_gives_stdout_stderr_and_the_exit_code(pod: Pod) -> None:
    with pod.exec(pod.plain, ["sh", "-c", "echo out; echo err >&2; exit 3"]) as s:
        r = s.wait()
    assert r.stdout == b"out\n" and r.stderr == b"err\n", r
    assert r.status is not None and r.status["reason"] == "NonZeroExitCode", r.status
    assert r.exit_code == 3, r.status


def test_exec_success_status(pod: Pod) -> None:
    with pod.exec(pod.plain, ["true"]) as s:
        r = s.wait()
    assert r.status == {"metadata": {}, "status": "Success"} and r.exit_code == 0, r


def test_exec_with_stdin_no_tty_reads_what_is_sent(pod: Pod) -> None:
    # remotecommand v4 (all containerd 2.1's stream server offers) cannot half-close stdin:
    # the command reads a known number of bytes instead of up to EOF.
    data = b"hello over stdin\n" * 3
    with pod.exec(pod.plain, ["head", "-c", str(len(data))], stdin=True) as s:
        s.stdin(data[:10])
        s.stdin(data[10:])
        r = s.wait()
    assert r.stdout == data and r.stderr == b"" and r.exit_code == 0, r


def test_exec_with_tty_and_stdin_resizes_and_exits_with_the_shells_code(pod: Pod) -> None:
    with pod.exec(pod.plain, ["sh"], tty=True, stdin=True) as s:
        s.resize(111, 33)
        s.stdin("stty size; tty; exit 7\n")
        r = s.wait()
    out = r.stdout.decode(errors="replace")
    assert "33 111" in out and re.search(r"/dev/pts/\d+", out), out
    assert STDERR not in r.out, r  # a terminal has one output stream
    assert r.exit_code == 7, r.status


def test_attach_to_a_tty_container_types_into_its_shell(pod: Pod) -> None:
    cid = pod.container("term", ["sh"], tty=True, stdin=True)
    with pod.attach(cid) as s:
        s.resize(90, 20)
        s.stdin("echo attached-$((6*7)); stty size\n")
        s.until(b"attached-42", STDOUT)
        s.until(b"20 90", STDOUT)
    # A second attach sees the same shell (the first one's detach left it running).
    with pod.attach(cid) as s:
        s.stdin("echo again-$((2+3))\n")
        s.until(b"again-5", STDOUT)


def test_tty_exec_resized_mid_session_and_interrupted_by_ctrl_c(pod: Pod, serve: Serve) -> None:
    with pod.exec(pod.plain, ["sh"], tty=True, stdin=True) as s:
        s.resize(111, 33)
        s.stdin("stty size\n")
        s.until(b"33 111")
        s.resize(70, 25)  # `kubectl exec -it` sends one at each SIGWINCH of the user's terminal
        s.stdin("stty size\n")
        s.until(b"25 70")
        # The ^C once sleep runs (exec'd, so the shell made its group the terminal's
        # foreground one): earlier, the shell's line editor (no ISIG) or the shell itself
        # would take it, and sleep would run on (seen under TCG).
        s.stdin("sleep 301; echo slept-$((2*3))\n")
        until("sleep 301 running", lambda: any(line.endswith(" sleep 301") for line in guest_ps(serve, pod.pod)), 60)
        s.stdin("\x03")  # ^C: the terminal's line discipline makes it SIGINT for the foreground job
        s.stdin("echo rc=$?\n")
        s.until(b"rc=130", timeout=30)
        s.stdin("exit\n")
        r = s.wait()
    assert b"slept-6" not in r.stdout and r.exit_code == 0, r


def test_exec_exit_by_signal(pod: Pod) -> None:
    with pod.exec(pod.plain, ["sh", "-c", "kill -9 $$"]) as s:
        r = s.wait()
    assert r.exit_code == 137, r.status


def test_exec_large_stdout_and_binary_stdin_arrive_whole(pod: Pod) -> None:
    with pod.exec(pod.plain, ["seq", "1", "60000"]) as s:
        r = s.wait(timeout=120)
    assert r.stdout == "".join(f"{i}\n" for i in range(1, 60001)).encode() and r.exit_code == 0, len(r.stdout)
    data = os.urandom(200_000)
    with pod.exec(pod.plain, ["sh", "-c", f"head -c {len(data)} | md5sum"], stdin=True) as s:
        for at in range(0, len(data), 16384):
            s.stdin(data[at:at + 16384])
        r = s.wait(timeout=120)
    assert r.stdout.split()[0].decode() == hashlib.md5(data).hexdigest() and r.exit_code == 0, r


def test_a_client_that_goes_away_ends_its_interactive_exec(pod: Pod, serve: Serve) -> None:
    # `kubectl exec -i` whose user closes the terminal: the stream ends, containerd closes
    # the exec's stdin (CloseIO), the shell reads EOF and exits. (With a tty containerd does
    # not: it drops only its own stdout reader (internal/cri/io/exec_io.go, `StdinOnce &&
    # !Tty`), so an idle shell stays, as under runc.)
    mark = f"mark-{secrets.token_hex(4)}"
    with pod.exec(pod.plain, ["sh", "-s", mark], stdin=True) as s:
        s.stdin("echo ready-$((1+1))\n")
        s.until(b"ready-2")
        assert any(mark in line for line in guest_ps(serve, pod.pod))
    until(f"the exec's shell ({mark}) gone", lambda: not any(mark in line for line in guest_ps(serve, pod.pod)), 60)


def test_attach_to_a_container_with_stdin_and_no_tty(pod: Pod) -> None:
    cid = pod.container("pipe", ["sh", "-c", 'while read l; do echo "got:$l"; echo "err:$l" >&2; done'], stdin=True)
    url = pod.ctd.runtime().Attach(cri.AttachRequest(container_id=cid, stdin=True, stdout=True, stderr=True),
                                   timeout=60).url
    with Session(url, netns=pod.netns) as s:
        s.stdin("one\n")
        s.until(b"got:one", STDOUT)
        s.until(b"err:one", STDERR)


def test_tty_exec_output_in_bulk_and_a_missing_binary(pod: Pod) -> None:
    # stdin=True though nothing is typed: with stdin=False containerd's CRI still gets a stdin
    # reader from the WebSocket server (an IgnoreChannel that reads EOF at once) and, for a
    # tty, drops its stdout reader at that EOF (internal/cri/io/exec_io.go): the output is
    # lost in a race, before it reaches us (SPDY clients, which pass no stdin, are not hit).
    with pod.exec(pod.plain, ["sh", "-c", "tty; seq 1 20000"], tty=True, stdin=True) as s:
        r = s.wait(timeout=120)
    lines = r.stdout.decode(errors="replace").split("\r\n")  # the terminal's ONLCR
    assert re.fullmatch(r"/dev/pts/\d+", lines[0]) and lines[1:-1] == [str(i) for i in range(1, 20001)], lines[:3]
    assert r.exit_code == 0, r.status
    with pod.exec(pod.plain, ["vsbxt-no-such-binary"]) as s:
        r = s.wait()
    assert r.exit_code == 127, r  # as ExecSync: kubectl says "command terminated with exit code 127"


# Two execs starting together failed 3 runs of 4 with "Channel closed." before the guest's
# dropbear got the fix for closing channels still waiting for their exec (images/dropbear/).
def test_two_tty_execs_at_once_each_get_their_own_terminal(pod: Pod) -> None:
    with pod.exec(pod.plain, ["sh"], tty=True, stdin=True) as a, \
            pod.exec(pod.plain, ["sh"], tty=True, stdin=True) as b:
        a.resize(81, 21)
        b.resize(82, 22)
        a.stdin("echo a-$((1+1)); stty size; tty\n")
        b.stdin("echo b-$((2+2)); stty size; tty\n")
        a.until(b"21 81")
        b.until(b"22 82")
        pts = [re.findall(rb"/dev/pts/\d+", s.until(b"/dev/pts/").stdout) for s in (a, b)]
        a.stdin("exit 1\n")
        b.stdin("exit 2\n")
        ra, rb = a.wait(), b.wait()
    assert b"a-2" in ra.stdout and b"b-4" not in ra.stdout and b"b-4" in rb.stdout and b"a-2" not in rb.stdout
    assert pts[0] != pts[1], pts
    assert (ra.exit_code, rb.exit_code) == (1, 2), (ra.status, rb.status)
