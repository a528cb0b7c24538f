"""Names of the taps this package creates: deterministic per sandbox, recognisable on sight."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

from ..errors import InvalidArgument

__all__ = ["TAP_PREFIX", "MAX_TAPS", "tap_names", "check_tap_names"]

TAP_PREFIX = "vsbx"
"""Every tap we create is named ``vsbx`` + 8 hex digits of sha256(sandbox id) + its index."""

MAX_TAPS = 1000
"""4 + 8 + 3 digits of index fill the kernel's 15-character limit on interface names."""

_TAP_RE = re.compile(rf"^{TAP_PREFIX}[0-9a-f]{{8}}(0|[1-9][0-9]{{0,2}})$")


def tap_names(sandbox_id: str, count: int) -> list[str]:
    """The names of the ``count`` taps of ``sandbox_id``: ``vsbx<8 hex><index>``, at most 15
    characters.

    The same id always gives the same names, so teardown after a restart finds them again.
    Distinct ids share a name only if their sha256 digests share 32 bits. Raises
    InvalidArgument for an empty id or a count outside ``0..MAX_TAPS``.
    """
    if not isinstance(sandbox_id, str) or not sandbox_id:
        raise InvalidArgument(f"sandbox id {sandbox_id!r} must be a non-empty string")
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= MAX_TAPS:
        raise InvalidArgument(f"tap count {count!r} not in 0..{MAX_TAPS}", sandbox_id=sandbox_id)
    digest = hashlib.sha256(sandbox_id.encode("utf-8")).hexdigest()[:8]
    return [f"{TAP_PREFIX}{digest}{i}" for i in range(count)]


def check_tap_names(names: Sequence[str]) -> list[str]:
    """Return ``names`` as a list if each is a name :func:`tap_names` can produce, once.

    Only such names are created, moved or deleted by this package, so a wrong argument can
    never delete someone else's interface. Raises InvalidArgument otherwise.
    """
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise InvalidArgument(f"tap names must be a list of strings, not {names!r}")
    result = list(names)
    for name in result:
        if not isinstance(name, str) or not _TAP_RE.match(name):
            raise InvalidArgument(f"{name!r} is not a tap name made by tap_names() ({TAP_PREFIX}<8 hex><index>)")
    if len(set(result)) != len(result):
        raise InvalidArgument(f"duplicate tap names in {result}")
    return result
