"""ShareStager over the fake mount table: where a container's rootfs, binds and files go."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmsandbox.errors import AlreadyExists, Internal, InvalidArgument
from vmsandbox.hostmount.fake import FakeHostMounts
from vmsandbox.model import Mount
from vmsandbox.task.stager import ShareStager

OVERLAY = Mount("overlay", "overlay", options=("index=off", "workdir=/s/2/work", "upperdir=/s/2/fs", "lowerdir=/s/1/fs"))


@pytest.fixture
def parts(tmp_path: Path) -> tuple[FakeHostMounts, ShareStager, Path]:
    share = tmp_path / "shared"
    share.mkdir()
    mounts = FakeHostMounts()
    return mounts, ShareStager(mounts, share), share


def test_the_rootfs_and_binds_are_mounted_in_the_share_and_mapped_to_guest_paths(parts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    mounts, stager, share = parts
    vol = tmp_path / "vol"
    vol.mkdir()
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    staged = stager.stage("c1", [OVERLAY], [str(vol), str(hosts)])
    assert staged.guest_rootfs == "/run/vsbx/shared/c1/rootfs"
    assert staged.sources == {str(vol): "/run/vsbx/shared/c1/binds/0", str(hosts): "/run/vsbx/shared/c1/binds/1"}
    assert mounts.attached == [
        ("overlay", "overlay", str(share / "c1" / "rootfs"), OVERLAY.options),
        ("bind", str(vol), str(share / "c1" / "binds" / "0"), ("rbind",)),
        ("bind", str(hosts), str(share / "c1" / "binds" / "1"), ("rbind",)),
    ]
    assert (share / "c1" / "binds" / "0").is_dir() and (share / "c1" / "binds" / "1").is_file()
    assert stager.put_file("c1", "config.json", b"{}") == "/run/vsbx/shared/c1/config.json"
    assert (share / "c1" / "config.json").stat().st_mode & 0o777 == 0o600
    stager.unstage("c1")
    assert not (share / "c1").exists() and mounts.mounted_under(str(share)) == []
    stager.unstage("c1")  # idempotent


def test_a_failed_mount_leaves_nothing(parts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    mounts, stager, share = parts
    with pytest.raises(InvalidArgument, match="does not exist"):
        stager.stage("c1", [OVERLAY], [str(tmp_path / "missing")])
    assert list(share.iterdir()) == [] and mounts.mounted_under(str(share)) == []
    mounts.fp.fail("mount_at", Internal("mount: permission denied"))
    with pytest.raises(Internal):
        stager.stage("c1", [OVERLAY], [])
    assert list(share.iterdir()) == []


@pytest.mark.parametrize("rootfs", [[], [OVERLAY, OVERLAY], [Mount("ext4", "/dev/vdb")]])
def test_a_rootfs_other_than_one_snapshot_mount_is_refused(parts, rootfs: list[Mount]) -> None:  # type: ignore[no-untyped-def]
    _, stager, share = parts
    with pytest.raises(InvalidArgument, match="one overlay or bind"):
        stager.stage("c1", rootfs, [])
    assert list(share.iterdir()) == []


def test_bad_ids_and_names_and_a_second_stage_are_refused(parts) -> None:  # type: ignore[no-untyped-def]
    _, stager, _ = parts
    for bad in ("../x", "", "a/b", ".hidden"):
        with pytest.raises(InvalidArgument):
            stager.stage(bad, [OVERLAY], [])
    stager.stage("c1", [OVERLAY], [])
    with pytest.raises(AlreadyExists):
        stager.stage("c1", [OVERLAY], [])
    for name in ("../x", "rootfs", ""):
        with pytest.raises(InvalidArgument):
            stager.put_file("c1", name, b"")


def test_a_failing_cleanup_does_not_hide_the_mount_error(parts) -> None:  # type: ignore[no-untyped-def]
    mounts, stager, _ = parts
    mounts.fp.fail("mount_at", Internal("mount: overlay: wrong fs type"))
    mounts.fp.fail("release", Internal("umount: target is busy"))
    with pytest.raises(Internal, match="wrong fs type"):
        stager.stage("c1", [OVERLAY], [])
