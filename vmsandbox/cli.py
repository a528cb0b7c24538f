"""The ``vmsandbox`` command: the composition root, where concrete parts are wired together.

Readable output by default, ``--json`` for scripts. Exit codes: 0 ok, 1 error (message on
stderr, one line per error class), 2 usage; ``exec`` exits with the guest command's code.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, is_dataclass
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Any as _Any

from . import __version__
from .config import Config, VirtType, detect_virt_type, parse_virt_type
from .errors import InvalidArgument, VmSandboxError
from .model import Mount, Sandbox

__all__ = ["main"]

log = logging.getLogger("vmsandbox")


def _jsonable(v: _Any) -> _Any:
    if is_dataclass(v) and not isinstance(v, type):
        return {k: _jsonable(x) for k, x in asdict(v).items()}
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, datetime):
        return v.isoformat()
    if isinstance(v, Enum):
        return v.value
    if isinstance(v, bytes):
        return v.decode(errors="replace")
    return v


def _emit(args: argparse.Namespace, value: _Any, text: str | None = None) -> None:
    if args.json:
        print(json.dumps(_jsonable(value), indent=2, sort_keys=True))
    elif text is not None:
        print(text)


class _Progress:
    """Progress on stderr for slow steps (image build, boot), silent under --json."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and (sys.stderr.isatty() or os.environ.get("VMSANDBOX_PROGRESS") == "1")

    def line(self, msg: str) -> None:
        if self.enabled:
            print(msg, file=sys.stderr, flush=True)

    def during(self, what: str) -> _Ticker:
        return _Ticker(self, what)


class _Ticker:
    def __init__(self, p: _Progress, what: str) -> None:
        self.p, self.what = p, what
        self.stop = threading.Event()
        self.t0 = time.monotonic()

    def __enter__(self) -> _Ticker:
        if self.p.enabled:
            threading.Thread(target=self._run, daemon=True).start()
        return self

    def _run(self) -> None:
        while not self.stop.wait(1.0):
            print(f"\r{self.what}... {time.monotonic() - self.t0:.0f}s", end="", file=sys.stderr, flush=True)

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.p.enabled and time.monotonic() - self.t0 >= 1.0:
            print(f"\r{self.what}: {time.monotonic() - self.t0:.1f}s", file=sys.stderr, flush=True)


def _config(args: argparse.Namespace) -> Config:
    return Config.from_env(
        uri=args.uri,
        state_dir=Path(args.state_dir) if args.state_dir else None,
        virt_type=parse_virt_type(args.virt_type) if args.virt_type else None,
    )


ADMIN_SOCKET = "admin.sock"
"""`vmsandbox serve` listens for the CLI on this socket in its state dir (root only)."""


def _controller(args: argparse.Namespace, *, mutates: bool = False, remote_ok: bool = True) -> _Any:
    """The controller a command talks to: the running `vmsandbox serve` that owns the state
    dir (through its admin socket) when there is one, else a controller of our own.

    One controller per state dir: when another process owns it and cannot be reached, a
    command that changes sandboxes (``mutates``) or cannot go through a server
    (``remote_ok=False``: create, start, run) is refused instead of racing that process.
    """
    from .errors import FailedPrecondition, Unavailable
    from .host import LibvirtController
    from .sandbox.controller import state_dir_owner

    cfg = _config(args)
    admin = cfg.state_dir / ADMIN_SOCKET
    owner = state_dir_owner(cfg.state_dir)
    if owner is not None and remote_ok and admin.exists():
        from .server.client import RemoteController

        remote = RemoteController(str(admin))
        try:
            remote.ping()
            return remote
        except Unavailable:
            remote.close()
    if owner is not None and (mutates or not remote_ok):
        who = f"process {owner}" if owner else "another process"
        how = ("create and start sandboxes through containerd (CRI) or use another --state-dir"
               if not remote_ok else f"it serves no admin socket at {admin}")
        raise FailedPrecondition(f"state dir {cfg.state_dir} is owned by {who} (vmsandbox serve?); {how}")
    return LibvirtController(config=cfg, progress=args.progress.line)


