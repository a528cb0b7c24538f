"""Input checks shared by the controller: sandbox ids and resource annotations."""

from __future__ import annotations

import re
from collections.abc import Mapping

from ..errors import InvalidArgument

__all__ = ["check_sandbox_id", "resources_from_annotations", "ANNOTATION_VCPUS", "ANNOTATION_MEMORY_MIB"]

ANNOTATION_VCPUS = "vmsandbox.io/vcpus"
ANNOTATION_MEMORY_MIB = "vmsandbox.io/memory-mib"
MIN_MEMORY_MIB = 64
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@+-]*")


def check_sandbox_id(sandbox_id: object) -> str:
    """Return the id when it is a safe name, else raise InvalidArgument.

    Safe: 1-128 characters of letters, digits and ``_.:@+-``, starting with a letter or
    digit, never containing ``..`` (ids become file, socket and domain names).
    """
    if not isinstance(sandbox_id, str) or not sandbox_id:
        raise InvalidArgument("sandbox id must be a non-empty string")
    if len(sandbox_id) > 128:
        raise InvalidArgument(f"sandbox id is longer than 128 characters ({len(sandbox_id)})")
    if ".." in sandbox_id or not _ID.fullmatch(sandbox_id):
        raise InvalidArgument(
            f"sandbox id {sandbox_id!r} is not a safe name (letters, digits and _.:@+- only, "
            "starting with a letter or digit, no '..')"
        )
    return sandbox_id


def _positive_int(key: str, value: str, lo: int, hi: int) -> int:
    try:
        n = int(value.strip(), 10)
    except ValueError:
        raise InvalidArgument(f"annotation {key}={value!r} is not a whole number") from None
    if not lo <= n <= hi:
        raise InvalidArgument(f"annotation {key}={n} is out of range [{lo}, {hi}]")
    return n


def resources_from_annotations(
    annotations: Mapping[str, str], *, max_vcpus: int, max_memory_mib: int
) -> tuple[int | None, int | None]:
    """(vcpus, memory MiB) named by our annotations; None where not given."""
    vcpus = mem = None
    if ANNOTATION_VCPUS in annotations:
        vcpus = _positive_int(ANNOTATION_VCPUS, annotations[ANNOTATION_VCPUS], 1, max_vcpus)
    if ANNOTATION_MEMORY_MIB in annotations:
        mem = _positive_int(ANNOTATION_MEMORY_MIB, annotations[ANNOTATION_MEMORY_MIB], MIN_MEMORY_MIB, max_memory_mib)
    return vcpus, mem
