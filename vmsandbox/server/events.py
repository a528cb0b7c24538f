"""Publishing events to containerd's events service (gRPC ``containerd.services.events.v1.Events/Publish``).

Best effort and asynchronous: :meth:`ContainerdEvents.publish` puts the event on a bounded
queue and returns at once (a full queue drops it, logged once); one thread sends the queue
in order, each event once, with the ``containerd-namespace`` header and a short deadline.
A containerd that is not there is logged once (and again only after it answered in
between), never retried: CRI learns of exits from Wait, so a lost event costs ``ctr events``
consumers only. :meth:`close` sends what is queued within its timeout, then stops and joins
the thread.
"""

from __future__ import annotations

import logging
import queue
import threading

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message

from ..proto.containerd.services.events.v1 import events_pb2, events_pb2_grpc

__all__ = ["ContainerdEvents", "NAMESPACE_HEADER"]

log = logging.getLogger(__name__)

#: The gRPC metadata key of containerd's namespace (pkg/namespaces/grpc.go).
NAMESPACE_HEADER = "containerd-namespace"
_STOP = None


class ContainerdEvents:
    """An event sink for the task engines: one queue and one sender thread per ``serve``."""

    def __init__(self, address: str, *, max_queued: int = 1024,
                 timeout: float = 5.0) -> None:
        self.address = address if "://" in address else f"unix://{address}"
        self._timeout = timeout
        self._queue: queue.Queue[tuple[str, str, Message] | None] = queue.Queue(max_queued)
        self._lock = threading.Lock()
        self._closed = self._failing = self._dropping = False
        self._channel = grpc.insecure_channel(self.address)
        self._stub = events_pb2_grpc.EventsStub(self._channel)  # type: ignore[no-untyped-call]
        self.sent = 0
        self._thread = threading.Thread(target=self._run, name="vsbx-events", daemon=True)
        self._thread.start()

    def publish(self, namespace: str, topic: str, event: Message) -> None:
        """Queue ``event`` (a containerd.events message) for ``topic``; never blocks or raises."""
        with self._lock:
            if self._closed:
                return
            try:
                self._queue.put_nowait((namespace, topic, event))
                self._dropping = False
            except queue.Full:
                if not self._dropping:
                    log.warning("events for containerd are dropped: %d are queued already", self._queue.maxsize)
                self._dropping = True

    def _run(self) -> None:
        while (item := self._queue.get()) is not _STOP:
            self._send(*item)

    def _send(self, namespace: str, topic: str, event: Message) -> None:
        req = events_pb2.PublishRequest(topic=topic, event=any_pb2.Any(
            type_url=event.DESCRIPTOR.full_name, value=event.SerializeToString()))
        try:
            self._stub.Publish(req, timeout=self._timeout, metadata=((NAMESPACE_HEADER, namespace),))
        except (grpc.RpcError, ValueError) as e:  # ValueError: the channel was closed (close's timeout)
            if not self._failing:
                log.warning("cannot publish %s to containerd at %s (%s); events are lost until it answers",
                            topic, self.address, e)
            self._failing = True
            return
        if self._failing:
            log.info("containerd at %s takes events again", self.address)
        self._failing = False
        self.sent += 1

    def close(self, timeout: float = 5.0) -> None:
        """Stop taking events, send the queued ones (for at most ``timeout`` s), join the
        thread and close the channel. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._queue.put(_STOP, timeout=timeout)
            self._thread.join(timeout)
        except queue.Full:
            pass
        self._channel.close()  # an event in flight ends now; the ones still queued fail at once
        if self._thread.is_alive():
            self._queue.put(_STOP)
        self._thread.join()
