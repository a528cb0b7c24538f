"""The sandbox's virtio-fs share on real guests, and crun running a container from it.

One sandbox without a rootfs is booted for the module; the host writes into its share
(``<state_dir>/sandboxes/<id>/shared``, the guest's /run/vsbx/shared) after the boot.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import unique
from vmsandbox import ExecResult, SandboxMetadata
from vmsandbox.hostmount import mount_points, under

pytestmark = pytest.mark.integration
GUEST_SHARE = "/run/vsbx/shared"


def share_of(controller, sid: str) -> Path:  # type: ignore[no-untyped-def]
    return Path(controller.config.state_dir) / "sandboxes" / sid / "shared"


def sh(controller, sid: str, script: str) -> ExecResult:  # type: ignore[no-untyped-def]
    return controller.exec(sid, ["sh", "-c", script], timeout=60)


def guest_sees(controller, sid: str, script: str, want: str, timeout: float = 10.0) -> str:  # type: ignore[no-untyped-def]
    """Run ``script`` in the guest until its stdout is ``want`` (or time runs out); its last stdout."""
    deadline = time.monotonic() + timeout
    while True:
        out = sh(controller, sid, script).stdout.decode().strip()
        if out == want or time.monotonic() > deadline:
            return out
        time.sleep(0.3)


def virtiofsd_pids(share: Path) -> list[int]:
    """virtiofsd processes serving ``share`` (libvirt passes ``-o source=<dir>,...``)."""
    out = []
    for d in os.listdir("/proc"):
        try:
            args = Path("/proc", d, "cmdline").read_bytes()
        except OSError:
            continue
        if b"virtiofsd" in args.split(b"\0")[0] and f"source={share}".encode() in args:
            out.append(int(d))
    return out


def mounts_under(path: Path) -> list[str]:
    return under(mount_points(), str(path))


@pytest.fixture(scope="module")
def booted(controller) -> Iterator[str]:  # type: ignore[no-untyped-def]
    sid = unique("share")
    controller.create(SandboxMetadata(sid))
    try:
        controller.start(sid)
        yield sid
    finally:
        for m in mounts_under(share_of(controller, sid))[:-1]:  # what a failed test left mounted
            subprocess.run(["umount", "-l", m], check=False)
        controller.shutdown(sid)
    assert mounts_under(Path(controller.config.state_dir)) == []


@pytest.fixture
def host_dir(qemu_tmp: Path) -> Path:
    d = qemu_tmp / "vol"
    d.mkdir()
    (d / "hello").write_text("from a host bind mount\n")
    return d


def test_the_share_is_a_shared_mount_that_the_guest_has_mounted(controller, booted: str) -> None:  # type: ignore[no-untyped-def]
    share = share_of(controller, booted)
    line = next(li for li in Path("/proc/self/mountinfo").read_text().splitlines() if li.split()[4] == str(share))
    assert "shared:" in line.split(" - ")[0]
    assert oct(share.stat().st_mode & 0o777) == "0o700"
    fstype = sh(controller, booted, f"awk '$2 == \"{GUEST_SHARE}\" {{print $3}}' /proc/mounts").stdout.decode().strip()
    assert fstype == "virtiofs"


def test_a_file_the_host_writes_after_boot_is_seen_in_the_guest(controller, booted: str) -> None:  # type: ignore[no-untyped-def]
    name = unique("file")
    (share_of(controller, booted) / name).write_text("written by the host after boot\n")
    try:
        assert guest_sees(controller, booted, f"cat {GUEST_SHARE}/{name}", "written by the host after boot") == \
            "written by the host after boot"
    finally:
        (share_of(controller, booted) / name).unlink()


def test_a_host_bind_mount_made_under_the_share_after_boot_shows_up_in_the_guest(controller, booted: str,  # type: ignore[no-untyped-def]
                                                                                 host_dir: Path) -> None:
    target = share_of(controller, booted) / unique("vol")
    target.mkdir()
    subprocess.run(["mount", "--bind", str(host_dir), str(target)], check=True)
    try:
        got = guest_sees(controller, booted, f"cat {GUEST_SHARE}/{target.name}/hello", "from a host bind mount")
        assert got == "from a host bind mount"
    finally:
        # virtiofsd holds the inodes the guest looked up: a plain umount is EBUSY, as the
        # adapter's release expects (it detaches lazily).
        busy = subprocess.run(["umount", str(target)], capture_output=True, text=True)
        if busy.returncode != 0:
            assert "busy" in busy.stderr
            subprocess.run(["umount", "--lazy", str(target)], check=True)
    # Unmounted on the host: the guest sees the empty folder again.
    assert guest_sees(controller, booted, f"ls -A {GUEST_SHARE}/{target.name} | wc -l", "0") == "0"
    target.rmdir()


def test_a_host_mount_under_the_share_is_its_own_filesystem_in_the_guest(controller, booted: str) -> None:  # type: ignore[no-untyped-def]
    """virtiofsd announces submounts: a host filesystem mounted under the share has its own
    st_dev in the guest, so its inode numbers cannot collide with the share's (tar, cp -a and
    du would take two files with one dev:ino for hard links)."""
    target = share_of(controller, booted) / unique("tmpfs")
    target.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "vsbxt-tmpfs", str(target)], check=True)
    try:
        (target / "f").write_text("x")
        assert guest_sees(controller, booted, f"cat {GUEST_SHARE}/{target.name}/f", "x") == "x"
        devs = sh(controller, booted, f"stat -c %d {GUEST_SHARE} {GUEST_SHARE}/{target.name} "
                                      f"{GUEST_SHARE}/{target.name}/f").stdout.decode().split()
        assert len(devs) == 3 and devs[0] != devs[1] == devs[2], devs
    finally:
        busy = subprocess.run(["umount", str(target)], capture_output=True, text=True)
        if busy.returncode != 0:
            subprocess.run(["umount", "--lazy", str(target)], check=True)
    target.rmdir()


def _busybox_bundle(bundle: Path, args: list[str]) -> None:
    rootfs = bundle / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    for d in ("proc", "dev", "tmp"):
        (rootfs / d).mkdir()
    shutil.copy2("/bin/busybox", rootfs / "bin" / "busybox")
    for applet in ("sh", "uname", "cat", "sleep"):
        os.symlink("busybox", rootfs / "bin" / applet)
    config = {
        "ociVersion": "1.0.2",
        "process": {"terminal": False, "user": {"uid": 0, "gid": 0}, "args": args, "env": ["PATH=/bin"],
                    "cwd": "/", "noNewPrivileges": True},
        "root": {"path": "rootfs", "readonly": False},
        "hostname": "vsbxt-container",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755", "size=1m"]},
        ],
        "linux": {"namespaces": [{"type": t} for t in ("pid", "mount", "ipc", "uts")]},
    }
    (bundle / "config.json").write_text(json.dumps(config))


def test_crun_runs_a_busybox_bundle_from_the_share_on_the_guest_kernel(controller, booted: str) -> None:  # type: ignore[no-untyped-def]
    bundle = share_of(controller, booted) / unique("bundle")
    cid = unique("c")
    _busybox_bundle(bundle, ["sh", "-c", "uname -r; hostname; exit 3"])
    try:
        r = controller.exec(booted, ["crun", "run", "--bundle", f"{GUEST_SHARE}/{bundle.name}", cid], timeout=120)
        lines = r.stdout.decode().split()
        guest_kernel = controller.image().kernel_version
        assert (r.exit_code, lines, r.stderr.decode()) == (3, [guest_kernel, "vsbxt-container"], "")
        assert guest_kernel != os.uname().release
        # crun run removed the container: no state, no cgroup left in the guest.
        left = sh(controller, booted, f"crun list -q; ls -d /sys/fs/cgroup/{cid} 2>/dev/null; true").stdout.decode()
        assert left.strip() == ""
    finally:
        shutil.rmtree(bundle)


def test_shutdown_leaves_no_mount_and_no_virtiofsd(controller, host_dir: Path) -> None:  # type: ignore[no-untyped-def]
    sid = unique("share-off")
    controller.create(SandboxMetadata(sid))
    try:
        controller.start(sid)
        assert len(virtiofsd_pids(share_of(controller, sid))) >= 1
        vol = share_of(controller, sid) / "vol"
        vol.mkdir()
        subprocess.run(["mount", "--bind", str(host_dir), str(vol)], check=True)  # left for Shutdown to take down
        assert guest_sees(controller, sid, f"cat {GUEST_SHARE}/vol/hello", "from a host bind mount") == \
            "from a host bind mount"
    finally:
        controller.shutdown(sid)
    sdir = Path(controller.config.state_dir) / "sandboxes" / sid
    assert (mounts_under(sdir), sdir.exists(), virtiofsd_pids(sdir / "shared")) == ([], False, [])
    assert (host_dir / "hello").read_text() == "from a host bind mount\n"  # the volume itself is untouched
