"""The bench's cold-vs-template figures (hack/vsbench): /proc parsing, path checks,
parallel efficiency and their report."""

from __future__ import annotations

from pathlib import Path

import pytest
from vsbench import options, phases, procs, report, startpath, stats

from vmsandbox.sandbox.events import LifecycleEvent, Step


def test_cpu_seconds_reads_utime_and_stime_even_when_comm_has_spaces_and_parens() -> None:
    # pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime ...
    stat = "4242 (qemu (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 12345 0 0"
    assert procs.cpu_seconds(stat, 100) == pytest.approx(3.0)
    assert procs.cpu_seconds("", 100) is None and procs.cpu_seconds("1 (x) S 1 2", 100) is None


def test_virtiofsd_of_a_domain_is_found_by_libvirts_pid_file_with_its_fork(tmp_path: Path) -> None:
    proc, run = tmp_path / "proc", tmp_path / "run"
    run.mkdir()

    def process(pid: int, *argv: str, kids: tuple[int, ...] = ()) -> None:
        (proc / str(pid) / "task" / str(pid)).mkdir(parents=True)
        (proc / str(pid) / "cmdline").write_text("\x00".join(argv) + "\x00")
        (proc / str(pid) / "task" / str(pid) / "children").write_text(" ".join(map(str, kids)) + " ")

    process(100, "/usr/bin/qemu-system-x86_64", "-name", "guest=vmsandbox-bench-4a1146-mc0,debug-threads=on", "-object",
            '{"file":"/var/lib/libvirt/qemu/domain-9-vmsandbox-bench-4a11/master-key.aes"}')
    process(101, "/usr/lib/qemu/virtiofsd", "--fd=33", "-o", "source=/x", kids=(102,))
    process(102, "/usr/lib/qemu/virtiofsd", "--fd=33", "-o", "source=/x")  # its namespace-sandbox fork
    process(103, "/usr/lib/qemu/virtiofsd", "--fd=33", "-o", "source=/y")  # another domain's
    (run / "9-vmsandbox-bench-4a11-fs0-fs.pid").write_text("101\n")
    (run / "19-vmsandbox-bench-4a11-fs0-fs.pid").write_text("103\n")
    (run / "9-vmsandbox-bench-4a11.pid").write_text("100\n")
    assert procs.domain_short_name((proc / "100" / "cmdline").read_text()) == "9-vmsandbox-bench-4a11"
    assert procs.children(101, proc) == [102]
    assert procs.virtiofsd_pids(100, proc, run) == [101, 102]
    assert procs.virtiofsd_pids(0, proc, run) == [] and procs.virtiofsd_pids(101, proc, run) == []


def _start(sid: str, total_s: float, asked: str | None, path: str | None, cpu: float | None,
           restored: bool = False) -> phases.Start:
    t0 = 10.0
    events = [LifecycleEvent(sid, Step.CREATED, monotonic=t0 + 0.01),
              LifecycleEvent(sid, Step.BOOTED, monotonic=t0 + 0.2, detail="template" if restored else "cold"),
              LifecycleEvent(sid, Step.AGENT_READY, monotonic=t0 + total_s - 0.1),
              LifecycleEvent(sid, Step.RUNNING, monotonic=t0 + total_s - 0.05)]
    stamps: dict[str, float | None] = {"t0": t0, **phases.stamps_from_events(events), "exec_done": t0 + total_s}
    return phases.Start(id=sid, stamps=stamps, exit_code=0, uptime=None, dmesg=[], others=0, events=events,
                        asked=asked, path=path, qemu_cpu_s=cpu)


def test_a_start_from_a_template_has_no_boot_phases() -> None:
    stamps = {"t0": 1.0, "created": 1.01, "booted": 1.3, "agent_ready": 1.6, "running": 1.62, "exec_done": 1.7}
    ph = phases.phase_durations(stamps)
    assert ph["domain_start"] == pytest.approx(290.0)
    assert ph["kernel_to_init"] is None and ph["init_script"] is None
    assert ph["agent_ready"] == pytest.approx(300.0) and ph["total"] == pytest.approx(700.0)


