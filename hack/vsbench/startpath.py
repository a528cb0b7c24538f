"""Cold boot against start from a template, in one run: create -> first exec by path, the
template's build, PSS per idle sandbox by path, and the parallel efficiency of each path
against QEMU's CPU seconds of one serial start."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmsandbox.sandbox.templates import ANNOTATION_START

from .host import say
from .phases import PHASES, Start
from .stats import pick, ratio, summarize

if TYPE_CHECKING:
    from .runner import Bench

__all__ = ["StartPaths", "ANNOTATION_START", "COLD", "TEMPLATE", "KINDS", "TARGET_FACTOR", "path_counts", "host_cores",
           "order_of", "path_summary", "cpu_s_of", "efficiency", "parallel_efficiency", "allocated_mib"]

log = logging.getLogger("bench")
COLD, TEMPLATE = "cold", "template"  #: the values of ANNOTATION_START and of status verbose "start"
KINDS = (COLD, TEMPLATE)
TARGET_FACTOR = 1.3  #: issue 12: all ready for N at once <= 1.3 x N x (CPU s of one boot) / host cores


def order_of(i: int, kinds: Sequence[str]) -> tuple[str, ...]:
    """The order of the kinds in round ``i``: alternated, so that drift on the host hits each alike."""
    return tuple(kinds) if i % 2 == 0 else tuple(reversed(kinds))


def path_counts(starts: Iterable[Start]) -> dict[str, int]:
    """How many starts took each path ("unknown": the controller did not say)."""
    out: dict[str, int] = {}
    for s in starts:
        out[s.path or "unknown"] = out.get(s.path or "unknown", 0) + 1
    return out


def path_summary(kind: str, starts: Sequence[Start]) -> dict[str, Any]:
    """The figures of serial starts that asked for ``kind``; those that took another path
    are kept as samples and counted, not summarized."""
    counted = [s for s in starts if s.path_ok]
    samples = [s.sample() for s in counted]
    return {
        "asked": kind,
        "n": len(starts),
        "n_counted": len(counted),
        "start_paths": path_counts(starts),
        "first_exec_ms": summarize(x["phases_ms"]["total"] for x in samples),
        "phases": {k: summarize(x["phases_ms"][k] for x in samples) for k, _l, _e in PHASES},
        "qemu_cpu_s": summarize(s.qemu_cpu_s for s in counted),
        "samples": samples,
        "other_path_samples": [s.sample() for s in starts if not s.path_ok],
    }


def cpu_s_of(samples: Iterable[Mapping[str, Any]], kind: str) -> list[float]:
    """QEMU CPU seconds of the samples that took the ``kind`` path (or did not say; a sample
    that did not ask was a cold boot before templates existed)."""
    out = []
    for s in samples:
        asked, took = s.get("start_asked") or COLD, s.get("start_path")
        if s.get("qemu_cpu_s") is not None and asked == kind and took in (None, kind):
            out.append(float(s["qemu_cpu_s"]))
    return out


def efficiency(n: int, cpu_s_one_boot: float | None, cores: int, all_ready_s: float) -> dict[str, Any]:
    """``ideal_s`` = N x CPU s of one boot / host cores (every core busy with boots, nothing
    wasted); ``efficiency`` = ideal_s / all_ready_s; the target is all_ready_s <= 1.3 ideal_s."""
    ideal = None if cpu_s_one_boot is None or cores < 1 else n * cpu_s_one_boot / cores
    return {
        "n": n,
        "ideal_s": ideal,
        "all_ready_s": all_ready_s,
        "efficiency": ratio(ideal, all_ready_s),
        "target_s": None if ideal is None else TARGET_FACTOR * ideal,
        "target_met": None if ideal is None else all_ready_s <= TARGET_FACTOR * ideal,
    }


def parallel_efficiency(res: Mapping[str, Any], cores: int) -> dict[str, Any]:
    """Per path: QEMU's CPU seconds of one serial start (p50 over this run's serial starts
    of that path) and the efficiency of each parallel level of N >= 2 of that path."""
    ser = ((res.get("serial") or {}).get("controller") or {}).get("samples") or []
    sp = res.get("start_paths") or {}
    out: dict[str, Any] = {"host_cores": cores, "target_factor": TARGET_FACTOR}
    for kind, rows in ((COLD, res.get("parallel") or []), (TEMPLATE, res.get("parallel_template") or [])):
        cpu = cpu_s_of([*(ser if kind == COLD else []), *((sp.get(kind) or {}).get("samples") or [])], kind)
        one = pick(summarize(cpu), "p50")
        levels = {}
        for row in rows:
            if row["n"] >= 2:
                e = efficiency(row["n"], one, cores, row["all_ready_s"])
                e["start_paths"] = row.get("start_paths")
                levels[str(row["n"])] = e
        if cpu or levels:
            out[kind] = {"cpu_s_one_boot": one, "cpu_s_samples": len(cpu), "levels": levels}
    return out


def allocated_mib(path: Path) -> float | None:
    """Disk space a file or folder takes (allocated blocks, so sparse files count what they use)."""
    try:
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        return sum(p.stat().st_blocks * 512 for p in files) / 1048576
    except OSError:
        return None


class StartPaths:
    """The cold/template sections of a run; figures go into the bench's results."""

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.kinds: tuple[str, ...] = (COLD,)
        ctl = bench.controller
        if bench.opts.no_templates:
            self.skipped = "--no-templates"
        elif not ctl.config.templates:
            self.skipped = "the controller's Config has templates=False ($VMSANDBOX_TEMPLATES)"
        else:
            self.skipped = ""
            self.kinds = KINDS

    def ensure_template(self) -> None:
        """Before the first template start: build (or find) the template of the default
        shape, timed, into ``results["template"]`` (or why there is none)."""
        res = self.bench.results
        if "template" not in res:
            res["template"] = {"skipped": self.skipped} if self.skipped else self.build()

    def build(self) -> dict[str, Any]:
        """Build (or find) the template of the default shape; how long it took."""
        say("template: building (or finding) the template of the default shape")
        t = time.monotonic()
        info = self.bench.controller.warm_template(progress=lambda line: log.info("template: %s", line))
        call_s = time.monotonic() - t
        out = {"key": info.key, "path": str(info.path), "built": info.built, "build_s": info.build_seconds,
               "call_s": call_s, "size_mib": allocated_mib(Path(info.path))}
        say(f"template: {'built' if info.built else 'found'} in {call_s:.1f}s ({info.key})")
        return out

    def run_serial(self) -> None:
        """``--start-samples`` serial starts of each path, alternated, after ``--warmup`` each."""
        b, n, warm = self.bench, self.bench.opts.start_samples, self.bench.opts.warmup
        out: dict[str, Any] = {"n": n, "warmup": warm, "kinds": list(self.kinds)}
        b.results["start_paths"] = out
        self.ensure_template()
        starts: dict[str, list[Start]] = {k: [] for k in self.kinds}
        for i in range(-warm, n):
            tag = f"w{-i}" if i < 0 else f"s{i}"
            for kind in order_of(i, self.kinds):
                say(f"start paths {tag}: {kind} ({'warm-up' if i < 0 else f'{i + 1}/{n}'})")
                sid = f"{b.prefix}-{kind[0]}{tag}"
                s = b.ours(sid, dmesg=False, start=kind)
                b.remove(sid)
                if i >= 0:
                    starts[kind].append(s)
        for kind, xs in starts.items():
            out[kind] = path_summary(kind, xs)
        out["template_over_cold_p50"] = ratio(pick((out.get(TEMPLATE) or {}).get("first_exec_ms"), "p50"),
                                              pick((out.get(COLD) or {}).get("first_exec_ms"), "p50"))

    def run_memory(self) -> None:
        """PSS per sandbox with 1, then 5 (``--memory-levels``) of one path running, each
        level measured ``--idle`` seconds after its last sandbox answered; one path at a time."""
        b, idle, levels = self.bench, self.bench.opts.idle, self.bench.opts.memory_levels
        out: dict[str, Any] = {"idle_s": idle, "levels": levels}
        b.results["memory_by_start"] = out
        self.ensure_template()
        for kind in self.kinds:
            sids: list[str] = []
            per: dict[str, Any] = {}
            out[kind] = per
            try:
                for n in levels:
                    new = [f"{b.prefix}-m{kind[0]}{j}" for j in range(len(sids), n)]
                    say(f"memory by start: {kind}, {len(new)} more to {n} running, then {idle:.0f}s idle")
                    wall, starts = b.start_batch(new, kind)
                    sids += new
                    time.sleep(idle)
                    m = b.memory(sids)
                    m["started_s"] = wall
                    m["start_paths"] = path_counts(starts)
                    per[f"n{n}"] = m
            finally:
                b.remove_many(sids)

    def run_parallel(self, levels: Sequence[int]) -> None:
        """N from the template at once, for each level; timing only (the cold levels carry
        the operations and memory)."""
        b = self.bench
        rows: list[dict[str, Any]] = []
        b.results["parallel_template"] = rows
        if TEMPLATE not in self.kinds:
            return
        self.ensure_template()
        for n in levels:
            say(f"parallel from the template: {n} at once")
            sids = [f"{b.prefix}-pt{n}-{j}" for j in range(n)]
            try:
                rows.append(b.parallel_row(sids, TEMPLATE))
                say(f"parallel from the template: {n} ready in {rows[-1]['all_ready_s']:.2f}s")
            finally:
                b.remove_many(sids)


def host_cores() -> int:
    return os.cpu_count() or 1
