"""A server's unix socket file: safe take-over of a stale path, permissions, removal.

Shared by the gRPC servers (vmsandbox.server) and the ttrpc server (vmsandbox.ttrpc), so it
imports nothing but the errors.
"""

from __future__ import annotations

import errno
import grp
import logging
import os
import socket
import stat

from .errors import FailedPrecondition, InvalidArgument

__all__ = ["prepare_socket_path", "secure_socket", "remove_socket", "SUN_PATH_MAX"]

log = logging.getLogger(__name__)

#: sockaddr_un.sun_path holds 108 bytes on Linux, including the terminating NUL.
SUN_PATH_MAX = 107

_PROBE_TIMEOUT = 1.0


def prepare_socket_path(path: str) -> str:
    """Make ``path`` ready to bind and return it absolute.

    Creates a missing parent directory with mode 0700. An existing socket file is removed only
    if nothing answers on it (a leftover of a server that died); FailedPrecondition if a
    server is listening there or the path is something other than a socket.
    """
    path = os.path.abspath(path)
    if len(os.fsencode(path)) > SUN_PATH_MAX:
        raise InvalidArgument(f"socket path {path!r} is longer than {SUN_PATH_MAX} bytes")
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        os.makedirs(parent, mode=0o700, exist_ok=True)
        log.info("created socket directory %s (mode 0700)", parent)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return path
    if not stat.S_ISSOCK(st.st_mode):
        raise FailedPrecondition(f"{path} exists and is not a socket; refusing to replace it")
    if _answers(path):
        raise FailedPrecondition(f"another server is listening on {path}; refusing to take it over")
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    log.info("removed stale socket %s", path)
    return path


def _answers(path: str) -> bool:
    """Whether a server accepts connections on the socket file ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(_PROBE_TIMEOUT)
        try:
            s.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except socket.timeout:
            return True  # a listener with a full backlog is still alive
        except OSError as e:
            if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
                return False
            raise FailedPrecondition(f"cannot tell whether {path} is in use: {e}") from e
        return True


def _group_id(group: str) -> int:
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise InvalidArgument(f"socket group {group!r} does not exist") from None


def secure_socket(path: str, group: str | None) -> os.stat_result:
    """Restrict the bound socket: 0600, or 0660 owned by ``group``. Returns its stat.

    Between bind and chmod the socket has the umask's mode; with the usual umask (022) others
    lack the write permission that connect needs, so no foreign client gets in.
    """
    if group is None:
        os.chmod(path, 0o600)
    else:
        os.chown(path, -1, _group_id(group))
        os.chmod(path, 0o660)
    return os.lstat(path)


def remove_socket(path: str, owned: os.stat_result | None) -> None:
    """Remove the socket file if it is still the one we bound (``owned``; None: any socket).

    gRPC core unlinks its unix listener's path itself on shutdown (and an existing file
    before bind, which is why :func:`prepare_socket_path` must refuse a live socket first);
    this covers the cases it does not.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if owned is not None and (st.st_ino, st.st_dev) != (owned.st_ino, owned.st_dev):
        log.info("not removing %s: it is no longer our socket", path)
        return
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
