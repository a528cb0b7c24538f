"""`vmsandbox serve` as its own process (the CLI), as a node runs it; ended by its PID."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import REPO

__all__ = ["Serve"]


class Serve:
    """`vmsandbox serve` as its own process (the CLI), on a state dir and socket of its own."""

    def __init__(self, state_dir: Path, socket: Path, env: dict[str, str] | None = None) -> None:
        self.state_dir, self.socket = state_dir, socket
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = state_dir.parent / f"{state_dir.name}-serve.log"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vmsandbox.cli", "--state-dir", str(self.state_dir),
             "serve", "--socket", str(self.socket)],
            cwd=REPO, env=self.env, stdout=subprocess.DEVNULL, stderr=open(self.log, "ab"),
        )
        deadline = time.monotonic() + 180  # the first start builds the guest image
        while not self.socket.exists():
            assert self.proc.poll() is None, self.log.read_text()[-4000:]
            assert time.monotonic() < deadline, "vmsandbox serve did not create its socket"
            time.sleep(0.1)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            return self.proc.wait()

    def cli(self, *args: str, timeout: float = 120, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
        """Run the `vmsandbox` CLI on this state dir, as an admin on the node would."""
        return subprocess.run(
            [sys.executable, "-m", "vmsandbox.cli", "--state-dir", str(self.state_dir), *args],
            cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout,
            input=stdin.decode() if stdin is not None else None,
        )
