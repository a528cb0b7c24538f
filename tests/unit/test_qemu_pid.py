"""Where the QEMU pid of a domain is found, for each libvirt URI (no libvirtd needed).

The pid files are laid out where each daemon writes them, but under the test's folder (the
session daemon's runtime dir comes from the environment); the QEMU is a real process whose
command line names the domain as libvirt's does (``-name guest=NAME,debug-threads=on``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmsandbox.hypervisor.libvirt_driver import LibvirtHypervisor
from vmsandbox.hypervisor.pidfile import SYSTEM_PID_DIRS, pid_file_dirs

NAME = "vmsandbox-pidtest"


@pytest.fixture
def fake_qemu() -> Iterator[subprocess.Popen[bytes]]:
    """A process whose command line is a libvirt QEMU's for domain NAME."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                          "-name", f"guest={NAME},debug-threads=on"])
    try:
        # Until the child has exec'd, /proc/<pid>/cmdline is still pytest's (seen under load).
        deadline = time.monotonic() + 10
        while b"-name" not in Path(f"/proc/{p.pid}/cmdline").read_bytes() and time.monotonic() < deadline:
            time.sleep(0.01)
        yield p
    finally:
        p.kill()
        p.wait()


@pytest.fixture
def as_user(monkeypatch: pytest.MonkeyPatch) -> None:
    """The client runs as an unprivileged user (its session daemon does too)."""
    monkeypatch.setattr(os, "geteuid", lambda: 1000)


def pid_of(uri: str) -> int:
    """What LibvirtHypervisor.pid answers on a connection to ``uri`` (none is opened)."""
    return LibvirtHypervisor.pid(types.SimpleNamespace(uri=uri), NAME)  # type: ignore[arg-type]


def write_pid(directory: Path, pid: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{NAME}.pid").write_text(f"{pid}\n")


def test_the_session_daemon_pid_file_is_under_xdg_runtime_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             fake_qemu: subprocess.Popen[bytes], as_user: None) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run-user"))
    write_pid(tmp_path / "run-user" / "libvirt" / "qemu" / "run", fake_qemu.pid)
    assert pid_of("qemu:///session") == fake_qemu.pid
    assert pid_of("qemu+unix:///session") == fake_qemu.pid


def test_without_xdg_runtime_dir_the_session_daemon_uses_the_cache_dir(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_qemu: subprocess.Popen[bytes], as_user: None) -> None:
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    write_pid(tmp_path / "home" / ".cache" / "libvirt" / "qemu" / "run", fake_qemu.pid)
    assert pid_of("qemu:///session") == fake_qemu.pid
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    write_pid(tmp_path / "cache" / "libvirt" / "qemu" / "run", fake_qemu.pid)
    (tmp_path / "home" / ".cache" / "libvirt" / "qemu" / "run" / f"{NAME}.pid").unlink()
    assert pid_of("qemu:///session") == fake_qemu.pid


def test_a_pid_file_of_a_process_that_is_not_that_domains_qemu_is_ignored(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, as_user: None) -> None:
    # A stale file whose pid now belongs to something else (here: the test itself).
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    write_pid(tmp_path / "libvirt" / "qemu" / "run", os.getpid())
    assert pid_of("qemu:///session") == 0
    write_pid(tmp_path / "libvirt" / "qemu" / "run", 2**22 + 12345)  # beyond pid_max: no process
    assert pid_of("qemu:///session") == 0


def test_which_folders_each_uri_reads() -> None:
    env = {"XDG_RUNTIME_DIR": "/run/user/1000", "HOME": "/home/u"}
    assert pid_file_dirs("qemu:///system", env, euid=0) == list(SYSTEM_PID_DIRS)
    assert pid_file_dirs("qemu+unix:///system", env, euid=0) == list(SYSTEM_PID_DIRS)
    # A user's session daemon never writes the system daemon's folder: a domain of the same
    # name there is another VM.
    assert pid_file_dirs("qemu:///session", env, euid=1000) == [Path("/run/user/1000/libvirt/qemu/run")]
    assert pid_file_dirs("qemu:///session", {"HOME": "/home/u"}, euid=1000) == [Path("/home/u/.cache/libvirt/qemu/run")]
    # root's /session is the system daemon.
    assert pid_file_dirs("qemu:///session", env, euid=0) == list(SYSTEM_PID_DIRS)
    # QEMU on another host, or no QEMU at all: no pid to read here.
    for uri in ("qemu+ssh://node-2/system", "qemu://localhost/system", "qemu+tcp://node-2/session", "test:///default", "lxc:///system",
                "qemu:///embed?root=/srv/x"):
        assert pid_file_dirs(uri, env, euid=0) == []


def test_process_cpu_counts_user_and_system_time_of_the_process(tmp_path: Path) -> None:
    from vmsandbox.hypervisor.pidfile import process_cpu_ns

    tick = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
    (tmp_path / "42").mkdir()
    # comm may hold spaces and parentheses; fields 14 and 15 are utime and stime in ticks.
    (tmp_path / "42" / "stat").write_text("42 (qemu (x) y) S 1 42 42 0 -1 4194560 1 0 0 0 300 70 0 0 20 0 5\n")
    assert process_cpu_ns(42, proc=tmp_path) == (300 * tick, 70 * tick)
    assert process_cpu_ns(43, proc=tmp_path) is None
    user, system = process_cpu_ns(os.getpid()) or (-1, -1)
    assert user >= 0 and system >= 0
