"""The virtio-fs share of a sandbox over the fakes: a shared mount before each boot, taken
down with everything under it at shutdown, after a failed start and by recovery; never a
folder removed through a mount. Plus the pure parts of the mount(8) adapter."""

from __future__ import annotations

import os
import stat
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.unit.rig import Rig, command_on_path
from vmsandbox import errors
from vmsandbox.hostmount import SystemHostMounts, mount_points, under
from vmsandbox.model import SandboxMetadata


def share_of(rig: Rig, sid: str) -> str:
    return str(rig.sandbox_dir(sid) / "shared")


def test_create_makes_a_private_share_folder_that_the_domain_serves_over_virtiofs(rig: Rig) -> None:
    rig.ctl.create(SandboxMetadata("a"))
    share = Path(share_of(rig, "a"))
    assert stat.S_IMODE(share.stat().st_mode) == 0o700
    fs = ET.fromstring(rig.domain("a").xml).find("devices/filesystem")
    assert fs is not None and fs.find("source").get("dir") == str(share)  # type: ignore[union-attr]
    assert fs.find("target").get("dir") == "vsbx-shared"  # type: ignore[union-attr]
    wrapper = rig.config.state_dir / "bin" / "virtiofsd"
    assert fs.find("binary").get("path") == str(wrapper)  # type: ignore[union-attr]
    assert rig.mounts.mounts == []  # nothing mounted before a boot


def test_the_domain_runs_the_configured_virtiofsd_with_announce_submounts(tmp_path: Path) -> None:
    """libvirt 9.0 has no XML for announce_submounts: the domain names a wrapper that adds it."""
    import subprocess

    real = tmp_path / "opt q" / "virtiofsd"
    real.parent.mkdir()
    real.write_text("#!/bin/sh\nfor a in \"$@\"; do echo \"[$a]\"; done\n")
    real.chmod(0o755)
    rig = Rig(tmp_path, virtiofsd=str(real))
    try:
        rig.ctl.create(SandboxMetadata("a"))
        binary = ET.fromstring(rig.domain("a").xml).find("devices/filesystem/binary")
        assert binary is not None
        wrapper = Path(binary.get("path") or "")
        assert wrapper == rig.config.state_dir / "bin" / "virtiofsd"
        assert stat.S_IMODE(wrapper.stat().st_mode) == 0o700
        out = subprocess.run([str(wrapper), "--fd=3", "-o", "source=/x y,cache=auto"], capture_output=True,
                             text=True, check=True).stdout
        assert out.split("\n")[:-1] == ["[--fd=3]", "[-o]", "[source=/x y,cache=auto]", "[-o]", "[announce_submounts]"]
        before = wrapper.stat().st_mtime_ns
        rig.ctl.create(SandboxMetadata("b"))
        assert wrapper.stat().st_mtime_ns == before  # unchanged: not rewritten under a starting domain
    finally:
        rig.close()


def test_start_makes_the_share_a_shared_mount_before_the_domain_boots(rig: Rig) -> None:
    rig.ctl.create(SandboxMetadata("a"))
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
    rig.ctl.create(SandboxMetadata("a"))
    rig.ctl.start("a")
    rig.mounts.mount(share_of(rig, "a") + "/c1/rootfs")  # as a container's rootfs bind will be
    rig.ctl.shutdown("a")
    assert rig.mounts.mounts == [] and rig.leftovers("a") == []


def test_a_failed_start_leaves_no_mount(rig: Rig) -> None:
    rig.ctl.create(SandboxMetadata("a"))
    rig.hv.fp.fail("start", errors.FailedPrecondition("QEMU: virtiofsd failed"))
    with pytest.raises(errors.FailedPrecondition):
        rig.ctl.start("a")
    assert rig.mounts.mounts == [] and rig.leftovers("a") == []


def test_a_share_that_cannot_be_mounted_fails_the_start_and_leaves_nothing(rig: Rig) -> None:
    rig.ctl.create(SandboxMetadata("a"))
    rig.mounts.fp.fail("share", errors.Internal("mount --make-shared failed"))
    with pytest.raises(errors.Internal, match="make-shared"):
        rig.ctl.start("a")
    assert rig.leftovers("a") == [] and rig.mounts.mounts == []
    assert rig.hv.fp.calls["start"] == 0  # the VM never booted without its share


