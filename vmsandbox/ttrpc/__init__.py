"""ttrpc, containerd's lightweight RPC over unix sockets, in pure Python (protobuf only).

The wire protocol only: framing, odd client stream ids, ``ttrpc.Request``/``Response``
envelopes, google.rpc status codes from :mod:`vmsandbox.errors`, deadlines from timeout_nano,
metadata. Unary calls only (containerd's task API has no streaming rpc). It knows no service:
``vmsandbox.task`` registers the task API on a :class:`Server`.
"""

from __future__ import annotations

from .client import Client, socket_path
from .context import PeerCredentials, RequestContext
from .frame import HEADER_LENGTH, MAX_DATA_LENGTH, MessageType
from .server import DEFAULT_MAX_REQUESTS, DEFAULT_STOP_GRACE, Server

__all__ = [
    "Server",
    "Client",
    "RequestContext",
    "PeerCredentials",
    "MessageType",
    "HEADER_LENGTH",
    "MAX_DATA_LENGTH",
    "DEFAULT_MAX_REQUESTS",
    "DEFAULT_STOP_GRACE",
    "socket_path",
]
