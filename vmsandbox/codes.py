"""google.rpc status codes, and the one table from :mod:`vmsandbox.errors` classes to them.

containerd turns a code back into its errdefs class (``errgrpc.ToNative``) whether it came over
gRPC or ttrpc, so both edges use this table: ``vmsandbox.server.status`` (gRPC) and
``vmsandbox.ttrpc`` (the task API). It imports no RPC library: the codes are plain numbers.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType

from . import errors

__all__ = ["Code", "ERROR_CODES", "INTERNAL_MESSAGE", "code_for", "error_for"]


class Code(enum.IntEnum):
    """google.rpc.Code (the numbers gRPC and ttrpc put on the wire)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


#: Mirrors containerd/errdefs ``pkg/errgrpc``; a subclass gets the code of its nearest listed base.
ERROR_CODES: Mapping[type[errors.VmSandboxError], Code] = MappingProxyType({
    errors.NotFound: Code.NOT_FOUND,
    errors.AlreadyExists: Code.ALREADY_EXISTS,
    errors.InvalidArgument: Code.INVALID_ARGUMENT,
    errors.FailedPrecondition: Code.FAILED_PRECONDITION,
    errors.Unavailable: Code.UNAVAILABLE,
    errors.DeadlineExceeded: Code.DEADLINE_EXCEEDED,
    errors.Unimplemented: Code.UNIMPLEMENTED,
    errors.Internal: Code.INTERNAL,
})

#: What goes on the wire for an Internal or unexpected error; the details go to the log only.
INTERNAL_MESSAGE = "internal error in the vmsandbox controller; details are in its log"

_CLASS_OF = {code: cls for cls, code in ERROR_CODES.items()}


def code_for(exc: BaseException) -> Code:
    """The code for ``exc``: its class's (or nearest listed base's), INTERNAL for anything else."""
    if isinstance(exc, errors.VmSandboxError):
        for cls in type(exc).__mro__:
            if issubclass(cls, errors.VmSandboxError) and cls in ERROR_CODES:
                return ERROR_CODES[cls]
    return Code.INTERNAL


def error_for(code: int, message: str) -> errors.VmSandboxError:
    """The :mod:`vmsandbox.errors` instance a peer's non-OK status stands for (the inverse table).

    A code with no class of its own (UNKNOWN, RESOURCE_EXHAUSTED, PERMISSION_DENIED, ...) becomes
    Internal with the code's name in front of the message, so it is not lost.
    """
    try:
        known = Code(code)
    except ValueError:
        return errors.Internal(f"status code {code}: {message}")
    cls = _CLASS_OF.get(known)
    if cls is None or cls is errors.Internal:
        return errors.Internal(f"{known.name}: {message}" if cls is None else message)
    return cls(message)
