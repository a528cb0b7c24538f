"""A FIFO holder: a tiny host process that keeps CRI's stdout/stderr FIFOs open for writing
while ``vmsandbox serve`` restarts.

containerd's reader of a container's output FIFO ends the container's log stream at EOF,
which comes as soon as the last writer closes: when serve exits, its fds close. A kept
container runs on, so a ``sleep`` (argv[0] ``vsbx-hold-<name>``, its own session) inherits the
write ends and holds them until the container's end, when serve closes its fds and kills the
holder: only then does containerd see EOF. Its pid is in the container's record; before a
kill the pid's argv[0] is checked, so a reused pid is never signalled.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
from collections.abc import Sequence

__all__ = ["hold", "release"]

log = logging.getLogger(__name__)


def _argv0(name: str) -> str:
    return f"vsbx-hold-{name}"


def hold(fds: Sequence[int], name: str) -> int:
    """Start a holder of ``fds``; its pid (0 when it cannot start: then output after a restart
    of serve reaches CRI only once containerd reopens the FIFOs)."""
    sleep = shutil.which("sleep") or "/bin/sleep"
    try:
        p = subprocess.Popen([_argv0(name), "infinity"], executable=sleep, pass_fds=tuple(fds),
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    except OSError as e:
        log.warning("cannot start a FIFO holder for %s: %s", name, e)
        return 0
    return p.pid


def release(pid: int, name: str) -> None:
    """Kill the holder ``pid`` if it still is the holder of ``name``; reap it if it is ours."""
    try:
        argv0 = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")[0]
    except OSError:
        return
    if argv0 != _argv0(name).encode():
        return
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass
