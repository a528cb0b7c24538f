"""The one table from :mod:`vmsandbox.errors` classes to gRPC status codes.

containerd's proxy turns each code back into its errdefs class (``errgrpc.ToNative``), so the
table mirrors containerd/errdefs ``pkg/errgrpc``. Internal and unexpected exceptions become
INTERNAL with a generic message; their details and traceback go to the log only.
"""

from __future__ import annotations

import logging

import grpc

from .. import errors

__all__ = ["ERROR_CODES", "INTERNAL_MESSAGE", "to_status"]

log = logging.getLogger(__name__)

ERROR_CODES: dict[type[errors.VmSandboxError], grpc.StatusCode] = {
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Unimplemented: grpc.StatusCode.UNIMPLEMENTED,
    errors.Internal: grpc.StatusCode.INTERNAL,
}

INTERNAL_MESSAGE = "internal error in the vmsandbox controller; details are in its log"


def to_status(exc: BaseException, *, rpc: str, sandbox_id: str) -> tuple[grpc.StatusCode, str]:
    """The status code and wire message for ``exc`` raised while serving ``rpc``; logs it.

    Subclasses of a listed class get that class's code. Expected errors are logged at INFO
    (NotFound on Stop/Shutdown is routine); Internal and anything unlisted at ERROR with the
    traceback, and only a generic message goes on the wire.
    """
    code: grpc.StatusCode | None = None
    if isinstance(exc, errors.VmSandboxError):
        for cls in type(exc).__mro__:
            if issubclass(cls, errors.VmSandboxError) and cls in ERROR_CODES:
                code = ERROR_CODES[cls]
                break
    if code is None or code is grpc.StatusCode.INTERNAL:
        log.error("%s sandbox %s: internal error", rpc, sandbox_id, exc_info=exc)
        return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE
    log.info("%s sandbox %s: %s: %s", rpc, sandbox_id, code.name, exc)
    return code, str(exc)
