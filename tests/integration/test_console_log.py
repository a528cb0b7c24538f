"""The guest console log on real guests: it shows the boot, a guest cannot make it grow
without bound, and what virtlogd rotated out is still read back in order.

libvirt hands the serial's file to virtlogd (qemu.conf ``stdio_handler = "logd"``, the
default), which rotates it at its max_size, keeping max_backups: the defaults are assumed
(2 MiB, 3), as on a host without /etc/libvirt/virtlogd.conf.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.conftest import unique
from vmsandbox import LibvirtController, SandboxMetadata

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
MAX_SIZE = 2 * MiB  # virtlogd.conf max_size
MAX_BACKUPS = 3  # virtlogd.conf max_backups
FLOOD = 5 * MiB


def boot(controller: LibvirtController, sandbox_ids: list[str], name: str) -> str:
    sid = unique(name)
    sandbox_ids.append(sid)
    controller.create(SandboxMetadata(sid))
    controller.start(sid)
    return sid


def log_files(controller: LibvirtController, sid: str) -> dict[str, int]:
    """The console log and whatever lies beside it (rotated backups): name -> size."""
    log = controller.console_log(sid)
    return {p.name: p.stat().st_size for p in log.parent.iterdir() if p.name.startswith(log.name)}


def settled(controller: LibvirtController, sid: str, timeout: float = 60) -> dict[str, int]:
    """The log files once their sizes stop changing (virtlogd writes behind the guest)."""
    deadline = time.monotonic() + timeout
    last = log_files(controller, sid)
    while time.monotonic() < deadline:
        time.sleep(1)
        now = log_files(controller, sid)
        if now == last:
            return now
        last = now
    raise AssertionError(f"the console log kept changing for {timeout}s: {last}")


def test_the_console_log_shows_the_boot(controller: LibvirtController, sandbox_ids: list[str]) -> None:
    sid = boot(controller, sandbox_ids, "conboot")
    assert controller.console_log(sid).is_file()
    text = controller.read_console_log(sid)
    assert b"vmsandbox: init started" in text and b"vmsandbox: agent ready" in text, text[-2000:]
    # Output after the boot reaches it too.
    r = controller.exec(sid, ["sh", "-c", "echo console-mark-4711 > /dev/console"], timeout=30)
    assert r.exit_code == 0
    deadline = time.monotonic() + 10
    while b"console-mark-4711" not in controller.read_console_log(sid):
        assert time.monotonic() < deadline, "a line the guest wrote to its console never reached the log"
        time.sleep(0.2)
    assert controller.read_console_log(sid, 100).endswith(b"console-mark-4711\r\n")


def test_a_guest_flooding_its_console_leaves_a_bounded_log(controller: LibvirtController,
                                                           sandbox_ids: list[str]) -> None:
    sid = boot(controller, sandbox_ids, "conflood")
    r = controller.exec(sid, ["sh", "-c", f"head -c {FLOOD} /dev/zero | tr '\\0' x > /dev/console"], timeout=600)
    assert r.exit_code == 0, r.stderr
    files = settled(controller, sid)
    log = controller.console_log(sid).name
    assert files[log] <= MAX_SIZE, files
    backups = sorted(n for n in files if n != log)
    assert backups and all(n.removeprefix(log + ".").isdigit() for n in backups), files
    assert len(backups) <= MAX_BACKUPS and all(files[n] <= MAX_SIZE for n in backups), files
    assert FLOOD <= sum(files.values()) <= MAX_SIZE * (1 + MAX_BACKUPS), files  # all of it kept, so far
    # `vmsandbox logs` (read_console_log) still shows the boot, then the flood, in order.
    text = controller.read_console_log(sid)
    assert len(text) == sum(files.values())
    boot_at = text.find(b"vmsandbox: agent ready")
    assert 0 <= boot_at < text.find(b"x" * 1000)
    assert text.count(b"x") >= FLOOD and text.endswith(b"x" * 1000)
    assert controller.read_console_log(sid, 1000) == b"x" * 1000
    # And the sandbox's removal takes the backups with it.
    folder: Path = controller.console_log(sid).parent
    controller.shutdown(sid)
    assert not folder.exists()
