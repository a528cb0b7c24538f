"""What a ttrpc handler learns about its request: peer, metadata, deadline, cancellation."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from ..errors import DeadlineExceeded, Unavailable

__all__ = ["PeerCredentials", "RequestContext", "metadata_from_pairs"]


@dataclass(frozen=True)
class PeerCredentials:
    """The connecting process, from SO_PEERCRED at accept time."""

    pid: int
    uid: int
    gid: int


def metadata_from_pairs(pairs: Iterable[tuple[str, str]]) -> Mapping[str, tuple[str, ...]]:
    """ttrpc metadata is a multimap: every value of a key, in the order sent."""
    out: dict[str, list[str]] = {}
    for key, value in pairs:
        out.setdefault(key, []).append(value)
    return MappingProxyType({k: tuple(v) for k, v in out.items()})


class RequestContext:
    """One request as its handler sees it.

    ``deadline`` is a :func:`time.monotonic` instant derived from the request's timeout_nano
    (None: the client set none, as containerd's Wait). The server cancels the context when the
    connection is lost or the server stops; a long-running handler should block in
    :meth:`wait` (or poll :meth:`done`) so that it returns promptly then.
    """

    def __init__(
        self,
        *,
        service: str,
        method: str,
        stream_id: int,
        peer: PeerCredentials,
        metadata: Mapping[str, tuple[str, ...]],
        timeout: float | None,
    ) -> None:
        self.service = service
        self.method = method
        self.stream_id = stream_id
        self.peer = peer
        self.metadata = metadata
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self._cancelled = threading.Event()
        self._reason = ""

    def __repr__(self) -> str:
        return f"<RequestContext {self.service}/{self.method} stream {self.stream_id}>"

    def first(self, key: str, default: str = "") -> str:
        """The first metadata value of ``key`` (e.g. ``containerd-namespace-ttrpc``)."""
        values = self.metadata.get(key)
        return values[0] if values else default

    def time_remaining(self) -> float | None:
        """Seconds left before the deadline (never negative); None without a deadline."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic())

    @property
    def cancelled(self) -> bool:
        """Whether the server cancelled the request (connection lost, server stopping)."""
        return self._cancelled.is_set()

    def expired(self) -> bool:
        """Whether the deadline has passed."""
        return self.deadline is not None and time.monotonic() >= self.deadline

    def done(self) -> bool:
        """Whether the handler's answer is no longer awaited: cancelled or past the deadline."""
        return self.cancelled or self.expired()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the context is done or ``timeout`` seconds passed; returns :meth:`done`."""
        limit = self.time_remaining()
        if timeout is not None:
            limit = timeout if limit is None else min(limit, timeout)
        self._cancelled.wait(limit)
        return self.done()

    def check(self) -> None:
        """Raise Unavailable if cancelled, DeadlineExceeded if past the deadline."""
        if self.cancelled:
            raise Unavailable(f"{self.service}/{self.method} cancelled: {self._reason}")
        if self.expired():
            raise DeadlineExceeded(f"{self.service}/{self.method}: deadline exceeded")

    def cancel(self, reason: str) -> None:
        """Called by the server (connection lost, server stopping); wakes :meth:`wait`."""
        if not self._cancelled.is_set():
            self._reason = reason
            self._cancelled.set()
