"""Where a libvirt QEMU daemon keeps its domains' pid files, and reading one safely.

Pure file reading, no libvirt import: the folders follow libvirt's qemu driver
(``cfg->stateDir``): ``/run/libvirt/qemu`` for the system daemon, and for a session daemon
its user runtime directory, ``$XDG_RUNTIME_DIR/libvirt/qemu/run`` (GLib's fallback when the
variable is unset: the user cache directory, ``${XDG_CACHE_HOME:-$HOME/.cache}``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

__all__ = ["SYSTEM_PID_DIRS", "pid_file_dirs", "read_qemu_pid", "qemu_pid", "process_cpu_ns"]

SYSTEM_PID_DIRS = (Path("/run/libvirt/qemu"), Path("/var/run/libvirt/qemu"))
_LOCAL_TRANSPORTS = ("", "unix")


def _session_dir(env: Mapping[str, str]) -> Path | None:
    runtime = env.get("XDG_RUNTIME_DIR", "")
    if not runtime:
        runtime = env.get("XDG_CACHE_HOME", "") or (os.path.join(env["HOME"], ".cache") if env.get("HOME") else "")
    return Path(runtime, "libvirt", "qemu", "run") if runtime else None


def pid_file_dirs(uri: str, env: Mapping[str, str], *, euid: int) -> list[Path]:
    """The folders, most likely first, where the daemon behind ``uri`` writes pid files.

    Empty when its QEMU does not run on this host (a remote URI), is not QEMU, or is an
    embedded driver. ``env`` is the environment the session daemon was started with (ours:
    libvirt starts it from the client), ``euid`` the client's.
    """
    parts = urlsplit(uri)
    driver, _, transport = parts.scheme.partition("+")
    # libvirt: any URI with a host part is remote, even "localhost".
    if driver != "qemu" or transport not in _LOCAL_TRANSPORTS or parts.netloc:
        return []
    # root's /session goes to the system daemon (libvirt's remote driver asks for the user
    # session daemon only when geteuid() > 0).
    if parts.path == "/system" or (parts.path == "/session" and euid == 0):
        return list(SYSTEM_PID_DIRS)
    if parts.path == "/session":
        session = _session_dir(env)
        return [session] if session else []
    return []


def _is_qemu_of(pid: int, name: str, proc: Path) -> bool:
    """Whether process ``pid`` runs QEMU for domain ``name`` (libvirt passes ``-name
    guest=NAME,...``, commas doubled): a stale pid file's number may be anyone's now."""
    try:
        argv = (proc / str(pid) / "cmdline").read_bytes().split(b"\0")
    except PermissionError:
        return (proc / str(pid)).exists()  # hidepid=: the process exists, trust libvirt
    except OSError:
        return False
    want = name.replace(",", ",,").encode()
    for flag, value in zip(argv, argv[1:]):
        if flag == b"-name" and (value in (want, b"guest=" + want) or value.startswith(b"guest=" + want + b",")):
            return True
    return False


def read_qemu_pid(name: str, dirs: list[Path], *, proc: Path = Path("/proc")) -> int:
    """The pid in the first ``<dir>/<name>.pid`` that names a live QEMU of ``name``; 0 if none."""
    for d in dirs:
        try:
            pid = int((d / f"{name}.pid").read_text().strip())
        except (OSError, ValueError):
            continue
        if pid > 0 and _is_qemu_of(pid, name, proc):
            return pid
    return 0


def qemu_pid(uri: str, name: str) -> int:
    """The QEMU pid of running domain ``name`` on the daemon behind ``uri``; 0 when unknown."""
    return read_qemu_pid(name, pid_file_dirs(uri, os.environ, euid=os.geteuid()))


def process_cpu_ns(pid: int, *, proc: Path = Path("/proc")) -> tuple[int, int] | None:
    """(user, system) CPU time of process ``pid``, all its threads, in ns; None if it is gone.

    libvirt's ``cpu.time`` is its cgroup's counter, which stops when QEMU is moved into the
    pod's cgroup; the kernel's per-process figure keeps counting wherever the process is.
    """
    try:
        fields = (proc / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
        utime, stime = int(fields[11]), int(fields[12])
    except (OSError, IndexError, ValueError):
        return None
    tick = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
    return utime * tick, stime * tick
