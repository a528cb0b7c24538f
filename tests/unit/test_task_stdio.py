"""CRI's FIFOs as a held container init sees them when containerd restarts: real FIFOs, no guest."""

from __future__ import annotations

import os
from pathlib import Path

from vmsandbox.task.stdio import Stdio


def test_a_held_process_keeps_writing_while_containerd_is_away_and_the_next_one_reads_it(tmp_path: Path) -> None:
    out = tmp_path / "stdout"
    os.mkfifo(out)
    cri = os.open(out, os.O_RDONLY | os.O_NONBLOCK)  # containerd's reader, before Create
    stdio = Stdio("", str(out), "", holder="t-held")
    try:
        stdio.open()
        stdio.stdout(b"tick0\n")
        assert os.read(cri, 100) == b"tick0\n"
        os.close(cri)  # containerd restarts: its reader is gone
        stdio.stdout(b"tick1\n")  # no EPIPE: the line waits in the FIFO
        assert stdio.stdout.fd is not None
        cri = os.open(out, os.O_RDONLY | os.O_NONBLOCK)  # the next containerd opens it again
        stdio.stdout(b"tick2\n")
        assert os.read(cri, 100) == b"tick1\ntick2\n"
    finally:
        stdio.close()
        os.close(cri)


def test_an_exec_without_a_holder_still_drops_its_stream_when_the_reader_goes(tmp_path: Path) -> None:
    out = tmp_path / "stdout"
    os.mkfifo(out)
    cri = os.open(out, os.O_RDONLY | os.O_NONBLOCK)
    stdio = Stdio("", str(out), "")
    try:
        stdio.open()
        os.close(cri)
        stdio.stdout(b"lost\n")  # EPIPE: discarded, never a hang
        assert stdio.stdout.fd is None
    finally:
        stdio.close()
