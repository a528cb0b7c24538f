"""Network namespace handles: open and check a namespace file, and make sockets inside it.

A socket inside a namespace is made by a short-lived thread of its own that enters the
namespace, creates the netlink socket (a socket stays in the namespace it was made in) and
ends; no shared thread ever calls ``setns`` and nothing forks. pyroute2's own netns mode
forks a child, which died with SIGSEGV inside the multi-threaded gRPC server.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from ..errors import Internal, InvalidArgument

__all__ = ["NetnsGone", "open_netns", "opened_netns", "host_netns_fd", "netlink_socket_in"]

_NS_GET_NSTYPE = 0xB703  # _IO(0xb7, 0x3), Linux >= 4.11
_CLONE_NEWNET = 0x40000000


class NetnsGone(InvalidArgument):
    """The path names no network namespace (any more): it is missing or not an nsfs file."""


def _describe_mode(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    return "a special file"


def open_netns(path: str) -> int:
    """Open ``path`` and check it is a network namespace other than our own; return the fd.

    Raises :class:`NetnsGone` when the path is missing or is not a namespace file (a
    directory, a regular file, a namespace file left behind after unmount), InvalidArgument
    when it is relative, unreadable, another kind of namespace, or this process's namespace
    (wiring that one would cut the host off).
    """
    if not isinstance(path, str) or not os.path.isabs(path):
        raise InvalidArgument(f"network namespace path {path!r} must be an absolute path")
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError) as e:
        raise NetnsGone(f"network namespace {path} does not exist") from e
    except OSError as e:
        raise InvalidArgument(f"network namespace {path} cannot be read: {e.strerror}") from e
    if not stat.S_ISREG(st.st_mode):
        raise NetnsGone(f"{path} is not a network namespace but {_describe_mode(st.st_mode)}")
    try:
        # O_NONBLOCK: a FIFO swapped in since the stat() must not block us.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError as e:
        raise NetnsGone(f"network namespace {path} does not exist") from e
    except OSError as e:
        raise InvalidArgument(f"network namespace {path} cannot be opened: {e.strerror}") from e
    try:
        try:
            nstype = fcntl.ioctl(fd, _NS_GET_NSTYPE)
        except OSError as e:
            if e.errno in (errno.ENOTTY, errno.EINVAL):
                raise NetnsGone(f"{path} is not a network namespace (not a namespace file)") from e
            raise InvalidArgument(f"network namespace {path} cannot be inspected: {e.strerror}") from e
        if nstype != _CLONE_NEWNET:
            raise InvalidArgument(f"{path} is a namespace, but not a network namespace")
        own = os.stat("/proc/thread-self/ns/net")
        mine = os.fstat(fd)
        if (mine.st_dev, mine.st_ino) == (own.st_dev, own.st_ino):
            raise InvalidArgument(f"{path} is the host's own network namespace; a sandbox needs its own")
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextmanager
def opened_netns(path: str) -> Iterator[int]:
    """:func:`open_netns` as a context manager that closes the fd."""
    fd = open_netns(path)
    try:
        yield fd
    finally:
        os.close(fd)


@contextmanager
def host_netns_fd() -> Iterator[int]:
    """An fd of this thread's network namespace (the host's), to move links back to it."""
    try:
        fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise Internal(f"opening the host network namespace: {e.strerror}") from e
    try:
        yield fd
    finally:
        os.close(fd)


_libc = ctypes.CDLL(None, use_errno=True)


def netlink_socket_in(netns_fd: int) -> socket.socket:
    """A route-netlink socket inside the network namespace open as ``netns_fd``.

    Made on a fresh thread that enters the namespace and then ends, so no thread that
    outlives the call is ever in another namespace, and nothing forks (safe in a threaded
    server). Raises OSError.
    """
    out: list[socket.socket | BaseException] = []

    def run() -> None:
        try:
            if _libc.setns(netns_fd, _CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns: {os.strerror(err)}")
            out.append(socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC,
                                     socket.NETLINK_ROUTE))
        except BaseException as e:  # handed to the caller's thread
            out.append(e)

    t = threading.Thread(target=run, name="vsbx-netns-socket", daemon=True)
    t.start()
    t.join()
    result = out[0]
    if isinstance(result, BaseException):
        raise result
    return result
