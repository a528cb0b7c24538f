"""The guest agent (images/agent/agent.c, PID 1) in a real guest: idle cost and lossless output.

One small sandbox without a rootfs serves the module: exec runs in the guest's own busybox
root, where PID 1 is the agent. Wake-ups are PID 1's voluntary context switches, counted
by a sampler the test leaves running in the guest while the host stays away or idle.
"""

from __future__ import annotations

import hashlib
import socket
import time
from collections.abc import Iterator

import pytest

from tests.conftest import unique
from tests.integration.test_controller_lifecycle import agent_socket, assert_left_nothing
from vmsandbox import LibvirtController, Sandbox

pytestmark = pytest.mark.integration

IDLE_S = 10
MAX_IDLE_WAKEUPS = 5
"""Allowed wake-ups of the agent in IDLE_S seconds of idleness: none are periodic, but a
paramiko keepalive (every 15 s) may fall into the window."""


@pytest.fixture(scope="module")
def guest(controller: LibvirtController) -> Iterator[str]:
    sid = unique("agent")
    sock = None
    try:
        controller.create(Sandbox(sid))
        controller.start(sid)
        sock = agent_socket(sid)
        yield sid
    finally:
        controller.shutdown(sid)
    assert_left_nothing(controller.config.state_dir, sid, sock)


def sh(controller: LibvirtController, sid: str, script: str, stdin: bytes | None = None) -> str:
    r = controller.exec(sid, ["sh", "-c", script], stdin=stdin, timeout=60)
    assert r.exit_code == 0, r.stderr
    return r.stdout.decode()


def drop_connection(controller: LibvirtController, sid: str, settle: float = 1.0) -> None:
    """Close the controller's agent connection (its next exec reconnects), and give the
    guest ``settle`` seconds to see the host end close before anyone connects again."""
    agent = controller._registry.get(sid).agent
    assert agent is not None
    agent.close()
    time.sleep(settle)


def agent_wakeups(controller: LibvirtController, sid: str, *, connected: bool) -> int:
    """PID 1's voluntary context switches over IDLE_S seconds in which the host sends nothing."""
    out = f"/run/{sid}-idle"
    sh(controller, sid, f"setsid sh -c 'sleep 1; grep ^voluntary_ctxt /proc/1/status; sleep {IDLE_S}; "
                        f"grep ^voluntary_ctxt /proc/1/status' </dev/null >{out} 2>&1 &")
    if not connected:
        drop_connection(controller, sid, settle=0)
    time.sleep(IDLE_S + 2.5)
    lines = sh(controller, sid, f"cat {out}; rm {out}").split()
    assert len(lines) == 4, lines  # two "voluntary_ctxt_switches: N" samples
    return int(lines[3]) - int(lines[1])


def test_the_idle_agent_does_not_wake_up(controller: LibvirtController, guest: str) -> None:
    """Neither with no host connected (the port then reports POLLHUP, which a poll loop
    turns into a spin) nor with an idle host connected does the agent wake periodically."""
    assert controller.exec(guest, ["cat", "/proc/1/comm"]).stdout == b"vsbx-agent\n"
    away = agent_wakeups(controller, guest, connected=False)
    idle = agent_wakeups(controller, guest, connected=True)
    assert away <= MAX_IDLE_WAKEUPS and idle <= MAX_IDLE_WAKEUPS, (
        f"the agent woke {away} times with no host and {idle} times with an idle host in {IDLE_S} s")
    # The host still gets in at once after being away.
    drop_connection(controller, guest, settle=0)
    t0 = time.monotonic()
    assert controller.exec(guest, ["true"]).exit_code == 0
    assert time.monotonic() - t0 < 5


FAKE = "/usr/sbin/dropbear"


