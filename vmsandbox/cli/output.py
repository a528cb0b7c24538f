"""What the CLI prints: readable text, or ``--json`` for scripts; progress on stderr."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from dataclasses import asdict, is_dataclass
from datetime import datetime
from enum import Enum
from typing import Any as _Any

from ..model import ExecResult

__all__ = ["Output", "Progress", "Ticker", "jsonable"]


def jsonable(v: _Any) -> _Any:
    """``v`` as JSON values: dataclasses as objects, datetimes in ISO 8601, enums by value,
    bytes decoded (invalid UTF-8 replaced)."""
    if is_dataclass(v) and not isinstance(v, type):
        return {k: jsonable(x) for k, x in asdict(v).items()}
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, datetime):
        return v.isoformat()
    if isinstance(v, Enum):
        return v.value
    if isinstance(v, bytes):
        return v.decode(errors="replace")
    return v


class Progress:
    """Progress on stderr for slow steps (image build, boot), silent under --json."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and (sys.stderr.isatty() or os.environ.get("VMSANDBOX_PROGRESS") == "1")

    def line(self, msg: str) -> None:
        if self.enabled:
            print(msg, file=sys.stderr, flush=True)

    def during(self, what: str) -> Ticker:
        return Ticker(self, what)


class Ticker:
    """``with progress.during("booting a"):`` shows the seconds passing, then the total."""

    def __init__(self, p: Progress, what: str) -> None:
        self.p, self.what = p, what
        self.stop = threading.Event()
        self.t0 = time.monotonic()

    def __enter__(self) -> Ticker:
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


class Output:
    """Where a command's result goes: ``emit`` prints JSON under ``--json``, else the text."""

    def __init__(self, json_output: bool) -> None:
        self.json = json_output
        self.progress = Progress(not json_output)

    def emit(self, value: _Any, text: str | None = None) -> None:
        if self.json:
            print(json.dumps(jsonable(value), indent=2, sort_keys=True))
        elif text is not None:
            print(text)

    def note(self, text: str) -> None:
        """A line for people on stderr (not under --json), apart from the result on stdout."""
        if not self.json:
            print(text, file=sys.stderr)

    @staticmethod
    def raw(stdout: bytes, stderr: bytes = b"") -> None:
        """Bytes as they came (a guest command's output, a console log)."""
        sys.stdout.buffer.write(stdout)
        sys.stdout.flush()
        if stderr:
            sys.stderr.buffer.write(stderr)
            sys.stderr.flush()

    def exec_result(self, res: ExecResult) -> None:
        """A guest command's result: its own output as it came, or JSON."""
        if self.json:
            self.emit(res)
        else:
            self.raw(res.stdout, res.stderr)
