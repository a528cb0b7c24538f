"""``hack/bench``'s entry point: logging, signals, the run, cleanup, JSON, plots and the table."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

from .host import loadavg, say
from .options import default_parallel, parse_args, template_parallel
from .plots import plots
from .report import report
from .runner import SSH_FAILURES, Bench
from .startpath import StartPaths, host_cores, parallel_efficiency

__all__ = ["main"]


def _logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("vmsandbox").setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("paramiko").setLevel(logging.WARNING)
    ssh_log = logging.getLogger("paramiko.transport")
    ssh_log.addHandler(SSH_FAILURES)
    ssh_log.propagate = verbose
    logging.getLogger("bench").setLevel(logging.INFO if verbose else logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    _logging(opts.verbose)
    if os.geteuid() != 0:
        print("hack/bench: must run as root (qemu:///system, guest sockets)", file=sys.stderr)
        return 2

    # Should a library ever fork a helper without exec (pyroute2's netns mode does), Ctrl-C
    # and SIGTERM reach the child too; raising there would unwind a copy of this process
    # through main() and clean up (delete the netns, close libvirt) under the live run's feet.
    main_pid = os.getpid()

    def on_signal(signum: int, _frame: object) -> None:
        if os.getpid() != main_pid:
            os._exit(128 + signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    begin = time.monotonic()
    bench = Bench(opts)
    status = 0
    try:
        say(f"run {bench.prefix}: setting up")
        bench.setup(default_parallel)
        if not opts.only_cri:
            if opts.serial:
                bench.run_serial()
            paths = StartPaths(bench)
            if opts.start_samples:
                paths.run_serial()
            if opts.memory_levels:
                paths.run_memory()
            bench.run_parallel()
            paths.run_parallel(template_parallel(opts, bench.parallel))
            if not opts.no_network:
                bench.run_network()
        if opts.cri:
            bench.run_cri()
    except KeyboardInterrupt:
        bench.results["error"] = "interrupted"
        status = 130
    except Exception as e:  # noqa: BLE001 - report, clean up, keep what was measured
        traceback.print_exc()
        bench.results["error"] = f"{type(e).__name__}: {e}"
        status = 1
    finally:
        if os.getpid() != main_pid:  # a forked helper must never clean up or report
            os._exit(70)
        say("cleaning up")
        bench.cleanup()
    res = bench.results
    res["duration_s"] = time.monotonic() - begin
    if res.get("parallel") or res.get("parallel_template"):
        res["parallel_efficiency"] = parallel_efficiency(res, host_cores())
    if "host" in res:
        res["host"]["loadavg_at_end"] = loadavg()
    out: Path = opts.out
    out.parent.mkdir(parents=True, exist_ok=True)
    if not opts.no_plots:
        res["plots"] = plots(res, out)
    out.write_text(json.dumps(res, indent=2, default=str) + "\n")
    print(report(res))
    print(f"results: {out}" + "".join(f"\nplot: {x}" for x in res.get("plots", [])))
    return status
