"""The SDK's figures: file copy throughput through the share (and, for comparison, through
the SSH exec channel), the first-byte latency of a streamed command, and image-to-ready for
a cold (just unpacked) and a cached OCI image. Run as ``python -m vsbench.sdkbench``
(``hack/bench-sdk``); prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from vmsandbox import LibvirtController, Sandbox
from vmsandbox.sandbox.controller import SandboxController
from vmsandbox.oci.image import read_image
from vmsandbox.oci.source import open_source

from .oci import busybox_image_tar

SCHEMA = "vmsandbox-bench-sdk/1"


def _mib_s(n: int, seconds: float) -> float:
    return n / (1 << 20) / seconds


def _vmhwm_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def copy_figures(sb: Sandbox, work: Path, mib: int, reps: int) -> dict[str, object]:
    src = work / "blob"
    h = hashlib.sha256()
    with open(src, "wb") as f:
        for _ in range(mib):
            chunk = os.urandom(1 << 20)
            h.update(chunk)
            f.write(chunk)
    want = h.hexdigest()
    size = mib << 20
    ins, outs = [], []
    rss_before = _vmhwm_kib()
    for i in range(reps):
        t = time.monotonic()
        sb.files.upload(src, "/var/tmp/blob")
        ins.append(time.monotonic() - t)
        back = work / f"back{i}"
        t = time.monotonic()
        sb.files.download("/var/tmp/blob", back)
        outs.append(time.monotonic() - t)
        hb = hashlib.sha256()
        with open(back, "rb") as f:
            while chunk := f.read(1 << 20):
                hb.update(chunk)
        got = hb.hexdigest()
        if got != want:
            raise SystemExit(f"copy of {mib} MiB came back different: {got} != {want}")
        back.unlink()
    sb.files.remove("/var/tmp/blob")
    return {"mib": mib, "reps": reps, "in_mib_s_p50": _mib_s(size, statistics.median(ins)),
            "out_mib_s_p50": _mib_s(size, statistics.median(outs)), "in_s": ins, "out_s": outs,
            "bench_vmhwm_growth_mib": (_vmhwm_kib() - rss_before) / 1024}


def ssh_figures(sb: Sandbox, mib: int) -> dict[str, object]:
    size = mib << 20
    got = [0]

    def count(d: bytes) -> None:
        got[0] += len(d)
    t = time.monotonic()
    sb.run(["head", "-c", str(size), "/dev/zero"], on_stdout=count, check=True)
    out_s = time.monotonic() - t
    if got[0] != size:
        raise SystemExit(f"SSH output: {got[0]} bytes of {size}")
    t = time.monotonic()
    r = sb.run(["wc", "-c"], stdin=bytes(size), check=True)
    in_s = time.monotonic() - t
    if int(r.text.split()[0]) != size:
        raise SystemExit(f"SSH input: {r.text} bytes of {size}")
    return {"mib": mib, "out_mib_s": _mib_s(size, out_s), "in_mib_s": _mib_s(size, in_s)}


def _q90(xs: list[float]) -> float:
    return sorted(xs)[min(len(xs) - 1, int(len(xs) * 0.9))] * 1000


def latency_figures(sb: Sandbox, samples: int) -> dict[str, object]:
    first: list[float] = []
    rtt: list[float] = []
    for _ in range(samples):
        arrived: list[float] = []
        t = time.monotonic()
        p = sb.spawn(["sh", "-c", "echo x; sleep 5"], on_stdout=lambda d: arrived.append(time.monotonic()))
        while not arrived:
            time.sleep(0.001)
        first.append(arrived[0] - t)
        p.kill()
        p.wait(30)
        t = time.monotonic()
        sb.run(["true"])
        rtt.append(time.monotonic() - t)
    return {"samples": samples, "first_byte_ms_p50": statistics.median(first) * 1000,
            "first_byte_ms_p90": _q90(first), "run_true_ms_p50": statistics.median(rtt) * 1000,
            "run_true_ms_p90": _q90(rtt)}


def image_figures(ctl: SandboxController, work: Path, samples: int) -> dict[str, object]:
    tar: Path = busybox_image_tar(work / "busybox.tar", ["vsbench/busybox:1"])
    digest = read_image(open_source(tar)).digest
    entry = ctl.config.state_dir / "oci" / digest.split(":", 1)[1]
    cold: list[float] = []
    cached: list[float] = []
    for i in range(samples):
        for kind in ("cold", "cached"):
            if kind == "cold":
                shutil.rmtree(entry, ignore_errors=True)
            t = time.monotonic()
            with Sandbox.create(image=tar, controller=ctl, id=f"vsbench-img-{kind}-{i}") as sb:
                sb.run(["true"], check=True)
                (cold if kind == "cold" else cached).append(time.monotonic() - t)
    return {"samples": samples, "cold_ms_p50": statistics.median(cold) * 1000,
            "cached_ms_p50": statistics.median(cached) * 1000, "cold_s": cold, "cached_s": cached}


def main() -> None:
    ap = argparse.ArgumentParser(prog="hack/bench-sdk", description=__doc__)
    ap.add_argument("--state-dir", default="/var/lib/vmsandbox-bench-sdk",
                    help="a state dir no other controller uses (default %(default)s)")
    ap.add_argument("--copy-mib", type=int, default=64)
    ap.add_argument("--copy-reps", type=int, default=3)
    ap.add_argument("--ssh-mib", type=int, default=16)
    ap.add_argument("--latency-samples", type=int, default=10)
    ap.add_argument("--image-samples", type=int, default=3)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    state = Path(a.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    os.chmod(state, 0o711)
    work = Path(tempfile.mkdtemp(prefix="vsbench-sdk-", dir="/var/tmp"))
    os.chmod(work, 0o711)
    res: dict[str, object] = {"schema": SCHEMA, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        with LibvirtController(state_dir=state) as ctl:
            ctl.image()
            ctl.warm_template()
            with Sandbox.create(controller=ctl, id="vsbench-sdk", memory_mib=512) as sb:
                res["copy"] = copy_figures(sb, work, a.copy_mib, a.copy_reps)
                res["ssh"] = ssh_figures(sb, a.ssh_mib)
                res["stream"] = latency_figures(sb, a.latency_samples)
            res["image_ready"] = image_figures(ctl, work, a.image_samples)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    c, s, st, im = res["copy"], res["ssh"], res["stream"], res["image_ready"]
    assert isinstance(c, dict) and isinstance(s, dict) and isinstance(st, dict) and isinstance(im, dict)
    print(f"file copy {c['mib']} MiB through the share, p50: in {c['in_mib_s_p50']:.0f} MiB/s, "
          f"out {c['out_mib_s_p50']:.0f} MiB/s (bench VmHWM +{c['bench_vmhwm_growth_mib']:.0f} MiB)")
    print(f"same bytes over the SSH exec channel ({s['mib']} MiB): in {s['in_mib_s']:.1f} MiB/s, "
          f"out {s['out_mib_s']:.1f} MiB/s")
    print(f"streamed command first byte p50/p90: {st['first_byte_ms_p50']:.0f}/{st['first_byte_ms_p90']:.0f} ms; "
          f"run(['true']) p50/p90: {st['run_true_ms_p50']:.0f}/{st['run_true_ms_p90']:.0f} ms")
    print(f"image to first command, p50: cold image {im['cold_ms_p50']:.0f} ms, cached {im['cached_ms_p50']:.0f} ms")
    out = a.out or Path("bench-results") / f"bench-sdk-{res['when']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
