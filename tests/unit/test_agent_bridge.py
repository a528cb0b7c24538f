"""The guest agent's bridge (images/agent/agent.c), built for the host and run against a pty.

A pty slave stands in for the virtio-serial port: it reports POLLHUP once the master (the
"host") is closed, as the port does while no host is connected. The agent's optional SERVER
argv replaces dropbear with a small shell script, so what the bridge does with bytes is seen
exactly: leftovers before the host's ``SSH-`` line are dropped, the host's own first bytes
are kept, the server's last bytes reach the host after it exited, and an idle agent does
not wake up.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import time
import tty
from collections.abc import Iterator
from pathlib import Path

import pytest

AGENT_C = Path(__file__).resolve().parents[2] / "images" / "agent" / "agent.c"


@pytest.fixture(scope="module")
def agent_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    gcc = shutil.which("gcc")
    assert gcc, "gcc is needed to build the guest agent (hack/setup.sh installs it)"
    out = tmp_path_factory.mktemp("agent") / "vsbx-agent"
    subprocess.run([gcc, "-O2", "-Wall", "-Werror", "-o", str(out), str(AGENT_C)], check=True)
    return out


class Bridge:
    def __init__(self, binary: Path, server: list[str]) -> None:
        self.master, slave = os.openpty()
        tty.setraw(slave)
        path = os.ttyname(slave)
        os.close(slave)
        self.proc = subprocess.Popen([str(binary), path, "/nonexistent-hostkey", *server],
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    def read_until(self, size: int, timeout: float = 10.0) -> bytes:
        got = bytearray()
        end = time.monotonic() + timeout
        while len(got) < size and time.monotonic() < end:
            r, _, _ = select.select([self.master], [], [], 0.2)
            if r:
                try:
                    got += os.read(self.master, 65536)
                except OSError:
                    break
        return bytes(got)

    def hang_up(self) -> None:
        if self.master >= 0:
            os.close(self.master)
            self.master = -1

    def wakeups(self) -> int:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines())
        return int(fields["voluntary_ctxt_switches"]) + int(fields["nonvoluntary_ctxt_switches"])

    def close(self) -> None:
        self.hang_up()
        self.proc.kill()
        self.proc.wait(5)


@pytest.fixture
def bridge(agent_binary: Path) -> Iterator[object]:
    made: list[Bridge] = []

    def make(server: list[str]) -> Bridge:
        b = Bridge(agent_binary, server)
        made.append(b)
        return b

    yield make
    for b in made:
        b.close()


# A server that echoes the first line it got and then writes a large tail before exiting.
TAIL = 300_000
ECHO_THEN_TAIL = ["/bin/sh", "-c", f'read -r line; printf "got:%s\\n" "$line"; head -c {TAIL} /dev/zero | tr "\\0" x']


def test_bytes_before_the_hosts_ssh_line_are_dropped_and_its_own_kept(bridge) -> None:  # type: ignore[no-untyped-def]
    b = bridge(ECHO_THEN_TAIL)
    b.send(b"\x00\x17stale bytes of a gone connection SS")  # a partial tag, too
    time.sleep(0.2)
    b.send(b"H-2.0-host\n")
    got = b.read_until(len(b"got:SH-2.0-host\n"))
    assert got.startswith(b"got:SSH-2.0-host\n"), got[:80]


def test_the_servers_last_bytes_reach_a_slow_host_after_it_exited(bridge) -> None:  # type: ignore[no-untyped-def]
    b = bridge(ECHO_THEN_TAIL)
    b.send(b"SSH-2.0-host\n")
    time.sleep(1.0)  # the server has written everything and exited by now
    head = b"got:SSH-2.0-host\n"
    got = b.read_until(len(head) + TAIL)
    assert got == head + b"x" * TAIL, (len(got), len(head) + TAIL)


def test_an_idle_agent_does_not_wake_up(bridge) -> None:  # type: ignore[no-untyped-def]
    b = bridge(ECHO_THEN_TAIL)
    time.sleep(0.3)
    before = b.wakeups()
    time.sleep(1.0)  # a connected host that says nothing
    connected = b.wakeups() - before
    b.hang_up()  # no host: the port reports POLLHUP from now on
    time.sleep(0.3)
    before = b.wakeups()
    time.sleep(1.0)
    gone = b.wakeups() - before
    assert b.proc.poll() is None, "the agent must outlive its host"
    assert (connected, gone) == (0, 0)