def _parse_mount(spec: str, first: bool) -> Mount:
    """``SOURCE[:TARGET][:ro]``; the type is ext4 for a file or device, bind for a folder."""
    parts = spec.split(":")
    ro = parts[-1] == "ro"
    if ro or parts[-1] == "rw":
        parts = parts[:-1]
    source = parts[0]
    target = parts[1] if len(parts) > 1 else ""
    kind = "bind" if os.path.isdir(source) else "ext4"
    return Mount(kind, os.path.abspath(source), "" if first else target, ("ro",) if ro else ())


def _pairs(items: list[str], what: str) -> dict[str, str]:
    bad = [i for i in items if "=" not in i]
    if bad:
        raise InvalidArgument(f"{what} must be KEY=VALUE, not {bad[0]!r}")
    return dict(i.split("=", 1) for i in items)


def _create_kwargs(args: argparse.Namespace) -> dict[str, _Any]:
    annotations = _pairs(args.annotation, "--annotation")
    if args.vcpus is not None:
        annotations["vmsandbox.io/vcpus"] = str(args.vcpus)
    if args.memory_mib is not None:
        annotations["vmsandbox.io/memory-mib"] = str(args.memory_mib)
    mounts = []
    if args.rootfs:
        mounts.append(_parse_mount(args.rootfs, True))
    mounts += [_parse_mount(m, False) for m in args.mount]
    if args.mount and not args.rootfs:
        raise VmSandboxError("--mount needs --rootfs (the first mount is the sandbox root)")
    return {"rootfs": mounts, "netns_path": args.netns or "", "annotations": annotations}


# --------------------------------------------------------------------------- commands
def cmd_image_build(args: argparse.Namespace) -> int:
    from .image import ensure_image

    cfg = _config(args)
    img = ensure_image(cfg.state_dir, cfg.images_dir, cfg.image_name, force=args.force, progress=args.progress.line)
    _emit(args, {"directory": str(img.directory), "manifest": img.manifest},
          f"image {img.name}: kernel {img.kernel_version}, {img.platform} in {img.directory}")
    return 0


def cmd_create(args: argparse.Namespace) -> int:
    with _controller(args, remote_ok=False) as c:
        c.create(Sandbox(args.id, labels={"name": args.id}), **_create_kwargs(args))
    _emit(args, {"id": args.id}, f"created {args.id}")
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    with _controller(args, remote_ok=False) as c, args.progress.during(f"booting {args.id}"):
        inst = c.start(args.id)
    _emit(args, inst, f"started {args.id} (VMM pid {inst.pid})")
    return 0


def _print_exec(res: _Any) -> None:
    sys.stdout.buffer.write(res.stdout)
    sys.stdout.flush()
    sys.stderr.buffer.write(res.stderr)
    sys.stderr.flush()


def cmd_run(args: argparse.Namespace) -> int:
    code = 0
    with _controller(args, remote_ok=False) as c:
        c.create(Sandbox(args.id, labels={"name": args.id}), **_create_kwargs(args))
        try:
            with args.progress.during(f"booting {args.id}"):
                inst = c.start(args.id)
            if not args.json:
                print(f"started {args.id} (VMM pid {inst.pid})", file=sys.stderr)
            if args.argv:
                res = c.exec(args.id, args.argv, timeout=args.timeout)
                if args.json:
                    _emit(args, {"instance": inst, "exec": res})
                else:
                    _print_exec(res)
                code = res.exit_code
            else:
                _emit(args, inst)
        finally:
            if args.rm:
                with args.progress.during(f"removing {args.id}"):
                    c.shutdown(args.id)
    return code


