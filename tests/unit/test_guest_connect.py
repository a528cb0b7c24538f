"""GuestAgent's (re)connect against a real SSH server (paramiko's) on a unix socket.

The server's first connection is wedged (accepted, never answers), as a guest's agent
channel is after a controller restart when QEMU serves the new client before the guest saw
the old one leave; the next connection answers. A reconnect must replace the wedged one
promptly, a boot wait must not give up on a guest that is still starting its agent.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from io import StringIO
from pathlib import Path

import paramiko
import pytest

from tests.unit.rig import Rig
from vmsandbox import SandboxMetadata
from vmsandbox.guest.agent import GuestAgent
from vmsandbox.guest.keys import generate_keypair


class _Accept(paramiko.ServerInterface):
    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        return paramiko.AUTH_SUCCESSFUL


class WedgedThenAnswering:
    """Accepts connections on ``path``; the first ``wedged`` ones get silence."""

    def __init__(self, path: Path, wedged: int, answer_after: float = 0.0) -> None:
        host = generate_keypair()
        self.host_key_line = host.public_line
        self._host_key = paramiko.Ed25519Key.from_private_key(StringIO(host.openssh_private().decode()))
        self.client = generate_keypair()
        self.wedged, self.answer_after = wedged, answer_after
        self.accepted: list[float] = []  # monotonic time of each connection
        self._held: list[socket.socket] = []
        self._transports: list[paramiko.Transport] = []
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(8)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.accepted.append(time.monotonic())
            if len(self.accepted) <= self.wedged:
                self._held.append(conn)  # never a byte: the banner wait runs out
                continue
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        time.sleep(self.answer_after)  # a guest still starting its agent
        t = paramiko.Transport(conn)
        t.add_server_key(self._host_key)
        self._transports.append(t)
        t.start_server(server=_Accept())

    def close(self) -> None:
        self._listener.close()
        for c in self._held:
            c.close()
        for t in self._transports:
            t.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[object]:
    made: list[WedgedThenAnswering] = []

    def make(wedged: int, answer_after: float = 0.0) -> tuple[WedgedThenAnswering, GuestAgent]:
        path = tmp_path / f"agent{len(made)}.sock"
        s = WedgedThenAnswering(path, wedged, answer_after)
        made.append(s)
        agent = GuestAgent(str(path), s.client.openssh_private(), s.host_key_line, sandbox_id="t")
        return s, agent

    yield make
    for s in made:
        s.close()


def test_a_wedged_connection_to_a_booted_guest_is_replaced_within_a_second_or_so(server) -> None:  # type: ignore[no-untyped-def]
    s, agent = server(wedged=1)
    started = time.monotonic()
    try:
        agent.connect(started + 15.0)
        assert agent.connected
    finally:
        agent.close()
    assert len(s.accepted) == 2
    # The old single attempt waited 10 s for the banner of the wedged connection.
    assert s.accepted[1] - started < 3.0


def test_wedged_reconnects_back_off_and_still_reach_a_guest_within_the_deadline(server) -> None:  # type: ignore[no-untyped-def]
    s, agent = server(wedged=3)
    started = time.monotonic()
    try:
        agent.connect(started + 15.0)
        assert agent.connected
    finally:
        agent.close()
    gaps = [b - a for a, b in zip(s.accepted, s.accepted[1:])]
    assert len(s.accepted) == 4 and gaps[0] < gaps[1] < gaps[2]  # 1, 2, 4 s: doubling


def test_a_booting_guest_gets_one_long_banner_wait_not_reconnects(server) -> None:  # type: ignore[no-untyped-def]
    s, agent = server(wedged=0, answer_after=2.5)  # the agent starts 2.5 s after the connect
    try:
        agent.connect(time.monotonic() + 15.0, booting=True)
        assert agent.connected
    finally:
        agent.close()
    assert len(s.accepted) == 1


def test_only_the_starts_first_contact_is_a_boot_wait(rig: Rig) -> None:
    rig.ctl.create(SandboxMetadata("a"))
    rig.ctl.start("a")
    rig.guests.channels[-1].close()  # the connection dropped
    assert rig.ctl.exec("a", ["true"]).exit_code == 0
    assert rig.guests.connects == [("a", True), ("a", False)]
