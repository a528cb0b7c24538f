"""The sandbox Controller contract: containerd's nine operations as a typed Protocol.

Anything that satisfies :class:`Controller` can be served to containerd by
:mod:`vmsandbox.server`; :class:`vmsandbox.LibvirtController` is the implementation.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol, runtime_checkable

from .model import AnyMessage, ControllerInstance, ControllerStatus, ExitStatus, Metric, Mount, Platform, SandboxMetadata

__all__ = ["Controller"]


@runtime_checkable
class Controller(Protocol):
    """containerd's ``core/sandbox.Controller`` in Python.

    Every method is safe to retry. Errors are :mod:`vmsandbox.errors` classes.
    """

    def create(
        self,
        sandbox: SandboxMetadata,
        *,
        rootfs: Iterable[Mount] = (),
        options: AnyMessage | None = None,
        netns_path: str = "",
        annotations: Mapping[str, str] | None = None,
    ) -> None:
        """Prepare a sandbox (disks, keys, domain definition) without booting it.

        Raises InvalidArgument for a bad id, mount, netns or annotation (nothing is left
        behind), AlreadyExists when the id is taken.
        """

    def start(self, sandbox_id: str) -> ControllerInstance:
        """Boot the sandbox and return once its guest agent answers.

        Idempotent on a running sandbox (returns the same instance). Raises NotFound,
        FailedPrecondition on a stopped sandbox, DeadlineExceeded when the guest does not
        become ready in time. A start that fails removes the sandbox and everything it owns,
        as Shutdown would (containerd never calls Shutdown after a failed Start): create it
        again to retry.
        """

    def platform(self, sandbox_id: str) -> Platform:
        """The guest's OS and architecture in OCI names. Raises NotFound."""

    def stop(self, sandbox_id: str, *, timeout: float | None = None) -> None:
        """Power the guest off gracefully, forcing it after ``timeout`` seconds.

        Succeeds on an unknown, created or already stopped sandbox.
        """

    def wait(self, sandbox_id: str, timeout: float | None = None) -> ExitStatus:
        """Block until the guest is gone and return how and when it ended.

        Raises NotFound, DeadlineExceeded when ``timeout`` seconds pass first.
        """

    def status(self, sandbox_id: str, *, verbose: bool = False) -> ControllerStatus:
        """State (SANDBOX_READY / SANDBOX_NOTREADY), VMM pid and times. Raises NotFound."""

    def shutdown(self, sandbox_id: str) -> None:
        """Stop the sandbox if needed, then remove everything it owns. Idempotent."""

    def metrics(self, sandbox_id: str) -> Metric:
        """Resource figures of the sandbox's VM. Raises NotFound."""

    def update(self, sandbox_id: str, sandbox: SandboxMetadata, *fields: str) -> None:
        """Apply changes of ``sandbox`` named by ``fields`` (all when none).

        Raises NotFound, InvalidArgument for unknown fields, FailedPrecondition when a
        change cannot reach the running guest.
        """