def cmd_exec(args: argparse.Namespace) -> int:
    if not args.argv:
        raise VmSandboxError("exec needs a command after --")
    env = _pairs(args.env, "--env")
    stdin = sys.stdin.buffer.read() if args.stdin else None
    with _controller(args, mutates=True) as c:  # a second agent connection would race the owner's
        res = c.exec(args.id, args.argv, env=env, cwd=args.cwd, stdin=stdin, timeout=args.timeout)
    if args.json:
        _emit(args, res)
    else:
        _print_exec(res)
    return int(res.exit_code)


def cmd_status(args: argparse.Namespace) -> int:
    with _controller(args) as c:
        st = c.status(args.id, verbose=args.verbose)
    lines = [f"{args.id}: {st.state} pid={st.pid} created={st.created_at.isoformat()}"
             + (f" exited={st.exited_at.isoformat()}" if st.exited_at else "")]
    lines += [f"  {k}: {v}" for k, v in sorted(st.info.items()) if "\n" not in v]
    _emit(args, st, "\n".join(lines))
    return 0


def cmd_platform(args: argparse.Namespace) -> int:
    with _controller(args) as c:
        p = c.platform(args.id)
    _emit(args, p, str(p))
    return 0


def cmd_metrics(args: argparse.Namespace) -> int:
    with _controller(args) as c:
        m = c.metrics(args.id)
    try:
        from .payloads.cgroupsv2 import from_any

        decoded: _Any = from_any(m.data)
    except VmSandboxError:
        decoded = {"type_url": m.data.type_url, "bytes": len(m.data.value)}
    _emit(args, {"timestamp": m.timestamp, "id": m.id, "data": decoded},
          json.dumps(_jsonable(decoded), indent=2))
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    with _controller(args, mutates=True) as c, args.progress.during(f"stopping {args.id}"):
        c.stop(args.id, timeout=args.timeout)
    _emit(args, {"id": args.id}, f"stopped {args.id}")
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    with _controller(args) as c:
        st = c.wait(args.id, timeout=args.timeout)
    _emit(args, st, f"{args.id}: exit status {st.exit_status} at {st.exited_at.isoformat()}")
    return 0


