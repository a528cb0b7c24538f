"""What containerd and CRI carry in protobuf Any values, as typed values.

- :mod:`.podconfig`: CRI's ``runtime.v1.PodSandboxConfig`` in Create's options;
- :mod:`.cgroupsv2`: ``io.containerd.cgroups.v2.Metrics``, the data of Metrics;
- :mod:`.updated_resources`: CRI's ``updated-resources`` sandbox extension in Update;
- :mod:`.linux_resources`: the runtime-spec LinuxResources of the task API's Update.

Pure code: protobuf, the generated messages in :mod:`vmsandbox.proto` and our model and
errors, nothing else (no libvirt, pyroute2, paramiko or grpc, no I/O).
"""

from __future__ import annotations

from . import cgroupsv2, linux_resources, podconfig, updated_resources

__all__ = ["cgroupsv2", "linux_resources", "podconfig", "updated_resources"]
