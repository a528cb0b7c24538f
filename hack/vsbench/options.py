"""The run's settings: ``hack/bench``'s flags, with the quick and full presets applied."""

from __future__ import annotations

import argparse
import os
import textwrap
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

__all__ = ["Options", "parse_args", "parse_parallel", "parse_levels", "default_parallel", "template_parallel", "QUICK",
           "FULL", "REPO"]

REPO = Path(__file__).resolve().parents[2]
QUICK = {"serial": 3, "warmup": 1, "ops_repeat": 20, "stop_samples": 2, "pings": 20, "net_mib": 32, "cri": 3,
         "cri_execs": 10, "start_samples": 5}
FULL = {"serial": 20, "warmup": 2, "ops_repeat": 100, "stop_samples": 5, "pings": 100, "net_mib": 256, "cri": 10,
        "cri_execs": 20, "start_samples": 10}
PARALLEL_DEFAULT = {"tcg": "1,5,10", "kvm": "1,10,50"}


@dataclass(frozen=True)
class Options:
    quick: bool
    serial: int
    warmup: int
    parallel: list[int] | None  #: None: chosen by virt type once the controller knows it
    ops_repeat: int
    stop_samples: int
    no_bare: bool
    no_network: bool
    pings: int
    net_mib: int
    cri: int
    cri_execs: int
    only_cri: bool
    start_samples: int
    idle: float
    memory_levels: list[int]
    template_parallel: list[int] | None  #: None: the parallel levels of N >= 2
    no_templates: bool
    out: Path
    no_plots: bool
    state_dir: str | None
    image_cache: str
    uri: str | None
    virt_type: str
    boot_timeout: float
    verbose: bool

    def as_json(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


def parse_parallel(text: str) -> list[int]:
    """``"1,5,10"`` -> [1, 5, 10] (sorted, unique, each >= 1)."""
    try:
        levels = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--parallel takes whole numbers like 1,5,10, not {text!r}") from None
    if not levels or levels[0] < 1:
        raise argparse.ArgumentTypeError("--parallel needs at least one level, each >= 1")
    return levels


def parse_levels(text: str) -> list[int]:
    """Like :func:`parse_parallel`, and ``none`` (or ``0``) for no levels."""
    return [] if text.strip().lower() in ("none", "0", "") else parse_parallel(text)


def template_parallel(opts: Options, parallel: Sequence[int]) -> list[int]:
    """The levels started at once from the template: ``--template-parallel``, else the cold
    levels of N >= 2 (N = 1 is a serial start)."""
    return list(opts.template_parallel) if opts.template_parallel is not None else [n for n in parallel if n >= 2]


def default_parallel(virt: str) -> list[int]:
    """The parallel levels for a virt type ("tcg" or "kvm") when --parallel is not given."""
    return parse_parallel(PARALLEL_DEFAULT[virt])


def _measured_code() -> str:
    import vmsandbox

    return str(Path(vmsandbox.__file__).resolve().parent)


def _fill(text: str) -> str:
    return textwrap.fill(text, 79, break_on_hyphens=False, break_long_words=False)


def parse_args(argv: Sequence[str] | None) -> Options:
    ap = argparse.ArgumentParser(
        prog="hack/bench",
        formatter_class=argparse.RawDescriptionHelpFormatter,  # a path must not be cut at a hyphen
        description=_fill("Benchmark vmsandbox: start latency (phases from the controller's lifecycle events, vs bare "
                    "libvirt), parallel start, operation latency, memory and network (round trip and TCP "
                    "throughput between a peer netns and a guest). Needs root and libvirtd. "
                    f"This run measures the vmsandbox in {_measured_code()}"),
    )
    ap.add_argument("--quick", action="store_true",
                    help=f"few samples, for a 2-core TCG host in about 8 min ({QUICK})")
    ap.add_argument("--serial", type=int, help=f"serial samples (quick {QUICK['serial']}, full {FULL['serial']})")
    ap.add_argument("--warmup", type=int, help="discarded serial starts first (quick 1, full 2)")
    ap.add_argument("--parallel", type=parse_parallel,
                    help=f"sandboxes started at once, e.g. 1,5,10 (default {PARALLEL_DEFAULT['tcg']} under TCG, "
                         f"{PARALLEL_DEFAULT['kvm']} under KVM)")
    ap.add_argument("--ops-repeat", type=int, help="calls per operation and level (quick 20, full 100)")
    ap.add_argument("--stop-samples", type=int, help="sandboxes per level whose stop/shutdown is timed")
    ap.add_argument("--no-bare", action="store_true", help="skip the bare-libvirt baseline")
    ap.add_argument("--no-network", action="store_true",
                    help="skip the network section (ping and TCP between a peer netns and a guest)")
    ap.add_argument("--pings", type=int, help=f"pings each way (quick {QUICK['pings']}, full {FULL['pings']})")
    ap.add_argument("--net-mib", type=int,
                    help=f"MiB per TCP transfer (quick {QUICK['net_mib']}, full {FULL['net_mib']})")
    ap.add_argument("--cri", type=int, help="pods of the CRI section: container start through a private containerd "
                                            f"(quick {QUICK['cri']}, full {FULL['cri']}; 0 skips it)")
    ap.add_argument("--cri-execs", type=int, help=f"ExecSync calls per CRI pod (quick {QUICK['cri_execs']}, "
                                                  f"full {FULL['cri_execs']})")
    ap.add_argument("--only-cri", action="store_true", help="run only the CRI section")
    ap.add_argument("--start-samples", type=int,
                    help="serial starts of each path, cold and from a template, alternated "
                         f"(quick {QUICK['start_samples']}, full {FULL['start_samples']}; 0 skips them)")
    ap.add_argument("--idle", type=float, default=20.0,
                    help="seconds the sandboxes idle before PSS by start path is read (default 20)")
    ap.add_argument("--memory-levels", type=parse_levels, default=[1, 5],
                    help="sandboxes of one path running when PSS by start path is read (default 1,5; none skips)")
    ap.add_argument("--template-parallel", type=parse_levels,
                    help="sandboxes started at once from the template (default: the --parallel levels >= 2; "
                         "none skips)")
    ap.add_argument("--no-templates", action="store_true",
                    help="measure the cold path only: no template built or started, the controller's "
                         "Config has templates=False")
    ap.add_argument("--out", type=Path, help="JSON file (default bench-results/bench-<UTC time>.json); PNGs go beside it")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--state-dir", help="controller state dir that no other controller uses "
                                        "(default: a fresh temporary one, removed afterwards)")
    ap.add_argument("--image-cache", default=os.environ.get("VMSANDBOX_BENCH_IMAGE_CACHE",
                                                            str(Path.home() / ".cache" / "vmsandbox-bench")),
                    help="where the guest image is built once and copied from (default ~/.cache/vmsandbox-bench)")
    ap.add_argument("--uri", default=None, help="libvirt URI (default qemu:///system or $VMSANDBOX_URI)")
    ap.add_argument("--virt-type", default=os.environ.get("VMSANDBOX_VIRT_TYPE", "auto"), choices=["auto", "kvm", "qemu"])
    ap.add_argument("--boot-timeout", type=float, default=180.0, help="seconds per start (default 180)")
    ap.add_argument("-v", "--verbose", action="store_true", help="log the controller's INFO messages")
    args = ap.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.serial < 0 or args.warmup < 0 or args.ops_repeat < 1 or args.stop_samples < 0:
        ap.error("--serial/--warmup/--stop-samples must be >= 0 and --ops-repeat >= 1")
    if args.cri < 0 or args.cri_execs < 1 or (args.only_cri and args.cri < 1):
        ap.error("--cri must be >= 0 (>= 1 with --only-cri) and --cri-execs >= 1")
    if args.start_samples < 0 or args.idle < 0:
        ap.error("--start-samples and --idle must be >= 0")
    if args.pings < 1 or args.net_mib < 1:
        ap.error("--pings and --net-mib must be >= 1")
    if args.out is None:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        args.out = REPO / "bench-results" / f"bench-{stamp}.json"
    return Options(**vars(args))
