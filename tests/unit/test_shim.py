"""The containerd-shim-vmsandbox-v1 binary as containerd runs it (the installed entry point)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vmsandbox import __version__
from vmsandbox.proto.containerd.task.v3.shim_pb2 import DeleteResponse
from vmsandbox.proto.containerd.types.introspection_pb2 import RuntimeInfo


@pytest.fixture(scope="module")
def shim() -> str:
    path = Path(sys.executable).parent / "containerd-shim-vmsandbox-v1"
    assert path.exists() or shutil.which("containerd-shim-vmsandbox-v1"), \
        "the package installs containerd-shim-vmsandbox-v1 next to python (pip install -e .)"
    return str(path)


def run(shim: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([shim, *args], capture_output=True, timeout=60)


def test_info_prints_the_runtime_info_containerd_parses(shim: str) -> None:
    r = run(shim, "-info")
    assert r.returncode == 0, r.stderr
    info = RuntimeInfo.FromString(r.stdout)
    assert (info.name, info.version.version) == ("io.containerd.vmsandbox.v1", __version__)


def test_delete_answers_a_delete_response_with_the_unknown_status_and_now(shim: str) -> None:
    before = time.time()
    # The argv containerd's binaryCall.Delete uses.
    r = run(shim, "-namespace", "k8s.io", "-address", "/run/containerd/containerd.sock",
            "-publish-binary", "/usr/bin/containerd", "-id", "c1", "-bundle", "/run/x/c1", "delete")
    assert r.returncode == 0, r.stderr
    resp = DeleteResponse.FromString(r.stdout)
    assert resp.exit_status == 255
    assert before - 1 <= resp.exited_at.seconds <= time.time() + 1


@pytest.mark.parametrize("args", [["-namespace", "k8s.io", "-id", "c1", "start"], ["-bogus", "delete"]])
def test_anything_else_is_refused(shim: str, args: list[str]) -> None:
    r = run(shim, *args)
    assert r.returncode != 0 and r.stdout == b""
    assert b"containerd-shim-vmsandbox-v1" in r.stderr
