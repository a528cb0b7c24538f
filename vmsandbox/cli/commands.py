"""One function per subcommand (doctor aside): read the options, call a controller, print.

Each takes the parsed options and the :class:`~vmsandbox.cli.output.Output` and returns the
exit code; errors are raised as :mod:`vmsandbox.errors` classes and reported by ``main``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any as _Any

from ..errors import InvalidArgument, VmSandboxError
from ..model import Mount, SandboxMetadata
from . import wiring
from .output import Output, jsonable
from .stream import parse_env_file, stream_command

__all__ = ["image_build", "create", "start", "run", "exec_", "status", "platform", "metrics", "stop", "wait",
           "shutdown", "list_", "logs", "serve"]


def _parse_mount(spec: str, first: bool) -> Mount:
    """``SOURCE[:TARGET][:ro]``; the type is ext4 for a file or device, bind for a folder.
    The first mount is the sandbox root, so its target is always empty."""
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
        raise InvalidArgument(f"{what} must be KEY=VALUE, got {bad[0]!r}")
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
    elif args.image:
        mounts.append(Mount("oci", os.path.abspath(args.image)))
    mounts += [_parse_mount(m, False) for m in args.mount]
    if args.mount and not (args.rootfs or args.image):
        raise VmSandboxError("--mount needs --rootfs or --image (the first mount is the sandbox root)")
    return {"rootfs": mounts, "netns_path": args.netns or "", "annotations": annotations}


def image_build(args: argparse.Namespace, out: Output) -> int:
    img = wiring.build_image(wiring.config_from(args), out.progress.line, force=args.force)
    out.emit({"directory": str(img.directory), "manifest": img.manifest},
             f"image {img.name}: kernel {img.kernel_version}, {img.platform} in {img.directory}")
    return 0


def image_warm(args: argparse.Namespace, out: Output) -> int:
    with wiring.own_controller(wiring.config_from(args), out.progress.line) as c:
        info = c.warm_template(vcpus=args.vcpus, memory_mib=args.memory_mib, progress=out.progress.line)
    out.emit({"key": info.key, "path": str(info.path), "built": info.built, "build_seconds": round(info.build_seconds, 3)},
             f"template {info.key}: {'built in %.1fs' % info.build_seconds if info.built else 'ready'} ({info.path})")
    return 0


def create(args: argparse.Namespace, out: Output) -> int:
    with wiring.own_controller(wiring.config_from(args), out.progress.line) as c:
        c.create(SandboxMetadata(args.id, labels={"name": args.id}), **_create_kwargs(args))
    out.emit({"id": args.id}, f"created {args.id}")
    return 0


def start(args: argparse.Namespace, out: Output) -> int:
    with wiring.own_controller(wiring.config_from(args), out.progress.line) as c, \
            out.progress.during(f"booting {args.id}"):
        inst = c.start(args.id)
    out.emit(inst, f"started {args.id} (VMM pid {inst.pid})")
    return 0


def run(args: argparse.Namespace, out: Output) -> int:
    """create + start (+ exec, exiting with its code) (+ shutdown with ``--rm``, even after a failure).
    With ``--image`` the command is the image's: its Entrypoint followed by CMD (or by its Cmd)."""
    code = 0
    with wiring.own_controller(wiring.config_from(args), out.progress.line) as c:
        c.create(SandboxMetadata(args.id, labels={"name": args.id}), **_create_kwargs(args))
        try:
            with out.progress.during(f"booting {args.id}"):
                inst = c.start(args.id)
            out.note(f"started {args.id} (VMM pid {inst.pid})")
            argv = list(args.argv)
            if args.image and (cfg := c.image_config(args.id)) is not None and (argv or cfg.entrypoint or cfg.cmd):
                argv = cfg.command(argv)
            if argv and not out.json:
                code = stream_command(c, args.id, argv, timeout=args.timeout)
            elif argv:
                res = c.exec(args.id, argv, timeout=args.timeout)
                out.emit({"instance": inst, "exec": res})
                code = res.exit_code
            else:
                out.emit(inst)
        finally:
            if args.rm:
                with out.progress.during(f"removing {args.id}"):
                    c.shutdown(args.id)
    return code


