"""vmsandbox: containerd sandboxes as lightweight libvirt (KVM or QEMU) guests.

The public API is what ``__all__`` lists; everything else is private.
"""

from __future__ import annotations

from .config import Config, VirtType
from .controller import Controller
from .errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    Unavailable,
    Unimplemented,
    VmSandboxError,
)
from .model import (
    AnyMessage,
    ControllerInstance,
    ControllerStatus,
    CreateOptions,
    ExecResult,
    ExitStatus,
    ImageConfig,
    Metric,
    Mount,
    Phase,
    Platform,
    Runtime,
    SandboxMetadata,
    SandboxState,
    SandboxSummary,
    StopOptions,
)
from .host import LibvirtController
from .sdk import CommandFailed, FileInfo, Files, OutputStream, Process, Sandbox
from .sdk.aio import AsyncSandbox

__version__ = "0.2.0"

__all__ = [
    # the SDK: a sandbox from an image in one call
    "Sandbox",
    "AsyncSandbox",
    "Process",
    "OutputStream",
    "Files",
    "FileInfo",
    "CommandFailed",
    # the controller API: containerd's sandbox Controller
    "LibvirtController",
    "Controller",
    "Config",
    "VirtType",
    "AnyMessage",
    "Runtime",
    "SandboxMetadata",
    "Mount",
    "CreateOptions",
    "StopOptions",
    "ControllerInstance",
    "ExitStatus",
    "ControllerStatus",
    "Platform",
    "Metric",
    "ExecResult",
    "ImageConfig",
    "SandboxState",
    "Phase",
    "SandboxSummary",
    "VmSandboxError",
    "NotFound",
    "AlreadyExists",
    "InvalidArgument",
    "FailedPrecondition",
    "Unavailable",
    "DeadlineExceeded",
    "Unimplemented",
    "Internal",
    "__version__",
]