def test_samples_that_took_another_path_are_kept_apart_and_not_summarized() -> None:
    starts = [_start("a", 1.0, "template", "template", 0.5, restored=True),
              _start("b", 6.0, "template", "cold", 6.5),  # no template fitted: fell back to cold
              _start("c", 1.2, "template", "template", 0.6, restored=True)]
    assert not starts[1].path_ok and starts[0].path_ok
    assert _start("d", 1.0, "cold", None, None).path_ok  # a controller that does not say
    out = startpath.path_summary("template", starts)
    assert out["n"] == 3 and out["n_counted"] == 2 and out["start_paths"] == {"template": 2, "cold": 1}
    assert out["first_exec_ms"]["max"] == pytest.approx(1200.0)
    assert [s["id"] for s in out["other_path_samples"]] == ["b"]
    assert out["samples"][0]["start_asked"] == "template" and out["samples"][0]["qemu_cpu_s"] == 0.5


def test_kinds_alternate_which_goes_first() -> None:
    kinds = ("cold", "template")
    assert startpath.order_of(0, kinds) == kinds and startpath.order_of(1, kinds) == ("template", "cold")
    assert startpath.order_of(-1, kinds) == ("template", "cold")


def test_efficiency_against_the_cpu_of_one_boot() -> None:
    e = startpath.efficiency(10, 4.0, 2, 25.0)  # ideal: 10 x 4 s / 2 cores = 20 s
    assert e["ideal_s"] == pytest.approx(20.0) and e["efficiency"] == pytest.approx(0.8)
    assert e["target_s"] == pytest.approx(26.0) and e["target_met"] is True
    assert startpath.efficiency(10, 4.0, 2, 27.0)["target_met"] is False
    unknown = startpath.efficiency(5, None, 2, 9.0)
    assert unknown["ideal_s"] is None and unknown["efficiency"] is None and unknown["target_met"] is None


def test_parallel_efficiency_takes_the_cpu_of_serial_starts_of_the_same_path() -> None:
    cold = [{"start_asked": "cold", "start_path": "cold", "qemu_cpu_s": x} for x in (4.0, 5.0, 6.0)]
    res = {
        "serial": {"controller": {"samples": [{"start_asked": "cold", "start_path": None, "qemu_cpu_s": 5.0}]}},
        "start_paths": {
            "cold": {"samples": cold},
            "template": {"samples": [{"start_asked": "template", "start_path": "template", "qemu_cpu_s": 1.0},
                                     {"start_asked": "template", "start_path": "cold", "qemu_cpu_s": 9.0}]},
        },
        "parallel": [{"n": 1, "all_ready_s": 6.0}, {"n": 5, "all_ready_s": 15.0}],
        "parallel_template": [{"n": 5, "all_ready_s": 3.0, "start_paths": {"template": 5}}],
    }
    eff = startpath.parallel_efficiency(res, 2)
    assert eff["cold"]["cpu_s_one_boot"] == pytest.approx(5.0) and eff["cold"]["cpu_s_samples"] == 4
    assert list(eff["cold"]["levels"]) == ["5"]  # N = 1 is a serial start
    assert eff["cold"]["levels"]["5"]["ideal_s"] == pytest.approx(12.5)
    assert eff["cold"]["levels"]["5"]["target_met"] is True  # 15 <= 1.3 x 12.5
    t = eff["template"]
    assert t["cpu_s_one_boot"] == pytest.approx(1.0) and t["cpu_s_samples"] == 1  # the fallback is not counted
    assert t["levels"]["5"]["efficiency"] == pytest.approx(2.5 / 3.0)
    assert "template" not in startpath.parallel_efficiency({"parallel": res["parallel"]}, 2)


