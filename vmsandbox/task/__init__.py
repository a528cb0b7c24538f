"""containerd's task API (``containerd.task.v3.Task``) per sandbox, served over vmsandbox.ttrpc.

For now a skeleton that registers every rpc and answers UNIMPLEMENTED (issue 11 builds the
handlers: container registry, spec rewrite for the guest, rootfs share, stdio pumps, all
through the Guest port, never libvirt).
"""

from __future__ import annotations

from .service import RPCS, SERVICE_NAME, TaskService

__all__ = ["TaskService", "SERVICE_NAME", "RPCS"]
