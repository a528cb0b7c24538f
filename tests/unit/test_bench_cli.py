"""hack/bench as a person runs it: the wrapper, its flags and which code it measures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _hack_bench(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "VMSANDBOX_PYTHON": sys.executable}
    env.pop("PYTHONPATH", None)
    return subprocess.run(["bash", str(REPO / "hack" / "bench"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_hack_bench_help_names_the_checkout_it_measures_from_any_folder(tmp_path: Path) -> None:
    # A checkout without its own .venv (a git worktree) and another vmsandbox installed
    # (editable from elsewhere): the bench must still run, and measure this checkout's code.
    r = _hack_bench("--help", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    assert text.startswith("usage: hack/bench [-h] [--quick]")
    assert f"measures the vmsandbox in {REPO / 'vmsandbox'}" in text
