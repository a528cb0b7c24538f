"""What a terminal process (``terminal=true``) gets beyond a plain one (pure).

crun runs a process whose ``process.terminal`` is true only with ``--console-socket``: it
makes the pty and sends the master over that unix socket. vsbx-exec listens there (token
``y``, images/README.md) and pumps the master to and from the channel's own pty, whose size
ResizePty sets (SIGWINCH reaches the container's terminal). The output is one stream, the
stdout FIFO (CRI reads no stderr FIFO of a tty); CloseIO types ^D (:class:`.stdio.Stdio`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any as _Any

from ..model import PtySize
from .process import IoSpec, TaskProcess
from .stdio import Stdio

__all__ = ["CONSOLE_DIR", "console_socket", "with_console_socket", "console_argv", "stdio_for", "console_size"]

CONSOLE_DIR = "/run/vsbx"
"""Where the console sockets live in the guest (tmpfs)."""


def console_socket(sandbox_id: str, container_id: str, exec_id: str) -> str:
    """A short guest path (sun_path holds 108 bytes) unique to the process."""
    key = f"{sandbox_id}/{container_id}/{exec_id}".encode()
    return f"{CONSOLE_DIR}/tty-{hashlib.sha256(key).hexdigest()[:20]}.sock"


def with_console_socket(argv: Sequence[str], path: str | None) -> list[str]:
    """A crun command line with ``--console-socket path`` (options come before the container
    id, argv's last element); unchanged for None."""
    if path is None:
        return list(argv)
    return [*argv[:-1], "--console-socket", path, argv[-1]]


def console_argv(argv: Sequence[str], sandbox_id: str, proc: TaskProcess) -> tuple[list[str], str | None]:
    """The crun command line for ``proc`` and its console socket (None: not a terminal)."""
    path = console_socket(sandbox_id, proc.container_id, proc.exec_id) if proc.io.terminal else None
    return with_console_socket(argv, path), path


def stdio_for(io: IoSpec, open_timeout: float, holder: str = "") -> Stdio:
    """The FIFOs of a process: a terminal's stderr FIFO is left alone (nobody reads it)."""
    return Stdio(io.stdin, io.stdout, "" if io.terminal else io.stderr, open_timeout=open_timeout,
                 holder=holder, terminal=io.terminal)


def console_size(process: Mapping[str, _Any]) -> PtySize | None:
    """The terminal size a runtime-spec Process asks for (``consoleSize``, which ``ctr tasks
    exec --tty`` sets from the user's terminal): the channel's pty starts at it, so the
    process sees it from its first instruction rather than after a ResizePty; crun applies it
    too. None when absent, not a terminal, or not positive."""
    box = process.get("consoleSize")
    if not process.get("terminal") or not isinstance(box, Mapping):
        return None
    w, h = box.get("width"), box.get("height")
    if isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0:
        return PtySize(w, h)
    return None
