"""The ``vmsandbox`` command: the composition root, where concrete parts are wired together.

Readable output by default, ``--json`` for scripts. Exit codes: 0 ok, 1 error (message on
stderr, one line per error class), 2 usage; ``exec`` exits with the guest command's code.

:mod:`.parser` reads the command line, :mod:`.commands` and :mod:`.doctor` run it,
:mod:`.output` prints, and :mod:`.wiring` alone picks the concrete parts.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from ..errors import VmSandboxError
from .output import Output
from .parser import parse_args

__all__ = ["main"]


def _configure_logging(command: str, verbose: bool) -> None:
    """Handlers are set here only (the library logs, the command decides what shows)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO if command == "serve" else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not verbose:
        logging.getLogger("paramiko").setLevel(logging.WARNING)
        if command not in ("run", "create", "start", "serve"):
            logging.getLogger("vmsandbox.config").setLevel(logging.ERROR)  # doctor reports it


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``vmsandbox ARGV...`` (``sys.argv[1:]`` by default) and return its exit code."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    _configure_logging(args.command, args.verbose_log)
    try:
        return int(args.func(args, Output(args.json)))
    except VmSandboxError as e:
        kind = type(e).__name__
        print(f"vmsandbox: {kind if kind != 'VmSandboxError' else 'error'}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