def test_start_path_options() -> None:
    o = options.parse_args(["--quick"])
    assert o.start_samples == 5 and o.idle == 20.0 and o.memory_levels == [1, 5] and o.template_parallel is None
    assert options.template_parallel(o, [1, 5, 10]) == [5, 10]
    o = options.parse_args(["--start-samples", "7", "--idle", "3", "--memory-levels", "none",
                            "--template-parallel", "2,4", "--no-templates"])
    assert o.start_samples == 7 and o.idle == 3.0 and o.memory_levels == [] and o.no_templates
    assert options.template_parallel(o, [1, 5, 10]) == [2, 4]
    assert options.parse_args([]).start_samples == 10


def test_report_renders_start_paths_memory_by_start_and_efficiency() -> None:
    s = stats.summarize
    mem = {"qemu_pss_kib": s([102400.0]), "virtiofsd_pss_kib": s([2048.0]), "sandbox_pss_kib": s([104448.0])}
    res = {
        "host": {},
        "start_paths": {"n": 5, "warmup": 1,
                        "cold": {"n": 5, "n_counted": 5, "first_exec_ms": s([6000.0]), "qemu_cpu_s": s([6.2]),
                                 "start_paths": {"cold": 5}},
                        "template": {"n": 5, "n_counted": 4, "first_exec_ms": s([900.0]), "qemu_cpu_s": s([0.8]),
                                     "start_paths": {"template": 4, "cold": 1}},
                        "template_over_cold_p50": 0.15},
        "template": {"key": "k1", "built": True, "build_s": 12.5, "call_s": 12.6, "size_mib": 80.0},
        "memory_by_start": {"idle_s": 20, "levels": [1, 5], "cold": {"n1": mem, "n5": mem},
                            "template": {"n1": mem, "n5": {**mem, "start_paths": {"cold": 1, "template": 4}}}},
        "parallel_template": [{"n": 5, "start": "template", "all_ready_s": 3.0, "sandboxes_per_s": 1.67,
                               "per_sandbox_ms": s([2500.0])}],
        "parallel_efficiency": {"host_cores": 2, "target_factor": 1.3,
                                "template": {"cpu_s_one_boot": 0.8,
                                             "levels": {"5": startpath.efficiency(5, 0.8, 2, 3.0)}}},
    }
    text = report.report(res)
    assert "template / cold, p50: 0.15x" in text and "template built: 12.5s" in text
    assert "template (took: 1 cold, 4 template)" in text
    assert "100.0" in text and "102.0" in text  # QEMU PSS, QEMU + virtiofsd in MiB
    assert "WARNING: template 5 running (took: 1 cold, 4 template)" in text
    assert "template N=5" in text and "0.67" in text and " no" in text  # ideal 2.0 s of 3.0 s: not met


class _Info:
    key, path, built, build_seconds = "k1", Path("/nonexistent/template"), True, 4.5


class _Ctl:
    class config:  # noqa: N801 - stands for a Config
        templates = True

    def warm_template(self, vcpus: int | None = None, memory_mib: int | None = None,
                      progress: object = None) -> _Info:
        return _Info()


class _Bench:
    """What the start-path sections use of runner.Bench; templates fall back to cold once."""

    def __init__(self, *argv: str) -> None:
        self.opts = options.parse_args(["--quick", "--warmup", "1", "--start-samples", "2", "--idle", "0",
                                        "--memory-levels", "1,3", *argv])
        self.prefix, self.controller, self.results = "bench-x", _Ctl(), {}
        self.calls: list[tuple[str, str | None]] = []
        self.running: set[str] = set()
        self.fell_back = False

    def ours(self, sid: str, *, dmesg: bool, start: str | None = "cold") -> phases.Start:
        self.calls.append((sid, start))
        self.running.add(sid)
        path = start
        if start == "template" and not self.fell_back and sid.endswith("s1"):
            self.fell_back, path = True, "cold"
        return _start(sid, 1.0 if path == "template" else 6.0, start, path, 1.0 if path == "template" else 6.0,
                      restored=path == "template")

    def remove(self, sid: str, clean: bool = False) -> tuple[float, float]:
        self.running.discard(sid)
        return 0.0, 0.0

    def remove_many(self, sids: list[str]) -> None:
        for s in sids:
            self.remove(s)

    def start_batch(self, sids: list[str], start: str | None) -> tuple[float, list[phases.Start]]:
        return 2.0, [self.ours(s, dmesg=False, start=start) for s in sids]

    def memory(self, sids: list[str]) -> dict[str, object]:
        return {"running": len(sids), "ids": sorted(sids)}

    def parallel_row(self, sids: list[str], start: str | None) -> dict[str, object]:
        wall, starts = self.start_batch(sids, start)
        return {"n": len(sids), "start": start, "all_ready_s": wall, "start_paths": startpath.path_counts(starts)}


