"""Our errors as gRPC status codes: :data:`vmsandbox.codes.ERROR_CODES` in grpc's own type.

containerd's proxy turns each code back into its errdefs class (``errgrpc.ToNative``); the
table itself lives in :mod:`vmsandbox.codes`, shared with the ttrpc task API. Internal and
unexpected exceptions become INTERNAL with a generic message; their details and traceback go
to the log only.
"""

from __future__ import annotations

import logging

import grpc

from .. import errors
from ..codes import ERROR_CODES as _CODES
from ..codes import INTERNAL_MESSAGE, Code, code_for

__all__ = ["ERROR_CODES", "INTERNAL_MESSAGE", "to_status"]

log = logging.getLogger(__name__)

_GRPC_CODE = {sc.value[0]: sc for sc in grpc.StatusCode}

ERROR_CODES: dict[type[errors.VmSandboxError], grpc.StatusCode] = {
    cls: _GRPC_CODE[int(code)] for cls, code in _CODES.items()
}


def to_status(exc: BaseException, *, rpc: str, sandbox_id: str) -> tuple[grpc.StatusCode, str]:
    """The status code and wire message for ``exc`` raised while serving ``rpc``; logs it.

    Subclasses of a listed class get that class's code. Expected errors are logged at INFO
    (NotFound on Stop/Shutdown is routine); Internal and anything unlisted at ERROR with the
    traceback, and only a generic message goes on the wire.
    """
    code = code_for(exc)
    if code is Code.INTERNAL:
        log.error("%s sandbox %s: internal error", rpc, sandbox_id, exc_info=exc)
        return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE
    log.info("%s sandbox %s: %s: %s", rpc, sandbox_id, code.name, exc)
    return _GRPC_CODE[int(code)], str(exc)
