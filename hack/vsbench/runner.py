"""One benchmark run: the controller, the bare baseline, serial and parallel starts,
operations, memory, the network section, and the cleanup of all it made."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from vmsandbox import Config, LibvirtController, SandboxMetadata, VirtType
from vmsandbox.sandbox.controller import DOMAIN_PREFIX

from .bare import FIRST_EXEC, BareBaseline, config_disk_of
from .console import MARKERS, ConsoleWatcher
from .crilat import CriSection
from .guestlog import GUEST_KEYS, biggest_gaps, parse_dmesg, parse_uptime
from .host import code_facts, host_facts, read_text, say
from .network import NetworkSection
from .options import Options
from .phases import PHASES, EventLog, Start, stamps_from_events
from .procs import process_cpu_seconds, pss_kib, virtiofsd_pids
from .report import ANCHORS
from .startpath import ANNOTATION_START, COLD, TEMPLATE, path_counts
from .stats import kib_field, pick, ratio, summarize

__all__ = ["Bench", "SSH_FAILURES", "SCHEMA"]

SCHEMA = "vmsandbox-bench/3"
log = logging.getLogger("bench")


class SSHFailures(logging.Handler):
    """Counts failed SSH connection attempts that paramiko logs (banner timeouts while a
    guest is still booting), so they show up as a figure instead of tracebacks."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("Exception (client)"):
            self.count += 1


SSH_FAILURES = SSHFailures()


