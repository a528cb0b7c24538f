"""The virtio-fs share of a sandbox over the fakes: a shared mount before each boot, taken
down with everything under it at shutdown, after a failed start and by recovery; never a
folder removed through a mount. Plus the pure parts of the mount(8) adapter."""

from __future__ import annotations

import os
import stat
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.unit.rig import Rig
from vmsandbox import errors
from vmsandbox.hostmount import mount_points, under
from vmsandbox.model import Sandbox


def share_of(rig: Rig, sid: str) -> str:
    return str(rig.sandbox_dir(sid) / "shared")


def test_create_makes_a_private_share_folder_that_the_domain_serves_over_virtiofs(rig: Rig) -> None:
    rig.ctl.create(Sandbox("a"))
    share = Path(share_of(rig, "a"))
    assert stat.S_IMODE(share.stat().st_mode) == 0o700
    fs = ET.fromstring(rig.domain("a").xml).find("devices/filesystem")
    assert fs is not None and fs.find("source").get("dir") == str(share)  # type: ignore[union-attr]
    assert fs.find("target").get("dir") == "vsbx-shared"  # type: ignore[union-attr]
    assert fs.find("binary").get("path") == "/usr/lib/qemu/virtiofsd"  # type: ignore[union-attr]
    assert rig.mounts.mounts == []  # nothing mounted before a boot


def test_the_virtiofsd_path_comes_from_the_config(tmp_path: Path) -> None:
    rig = Rig(tmp_path, virtiofsd="/opt/qemu/virtiofsd")
    try:
        rig.ctl.create(Sandbox("a"))
        binary = ET.fromstring(rig.domain("a").xml).find("devices/filesystem/binary")
        assert binary is not None and binary.get("path") == "/opt/qemu/virtiofsd"
    finally:
        rig.close()


def test_start_makes_the_share_a_shared_mount_before_the_domain_boots(rig: Rig) -> None:
    rig.ctl.create(Sandbox("a"))
    seen: list[bool] = []
    real_start = rig.hv.start

    def start(name: str) -> None:
        seen.append(share_of(rig, "a") in rig.mounts.shared)
        real_start(name)

    rig.hv.start = start  # type: ignore[method-assign]
    rig.ctl.start("a")
    assert seen == [True]
    assert rig.mounts.mounted_under(share_of(rig, "a")) == [share_of(rig, "a")]


def test_shutdown_unmounts_the_share_and_what_was_mounted_under_it(rig: Rig) -> None:
    rig.ctl.create(Sandbox("a"))
    rig.ctl.start("a")
    rig.mounts.mount(share_of(rig, "a") + "/c1/rootfs")  # as a container's rootfs bind will be
    rig.ctl.shutdown("a")
    assert rig.mounts.mounts == [] and rig.leftovers("a") == []


def test_a_failed_start_leaves_no_mount(rig: Rig) -> None:
    rig.ctl.create(Sandbox("a"))
    rig.hv.fp.fail("start", errors.FailedPrecondition("QEMU: virtiofsd failed"))
    with pytest.raises(errors.FailedPrecondition):
        rig.ctl.start("a")
    assert rig.mounts.mounts == [] and rig.leftovers("a") == []


def test_a_share_that_cannot_be_mounted_fails_the_start_and_leaves_nothing(rig: Rig) -> None:
    rig.ctl.create(Sandbox("a"))
    rig.mounts.fp.fail("share", errors.Internal("mount --make-shared failed"))
    with pytest.raises(errors.Internal, match="make-shared"):
        rig.ctl.start("a")
    assert rig.leftovers("a") == [] and rig.mounts.mounts == []
    assert rig.hv.fp.calls["start"] == 0  # the VM never booted without its share


def test_a_mount_that_stays_keeps_the_folder_and_the_record_until_a_later_shutdown(rig: Rig) -> None:
    rig.ctl.create(Sandbox("a"))
    rig.ctl.start("a")
    (Path(share_of(rig, "a")) / "data").write_text("someone's volume")
    rig.mounts.fp.fail("release", errors.Internal("umount: target is busy"))
    with pytest.raises(errors.Internal, match="busy"):
        rig.ctl.shutdown("a")
    # No rmtree ran through the mount: the files and the record are still there.
    assert (Path(share_of(rig, "a")) / "data").read_text() == "someone's volume"
    assert rig.record("a")["id"] == "a"
    rig.ctl.shutdown("a")
    assert rig.leftovers("a") == []


def test_recovery_unmounts_and_removes_the_folder_of_a_create_that_was_cut_short(rig: Rig) -> None:
    rig.ctl.close()
    stray = rig.sandbox_dir("cut")
    (stray / "shared").mkdir(parents=True)
    rig.mounts.share(str(stray / "shared"))
    rig.mounts.mount(str(stray / "shared" / "c1"))
    rig.restart()
    assert rig.mounts.mounts == [] and not stray.exists()


def test_recovery_unmounts_strays_of_a_removed_sandbox_and_keeps_those_of_known_ones(rig: Rig) -> None:
    rig.ctl.create(Sandbox("a"))
    rig.ctl.start("a")
    rig.mounts.mount(share_of(rig, "a") + "/c1")
    gone = share_of(rig, "gone")  # a folder already removed, its mount left (a lazy detach in flight)
    rig.mounts.mount(gone)
    rig.restart()
    assert rig.mounts.mounted_under(str(rig.config.state_dir)) == [share_of(rig, "a") + "/c1", share_of(rig, "a")]
    rig.ctl.shutdown("a")
    assert rig.mounts.mounts == []


def test_a_sandbox_recorded_before_shares_existed_gets_its_folder_at_start(rig: Rig) -> None:
    rig.ctl.create(Sandbox("a"))
    os.rmdir(share_of(rig, "a"))
    rig.ctl.start("a")
    assert stat.S_IMODE(Path(share_of(rig, "a")).stat().st_mode) == 0o700
    rig.ctl.shutdown("a")
    assert rig.leftovers("a") == []


# --------------------------------------------------------------------------- mount(8) adapter, pure parts
def test_mountinfo_paths_are_unescaped(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text("22 1 0:21 / / rw shared:1 - ext4 /dev/vda rw\n"
                    "40 22 0:30 / /var/lib/a\\040b rw shared:7 - tmpfs tmpfs rw\n"
                    "41 40 0:31 /x /var/lib/a\\040b/c\\134d rw - ext4 /dev/vdb rw\n")
    assert mount_points(str(info)) == ["/", "/var/lib/a b", "/var/lib/a b/c\\d"]


def test_under_is_deepest_first_and_ignores_a_sibling_with_the_same_prefix() -> None:
    points = ["/", "/s/a", "/s/a/x", "/s/a/x", "/s/a/x/y", "/s/ab", "/s"]
    assert under(points, "/s/a/") == ["/s/a/x/y", "/s/a/x", "/s/a"]
    assert under(points, "/s/none") == []
