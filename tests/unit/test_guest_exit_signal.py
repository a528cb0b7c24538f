"""A session whose process was killed by a signal: dropbear reports it with RFC 4254
"exit-signal" (an SSH "signal" KILL kills vsbx-exec itself), which paramiko drops. The host
reads it (128+N), except after its own abort, against a real SSH server (paramiko's)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from io import StringIO
from pathlib import Path

import paramiko
import pytest

from vmsandbox import Unavailable
from vmsandbox.guest.agent import GuestAgent
from vmsandbox.guest.keys import generate_keypair

Ending = tuple[str, object]  # ("status", 3) or ("signal", "KILL")


class _Ends(paramiko.ServerInterface):
    """Accepts any exec and ends it ``delay`` seconds later with ``ending``."""

    def __init__(self, ending: Ending, delay: float) -> None:
        self.ending, self.delay = ending, delay

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        return paramiko.AUTH_SUCCESSFUL

    def check_channel_request(self, kind: str, chanid: int) -> int:
        return paramiko.OPEN_SUCCEEDED

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        threading.Thread(target=self._end, args=(channel,), daemon=True).start()
        return True

    def _end(self, chan: paramiko.Channel) -> None:
        time.sleep(self.delay)
        kind, value = self.ending
        if kind == "status":
            chan.send_exit_status(int(value))  # type: ignore[call-overload]
        else:  # what dropbear's send_msg_chansess_exitsignal sends
            m = paramiko.Message()
            m.add_byte(paramiko.common.cMSG_CHANNEL_REQUEST)
            m.add_int(chan.remote_chanid)
            m.add_string("exit-signal")
            m.add_boolean(False)
            m.add_string(str(value))
            m.add_boolean(False)  # core dumped
            m.add_string("")
            m.add_string("")
            getattr(chan.get_transport(), "_send_user_message")(m)
        chan.close()


@pytest.fixture
def guest(tmp_path: Path) -> Iterator[Callable[[Ending, float], GuestAgent]]:
    made: list[tuple[socket.socket, GuestAgent, list[paramiko.Transport]]] = []

    # Not 0: a channel closed before paramiko sent the exec's reply fails exec_command
    # ("Channel closed."); dropbear always replies first.
    def make(ending: Ending, delay: float = 0.2) -> GuestAgent:
        host, client = generate_keypair(), generate_keypair()
        host_key = paramiko.Ed25519Key.from_private_key(StringIO(host.openssh_private().decode()))
        path = tmp_path / f"agent{len(made)}.sock"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen(1)
        transports: list[paramiko.Transport] = []

        def serve() -> None:
            conn, _ = listener.accept()
            t = paramiko.Transport(conn)
            t.add_server_key(host_key)
            transports.append(t)
            t.start_server(server=_Ends(ending, delay))

        threading.Thread(target=serve, daemon=True).start()
        agent = GuestAgent(str(path), client.openssh_private(), host.public_line, sandbox_id="t")
        agent.connect(time.monotonic() + 10)
        made.append((listener, agent, transports))
        return agent

    yield make
    for listener, agent, transports in made:
        agent.close()
        listener.close()
        for t in transports:
            t.close()


@pytest.mark.parametrize(("ending", "code"), [(("signal", "KILL"), 137), (("signal", "TERM"), 143),
                                              (("status", 3), 3)])
def test_exec_and_spawn_report_an_exit_signal_as_128_plus_n(guest, ending: Ending, code: int) -> None:  # type: ignore[no-untyped-def]
    agent = guest(ending)
    assert agent.exec(["x"], timeout=10).exit_code == code
    p = agent.spawn(["x"], stdout=lambda b: None, stderr=lambda b: None)
    assert p.wait(10) == code


def test_an_aborted_process_killed_by_the_abort_has_no_exit_status(guest) -> None:  # type: ignore[no-untyped-def]
    agent = guest(("signal", "KILL"), 0.5)  # the guest's answer to the abort's KILL
    p = agent.spawn(["x"], stdout=lambda b: None, stderr=lambda b: None)
    p.abort()
    with pytest.raises(Unavailable):
        p.wait(10)


@pytest.mark.parametrize("kw", [{"supervise_pidfile": "/run/p.pid"}, {"supervise_pidfile": "/run/p.pid", "keep": "/k"},
                                {"rejoin": "/k"}], ids=["p", "k", "w"])
def test_a_supervisor_killed_by_a_signal_tells_nothing_of_its_daemon(guest, kw: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    """The daemon (a kept container init) runs on: the engine must see a lost session
    (Unavailable, then rejoin the keeper), not an exit status."""
    agent = guest(("signal", "KILL"))
    p = agent.spawn([] if "rejoin" in kw else ["crun"], stdout=lambda b: None, stderr=lambda b: None, **kw)
    with pytest.raises(Unavailable):
        p.wait(10)
