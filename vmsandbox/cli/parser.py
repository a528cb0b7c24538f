"""The command line: subcommands and options (argparse), and the ``--`` that ends them.

Each subcommand's ``func`` is its function in :mod:`~vmsandbox.cli.commands` (or doctor).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from .. import __version__
from . import commands as cmd
from .copy import cp as copy_cmd
from .doctor import doctor

__all__ = ["build_parser", "split_command", "parse_args"]


def split_command(words: Sequence[str]) -> tuple[list[str], list[str] | None]:
    """(options, command): everything after the first ``--`` is the command (exec, run), as
    it is, so options may come anywhere before it; None when there is no ``--``. argparse
    alone would give that list to the id's positional chunk."""
    words = list(words)
    if "--" not in words:
        return words, None
    cut = words.index("--")
    return words[:cut], words[cut + 1:]


def _create_options(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("id")
    root = sp.add_mutually_exclusive_group()
    root.add_argument("--rootfs", help="root disk: an ext4 image file, block device or a folder (SOURCE[:ro])")
    root.add_argument("--image", help="root from an OCI image: a layout folder, an oci-archive or docker-save tarball")
    sp.add_argument("--mount", action="append", default=[], help="extra disk SOURCE:TARGET[:ro] (repeatable)")
    sp.add_argument("--netns", help="network namespace path to wire the guest into")
    sp.add_argument("--vcpus", type=int)
    sp.add_argument("--memory-mib", type=int)
    sp.add_argument("--annotation", action="append", default=[], help="KEY=VALUE (repeatable)")


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
    b.set_defaults(func=cmd.image_build)
    w = img.add_parser("warm", help="build the start template of a sandbox shape now (else the first start does)")
    w.add_argument("--vcpus", type=int, help="vCPUs of the sandboxes it serves (default: the configured default)")
    w.add_argument("--memory-mib", type=int, help="their boot memory (default: the configured default)")
    w.set_defaults(func=cmd.image_warm)

    c = sub.add_parser("create", help="prepare a sandbox (no boot)")
    _create_options(c)
    c.set_defaults(func=cmd.create)
    r = sub.add_parser("run", help="create and start a sandbox, optionally run a command in it")
    _create_options(r)
    r.add_argument("--rm", action="store_true", help="remove the sandbox afterwards")
    r.add_argument("--timeout", type=float)
    r.add_argument("argv", nargs="*")
    r.set_defaults(func=cmd.run)
    for name, fn, hlp in (("start", cmd.start, "boot a created sandbox"), ("platform", cmd.platform, "guest OS/arch"),
                          ("metrics", cmd.metrics, "resource figures"), ("shutdown", cmd.shutdown, "stop and remove"),
                          ("logs", cmd.logs, "the guest console log")):
        sp = sub.add_parser(name, help=hlp)
        sp.add_argument("id")
        if name == "logs":
            sp.add_argument("--tail-bytes", type=int, default=0, help="only the last N bytes")
        sp.set_defaults(func=fn)
    s = sub.add_parser("status", help="state of a sandbox")
    s.add_argument("id")
    s.add_argument("--verbose", action="store_true")
    s.set_defaults(func=cmd.status)
    st = sub.add_parser("stop", help="power the guest off (forced after --timeout)")
    st.add_argument("id")
    st.add_argument("--timeout", type=float)
    st.set_defaults(func=cmd.stop)
    w = sub.add_parser("wait", help="wait until the guest is gone")
    w.add_argument("id")
    w.add_argument("--timeout", type=float)
    w.set_defaults(func=cmd.wait)
    e = sub.add_parser("exec", help="run a command in the sandbox (no shell): exec ID -- ARGV...")
    e.add_argument("id")
    e.add_argument("--env", action="append", default=[], help="KEY=VALUE (repeatable)")
    e.add_argument("--env-file", action="append", default=[], metavar="FILE",
                   help="KEY=VALUE lines, # comments; a bare KEY takes our value (repeatable; --env wins)")
    e.add_argument("-w", "--workdir", "--cwd", dest="cwd", metavar="DIR", help="working directory in the sandbox")
    e.add_argument("-u", "--user", help="NAME|UID[:GROUP|GID] (default root)")
    e.add_argument("--timeout", type=float)
    e.add_argument("-i", "--interactive", "--stdin", dest="stdin", action="store_true",
                   help="pass our stdin to the command (EOF closes its stdin)")
    e.add_argument("-t", "--tty", action="store_true",
                   help="give it a terminal: ours (stdin must be one), raw while it runs")
    e.add_argument("argv", nargs="*")
    e.set_defaults(func=cmd.exec_)
    cpp = sub.add_parser("cp", help="copy files or folders: cp SRC ID:DST, cp ID:SRC DST (modes kept; via virtio-fs)")
    cpp.add_argument("src")
    cpp.add_argument("dst")
    cpp.set_defaults(func=copy_cmd)
    ls = sub.add_parser("list", help="all sandboxes")
    ls.set_defaults(func=cmd.list_)
    d = sub.add_parser("doctor", help="what this host lacks")
    d.add_argument("--containerd", metavar="SOCKET",
                   help="also check this containerd (version, proxy plugin, runtime handler, pause image)")
    d.add_argument("--sandboxer", default="vmsandbox", help="the proxy plugin name in containerd's config")
    d.add_argument("--pause-image", help="the sandbox image containerd >= 2.3 pulls (default registry.k8s.io/pause:3.10.2)")
    d.set_defaults(func=doctor)
    sv = sub.add_parser("serve", help="serve containerd's sandbox Controller (gRPC) on a unix socket")
    sv.add_argument("--socket", default="/run/vmsandbox/vmsandbox.sock")
    sv.add_argument("--socket-group", help="make the socket 0660 for this group (default 0600 root)")
    sv.add_argument("--max-workers", type=int, default=512, help="rpc threads; each running sandbox holds one Wait")
    sv.add_argument("--containerd-address", metavar="PATH",
                    help="containerd's gRPC socket, for the containers' /tasks/* events (default "
                         "$VMSANDBOX_CONTAINERD_ADDRESS or /run/containerd/containerd.sock; '' for none)")
    sv.add_argument("--no-build-image", dest="build_image", action="store_false",
                    help="do not build the guest image (nor the default start template) at start-up")
    sv.set_defaults(func=cmd.serve)
    return p


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The options, with the words after ``--`` appended to the command's ``argv``; a usage
    error exits 2 with the usage on stderr (argparse's convention)."""
    words, command = split_command(argv)
    parser = build_parser()
    args = parser.parse_args(words)
    if command is not None:
        if not hasattr(args, "argv"):
            parser.error(f"'--' is only for exec and run, not {args.command}")
        args.argv = list(args.argv) + command
    return args
