"""containerd mounts as guest disks, seen from inside real guests.

One guest (module-wide) gets three mounts: the busybox rootfs image as its root, a second
ext4 image read-only at /data, and a host folder (``bind``) copied into a disk at /srv/host.
Root-writes-persist and folder-as-root each boot their own guest.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import unique
from tests.integration.test_controller_lifecycle import (
    agent_socket,
    assert_left_nothing,
    footprint,
    qemu_dir,
)
from vmsandbox import InvalidArgument, LibvirtController, Mount, NotFound, SandboxMetadata

pytestmark = pytest.mark.integration

BLOB = bytes(range(256)) * 512  # 128 KiB with every byte value


def mkfs_from(tree: Path, image: Path, size_mib: int = 16) -> None:
    with open(image, "wb") as f:
        f.truncate(size_mib << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(image)], check=True, capture_output=True)


def debugfs_cat(image: Path, path: str) -> str:
    r = subprocess.run(["debugfs", "-R", f"cat {path}", str(image)], capture_output=True, text=True, check=True)
    return r.stdout


def busybox_tree(root: Path, os_id: str) -> None:
    """A minimal root filesystem folder: busybox and its applets, an os-release."""
    for d in ("bin", "etc", "proc", "sys", "dev", "tmp", "root"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2("/bin/busybox", root / "bin" / "busybox")
    applets = subprocess.run(["/bin/busybox", "--list"], capture_output=True, text=True, check=True).stdout.split()
    for a in applets:
        if a != "busybox":
            os.symlink("busybox", root / "bin" / a)
    (root / "etc" / "os-release").write_text(f"ID={os_id}\n")


@pytest.fixture(scope="module")
def host_tree(test_root: Path) -> Path:
    """The folder behind the ``bind`` mount."""
    d = qemu_dir(test_root) / "tree"
    (d / "sub" / "deeper").mkdir(parents=True)
    (d / "hello.txt").write_text("hello from a host folder\n")
    (d / "sub" / "deeper" / "blob.bin").write_bytes(BLOB)
    (d / "run.sh").write_text("#!/bin/sh\necho ran with $#\n")
    os.chmod(d / "run.sh", 0o755)
    return d


@pytest.fixture(scope="module")
def mounted(
    controller: LibvirtController, test_root: Path, rootfs_image: Path, host_tree: Path
) -> Iterator[tuple[str, Path]]:
    """(sandbox id, the /data image) of a running guest with three mounts."""
    sid = unique("mounts")
    d = qemu_dir(test_root)
    root = d / "rootfs.img"
    shutil.copyfile(rootfs_image, root)
    data_tree = d / "data-tree"
    data_tree.mkdir()
    (data_tree / "readme.txt").write_text("read-only data\n")
    data = d / "data.img"
    mkfs_from(data_tree, data)
    sock = None
    try:
        controller.create(SandboxMetadata(sid), rootfs=[
            Mount("ext4", str(root)),
            Mount("ext4", str(data), "/data", ("ro",)),
            Mount("bind", str(host_tree), "/srv/host", ("rbind", "rw")),
        ])
        controller.start(sid)
        sock = agent_socket(sid)
        yield sid, data
    finally:
        controller.shutdown(sid)
    assert_left_nothing(controller.config.state_dir, sid, sock)
    shutil.rmtree(d, ignore_errors=True)


def run(controller: LibvirtController, sid: str, *argv: str) -> tuple[int, str, str]:
    r = controller.exec(sid, list(argv))
    return r.exit_code, r.stdout.decode(), r.stderr.decode()


def mounts_of(controller: LibvirtController, sid: str) -> dict[str, list[str]]:
    """mountpoint -> [device, fstype, options] as the guest sees them."""
    out = {}
    for line in run(controller, sid, "cat", "/proc/mounts")[1].splitlines():
        dev, mnt, fstype, opts = line.split()[:4]
        out[mnt] = [dev, fstype, opts]
    return out


def test_the_first_mount_is_the_root(controller: LibvirtController, mounted: tuple[str, Path]) -> None:
    sid, _ = mounted
    assert "ID=vsbxrootfs" in run(controller, sid, "cat", "/etc/os-release")[1]
    assert run(controller, sid, "ls", "/data")[0] == 0


def test_second_image_is_visible_and_read_only(controller: LibvirtController, mounted: tuple[str, Path]) -> None:
    sid, data_image = mounted
    assert run(controller, sid, "cat", "/data/readme.txt")[1] == "read-only data\n"
    code, _, err = run(controller, sid, "touch", "/data/new-file")
    assert code != 0 and "Read-only file system" in err
    code, _, err = run(controller, sid, "rm", "/data/readme.txt")
    assert code != 0
    assert run(controller, sid, "cat", "/data/readme.txt")[1] == "read-only data\n"
    dev, fstype, opts = mounts_of(controller, sid)["/data"]
    assert fstype == "ext4" and "ro" in opts.split(",")
    assert debugfs_cat(data_image, "/readme.txt") == "read-only data\n"


def test_a_host_folder_becomes_a_disk_with_its_files(
    controller: LibvirtController, mounted: tuple[str, Path]
) -> None:
    sid, _ = mounted
    assert run(controller, sid, "cat", "/srv/host/hello.txt")[1] == "hello from a host folder\n"
    r = controller.exec(sid, ["cat", "/srv/host/sub/deeper/blob.bin"])
    assert hashlib.sha256(r.stdout).hexdigest() == hashlib.sha256(BLOB).hexdigest()
    assert run(controller, sid, "/srv/host/run.sh", "a b", "c")[1] == "ran with 2\n"  # mode 0755 kept
    dev, fstype, opts = mounts_of(controller, sid)["/srv/host"]
    assert dev.startswith("/dev/vd") and fstype == "ext4" and "rw" in opts.split(",")


def test_guest_writes_to_a_folder_mount_do_not_reach_the_host(
    controller: LibvirtController, mounted: tuple[str, Path], host_tree: Path
) -> None:
    sid, _ = mounted
    code, _, err = run(controller, sid, "sh", "-c", "echo guest > /srv/host/from-guest && rm /srv/host/hello.txt")
    assert code == 0, err
    assert run(controller, sid, "cat", "/srv/host/from-guest")[1] == "guest\n"
    assert not (host_tree / "from-guest").exists()
    assert (host_tree / "hello.txt").read_text() == "hello from a host folder\n"


def test_rootfs_writes_persist_in_the_image_after_stop_and_shutdown(
    controller: LibvirtController, sandbox_ids: list[str], rootfs_copy: Path
) -> None:
    sid = unique("persist")
    sandbox_ids.append(sid)
    controller.create(SandboxMetadata(sid), rootfs=[Mount("ext4", str(rootfs_copy))])
    controller.start(sid)
    code, _, err = run(controller, sid, "sh", "-c",
                       "echo kept > /root/note.txt && mkdir -p /var/lib/app && echo 42 > /var/lib/app/state"
                       " && rm /etc/passwd")
    assert code == 0, err
    controller.stop(sid, timeout=30)
    assert controller.wait(sid, timeout=10).exit_status == 0
    controller.shutdown(sid)
    assert rootfs_copy.is_file(), "shutdown must not remove the caller's image"
    assert debugfs_cat(rootfs_copy, "/root/note.txt") == "kept\n"
    assert debugfs_cat(rootfs_copy, "/var/lib/app/state") == "42\n"
    assert debugfs_cat(rootfs_copy, "/etc/passwd") == ""
    assert "ID=vsbxrootfs" in debugfs_cat(rootfs_copy, "/etc/os-release")
    fsck = subprocess.run(["e2fsck", "-n", "-f", str(rootfs_copy)], capture_output=True, text=True)
    assert fsck.returncode == 0, f"the image is not clean after a clean stop:\n{fsck.stdout}"


def test_a_folder_can_be_the_root(controller: LibvirtController, sandbox_ids: list[str], qemu_tmp: Path) -> None:
    tree = qemu_tmp / "root-tree"
    busybox_tree(tree, "dirroot")
    sid = unique("dirroot")
    sandbox_ids.append(sid)
    controller.create(SandboxMetadata(sid), rootfs=[Mount("bind", str(tree))])
    controller.start(sid)
    assert run(controller, sid, "cat", "/etc/os-release")[1] == "ID=dirroot\n"
    assert mounts_of(controller, sid)["/"][1] == "ext4"
    assert run(controller, sid, "touch", "/root/x")[0] == 0
    assert not (tree / "root" / "x").exists()


# ---------------------------------------------------------------- refused mounts (no boot)


@pytest.fixture
def spare_image(qemu_tmp: Path) -> Path:
    p = qemu_tmp / "spare.img"
    p.write_bytes(b"\0" * 4096)
    return p


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda img: [Mount("ext4", str(img) + ".missing")], id="missing-source"),
        pytest.param(lambda img: [Mount("xfs", str(img))], id="type-xfs"),
        pytest.param(lambda img: [Mount("nfs", str(img))], id="type-nfs"),
        pytest.param(lambda img: [Mount("ext4", str(img), "", ("foo",))], id="option-foo"),
        pytest.param(lambda img: [Mount("ext4", str(img)), Mount("ext4", str(img), "data", ("ro",))],
                     id="relative-target"),
        pytest.param(lambda img: [Mount("ext4", str(img)), Mount("ext4", str(img) + ".missing", "/data")],
                     id="missing-second-source"),
        pytest.param(lambda img: [Mount("ext4", str(img), "/data")], id="root-with-target"),
        pytest.param(lambda img: [Mount("ext4", str(img.parent))], id="folder-without-bind"),
    ],
)
def test_bad_mounts_are_refused_and_leave_nothing(
    controller: LibvirtController, sandbox_ids: list[str], spare_image: Path, make: object
) -> None:
    sid = unique("badmount")
    sandbox_ids.append(sid)
    before = footprint(controller)
    with pytest.raises(InvalidArgument):
        controller.create(SandboxMetadata(sid), rootfs=make(spare_image))  # type: ignore[operator]
    assert footprint(controller) == before
    with pytest.raises(NotFound):
        controller.status(sid)
