"""One exception hierarchy for vmsandbox, mirroring containerd's errdefs classes.

Every error the public API raises is a :class:`VmSandboxError`. Adapters translate foreign
exceptions (libvirt, paramiko, pyroute2, OSError) into these classes at their edge with
``raise ... from``; the gRPC server maps each class to exactly one status code.
This module imports nothing of ours.
"""

from __future__ import annotations

__all__ = [
    "VmSandboxError",
    "NotFound",
    "AlreadyExists",
    "InvalidArgument",
    "FailedPrecondition",
    "Unavailable",
    "DeadlineExceeded",
    "Unimplemented",
    "Internal",
]


class VmSandboxError(Exception):
    """Base class. ``sandbox_id`` names the sandbox concerned, when there is one."""

    def __init__(self, message: str, *, sandbox_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.sandbox_id = sandbox_id

    def __str__(self) -> str:
        if self.sandbox_id and self.sandbox_id not in self.message:
            return f"sandbox {self.sandbox_id}: {self.message}"
        return self.message


class NotFound(VmSandboxError):
    """The sandbox (or another named object) does not exist."""


class AlreadyExists(VmSandboxError):
    """A sandbox with this id already exists."""


class InvalidArgument(VmSandboxError):
    """The request is malformed: bad id, mount, annotation, path or field."""


class FailedPrecondition(VmSandboxError):
    """The request is well formed but the sandbox is not in a state that allows it."""


class Unavailable(VmSandboxError):
    """A transient fault (libvirtd unreachable, guest agent not answering); retry later."""


class DeadlineExceeded(VmSandboxError):
    """The operation did not finish before its deadline."""


class Unimplemented(VmSandboxError):
    """The operation or field is not supported by this controller."""


class Internal(VmSandboxError):
    """An unexpected failure; details are in the log."""
