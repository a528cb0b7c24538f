"""Generated protobuf/gRPC code (``hack/gen-proto.sh``) for containerd's wire types; do not edit.

The .proto sources sit beside the generated modules. Wire package names equal containerd's
(``containerd.types``, ``containerd.services.sandbox.v1``, ``containerd.task.v3``,
``containerd.v1.types``, ``io.containerd.cgroups.v2``, ``runtime.v1``, ``ttrpc``); only the
Python module paths live under ``vmsandbox.proto``. The task API (``containerd.task.v3``) is
served over ttrpc, so it has no gRPC stub.
"""