def exec_(args: argparse.Namespace, out: Output) -> int:
    if not args.argv:
        raise VmSandboxError("exec needs a command after --")
    env: dict[str, str] = {}
    for path in args.env_file:
        try:
            with open(path, encoding="utf-8") as f:
                env |= parse_env_file(f.read(), os.environ, name=path)
        except OSError as e:
            raise InvalidArgument(f"--env-file {path}: {e.strerror or e}") from e
    env |= _pairs(args.env, "--env")
    if args.json and args.tty:
        raise InvalidArgument("--json collects the output; it has no terminal (leave -t out)")
    # mutates: a second agent connection would race the owner's.
    with wiring.sandboxes(wiring.config_from(args), out.progress.line, mutates=True) as c:
        if not args.json:
            return stream_command(c, args.id, args.argv, env=env, cwd=args.cwd, user=args.user,
                                  interactive=args.stdin, terminal=args.tty, timeout=args.timeout)
        # --json: the whole result at once, as before (the controller caps the output).
        stdin = sys.stdin.buffer.read() if args.stdin else None
        res = c.exec(args.id, args.argv, env=env, cwd=args.cwd, stdin=stdin, timeout=args.timeout, user=args.user)
    out.exec_result(res)
    return int(res.exit_code)


def status(args: argparse.Namespace, out: Output) -> int:
    with wiring.sandboxes(wiring.config_from(args), out.progress.line) as c:
        st = c.status(args.id, verbose=args.verbose)
    lines = [f"{args.id}: {st.state} pid={st.pid} created={st.created_at.isoformat()}"
             + (f" exited={st.exited_at.isoformat()}" if st.exited_at else "")]
    lines += [f"  {k}: {v}" for k, v in sorted(st.info.items()) if "\n" not in v]
    out.emit(st, "\n".join(lines))
    return 0


def platform(args: argparse.Namespace, out: Output) -> int:
    with wiring.sandboxes(wiring.config_from(args), out.progress.line) as c:
        p = c.platform(args.id)
    out.emit(p, str(p))
    return 0


def metrics(args: argparse.Namespace, out: Output) -> int:
    from ..payloads.cgroupsv2 import from_any

    with wiring.sandboxes(wiring.config_from(args), out.progress.line) as c:
        m = c.metrics(args.id)
    try:
        decoded: _Any = from_any(m.data)
    except VmSandboxError:
        decoded = {"type_url": m.data.type_url, "bytes": len(m.data.value)}
    out.emit({"timestamp": m.timestamp, "id": m.id, "data": decoded}, json.dumps(jsonable(decoded), indent=2))
    return 0


def stop(args: argparse.Namespace, out: Output) -> int:
    with wiring.sandboxes(wiring.config_from(args), out.progress.line, mutates=True) as c, \
            out.progress.during(f"stopping {args.id}"):
        c.stop(args.id, timeout=args.timeout)
    out.emit({"id": args.id}, f"stopped {args.id}")
    return 0


def wait(args: argparse.Namespace, out: Output) -> int:
    with wiring.sandboxes(wiring.config_from(args), out.progress.line) as c:
        st = c.wait(args.id, timeout=args.timeout)
    out.emit(st, f"{args.id}: exit status {st.exit_status} at {st.exited_at.isoformat()}")
    return 0


def shutdown(args: argparse.Namespace, out: Output) -> int:
    with wiring.sandboxes(wiring.config_from(args), out.progress.line, mutates=True) as c, \
            out.progress.during(f"removing {args.id}"):
        c.shutdown(args.id)
    out.emit({"id": args.id}, f"removed {args.id}")
    return 0


def list_(args: argparse.Namespace, out: Output) -> int:
    with wiring.sandboxes(wiring.config_from(args), out.progress.line) as c:
        rows = c.list()
    text = "\n".join(f"{r.id:<40} {r.phase.value:<8} {r.state.value:<17} pid={r.pid}" for r in rows)
    out.emit(rows, text or "no sandboxes")
    return 0


def logs(args: argparse.Namespace, out: Output) -> int:
    """The console log as it is, with or without --json (it is the guest's bytes)."""
    with wiring.sandboxes(wiring.config_from(args), out.progress.line) as c:
        data = c.read_console_log(args.id, args.tail_bytes)
    out.raw(data)
    return 0


def serve(args: argparse.Namespace, out: Output) -> int:
    wiring.serve(wiring.config_from(args), out.progress.line, socket=args.socket, socket_group=args.socket_group,
                 max_workers=args.max_workers, build_image=args.build_image)
    return 0
