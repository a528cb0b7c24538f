"""``containerd-shim-vmsandbox-v1``: the shim binary containerd looks up for vmsandbox pods.

No process of this binary serves a container: containers of a vmsandbox pod are served by
``vmsandbox serve`` on the task address the sandbox's Start returned (version 3), so
containerd never starts a shim for them. containerd still resolves the runtime's binary:

- at restart, for every task bundle it finds (``runtime_type = "io.containerd.vmsandbox.v1"``
  -> ``containerd-shim-vmsandbox-v1`` on PATH); without the binary it deletes the bundle and
  the task is lost;
- ``-info`` at task create (containerd >= 2.2): a serialized ``containerd.types.RuntimeInfo``
  on stdout;
- ``delete`` when the task connection of a task it reloaded drops: a serialized
  ``DeleteResponse`` on stdout. The task is gone from containerd's view; its status is not
  known here, so the answer is the one containerd would use itself (255) with the time of
  the call.

Anything else (``start``, the only other action) is refused with exit status 1.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from google.protobuf import timestamp_pb2

from . import __version__

__all__ = ["RUNTIME_NAME", "main"]

RUNTIME_NAME = "io.containerd.vmsandbox.v1"
UNKNOWN_EXIT = 255

# Go flag-style options containerd passes (`-name value` or `-name=value`); booleans take none.
_VALUED = {"namespace", "address", "publish-binary", "id", "bundle", "socket", "ttrpc-address"}
_BOOLEAN = {"debug", "info", "v", "version"}


def _parse(argv: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    flags: dict[str, str] = {}
    rest: list[str] = []
    it = iter(argv)
    for arg in it:
        if not arg.startswith("-") or arg in ("-", "--"):
            rest.append(arg)
            continue
        name, eq, value = arg.lstrip("-").partition("=")
        if name in _BOOLEAN:
            flags[name] = value or "true"
        elif name in _VALUED:
            flags[name] = value if eq else next(it, "")
        else:
            raise ValueError(f"unknown flag {arg!r}")
    return flags, rest


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        flags, actions = _parse(args)
    except ValueError as e:
        print(f"containerd-shim-vmsandbox-v1: {e}", file=sys.stderr)
        return 2
    if "v" in flags or "version" in flags:
        print(f"containerd-shim-vmsandbox-v1 {__version__}")
        return 0
    if "info" in flags:
        from .proto.containerd.types.introspection_pb2 import RuntimeInfo, RuntimeVersion

        info = RuntimeInfo(name=RUNTIME_NAME, version=RuntimeVersion(version=__version__))
        sys.stdout.buffer.write(info.SerializeToString())
        return 0
    if actions == ["delete"]:
        from .proto.containerd.task.v3.shim_pb2 import DeleteResponse

        now = timestamp_pb2.Timestamp()
        now.GetCurrentTime()
        sys.stdout.buffer.write(DeleteResponse(pid=0, exit_status=UNKNOWN_EXIT, exited_at=now).SerializeToString())
        return 0
    print("containerd-shim-vmsandbox-v1: only -info and delete are answered; the containers of a vmsandbox "
          "pod are served by `vmsandbox serve` on the sandbox's task address (runtime_type "
          f"{RUNTIME_NAME} with sandboxer = \"vmsandbox\")", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
