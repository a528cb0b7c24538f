"""The printed report: start phases (ours vs bare), guest boot, parallel, operations, memory, network."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .phases import PHASES
from .stats import pick as p

__all__ = ["ANCHORS", "report", "start_path_lines", "memory_by_start_lines", "efficiency_lines", "cri_lines",
           "network_lines", "noise_line", "anchors_line", "render_table", "fmt_ms",
           "fmt_ratio"]

# Published figures the README compares us with (see the benchmark issue).
ANCHORS = {
    "firecracker_boot_to_init_ms": 125,
    "kuasar_serial_p50_ms": 324,
    "kata_serial_p50_ms": 900,
    "kuasar_parallel_50_s": 1.0,
    "kata_parallel_50_s": 1.72,
}


def fmt_ms(v: float | None) -> str:
    if v is None:
        return "n/a"
    if abs(v) >= 100:
        return f"{v:.0f}"
    return f"{v:.1f}" if abs(v) >= 1 else f"{v:.2f}"


def fmt_ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b <= 0:
        return "n/a"
    return f"{a / b:.2f}x"


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]], indent: int = 2) -> str:
    """A plain text table: the first column left-aligned, the others right-aligned."""
    cols = [headers, *rows]
    widths = [max(len(r[i]) for r in cols) for i in range(len(headers))]
    lines = []
    for r in cols:
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        lines.append(" " * indent + "  ".join(cells).rstrip())
    lines.insert(1, " " * indent + "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def report(res: Mapping[str, Any]) -> str:
    """The printed table: start phases (ours vs bare), guest boot, parallel, ops, memory."""
    out: list[str] = []
    h = res.get("host", {})
    out.append(
        f"vmsandbox bench ({res.get('mode')}) | virt {h.get('virt_type')} | {h.get('cpu_model')} x {h.get('cpu_count')}"
        f" | host kernel {h.get('host_kernel')} | libvirt {h.get('libvirt_version')} | QEMU {h.get('qemu_version')}"
    )
    out.append(
        f"guest: kernel {h.get('guest_kernel')}, {h.get('guest_machine')}, {h.get('guest_vcpus')} vCPU,"
        f" {h.get('guest_memory_mib')} MiB (max {h.get('guest_max_memory_mib')}), cmdline '{h.get('guest_cmdline')}'"
    )
    code = res.get("code")
    if code:
        out.append(f"code: {code.get('vmsandbox')} ({code.get('commit') or 'not a git checkout'})")
    ser = res.get("serial")
    if ser:
        ours, bare = ser.get("controller"), ser.get("bare")
        out.append("")
        out.append(f"Start latency, serial: N={ser['n']} (+{ser['warmup']} warm-up), create -> first exec answered, ms")
        heads = ["phase", "ours p50", "p90", "p99", "bare p50", "p90", "p99", "ours/bare p50"]
        rows = []
        for key, label, _end in (*PHASES, ("total", "total", "")):
            a = ours["phases"].get(key) if ours else None
            b = bare["phases"].get(key) if bare else None
            rows.append([label, fmt_ms(p(a, "p50")), fmt_ms(p(a, "p90")), fmt_ms(p(a, "p99")),
                         fmt_ms(p(b, "p50")), fmt_ms(p(b, "p90")), fmt_ms(p(b, "p99")),
                         fmt_ratio(p(a, "p50"), p(b, "p50"))])
        out.append(render_table(heads, rows))
        g = (ours or bare or {}).get("guest") or {}
        if g:
            out.append("")
            out.append("Guest boot, from the guest's clocks (dmesg + /proc/uptime), ms, "
                       + ("ours" if ours else "bare") + " samples")
            labels = [
                ("vmm_to_kernel_ms", "libvirt create returned -> guest kernel clock 0 (firmware, kernel load)"),
                ("kernel_to_run_init_ms", "kernel clock 0 -> 'Run /init' (kernel boot)"),
                ("run_init_to_console_ms", "'Run /init' -> 'init started' on the console"),
                ("crng_ready_ms", "'crng init done' (guest clock)"),
                ("agent_line_guest_ms", "'agent ready' line (guest clock)"),
                ("ready_guest_ms", "RUNNING, start() returns (guest clock)"),
                ("clock_error_ms", "(error of the clock mapping, +/-)"),
            ]
            rows = [[lab, fmt_ms(p(g.get(k), "p50")), fmt_ms(p(g.get(k), "p90"))] for k, lab in labels if g.get(k)]
            out.append(render_table(["", "p50", "p90"], rows))
            gaps = (ours or bare or {}).get("dmesg_gaps") or []
            if gaps:
                out.append("  biggest gaps in the kernel log (first sample):")
                for gap in gaps[:5]:
                    out.append(f"    {gap['gap_ms']:7.1f} ms at {gap['at_s']:.3f}s  after '{gap['after'][:60]}'"
                               f"  before '{gap['before'][:60]}'")
    sp = res.get("start_paths")
    if sp:
        out.append("")
        out.extend(start_path_lines(sp, res.get("template")))
    mbs = res.get("memory_by_start")
    if mbs:
        out.append("")
        out.extend(memory_by_start_lines(mbs))
    par = [*(res.get("parallel") or []), *(res.get("parallel_template") or [])]
    if par:
        out.append("")
        out.append("Parallel start: N at once, create -> first exec answered")
        rows = [[str(r["n"]), r.get("start") or "cold", f"{r['all_ready_s']:.2f}", f"{r['sandboxes_per_s']:.2f}",
                 fmt_ms(p(r["per_sandbox_ms"], "p50")), fmt_ms(p(r["per_sandbox_ms"], "p90")),
                 fmt_ms(p(r["per_sandbox_ms"], "max")), str(r.get("failed_ssh_attempts", "n/a"))] for r in par]
        out.append(render_table(["N", "path", "all ready s", "sandboxes/s", "each p50 ms", "p90", "max",
                                 "SSH attempts timed out"], rows))
    eff = res.get("parallel_efficiency")
    if eff:
        out.append("")
        out.extend(efficiency_lines(eff))
    ops = res.get("operations")
    if ops:
        levels = list(ops)
        out.append("")
        out.append("Operation latency, ms, p50 / p90, by sandboxes running")
        names = [("status", "status"), ("platform", "platform"), ("metrics", "metrics"), ("list", "list"),
                 ("exec_true", "exec true (warm transport)"), ("stop", "stop (clean power-off)"),
                 ("shutdown", "shutdown (remove)")]
        rows = []
        for key, label in names:
            row = [label]
            for lv in levels:
                s = ops[lv].get(key)
                row.append("n/a" if s is None else f"{fmt_ms(s['p50'])} / {fmt_ms(s['p90'])}")
            rows.append(row)
        out.append(render_table(["operation", *[f"{lv} running" for lv in levels]], rows))
    mem = res.get("memory")
    if mem:
        out.append("")
        out.append("Memory, MiB")
        rows = [["QEMU PSS per sandbox (mean)", *[_mib(p(m["qemu_pss_kib"], "mean")) for m in mem]],
                ["QEMU PSS per sandbox (max)", *[_mib(p(m["qemu_pss_kib"], "max")) for m in mem]],
                ["QEMU PSS, all sandboxes", *[_mib(m["qemu_pss_kib_total"]) for m in mem]],
                ["controller RSS (this process)", *[_mib(m["controller_rss_kib"]) for m in mem]]]
        out.append(render_table(["", *[f"{m['running']} running" for m in mem]], rows))
        idle = res.get("controller_rss_kib_idle")
        if idle:
            out.append(f"  controller RSS before any sandbox: {_mib(idle)} MiB")
    net = res.get("network")
    if net:
        out.append("")
        out.extend(network_lines(net))
    cri = res.get("cri")
    if cri:
        out.append("")
        out.extend(cri_lines(cri))
    noise = noise_line(res)
    if noise:
        out.append("")
        out.append(noise)
    if res.get("serial") or res.get("parallel"):
        out.append("")
        out.append(anchors_line(res))
    if res.get("error"):
        out.append(f"\nERROR: {res['error']}")
    if "duration_s" in res:
        out.append(f"total bench time {res['duration_s']:.1f}s")
    return "\n".join(out)


def _paths_note(counts: Mapping[str, int] | None, asked: str) -> str:
    """"" when every start took the path asked for (or did not say), else what they took."""
    other = {k: v for k, v in (counts or {}).items() if k not in (asked, "unknown")}
    return "" if not other else " (took: " + ", ".join(f"{v} {k}" for k, v in sorted((counts or {}).items())) + ")"


def start_path_lines(sp: Mapping[str, Any], template: Mapping[str, Any] | None = None) -> list[str]:
    """Cold boot against start from a template: create -> first exec, the ratio, the build."""
    out = [f"Start path: cold boot vs from a template, serial, N={sp.get('n')} each (+{sp.get('warmup')} warm-up),"
           " alternated, create -> first exec answered"]
    rows = []
    for kind in ("cold", "template"):
        k = sp.get(kind)
        if not k:
            continue
        f, cpu = k.get("first_exec_ms"), k.get("qemu_cpu_s")
        rows.append([kind + _paths_note(k.get("start_paths"), kind), fmt_ms(p(f, "p50")), fmt_ms(p(f, "p90")),
                     fmt_ms(p(f, "max")), "n/a" if p(cpu, "p50") is None else f"{p(cpu, 'p50'):.2f}",
                     f"{k.get('n_counted')}/{k.get('n')}"])
    if rows:
        out.append(render_table(["path", "p50 ms", "p90", "max", "QEMU CPU s p50", "counted"], rows))
    for kind in ("cold", "template"):
        ph = (sp.get(kind) or {}).get("phases") or {}
        known = [(label.split(" (")[0], p(ph.get(key), "p50")) for key, label, _e in PHASES]
        if any(v is not None for _n, v in known):
            out.append(f"  {kind}, p50 ms: " + " / ".join(f"{n} {fmt_ms(v)}" for n, v in known if v is not None))
    r = sp.get("template_over_cold_p50")
    if r is not None:
        out.append(f"  template / cold, p50: {r:.2f}x")
    b = template or {}
    if b.get("key"):
        size = b.get("size_mib")
        out.append(f"  template {'built' if b.get('built') else 'found (built before; its build time is the old one)'}"
                   f": {b.get('build_s', 0):.1f}s by the controller, {b.get('call_s', 0):.1f}s for the call"
                   + ("" if size is None else f", {size:.0f} MiB on disk") + f" ({b.get('key')})")
    if b.get("skipped"):
        out.append(f"  template path not measured: {b['skipped']}")
    return out


def memory_by_start_lines(mbs: Mapping[str, Any]) -> list[str]:
    """PSS per idle sandbox by start path and number running."""
    levels = [f"n{n}" for n in mbs.get("levels") or []]
    kinds = [k for k in ("cold", "template") if mbs.get(k)]
    out = [f"Memory per idle sandbox by start path, MiB (read {mbs.get('idle_s', 0):.0f}s after the last answered)"]
    heads = ["", *[f"{k} {lv[1:]} running" for k in kinds for lv in levels]]
    rows = []
    for name, stat, label in (("qemu_pss_kib", "mean", "QEMU PSS per sandbox (mean)"),
                              ("virtiofsd_pss_kib", "mean", "virtiofsd PSS (mean)"),
                              ("sandbox_pss_kib", "mean", "QEMU + virtiofsd (mean)"),
                              ("sandbox_pss_kib", "max", "QEMU + virtiofsd (max)")):
        rows.append([label, *[_mib(p((mbs[k].get(lv) or {}).get(name), stat)) for k in kinds for lv in levels]])
    out.append(render_table(heads, rows))
    for k in kinds:
        for lv in levels:
            note = _paths_note((mbs[k].get(lv) or {}).get("start_paths"), k)
            if note:
                out.append(f"  WARNING: {k} {lv[1:]} running{note}")
    return out


def efficiency_lines(eff: Mapping[str, Any]) -> list[str]:
    """ideal_s = N x QEMU CPU s of one serial start / host cores; efficiency = ideal / all ready."""
    out = [f"Parallel efficiency: ideal = N x QEMU CPU s of one serial start / {eff.get('host_cores')} host cores;"
           f" target: all ready <= {eff.get('target_factor')} x ideal"]
    rows = []
    for kind in ("cold", "template"):
        k = eff.get(kind)
        if not k:
            continue
        one = k.get("cpu_s_one_boot")
        for n, e in (k.get("levels") or {}).items():
            rows.append([f"{kind} N={n}", "n/a" if one is None else f"{one:.2f}",
                         "n/a" if e.get("ideal_s") is None else f"{e['ideal_s']:.2f}", f"{e['all_ready_s']:.2f}",
                         "n/a" if e.get("efficiency") is None else f"{e['efficiency']:.2f}",
                         {True: "yes", False: "no", None: "n/a"}[e.get("target_met")]])
    if rows:
        out.append(render_table(["", "CPU s one boot", "ideal s", "all ready s", "efficiency", "target met"], rows))
    else:
        out.append("  (no parallel level of N >= 2)")
    return out


CRI_LABELS = {
    "pod_to_running": "RunPodSandbox -> 1st container RUNNING",
    "run_pod": "  RunPodSandbox",
    "first_create": "  CreateContainer (1st)",
    "first_start": "  StartContainer (1st)",
    "create_start": "Create+StartContainer (2nd, warm pod)",
    "exec_sync": "ExecSync true",
    "stop_remove": "StopPodSandbox + RemovePodSandbox",
}


def cri_lines(cri: Mapping[str, Any]) -> list[str]:
    """The CRI section: container start latency through containerd, ms."""
    if cri.get("skipped"):
        return [f"Containers through CRI: skipped ({cri['skipped']})"]
    out = [f"Containers through CRI (containerd {cri.get('containerd')}): N={cri.get('n')} pods "
           f"(+{cri.get('warmup')} warm-up), {cri.get('execs_per_pod')} ExecSync each, ms"]
    figs = cri.get("figures_ms") or {}
    rows = [[label, fmt_ms(p(figs.get(k), "p50")), fmt_ms(p(figs.get(k), "p90")), fmt_ms(p(figs.get(k), "max")),
             str(int(p(figs.get(k), "n") or 0))] for k, label in CRI_LABELS.items()]
    out.append(render_table(["step", "p50", "p90", "max", "n"], rows))
    return out


def network_lines(net: Mapping[str, Any]) -> list[str]:
    """The network section of the report: round trips, then TCP throughput."""
    out = [f"Network (peer netns <-> guest, tap + tc redirect): {net.get('peer_addr')} <-> {net.get('guest_addr')},"
           f" MTU {net.get('mtu')}" + (f", guest booted in {net['boot_s']:.1f}s" if net.get("boot_s") else "")]
    rtt = net.get("rtt_ms") or {}
    if rtt:
        rows = []
        for key, label in (("peer_to_guest", "ping peer -> guest"), ("guest_to_peer", "ping guest -> peer")):
            r = rtt.get(key)
            if key not in rtt:
                continue
            if r is None:
                rows.append([label, *["n/a"] * 5, "no reply"])
                continue
            lost = "n/a" if r.get("loss_pct") is None else f"{r['received']}/{r['sent']}"
            rows.append([label, *[fmt_ms(r.get(k)) for k in ("min", "avg", "p50", "p90", "max")], lost])
        out.append(render_table([f"round trip, ms (busybox ping -i {net.get('ping_interval_s')})",
                                 "min", "avg", "p50", "p90", "max", "replies"], rows))
    tcp = net.get("tcp") or {}
    if tcp:
        rows = []
        for key, label in (("peer_to_guest", "peer -> guest (nc -l in the guest)"),
                           ("guest_to_peer", "guest -> peer (dd | nc in the guest)"),
                           ("guest_to_peer_httpd", "guest -> peer (httpd sendfile in the guest)")):
            t = tcp.get(key)
            if t:
                rows.append([label, f"{t['bytes'] / 1048576:.0f}", f"{t['seconds']:.2f}",
                             "n/a" if t.get("mib_s") is None else f"{t['mib_s']:.1f}"])
        out.append(render_table(["TCP throughput", "MiB", "s", "MiB/s"], rows))
        if "guest_to_peer" in tcp and "guest_to_peer_httpd" in tcp:
            out.append("  (busybox nc writes in small chunks: under TCG the guest's CPU, not the path, limits dd | nc)")
    if net.get("other_domains_running"):
        out.append(f"  WARNING: {net['other_domains_running']} other guest(s) were running during the network figures")
    if "rtt_ms" not in net and "tcp" not in net:
        out.append("  (not measured)")
    return out


def noise_line(res: Mapping[str, Any]) -> str | None:
    """A warning when other guests ran on the host during our starts."""
    ser = res.get("serial") or {}
    counts = [s.get("other_domains_running", 0) for kind in ("controller", "bare")
              for s in (ser.get(kind) or {}).get("samples", [])]
    sp = res.get("start_paths") or {}
    counts += [s.get("other_domains_running", 0) for kind in ("cold", "template")
               for key in ("samples", "other_path_samples") for s in (sp.get(kind) or {}).get(key, [])]
    counts += [r.get("other_domains_running", 0) for r in [*(res.get("parallel") or []),
                                                            *(res.get("parallel_template") or [])]]
    busy = [c for c in counts if c]
    if not busy:
        return None
    return (f"WARNING: other guests were running on this host during {len(busy)} of {len(counts)} measured starts"
            f" (up to {max(busy)} at once): the figures include their load")


def anchors_line(res: Mapping[str, Any]) -> str:
    """Our figures next to the published ones (ANCHORS)."""
    a = ANCHORS
    ours = ((res.get("serial") or {}).get("controller") or {}).get("phases") or {}
    to_init = None
    if ours.get("domain_start") and ours.get("kernel_to_init"):
        to_init = ours["domain_start"]["p50"] + ours["kernel_to_init"]["p50"]
    total = p(ours.get("total"), "p50")
    par = res.get("parallel") or []
    big = par[-1] if par else None
    parts = [
        f"Firecracker boot to init <= {a['firecracker_boot_to_init_ms']} ms (ours, domain start + kernel to init p50: {fmt_ms(to_init)} ms)",
        f"Kuasar / Kata serial start p50 {a['kuasar_serial_p50_ms']} / {a['kata_serial_p50_ms']} ms (ours: {fmt_ms(total)} ms)",
        f"50 in parallel {a['kuasar_parallel_50_s']} / {a['kata_parallel_50_s']} s"
        + (f" (ours: {big['n']} in {big['all_ready_s']:.2f} s)" if big else ""),
    ]
    virt = (res.get("host") or {}).get("virt_type")
    note = " [ours under TCG software emulation: not comparable to KVM figures]" if virt == "tcg" else ""
    return "Anchors: " + "; ".join(parts) + note


def _mib(kib: float | None) -> str:
    return "n/a" if kib is None else f"{kib / 1024:.1f}"