def test_a_mount_that_stays_keeps_the_folder_and_the_record_until_a_later_shutdown(rig: Rig) -> None:
    rig.ctl.create(SandboxMetadata("a"))
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
    rig.ctl.create(SandboxMetadata("a"))
    rig.ctl.start("a")
    rig.mounts.mount(share_of(rig, "a") + "/c1")
    gone = share_of(rig, "gone")  # a folder already removed, its mount left (a lazy detach in flight)
    rig.mounts.mount(gone)
    rig.restart()
    assert rig.mounts.mounted_under(str(rig.config.state_dir)) == [share_of(rig, "a") + "/c1", share_of(rig, "a")]
    rig.ctl.shutdown("a")
    assert rig.mounts.mounts == []


def test_a_sandbox_recorded_before_shares_existed_gets_its_folder_at_start(rig: Rig) -> None:
    rig.ctl.create(SandboxMetadata("a"))
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


@pytest.fixture
def mount_cmds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """mount(8) and umount(8) stand-ins over a mountinfo file: umount drops its target's line
    (exit 32 "target is busy" for a path listed in ``busy``, unless --lazy)."""
    info = tmp_path / "mountinfo"
    busy = tmp_path / "busy"
    busy.touch()
    calls = command_on_path(tmp_path, monkeypatch, "umount", f"""echo "umount $*" >> $CALLS
for a; do p=$a; done
if [ "$1" != --lazy ] && grep -qxF "$p" {busy}; then echo "umount: $p: target is busy." >&2; exit 32; fi
grep -v " $p rw" {info} > {info}.new; mv {info}.new {info}""")
    command_on_path(tmp_path, monkeypatch, "mount", f"""echo "mount $*" >> {calls}
[ "$1" = --bind ] && echo "99 1 0:9 / $3 rw - none none rw" >> {info}; true""")
    return info, calls


def _info_line(n: int, point: str) -> str:
    return f"{n} 1 0:{n} / {point} rw shared:{n} - tmpfs tmpfs rw\n"


def test_release_unmounts_deepest_first_and_detaches_a_busy_one_lazily(mount_cmds: tuple[Path, Path],
                                                                      tmp_path: Path) -> None:
    info, calls = mount_cmds
    info.write_text(_info_line(1, "/") + _info_line(2, "/s/a") + _info_line(3, "/s/a/c1") + _info_line(4, "/s/ab"))
    (tmp_path / "busy").write_text("/s/a/c1\n")
    SystemHostMounts(str(info)).release("/s/a")
    assert calls.read_text().splitlines() == ["umount /s/a/c1", "umount --lazy /s/a/c1", "umount /s/a"]
    assert mount_points(str(info)) == ["/", "/s/ab"]  # the sibling with the same prefix stays


def test_release_of_nothing_mounted_runs_nothing(mount_cmds: tuple[Path, Path]) -> None:
    info, calls = mount_cmds
    info.write_text(_info_line(1, "/"))
    SystemHostMounts(str(info)).release("/s/a")
    assert not calls.exists()


def test_a_mount_that_cannot_be_taken_down_is_an_internal_error(mount_cmds: tuple[Path, Path],
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path: Path) -> None:
    info, _ = mount_cmds
    info.write_text(_info_line(1, "/") + _info_line(2, "/s/a"))
    command_on_path(tmp_path, monkeypatch, "umount", "echo 'umount: /s/a: not permitted' >&2; exit 32")
    with pytest.raises(errors.Internal, match="not permitted"):
        SystemHostMounts(str(info)).release("/s/a")


def test_share_binds_a_folder_onto_itself_once_then_makes_it_shared(mount_cmds: tuple[Path, Path],
                                                                    tmp_path: Path) -> None:
    info, calls = mount_cmds
    info.write_text(_info_line(1, "/"))
    share = tmp_path / "shared"
    share.mkdir()
    mounts = SystemHostMounts(str(info))
    mounts.share(str(share))
    mounts.share(str(share))  # idempotent: already a mount point, only made shared again
    assert calls.read_text().splitlines() == [f"mount --bind {share} {share}", f"mount --make-shared {share}",
                                              f"mount --make-shared {share}"]
    with pytest.raises(errors.FailedPrecondition, match="not a folder"):
        mounts.share(str(tmp_path / "missing"))
