"""One PNG per series next to the JSON (needs matplotlib: ``pip install '.[bench]'``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .host import say
from .phases import PHASES
from .stats import pick as p

__all__ = ["plots"]


def plots(res: Mapping[str, Any], out: Path) -> list[str]:
    """One PNG per series next to the JSON; returns their paths."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("matplotlib is missing (.venv/bin/pip install '.[bench]'): no plots")
        return []
    made: list[str] = []
    title = f"vmsandbox ({(res.get('host') or {}).get('virt_type')}, {res.get('started_at')})"

    def save(fig: Any, suffix: str) -> None:
        path = out.with_name(f"{out.stem}-{suffix}.png")
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(str(path))

    ser = res.get("serial") or {}
    if ser.get("controller") or ser.get("bare"):
        fig, ax = plt.subplots(figsize=(9, 4.5))
        rows: list[tuple[str, dict[str, Any]]] = []
        for kind in ("controller", "bare"):
            for i, s in enumerate((ser.get(kind) or {}).get("samples", [])):
                rows.append((f"{'ours' if kind == 'controller' else 'bare'} {i}", s["phases_ms"]))
        colors = [plt.get_cmap("tab10")(j) for j in range(10)]
        lefts = [0.0] * len(rows)
        for j, (key, label, _e) in enumerate(PHASES):
            widths = [ph.get(key) or 0.0 for _n, ph in rows]
            ax.barh([n for n, _ph in rows], widths, left=lefts, color=colors[j % 10], label=label)
            lefts = [a + b for a, b in zip(lefts, widths)]
        ax.invert_yaxis()
        ax.set_xlabel("ms since create (serial starts, one bar each)")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=3)
        save(fig, "serial")
    sp = res.get("start_paths") or {}
    kinds = [k for k in ("cold", "template") if (sp.get(k) or {}).get("samples")]
    if kinds:
        fig, ax = plt.subplots(figsize=(6, 4))
        data = [[x["phases_ms"]["total"] / 1000 for x in sp[k]["samples"] if x["phases_ms"]["total"] is not None]
                for k in kinds]
        ax.boxplot(data, whis=(0, 100))
        ax.set_xticks(range(1, len(kinds) + 1), [f"{k} (n={len(d)})" for k, d in zip(kinds, data)])
        for j, d in enumerate(data, start=1):
            ax.plot([j] * len(d), d, "o", color="tab:blue", alpha=0.5, markersize=4)
        r = sp.get("template_over_cold_p50")
        ax.set_ylabel("s, create -> first exec answered (serial)")
        ax.set_ylim(0, 1.1 * max((max(d) for d in data if d), default=1.0))
        if r is not None:
            ax.set_title(f"template / cold p50 = {r:.2f}x", fontsize=9)
        save(fig, "start-paths")
    mbs = res.get("memory_by_start") or {}
    mkinds = [k for k in ("cold", "template") if mbs.get(k)]
    if mkinds:
        fig, ax = plt.subplots(figsize=(6, 4))
        mlevels = [f"n{n}" for n in mbs.get("levels") or []]
        width = 0.8 / len(mkinds)
        for j, k in enumerate(mkinds):
            xs = [i + j * width for i in range(len(mlevels))]
            qemu = [(p((mbs[k].get(lv) or {}).get("qemu_pss_kib"), "mean") or 0) / 1024 for lv in mlevels]
            fs = [(p((mbs[k].get(lv) or {}).get("virtiofsd_pss_kib"), "mean") or 0) / 1024 for lv in mlevels]
            ax.bar(xs, qemu, width, label=f"{k}: QEMU", color=f"C{2 * j}")
            ax.bar(xs, fs, width, bottom=qemu, label=f"{k}: virtiofsd", color=f"C{2 * j + 1}")
        ax.set_xticks([i + width * (len(mkinds) - 1) / 2 for i in range(len(mlevels))],
                      [f"{lv[1:]} running" for lv in mlevels])
        ax.set_ylabel(f"MiB PSS per idle sandbox (mean, after {mbs.get('idle_s', 0):.0f}s idle)")
        ax.legend(fontsize=8)
        save(fig, "memory-by-start")
    par = res.get("parallel") or []
    part = res.get("parallel_template") or []
    if par or part:
        eff = res.get("parallel_efficiency") or {}
        fig, ax = plt.subplots(figsize=(6, 4))
        ns = sorted({r["n"] for r in [*par, *part]})
        for prows, kind, style in ((par, "cold", "o-"), (part, "template", "^-")):
            if prows:
                ax.plot([r["n"] for r in prows], [r["all_ready_s"] for r in prows], style,
                        label=f"{kind}: all ready (s)")
            elevels = (eff.get(kind) or {}).get("levels") or {}
            pts = sorted((int(n), e["target_s"]) for n, e in elevels.items() if e.get("target_s") is not None)
            if pts:
                ax.plot([a for a, _b in pts], [b for _a, b in pts], "x:", label=f"{kind}: target (1.3 x ideal)")
        ax.set_xlabel("sandboxes started at once")
        ax.set_ylabel("seconds until all answered")
        ax2 = ax.twinx()
        if par:
            ax2.plot([r["n"] for r in par], [r["sandboxes_per_s"] for r in par], "s--", color="tab:orange",
                     label="cold: sandboxes/s")
        ax2.set_ylabel("sandboxes per second")
        ax.set_xticks(ns)
        ax.set_ylim(bottom=0)
        ax2.set_ylim(bottom=0)
        fig.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.1, 0.9))
        save(fig, "parallel")
    ops = res.get("operations") or {}
    if ops:
        fig, ax = plt.subplots(figsize=(8, 4))
        names = ["status", "platform", "metrics", "list", "exec_true", "stop", "shutdown"]
        width = 0.8 / max(1, len(ops))
        for j, (lv, o) in enumerate(ops.items()):
            xs = [i + j * width for i in range(len(names))]
            p50 = [(o.get(nm) or {}).get("p50", 0) for nm in names]
            p90 = [(o.get(nm) or {}).get("p90", 0) for nm in names]
            ax.bar(xs, p50, width, label=f"{lv} running (p50, bar to p90)",
                   yerr=[[0] * len(names), [b - a for a, b in zip(p50, p90)]])
        ax.set_xticks([i + width * (len(ops) - 1) / 2 for i in range(len(names))], names)
        ax.set_yscale("log")
        ax.set_ylabel("ms (log)")
        ax.legend(fontsize=8)
        save(fig, "operations")
    mem = res.get("memory") or []
    if mem:
        fig, ax = plt.subplots(figsize=(6, 4))
        ns = [m["running"] for m in mem]
        ax.plot(ns, [(p(m["qemu_pss_kib"], "mean") or 0) / 1024 for m in mem], "o-", label="QEMU PSS per sandbox")
        ax.plot(ns, [(m["controller_rss_kib"] or 0) / 1024 for m in mem], "s--", label="controller RSS")
        ax.set_xlabel("sandboxes running")
        ax.set_xticks(ns)
        ax.set_ylabel("MiB")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
        save(fig, "memory")
    cri = (res.get("cri") or {}).get("figures_ms") or {}
    if cri:
        from .report import CRI_LABELS

        keys = [k for k in CRI_LABELS if cri.get(k)]
        fig, ax = plt.subplots(figsize=(8, 4))
        p50 = [cri[k]["p50"] for k in keys]
        p90 = [cri[k]["p90"] for k in keys]
        ax.barh([CRI_LABELS[k].strip() for k in keys], p50, xerr=[[0] * len(keys), [b - a for a, b in zip(p50, p90)]],
                color="tab:blue", label="p50 (bar to p90)")
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("ms (log)")
        ax.legend(fontsize=8)
        save(fig, "cri")
    return made


