"""Names of the taps this package creates: deterministic per sandbox, recognisable on sight."""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Sequence

from ..errors import InvalidArgument

__all__ = ["TAP_PREFIX", "MAX_TAPS", "tap_names", "check_tap_names"]

TAP_PREFIX = "vsbx"
"""Every tap we create is named ``vsbx`` + 11 base32 characters of sha256(sandbox id, index)."""

MAX_TAPS = 1000
"""A sanity bound on the taps of one sandbox (one per interface of its network namespace)."""

_HASH_CHARS = 11
"""4 + 11 characters fill the kernel's 15-character limit on interface names (IFNAMSIZ 16
with its NUL): 55 bits of hash, against 32 in the names of earlier versions."""

_TAP_RE = re.compile(rf"{TAP_PREFIX}[a-z2-7]{{{_HASH_CHARS}}}")
# Names of earlier versions (vsbx + 8 hex of sha256(id) + index), still found in their records.
_LEGACY_TAP_RE = re.compile(rf"{TAP_PREFIX}[0-9a-f]{{8}}(0|[1-9][0-9]{{0,2}})")


def _tap_name(sandbox_id: str, index: int) -> str:
    # The NUL cannot end an index, so (id, index) pairs never hash the same bytes.
    digest = hashlib.sha256(sandbox_id.encode("utf-8") + b"\0" + str(index).encode()).digest()
    return TAP_PREFIX + base64.b32encode(digest).decode("ascii").lower()[:_HASH_CHARS]


def tap_names(sandbox_id: str, count: int) -> list[str]:
    """The names of the ``count`` taps of ``sandbox_id``: ``vsbx`` + 11 base32 characters of
    sha256(sandbox id, index), exactly 15 characters.

    The same id always gives the same names, so teardown after a restart finds them again.
    Any two names share only by a 55-bit hash collision (and :func:`create_taps` refuses a
    name that is taken). Raises InvalidArgument for an empty id or a count outside
    ``0..MAX_TAPS``.
    """
    if not isinstance(sandbox_id, str) or not sandbox_id:
        raise InvalidArgument(f"sandbox id {sandbox_id!r} must be a non-empty string")
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= MAX_TAPS:
        raise InvalidArgument(f"tap count {count!r} not in 0..{MAX_TAPS}", sandbox_id=sandbox_id)
    return [_tap_name(sandbox_id, i) for i in range(count)]


def check_tap_names(names: Sequence[str]) -> list[str]:
    """Return ``names`` as a list if each is a name :func:`tap_names` can produce (or one of
    the names earlier versions made, kept in their records), once.

    Only such names are created, moved or deleted by this package, so a wrong argument can
    never delete someone else's interface. Raises InvalidArgument otherwise.
    """
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise InvalidArgument(f"tap names must be a list of strings, not {names!r}")
    result = list(names)
    for name in result:
        if not isinstance(name, str) or not (_TAP_RE.fullmatch(name) or _LEGACY_TAP_RE.fullmatch(name)):
            raise InvalidArgument(
                f"{name!r} is not a tap name made by tap_names() ({TAP_PREFIX}<{_HASH_CHARS} base32 characters>)")
    if len(set(result)) != len(result):
        raise InvalidArgument(f"duplicate tap names in {result}")
    return result