def cmd_shutdown(args: argparse.Namespace) -> int:
    with _controller(args, mutates=True) as c, args.progress.during(f"removing {args.id}"):
        c.shutdown(args.id)
    _emit(args, {"id": args.id}, f"removed {args.id}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    with _controller(args) as c:
        rows = c.list()
    text = "\n".join(f"{r.id:<40} {r.phase.value:<8} {r.state.value:<17} pid={r.pid}" for r in rows)
    _emit(args, rows, text or "no sandboxes")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    with _controller(args) as c:
        data = c.read_console_log(args.id, args.tail_bytes)
    sys.stdout.buffer.write(data)
    sys.stdout.flush()
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .server import serve
    from .host import LibvirtController

    ctl = LibvirtController(config=_config(args), progress=args.progress.line)
    try:
        if args.build_image:
            ctl.image()
        srv = serve(ctl, args.socket, socket_group=args.socket_group, max_workers=args.max_workers,
                    admin=ctl, admin_socket_path=str(ctl.config.state_dir / ADMIN_SOCKET))
        srv.install_signal_handlers()
        log.info("serving containerd's sandbox Controller on %s (virt type %s)", srv.socket_path, ctl.virt_type.value)
        srv.wait()
    finally:
        ctl.close()
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    cfg = _config(args)
    checks: list[tuple[str, bool, str, bool]] = []  # name, ok, detail, required

    def check(name: str, ok: bool, detail: str, required: bool = True) -> None:
        checks.append((name, ok, detail, required))

    check("root", os.geteuid() == 0, "running as root" if os.geteuid() == 0 else "run as root (libvirt system, netns, taps)")
    from .hypervisor.libvirt_driver import LibvirtHypervisor

    try:
        hv = LibvirtHypervisor(cfg.uri, connect_timeout=3.0)
        try:
            host = hv.host_info()
        finally:
            hv.close()
        check("libvirtd", True, f"{cfg.uri} answers (libvirt {host['libvirt_version']}, "
                                f"{host['hypervisor']} {host['hypervisor_version']})")
    except VmSandboxError as e:
        check("libvirtd", False, f"{cfg.uri}: {e} (start it: hack/setup.sh)")
    vt = detect_virt_type(cfg.virt_type)
    check("accelerator", True, "KVM" if vt is VirtType.KVM else "TCG (software emulation; KVM not usable here)",
          required=False)
    kvm_ok = not os.path.exists("/dev/kvm") or os.stat("/dev/kvm").st_mode & 0o060 == 0o060
    check("/dev/kvm access", kvm_ok, "group kvm rw" if kvm_ok else "not root:kvm 0660: libvirt re-probes QEMU on every define (hack/setup.sh fixes it)", required=False)
    check("network namespaces", os.path.exists("/proc/self/ns/net"), "/proc/self/ns/net")
    for tool in ("mkfs.ext4", "gcc", "cpio", "busybox", "dropbear", "apt-get"):
        path = shutil.which(tool) or (f"/usr/sbin/{tool}" if os.path.exists(f"/usr/sbin/{tool}") else None)
        check(tool, path is not None, path or "missing (hack/setup.sh installs it)")
    from .image import find_image

    img = find_image(cfg.state_dir, cfg.images_dir, cfg.image_name)
    check("guest image", img is not None,
          f"{img.directory} (kernel {img.kernel_version})" if img else "not built yet (vmsandbox image build)", required=False)
    if args.containerd:
        from .containerd_check import check_containerd

        for c in check_containerd(args.containerd, sandboxer=args.sandboxer, pause_image=args.pause_image):
            check(c.name, c.ok, c.detail, c.required)
    ok = all(c[1] for c in checks if c[3])
    if args.json:
        _emit(args, {"ok": ok, "checks": [{"name": n, "ok": o, "detail": d, "required": r} for n, o, d, r in checks]})
    else:
        for n, o, d, r in checks:
            print(f"{'ok ' if o else ('MISSING' if r else 'warn')}  {n:<20} {d}")
    return 0 if ok else 1


# --------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vmsandbox", description="containerd sandboxes as libvirt guests")
    p.add_argument("--version", action="version", version=f"vmsandbox {__version__}")
    p.add_argument("--uri", help="libvirt URI (default qemu:///system, env VMSANDBOX_URI)")
    p.add_argument("--state-dir", help="state folder (default /var/lib/vmsandbox, env VMSANDBOX_STATE_DIR)")
    p.add_argument("--virt-type", help="kvm | qemu | auto (default auto, env VMSANDBOX_VIRT_TYPE)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("-v", "--verbose-log", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    img = sub.add_parser("image", help="guest image").add_subparsers(dest="image_command", required=True)
    b = img.add_parser("build", help="build (or rebuild) the default guest image")
    b.add_argument("--force", action="store_true")
    b.set_defaults(func=cmd_image_build)

    def create_opts(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("id")
        sp.add_argument("--rootfs", help="root disk: an ext4 image file, block device or a folder (SOURCE[:ro])")
        sp.add_argument("--mount", action="append", default=[], help="extra disk SOURCE:TARGET[:ro] (repeatable)")
        sp.add_argument("--netns", help="network namespace path to wire the guest into")
        sp.add_argument("--vcpus", type=int)
        sp.add_argument("--memory-mib", type=int)
        sp.add_argument("--annotation", action="append", default=[], help="KEY=VALUE (repeatable)")

    c = sub.add_parser("create", help="prepare a sandbox (no boot)")
    create_opts(c)
    c.set_defaults(func=cmd_create)
    r = sub.add_parser("run", help="create and start a sandbox, optionally run a command in it")
    create_opts(r)
    r.add_argument("--rm", action="store_true", help="remove the sandbox afterwards")
    r.add_argument("--timeout", type=float)
    r.add_argument("argv", nargs="*")
    r.set_defaults(func=cmd_run)
    for name, fn, hlp in (("start", cmd_start, "boot a created sandbox"), ("platform", cmd_platform, "guest OS/arch"),
                          ("metrics", cmd_metrics, "resource figures"), ("shutdown", cmd_shutdown, "stop and remove"),
                          ("logs", cmd_logs, "the guest console log")):
        sp = sub.add_parser(name, help=hlp)
        sp.add_argument("id")
        if name == "logs":
            sp.add_argument("--tail-bytes", type=int, default=0, help="only the last N bytes")
        sp.set_defaults(func=fn)
    s = sub.add_parser("status", help="state of a sandbox")
    s.add_argument("id")
    s.add_argument("--verbose", action="store_true")
    s.set_defaults(func=cmd_status)
    st = sub.add_parser("stop", help="power the guest off (forced after --timeout)")
    st.add_argument("id")
    st.add_argument("--timeout", type=float)
    st.set_defaults(func=cmd_stop)
    w = sub.add_parser("wait", help="wait until the guest is gone")
    w.add_argument("id")
    w.add_argument("--timeout", type=float)
    w.set_defaults(func=cmd_wait)
    e = sub.add_parser("exec", help="run a command in the sandbox (no shell): exec ID -- ARGV...")
    e.add_argument("id")
    e.add_argument("--env", action="append", default=[], help="KEY=VALUE (repeatable)")
    e.add_argument("--cwd")
    e.add_argument("--timeout", type=float)
    e.add_argument("--stdin", action="store_true", help="pass this command's stdin")
    e.add_argument("argv", nargs="*")
    e.set_defaults(func=cmd_exec)
    ls = sub.add_parser("list", help="all sandboxes")
    ls.set_defaults(func=cmd_list)
    d = sub.add_parser("doctor", help="what this host lacks")
    d.add_argument("--containerd", metavar="SOCKET",
                   help="also check this containerd (version, proxy plugin, runtime handler, pause image)")
    d.add_argument("--sandboxer", default="vmsandbox", help="the proxy plugin name in containerd's config")
    d.add_argument("--pause-image", help="the sandbox image containerd >= 2.3 pulls (default registry.k8s.io/pause:3.10.2)")
    d.set_defaults(func=cmd_doctor)
    sv = sub.add_parser("serve", help="serve containerd's sandbox Controller (gRPC) on a unix socket")
    sv.add_argument("--socket", default="/run/vmsandbox/vmsandbox.sock")
    sv.add_argument("--socket-group", help="make the socket 0660 for this group (default 0600 root)")
    sv.add_argument("--max-workers", type=int, default=512, help="rpc threads; each running sandbox holds one Wait")
    sv.add_argument("--no-build-image", dest="build_image", action="store_false",
                    help="do not build the guest image at start-up")
    sv.set_defaults(func=cmd_serve)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    # Everything after the first `--` is the command (exec, run), so options may come
    # anywhere before it: argparse alone would give that list to the id's positional chunk.
    command: list[str] | None = None
    if "--" in words:
        cut = words.index("--")
        words, command = words[:cut], words[cut + 1:]
    parser = build_parser()
    args = parser.parse_args(words)
    if command is not None:
        if not hasattr(args, "argv"):
            parser.error(f"'--' is only for exec and run, not {args.command}")
        args.argv = list(args.argv) + command
    logging.basicConfig(
        level=logging.DEBUG if args.verbose_log else logging.INFO if args.command == "serve" else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose_log:
        logging.getLogger("paramiko").setLevel(logging.WARNING)
        if args.command not in ("run", "create", "start", "serve"):
            logging.getLogger("vmsandbox.config").setLevel(logging.ERROR)  # doctor reports it
    args.progress = _Progress(not args.json)
    try:
        return int(args.func(args))
    except VmSandboxError as e:
        kind = type(e).__name__
        print(f"vmsandbox: {kind if kind != 'VmSandboxError' else 'error'}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
