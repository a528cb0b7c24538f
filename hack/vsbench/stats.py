"""Statistics of samples: percentiles (``statistics.quantiles``), summaries and ratios."""

from __future__ import annotations

import re
import statistics
from collections.abc import Iterable, Mapping, Sequence

__all__ = ["percentile", "summarize", "pick", "ratio", "mib_per_s", "kib_field"]


def _percentiles(values: Sequence[float], ps: Sequence[int]) -> list[float]:
    xs = sorted(values)
    if not xs:
        raise ValueError("percentile of no values")
    for p in ps:
        if not 0 <= p <= 100:
            raise ValueError(f"percentile {p} is outside 0..100")
    if len(xs) == 1:
        return [xs[0]] * len(ps)
    # Linear between closest ranks: numpy's default, R's type 7. On a rank itself the sample
    # is the answer as it is (quantiles computes x * 100 / 100 there, which may be off by an ulp).
    cuts = statistics.quantiles(xs, n=100, method="inclusive")
    m = len(xs) - 1
    return [xs[p * m // 100] if p * m % 100 == 0 else cuts[p - 1] for p in ps]


def percentile(values: Sequence[float], p: int) -> float:
    """The p-th percentile (a whole number 0..100), linear between closest ranks."""
    if p != int(p):
        raise ValueError(f"percentile {p} is not a whole number")
    return _percentiles(values, [int(p)])[0]


def summarize(values: Iterable[float | None]) -> dict[str, float] | None:
    """n, min, p50, p90, p99, max and mean of the values that are not None; None if none."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return None
    p50, p90, p99 = _percentiles(xs, [50, 90, 99])
    return {"n": len(xs), "min": min(xs), "p50": p50, "p90": p90, "p99": p99, "max": max(xs),
            "mean": statistics.fmean(xs)}


def pick(summary: Mapping[str, float] | None, key: str) -> float | None:
    """One figure of a summary that may be missing."""
    return None if summary is None else summary.get(key)


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


def mib_per_s(nbytes: int | float, seconds: float) -> float | None:
    return None if seconds <= 0 else nbytes / 1048576 / seconds


def kib_field(text: str, name: str) -> int | None:
    """A ``Name:   1234 kB`` field of /proc/<pid>/status or smaps_rollup, in KiB."""
    m = re.search(rf"^{re.escape(name)}:\s+(\d+)\s+kB", text, re.M)
    return int(m.group(1)) if m else None
