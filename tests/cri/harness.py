"""The CRI tests' node: a private containerd and `vmsandbox serve` (hack/vsbench/node.py, shared
with the bench's CRI section)."""

from vsbench.node import (
    BUSYBOX_IMAGE,
    CNI_CACHE,
    CONTAINERD_ENV,
    DEPLOY_SOCKET,
    PAUSE_IMAGE,
    RUNTIME_HANDLER,
    Binaries,
    Containerd,
    find_binaries,
    sh,
    unmount_under,
)

__all__ = ["BUSYBOX_IMAGE", "CNI_CACHE", "CONTAINERD_ENV", "DEPLOY_SOCKET", "PAUSE_IMAGE", "RUNTIME_HANDLER",
           "Binaries", "Containerd", "find_binaries", "sh", "unmount_under"]