def one_shot_session(controller: LibvirtController, sid: str, script: str, *, pause: float = 0.0,
                     expect: int | None = None) -> bytes:
    """Stand in ``script`` (sh) for dropbear for one host connection, and return all that
    connection receives. The stand-in puts the real dropbear back first, and the agent runs
    it like dropbear: stdin and stdout its end of the session. The host connects over a raw
    socket, waits ``pause`` seconds, then reads until 5 s of silence (1 s once ``expect``
    bytes arrived: anything more would be wrong too)."""
    sh(controller, sid, f"mv {FAKE} {FAKE}.real && cat > {FAKE} && chmod 755 {FAKE}",
       stdin=f"#!/bin/sh\nmv {FAKE}.real {FAKE}\n{script}\n".encode())
    path = agent_socket(sid)
    drop_connection(controller, sid)
    got = bytearray()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(path)
        s.sendall(b"SSH-2.0-vsbxt\r\n")  # what a client says first
        time.sleep(pause)
        try:
            while True:
                s.settimeout(1 if expect is not None and len(got) >= expect else 5)
                if not (chunk := s.recv(65536)):
                    break
                got += chunk
        except TimeoutError:
            pass
        s.shutdown(socket.SHUT_WR)  # QEMU 7.2 sees a half-close reliably (vmsandbox/guest/agent.py)
    time.sleep(1.0)
    # The real dropbear is back and a fresh connection works, with no stale bytes in the way.
    assert sh(controller, sid, f"test ! -e {FAKE}.real && echo ok") == "ok\n"
    return bytes(got)


@pytest.mark.parametrize("size", [100, 65537, 300_000, 8 << 20])
def test_a_session_output_reaches_the_host_in_full(controller: LibvirtController, guest: str, size: int) -> None:
    """The session process writes ``size`` bytes and exits at once: the host gets them all,
    the tail the agent still held when the session ended included."""
    blob = f"/run/{guest}-blob"
    want = sh(controller, guest, f"head -c {size} /dev/urandom > {blob}; sha256sum {blob}").split()[0]
    got = one_shot_session(controller, guest, f"exec cat {blob}", expect=size)
    sh(controller, guest, f"rm {blob}")
    assert (len(got), hashlib.sha256(got).hexdigest()) == (size, want), f"lost {size - len(got)} of {size} bytes"


def test_output_queued_for_a_slow_host_outlives_its_session(controller: LibvirtController, guest: str) -> None:
    """The host reads nothing for a while; the session process writes until everything
    between it and the host is full (virtio queue, agent buffer, socket), then dies. Every
    byte it wrote (its wchar) must still reach the host once the host reads."""
    blob, written = f"/run/{guest}-blob", f"/run/{guest}-written"
    sh(controller, guest, f"head -c {16 << 20} /dev/urandom > {blob}")
    got = one_shot_session(controller, guest, f"""
        dd if={blob} bs=4096 2>/dev/null &
        sleep 3
        grep ^wchar: /proc/$!/io > {written}
        kill -9 $!""", pause=6)
    n, want = sh(controller, guest, f"n=$(cut -d' ' -f2 {written}); echo $n; head -c $n {blob} | sha256sum; "
                                     f"rm {blob} {written}").split()[:2]
    assert 0 < int(n) < 16 << 20, "the writer should have been stopped by a full pipeline"
    assert (len(got), hashlib.sha256(got).hexdigest()) == (int(n), want), (
        f"lost {int(n) - len(got)} of the {n} bytes written")


@pytest.mark.parametrize("size", [65535, 65536, 65537, 4 << 20])
def test_exec_output_arrives_whole(controller: LibvirtController, guest: str, size: int) -> None:
    """A command that writes ``size`` bytes and exits at once: the host gets all of them."""
    r = controller.exec(guest, ["sh", "-c", f"head -c {size} /dev/urandom > /run/o; sha256sum /run/o >&2; "
                                            "exec cat /run/o"], timeout=120)
    assert r.exit_code == 0
    assert (len(r.stdout), hashlib.sha256(r.stdout).hexdigest()) == (size, r.stderr.split()[0].decode())
