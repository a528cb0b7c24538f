"""OCI images as sandbox roots on real guests: the layers' tree, the image's Env and
WorkingDir in exec, one cached base shared read-only by every sandbox of the image (each
writing its own overlay), ``vmsandbox run --image`` through the CLI."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, unique
from tests.integration.test_controller_lifecycle import qemu_dir
from tests.ocibuild import BUSYBOX_EXPECT, build_busybox_image
from vmsandbox import LibvirtController, Mount, SandboxMetadata

pytestmark = pytest.mark.integration


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def out(controller: LibvirtController, sid: str, *argv: str, **kw: object) -> str:
    r = controller.exec(sid, list(argv), timeout=60, **kw)  # type: ignore[arg-type]
    assert r.exit_code == 0, r.stderr.decode()
    return r.stdout.decode()


@pytest.fixture(scope="module")
def images(test_root: Path) -> dict[str, Path]:
    d = qemu_dir(test_root)
    return {fmt: build_busybox_image(d / fmt, fmt) for fmt in ("layout", "oci-archive")}


@pytest.fixture(scope="module")
def booted(controller: LibvirtController, images: dict[str, Path]) -> Iterator[str]:
    """A running sandbox whose root is the busybox image (layout folder)."""
    sid = unique("oci")
    try:
        controller.create(SandboxMetadata(sid), rootfs=[Mount("oci", str(images["layout"]))])
        controller.start(sid)
        yield sid
    finally:
        controller.shutdown(sid)


def base_of(controller: LibvirtController, sid: str) -> Path:
    cfg = controller.image_config(sid)
    assert cfg is not None
    return controller.config.state_dir / "oci" / cfg.digest[7:] / "rootfs.ext4"


def test_the_layers_with_their_whiteouts_make_the_guests_root(controller: LibvirtController, booted: str) -> None:
    assert controller.status(booted, verbose=True).info["start"] == "template"  # the qcow2 disk was hot-plugged
    for path, content in BUSYBOX_EXPECT.items():
        r = controller.exec(booted, ["cat", path], timeout=30)
        if content is None:
            assert r.exit_code != 0, f"{path} should be gone"
        else:
            assert (r.exit_code, r.stdout.decode()) == (0, content), path
    assert out(controller, booted, "ls", "/opt/old") == "c.txt\n"
    inodes = out(controller, booted, "stat", "-c", "%i", "/work/hello.txt", "/work/hello-link.txt").split()
    assert len(set(inodes)) == 1
    assert out(controller, booted, "stat", "-c", "%u:%g %a", "/work", "/tmp").split("\n")[:2] == ["1000:1000 755",
                                                                                                    "0:0 1777"]
    assert out(controller, booted, "readlink", "/bin/sh") == "busybox\n"
    fields = out(controller, booted, "cat", "/proc/mounts").split("\n")
    root = [line.split() for line in fields if line.split()[1:2] == ["/"]][-1]
    assert root[0].startswith("/dev/vd") and root[2] == "ext4"


def test_exec_gets_the_images_env_and_working_dir(controller: LibvirtController, booted: str) -> None:
    assert out(controller, booted, "greet") == "hello from /work\n"  # PATH has /usr/bin, cwd /work
    assert out(controller, booted, "sh", "-c", "echo $GREETING; pwd", env={"GREETING": "bye"}, cwd="/tmp") == "bye\n/tmp\n"
    assert "GREETING" not in out(controller, booted, "env", in_guest_root=True)


def test_guest_writes_go_to_the_overlay_not_the_cached_base(
        controller: LibvirtController, booted: str, images: dict[str, Path]) -> None:
    base = base_of(controller, booted)
    before = sha256(base)
    out(controller, booted, "sh", "-c", "echo mine > /work/new.txt && rm /etc/layer2 && sync")
    assert out(controller, booted, "cat", "/work/new.txt") == "mine\n"
    assert sha256(base) == before
    overlay = controller.config.state_dir / "sandboxes" / booted / "disks" / "m0.qcow2"
    assert overlay.is_file()


def test_a_second_sandbox_of_the_image_reuses_the_cache_and_sees_its_own_root(
        controller: LibvirtController, booted: str, images: dict[str, Path], sandbox_ids: list[str]) -> None:
    base = base_of(controller, booted)
    st = base.stat()
    sid = unique("oci2")
    sandbox_ids.append(sid)
    # the same image as an oci-archive tarball: the same manifest digest, so the same base
    controller.create(SandboxMetadata(sid), rootfs=[Mount("oci", str(images["oci-archive"]))])
    controller.start(sid)
    assert base_of(controller, sid) == base
    st2 = base.stat()
    assert (st2.st_ino, st2.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
    assert out(controller, sid, "cat", "/etc/layer2") == "2\n"  # the first sandbox's rm is its own
    assert controller.exec(sid, ["cat", "/work/new.txt"]).exit_code != 0
    controller.shutdown(sid)
    assert not (controller.config.state_dir / "sandboxes" / sid).exists() and base.is_file()


def test_shutdown_leaves_no_overlay_and_keeps_the_base(controller: LibvirtController, images: dict[str, Path]) -> None:
    sid = unique("oci3")
    controller.create(SandboxMetadata(sid), rootfs=[Mount("oci", str(images["layout"]))])
    try:
        controller.start(sid)
        base = base_of(controller, sid)
        before = sha256(base)
        out(controller, sid, "sh", "-c", "dd if=/dev/zero of=/big bs=1M count=8 && sync")
    finally:
        controller.shutdown(sid)
    assert not (controller.config.state_dir / "sandboxes" / sid).exists()
    assert base.is_file() and sha256(base) == before


def test_cli_run_image_runs_the_entrypoint_and_cmd(controller: LibvirtController, test_root: Path,
                                                   images: dict[str, Path]) -> None:
    """Its own state dir (the session's controller owns the shared one), the session's guest
    image copied in, cold boots (no template to build)."""
    own = Path(qemu_dir(test_root)) / "state"
    own.mkdir()
    os.chmod(own, 0o711)
    shutil.copytree(controller.config.state_dir / "images", own / "images", symlinks=True)  # built by the fixture
    env = {**os.environ, "PYTHONPATH": str(REPO), "VMSANDBOX_TEMPLATES": "0", "VMSANDBOX_PROGRESS": "1"}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "vmsandbox", "--state-dir", str(own), *args], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=600)

    sid = unique("ocicli")
    done = cli("run", "--rm", "--image", str(images["oci-archive"]), sid)
    assert (done.returncode, done.stdout) == (0, "hello from /work\n"), done.stderr
    assert "unpacking image sha256:" in done.stderr and "(3 layers)" in done.stderr
    done = cli("run", "--rm", "--image", str(images["layout"]), unique("ocicli"), "--", 'echo "$GREETING, $(id -u)"')
    assert (done.returncode, done.stdout) == (0, "hello, 0\n"), done.stderr
    assert "unpacking image" not in done.stderr  # the same image: cached
    assert [p.name for p in (own / "sandboxes").iterdir()] == []
    assert len([p for p in (own / "oci").iterdir() if p.is_dir()]) == 1
    shutil.rmtree(own.parent, ignore_errors=True)
