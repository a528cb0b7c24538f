"""containerd's sandbox Controller gRPC service (``containerd.services.sandbox.v1.Controller``).

Adapts any :class:`vmsandbox.controller.Controller`; depends only on the contract modules
(controller, model, errors), never on the implementation.
"""

from __future__ import annotations

from .grpc_server import DEFAULT_STOP_GRACE, ControllerServer, serve
from .service import SERVICE_NAME, ControllerServicer
from .status import ERROR_CODES

__all__ = [
    "serve",
    "ControllerServer",
    "ControllerServicer",
    "SERVICE_NAME",
    "ERROR_CODES",
    "DEFAULT_STOP_GRACE",
]