def test_start_path_sections_alternate_check_the_path_and_clean_up() -> None:
    b = _Bench()
    sp = startpath.StartPaths(b)  # type: ignore[arg-type]
    assert sp.kinds == ("cold", "template")
    sp.run_serial()
    sp.run_memory()
    sp.run_parallel([2])
    assert not b.running  # every sandbox removed
    serial = [c for c in b.calls if "-cs" in c[0] or "-ts" in c[0] or "-cw" in c[0] or "-tw" in c[0]]
    assert serial == [("bench-x-tw1", "template"), ("bench-x-cw1", "cold"), ("bench-x-cs0", "cold"),
                      ("bench-x-ts0", "template"), ("bench-x-ts1", "template"), ("bench-x-cs1", "cold")]
    res = b.results["start_paths"]
    assert b.results["template"]["built"] is True and b.results["template"]["build_s"] == 4.5
    assert res["template"]["n"] == 2 and res["template"]["n_counted"] == 1  # ts1 fell back to cold
    assert res["template_over_cold_p50"] == pytest.approx(1.0 / 6.0)
    mem = b.results["memory_by_start"]
    assert mem["cold"]["n1"]["running"] == 1
    assert mem["cold"]["n3"]["ids"] == ["bench-x-mc0", "bench-x-mc1", "bench-x-mc2"]
    assert mem["template"]["n3"]["start_paths"] == {"template": 2}  # the 2 started for that level
    assert b.results["parallel_template"][0]["n"] == 2
    eff = startpath.parallel_efficiency(b.results, 2)
    assert eff["template"]["cpu_s_one_boot"] == pytest.approx(1.0) and eff["template"]["levels"]["2"]["ideal_s"] == 1.0


def test_without_templates_only_the_cold_path_is_measured() -> None:
    b = _Bench("--no-templates")
    sp = startpath.StartPaths(b)  # type: ignore[arg-type]
    sp.run_serial()
    sp.run_parallel([2])
    assert sp.kinds == ("cold",) and b.results["template"] == {"skipped": "--no-templates"}
    assert "template" not in b.results["start_paths"] and b.results["parallel_template"] == []
    assert {start for _sid, start in b.calls} == {"cold"}


def test_the_template_is_built_and_timed_before_the_first_template_start_of_any_section() -> None:
    b = _Bench()
    startpath.StartPaths(b).run_parallel([2])  # type: ignore[arg-type]
    assert b.results["template"]["call_s"] >= 0 and b.results["template"]["key"] == "k1"
    assert b.results["parallel_template"][0]["start_paths"] == {"template": 2}


def test_noise_counts_the_start_path_samples_and_template_levels() -> None:
    res = {"start_paths": {"cold": {"samples": [{"other_domains_running": 0}]},
                           "template": {"samples": [{"other_domains_running": 3}],
                                        "other_path_samples": [{"other_domains_running": 1}]}},
           "parallel_template": [{"other_domains_running": 0}]}
    line = report.noise_line(res)
    assert line is not None and "during 2 of 4 measured starts (up to 3 at once)" in line