class Bench:
    """One benchmark run: owns the controller, the bare libvirt connection and cleanup."""

    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.prefix = f"bench-{secrets.token_hex(3)}"
        self.results: dict[str, Any] = {
            "schema": SCHEMA,
            "prefix": self.prefix,
            "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "mode": "quick" if opts.quick else "full",
            "anchors": ANCHORS,
        }
        self.ctl: LibvirtController | None = None
        self.conn: Any = None  # the bench's own libvirt connection (bare baseline, facts, cleanup)
        self.events = EventLog()
        self.watcher = ConsoleWatcher(MARKERS)
        self.sids: set[str] = set()
        self.own_state_dir = opts.state_dir is None
        self.state_dir = Path(opts.state_dir).resolve() if opts.state_dir else None
        self.bare: BareBaseline | None = None
        self.network: NetworkSection | None = None
        self.cri: CriSection | None = None
        self.parallel: list[int] = list(opts.parallel or [])

    @property
    def controller(self) -> LibvirtController:
        assert self.ctl is not None, "setup() first"
        return self.ctl

    # ------------------------------------------------------------------ set-up
    def setup(self, default_parallel: Callable[[str], list[int]]) -> None:
        import libvirt

        if self.state_dir is None:
            self.state_dir = Path(tempfile.mkdtemp(prefix=self.prefix + "-"))
        self._provision_image(self.state_dir)
        cfg = Config.from_env(uri=self.opts.uri, state_dir=self.state_dir, virt_type=VirtType(self.opts.virt_type),
                              boot_timeout=self.opts.boot_timeout, templates=False if self.opts.no_templates else None)
        self.conn = libvirt.open(cfg.uri)
        self.ctl = ctl = LibvirtController(config=cfg, events=self.events)
        virt = "kvm" if ctl.virt_type is VirtType.KVM else "tcg"
        if not self.parallel:
            self.parallel = default_parallel(virt)
        self.results["args"] = {**self.opts.as_json(), "parallel": self.parallel}
        self.results["code"] = code_facts()
        self.results["controller_rss_kib_idle"] = kib_field(read_text("/proc/self/status"), "VmRSS")

        # The template: a sandbox the controller defines (never started) whose XML, keys and
        # config disk the bare baseline reuses. Its verbose status carries the domain XML.
        tid = f"{self.prefix}-tmpl"
        self.sids.add(tid)
        ctl.create(SandboxMetadata(id=tid), annotations={ANNOTATION_START: COLD})  # bare boots it cold
        self.events.take(tid)
        info = ctl.status(tid, verbose=True).info
        if "domain_xml" not in info:
            raise RuntimeError(f"the template's status has no domain XML (libvirt {info.get('libvirt_state')})")
        xml = info["domain_xml"]
        bare_dir = self.state_dir / f"{self.prefix}-bare"
        bare_dir.mkdir()
        os.chmod(bare_dir, 0o711)
        config = bare_dir / "config.tar"
        shutil.copyfile(config_disk_of(xml), config)
        os.chmod(config, 0o600)
        # The client key the controller made for the template, beside its console log.
        client_key = (Path(info["console_log"]).parent / "id_ed25519").read_bytes()
        self.bare = BareBaseline(self.conn, prefix=self.prefix, directory=bare_dir, template_xml=xml,
                                 client_key=client_key, config_disk=config, watcher=self.watcher,
                                 boot_timeout=self.opts.boot_timeout, others=self.others)
        ctl.shutdown(tid)
        self.sids.discard(tid)
        self.events.take(tid)
        self.results["host"] = host_facts(virt=virt, domain_xml=xml, guest_kernel=ctl.image().kernel_version,
                                          libvirt_version=self.conn.getLibVersion(),
                                          qemu_version=self.conn.getVersion())

    def _provision_image(self, state_dir: Path) -> None:
        """Put the guest image into the state dir: copied from a cache (built there once)."""
        from vmsandbox.image import ensure_image, find_image, recipe_digest

        images = Config.from_env().images_dir
        if find_image(state_dir, images) is not None:
            return
        cache = Path(self.opts.image_cache)
        src = find_image(cache, images) or find_image(Config.from_env().state_dir, images)
        if src is None:
            say(f"building the guest image into {cache} (once)")
            src = ensure_image(cache, images, progress=lambda line: log.info("%s", line))
        dst = state_dir / "images" / src.name / recipe_digest(images)
        dst.parent.mkdir(parents=True, exist_ok=True)
        for d in (state_dir, state_dir / "images", dst.parent):
            os.chmod(d, 0o755 if d != state_dir else 0o711)
        shutil.copytree(src.directory, dst)
        os.chmod(dst, 0o755)

    # ------------------------------------------------------------------ one start
    def others(self) -> int:
        """Running domains that are not this run's: their load skews our figures."""
        try:
            names = [d.name() for d in self.conn.listAllDomains(1)]  # VIR_CONNECT_LIST_DOMAINS_ACTIVE
        except Exception:  # noqa: BLE001 - only a hint
            return 0
        return sum(1 for n in names if not self._ours(n))

    def _ours(self, domain: str) -> bool:
        return domain.startswith(self.prefix + "-") or domain.startswith(f"{DOMAIN_PREFIX}{self.prefix}-")

    def ours(self, sid: str, *, dmesg: bool, start: str | None = COLD) -> Start:
        """create -> start -> first exec through the controller, stamped by its events.

        ``start`` is the path asked for (the ``vmsandbox.io/start`` annotation; None: the
        controller's default); the path taken (status verbose ``start``) and QEMU's CPU
        seconds when the first exec answered are read after the clock stopped."""
        ctl = self.controller
        self.sids.add(sid)
        others = self.others()
        annotations = {ANNOTATION_START: start} if start is not None else None
        t0 = time.monotonic()
        ctl.create(SandboxMetadata(id=sid), annotations=annotations)
        self.watcher.watch(sid, ctl.console_log(sid))
        mine: dict[str, float | None] = {"t0": t0}
        try:
            ctl.start(sid)
            mine["exec_start"] = time.monotonic()
            r = ctl.exec(sid, FIRST_EXEC, timeout=30)
            mine["exec_done"] = time.monotonic()
        finally:
            found = self.watcher.unwatch(sid)
            events = self.events.take(sid)
        cpu = process_cpu_seconds(ctl.status(sid).pid)
        path = ctl.status(sid, verbose=True).info.get("start") or None  # "": a controller that does not say
        if (path or start) == TEMPLATE:
            # A restored guest's console log begins with its template's boot: those marker
            # lines were printed long before this start, so they stamp nothing.
            found = {}
        stamps: dict[str, float | None] = {**stamps_from_events(events), **found, **mine}
        log_lines = parse_dmesg(ctl.exec(sid, ["dmesg"], timeout=30).stdout) if dmesg else []
        s = Start(id=sid, stamps=stamps, exit_code=r.exit_code, uptime=parse_uptime(r.stdout),
                  dmesg=log_lines, others=others, events=events, asked=start, path=path, qemu_cpu_s=cpu)
        _check(s)
        if not s.path_ok:
            say(f"{sid}: asked for a {start} start, the controller took the {path} path")
        return s

    def remove(self, sid: str, *, clean: bool = False) -> tuple[float, float]:
        """Stop (forced unless ``clean``) and shut down; (stop s, shutdown s)."""
        ctl = self.controller
        t = time.monotonic()
        ctl.stop(sid, timeout=None if clean else 0)
        t1 = time.monotonic()
        ctl.shutdown(sid)
        t2 = time.monotonic()
        self.sids.discard(sid)
        self.events.take(sid)
        return t1 - t, t2 - t1

    # ------------------------------------------------------------------ serial
    def run_serial(self) -> None:
        n, warm = self.opts.serial, self.opts.warmup
        ours: list[Start] = []
        bare: list[Start] = []
        failures = SSH_FAILURES.count
        for i in range(-warm, n):
            tag = f"w{-i}" if i < 0 else f"s{i}"
            say(f"serial {tag} ({'warm-up' if i < 0 else f'{i + 1}/{n}, ours and bare'})")
            # Alternate which goes first, so that drift on the host hits both alike. The
            # warm-up has no bare start: ours warms the same kernel, initramfs and QEMU.
            order = ("ours", "bare") if i % 2 == 0 else ("bare", "ours")
            for kind in order:
                if kind == "ours":
                    sid = f"{self.prefix}-{tag}"
                    s = self.ours(sid, dmesg=True)
                    self.remove(sid)
                    if i >= 0:
                        ours.append(s)
                elif i >= 0 and not self.opts.no_bare:
                    assert self.bare is not None
                    s = self.bare.start(tag)
                    _check(s)
                    bare.append(s)
        out: dict[str, Any] = {"n": n, "warmup": warm, "failed_ssh_attempts": SSH_FAILURES.count - failures}
        for kind, starts in (("controller", ours), ("bare", bare)):
            if not starts:
                continue
            samples = [s.sample() for s in starts]
            keys = [k for k, _l, _e in PHASES] + ["total"]
            out[kind] = {
                "phases": {k: summarize(s["phases_ms"][k] for s in samples) for k in keys},
                "guest": {k: summarize((s["guest"] or {}).get(k) for s in samples) for k in GUEST_KEYS},
                "samples": samples,
                "dmesg_gaps": biggest_gaps(starts[0].dmesg),
            }
        if ours and bare:
            out["ratio_p50"] = {k: ratio(pick(out["controller"]["phases"][k], "p50"),
                                         pick(out["bare"]["phases"][k], "p50"))
                                for k in out["controller"]["phases"]}
        self.results["serial"] = out

    # ------------------------------------------------------------------ parallel
    def run_parallel(self) -> None:
        self.results["parallel"] = []
        self.results["operations"] = {}
        self.results["memory"] = []
        for n in self.parallel:
            say(f"parallel: {n} at once")
            sids = [f"{self.prefix}-p{n}-{j}" for j in range(n)]
            row = self.parallel_row(sids, COLD)
            self.results["parallel"].append(row)
            say(f"parallel: {n} ready in {row['all_ready_s']:.2f}s; operations and memory with {n} running")
            self.results["memory"].append(self.memory(sids))
            ops = self.operations(sids)
            self.results["operations"][str(n)] = ops
            self.teardown_batch(sids, ops)

    def start_batch(self, sids: Sequence[str], start: str | None) -> tuple[float, list[Start]]:
        """Start all at once (one thread each, let go together); (seconds until the last
        first exec answered, the starts)."""
        n = len(sids)
        gate = threading.Barrier(n + 1)

        def one(sid: str) -> Start:
            gate.wait()
            return self.ours(sid, dmesg=False, start=start)

        with ThreadPoolExecutor(max_workers=n, thread_name_prefix="bench-par") as pool:
            futures = [pool.submit(one, sid) for sid in sids]
            try:
                gate.wait()
            except BaseException:
                gate.abort()  # never leave workers waiting at the gate
                raise
            go = time.monotonic()
            starts = [f.result() for f in futures]
        # Wall time from the moment all threads were let go until the last answered.
        return max(s.stamps["exec_done"] or go for s in starts) - go, starts

    def parallel_row(self, sids: Sequence[str], start: str | None) -> dict[str, Any]:
        """One parallel level: start ``sids`` at once; its figures (they keep running)."""
        others, failures = self.others(), SSH_FAILURES.count
        wall, starts = self.start_batch(sids, start)
        samples = [s.sample() for s in starts]
        return {
            "n": len(sids),
            "start": start,
            "start_paths": path_counts(starts),
            "all_ready_s": wall,
            "sandboxes_per_s": len(sids) / wall,
            "per_sandbox_ms": summarize(s["phases_ms"]["total"] for s in samples),
            "qemu_cpu_s": summarize(s.qemu_cpu_s for s in starts),
            "failed_ssh_attempts": SSH_FAILURES.count - failures,
            "other_domains_running": others,
            "phases": {k: summarize(s["phases_ms"][k] for s in samples) for k, _l, _e in PHASES},
        }

    def operations(self, sids: Sequence[str]) -> dict[str, Any]:
        """Latency (ms) of the cheap operations, round-robin over the running sandboxes."""
        ctl = self.controller

        def exec_true(s: str) -> None:
            r = ctl.exec(s, ["true"], timeout=30)
            if r.exit_code != 0:
                raise RuntimeError(f"{s}: exec true exited {r.exit_code}")

        ops: dict[str, Callable[[str], object]] = {
            "status": ctl.status,
            "platform": ctl.platform,
            "metrics": ctl.metrics,
            "list": lambda _s: ctl.list(),
            "exec_true": exec_true,
        }
        out: dict[str, Any] = {}
        for name, fn in ops.items():
            xs = []
            for k in range(self.opts.ops_repeat):
                sid = sids[k % len(sids)]
                t = time.monotonic()
                fn(sid)
                xs.append((time.monotonic() - t) * 1000)
            out[name] = summarize(xs)
        return out

    def memory(self, sids: Sequence[str]) -> dict[str, Any]:
        """QEMU's PSS and RSS per sandbox, its virtiofsd's PSS, and this process's (the
        controller's) RSS."""
        pss, rss, fs = [], [], []
        for sid in sids:
            pid = self.controller.status(sid).pid
            rollup = read_text(f"/proc/{pid}/smaps_rollup") if pid else ""
            pss.append(kib_field(rollup, "Pss"))
            rss.append(kib_field(rollup, "Rss"))
            fs.append(pss_kib(virtiofsd_pids(pid)) if pid else None)
        both = [None if q is None else q + (f or 0) for q, f in zip(pss, fs)]
        return {
            "running": len(sids),
            "qemu_pss_kib": summarize(pss),
            "qemu_pss_kib_total": sum(x for x in pss if x is not None),
            "qemu_rss_kib": summarize(rss),
            "virtiofsd_pss_kib": summarize(fs),
            "sandbox_pss_kib": summarize(both),
            "controller_rss_kib": kib_field(read_text("/proc/self/status"), "VmRSS"),
        }

    def teardown_batch(self, sids: Sequence[str], ops: dict[str, Any]) -> None:
        """Time stop (clean) + shutdown one by one on a few; force the rest off together."""
        k = min(len(sids), self.opts.stop_samples)
        stops, shutdowns = [], []
        for sid in sids[:k]:
            a, b = self.remove(sid, clean=True)
            stops.append(a * 1000)
            shutdowns.append(b * 1000)
        ops["stop"] = summarize(stops)
        ops["shutdown"] = summarize(shutdowns)
        self.remove_many(sids[k:])

    def remove_many(self, sids: Sequence[str]) -> None:
        """Force them off and remove them, several at a time."""
        if sids:
            with ThreadPoolExecutor(max_workers=min(8, len(sids))) as pool:
                list(pool.map(self.remove, sids))

    # ------------------------------------------------------------------ network
    def run_network(self) -> None:
        """Round trip and TCP throughput between a peer netns and a guest (network.py)."""
        self.network = NetworkSection(self.controller, prefix=self.prefix, pings=self.opts.pings,
                                      net_mib=self.opts.net_mib, others=self.others)
        self.network.run(self.results.setdefault("network", {}))

    # ------------------------------------------------------------------ cleanup
    def run_cri(self) -> None:
        """Container start latency through a private containerd and `vmsandbox serve` (:mod:`.crilat`)."""
        from .node import find_binaries

        try:
            find_binaries()
        except RuntimeError as e:  # no containerd to drive: the rest of the run still counts
            say(f"CRI section skipped: {e}")
            self.results["cri"] = {"skipped": str(e)}
            return
        say(f"CRI: {self.opts.warmup} + {self.opts.cri} pods through a private containerd")
        self.cri = CriSection(self.prefix, self._provision_image)
        self.results["cri"] = self.cri.run(self.opts.cri, self.opts.warmup, self.opts.cri_execs)

    def cleanup(self) -> None:
        """Remove every sandbox, domain, netns and file this run made; never anything else."""
        if self.cri is not None:
            for problem in self.cri.cleanup():
                say(f"cleanup: {problem}")
        if self.ctl is not None:
            for sid in sorted(self.sids):
                try:
                    self.ctl.stop(sid, timeout=0)
                    self.ctl.shutdown(sid)
                except Exception as e:  # noqa: BLE001 - keep cleaning
                    say(f"cleanup: shutdown of {sid} failed: {e}")
        if self.network is not None:  # after the sandboxes: the pod netns gets eth0 back first
            self.network.cleanup()
        if self.conn is not None:
            import libvirt

            for dom in self.conn.listAllDomains(0):
                try:
                    name = dom.name()
                    if self._ours(name):
                        if dom.isActive():
                            dom.destroy()
                        dom.undefine()
                        say(f"cleanup: removed left-over domain {name}")
                except libvirt.libvirtError as e:
                    say(f"cleanup: {e}")
        if self.ctl is not None:
            self.ctl.close()
        if self.conn is not None:
            self.conn.close()
        self.watcher.close()
        if self.state_dir is not None:
            if self.own_state_dir:
                shutil.rmtree(self.state_dir, ignore_errors=True)
            elif self.bare is not None:
                shutil.rmtree(self.bare.directory, ignore_errors=True)


def _check(start: Start) -> None:
    if start.exit_code != 0:
        raise RuntimeError(f"{start.id}: first exec {FIRST_EXEC} exited {start.exit_code}")
