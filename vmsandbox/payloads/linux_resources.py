"""The runtime-spec ``LinuxResources`` that containerd's Update carries (CRI's UpdateContainerResources).

containerd marshals ``specs.LinuxResources`` with typeurl, which registers it as
``types.containerd.io/opencontainers/runtime-spec/1/LinuxResources`` and writes Go's
encoding/json of it: ``{"memory": {"limit": 33554432}, "cpu": {"shares": 512, "quota": 50000,
"period": 100000}, "pids": {"limit": 100}, ...}``. It is handed to the OCI runtime as it is,
so only its shape is checked here.
"""

from __future__ import annotations

import json
from typing import Any as _Any

from ..errors import InvalidArgument
from ..model import AnyMessage

__all__ = ["TYPE_URL", "parse_linux_resources"]

TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"


def parse_linux_resources(a: AnyMessage) -> dict[str, _Any]:
    """The JSON object of a LinuxResources Any. InvalidArgument for another type, bytes that
    are not a JSON object, or a section (memory, cpu, pids, ...) that is not an object or list."""
    if a.type_url != TYPE_URL:
        raise InvalidArgument(f"resources have type {a.type_url!r}, want {TYPE_URL!r}")
    try:
        doc = json.loads(a.value)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidArgument(f"resources are not JSON: {e}") from e
    if not isinstance(doc, dict):
        raise InvalidArgument(f"resources must be a JSON object, not {type(doc).__name__}")
    for key, value in doc.items():
        if value is not None and not isinstance(value, (dict, list)):
            raise InvalidArgument(f"resources: {key!r} must be an object or a list, not {type(value).__name__}")
    return doc
