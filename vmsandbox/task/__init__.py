"""containerd's task API (``containerd.task.v3.Task``) per sandbox, served over vmsandbox.ttrpc.

:class:`TaskEngine` runs a sandbox's containers in its guest (supervised crun over the
GuestChannel port, rootfs and files through the :class:`BundleStager` port, CRI's FIFOs
pumped on the host); :class:`TaskService` adapts it to the rpcs. Never libvirt.
"""

from __future__ import annotations

from .engine import TaskEngine
from .ports import BundleStager, StagedBundle
from .process import Exit, IoSpec, ProcessState, Status
from .service import RPCS, SERVICE_NAME, TaskService
from .spec import rewrite_process, rewrite_spec

__all__ = [
    "TaskService",
    "TaskEngine",
    "BundleStager",
    "StagedBundle",
    "IoSpec",
    "Exit",
    "ProcessState",
    "Status",
    "rewrite_spec",
    "rewrite_process",
    "SERVICE_NAME",
    "RPCS",
]
