"""The guest's own clocks: ``/proc/uptime`` and the kernel log, placed on the host timeline."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["parse_uptime", "parse_dmesg", "dmesg_time", "biggest_gaps", "guest_timeline", "GUEST_KEYS"]

_DMESG = re.compile(r"^(?:<\d+>)?\[\s*(\d+\.\d+)\]\s?(.*)$")

GUEST_KEYS = ("vmm_to_kernel_ms", "kernel_to_run_init_ms", "run_init_to_console_ms", "crng_ready_ms",
              "agent_line_guest_ms", "ready_guest_ms", "clock_error_ms")


def parse_uptime(text: bytes | str) -> float | None:
    """Seconds since the guest kernel's clock started, from ``/proc/uptime``."""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    try:
        return float(text.split()[0])
    except (IndexError, ValueError):
        return None


def parse_dmesg(text: bytes | str) -> list[tuple[float, str]]:
    """``[   1.234567] message`` lines as (seconds, message); other lines are skipped."""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    out = []
    for line in text.splitlines():
        m = _DMESG.match(line)
        if m:
            out.append((float(m.group(1)), m.group(2)))
    return out


def dmesg_time(events: Sequence[tuple[float, str]], pattern: str) -> float | None:
    """Guest time of the first kernel message matching the regex ``pattern``."""
    rx = re.compile(pattern)
    for t, msg in events:
        if rx.search(msg):
            return t
    return None


def biggest_gaps(events: Sequence[tuple[float, str]], top: int = 8) -> list[dict[str, Any]]:
    """The largest pauses in the kernel log: where boot time goes between two messages."""
    pairs = sorted(zip(events, events[1:]), key=lambda ab: ab[0][0] - ab[1][0])
    return [{"at_s": t1, "gap_ms": (t2 - t1) * 1000, "after": m1, "before": m2}
            for (t1, m1), (t2, m2) in pairs[:top]]


def guest_timeline(
    stamps: Mapping[str, float | None], uptime: float | None, events: Sequence[tuple[float, str]]
) -> dict[str, float | None]:
    """Guest-clock facts of one boot, placed on the host timeline (milliseconds).

    The first exec read the guest's uptime somewhere between ``exec_start`` and
    ``exec_done``; its midpoint minus the uptime is when the guest kernel's clock read 0
    (the error is half the exec's round trip, ``clock_error_ms``). "Ready" is RUNNING, or
    for a bare start (no controller, no RUNNING) the agent's answer.
    """
    out: dict[str, float | None] = dict.fromkeys(GUEST_KEYS)
    begin, done, booted = stamps.get("exec_start"), stamps.get("exec_done"), stamps.get("booted")
    ready = stamps.get("running")
    if ready is None:
        ready = stamps.get("agent_ready")
    run_init = dmesg_time(events, r"Run \S+ as init process")
    crng = dmesg_time(events, r"crng init done")
    out["kernel_to_run_init_ms"] = None if run_init is None else run_init * 1000
    out["crng_ready_ms"] = None if crng is None else crng * 1000
    if uptime is None or begin is None or done is None:
        return out
    zero = (begin + done) / 2 - uptime
    out["clock_error_ms"] = (done - begin) / 2 * 1000
    if ready is not None:
        out["ready_guest_ms"] = (ready - zero) * 1000
    if booted is not None:
        out["vmm_to_kernel_ms"] = (zero - booted) * 1000
    init_line, agent_line = stamps.get("init_line"), stamps.get("agent_line")
    if init_line is not None and run_init is not None:
        out["run_init_to_console_ms"] = ((init_line - zero) - run_init) * 1000
    if agent_line is not None:
        out["agent_line_guest_ms"] = (agent_line - zero) * 1000
    return out
