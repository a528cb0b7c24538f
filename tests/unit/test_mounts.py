"""Mount planning: which containerd mounts become which guest disks, and what is refused.

Pure planning needs no root; building a disk image from a folder needs ``mkfs.ext4`` and
``debugfs`` (e2fsprogs) and is skipped without them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.unit.rig import command_on_path
from vmsandbox import InvalidArgument, Mount
from vmsandbox.sandbox.mounts import QCOW2_MAGIC, DiskPlan, materialize, plan_mounts

needs_e2fsprogs = pytest.mark.skipif(
    shutil.which("mkfs.ext4") is None or shutil.which("debugfs") is None, reason="needs e2fsprogs"
)


@pytest.fixture
def raw(tmp_path: Path) -> str:
    p = tmp_path / "root.img"
    p.write_bytes(b"\0" * 4096)
    return str(p)


@pytest.fixture
def qcow2(tmp_path: Path) -> str:
    p = tmp_path / "data.qcow2"
    p.write_bytes(QCOW2_MAGIC + b"\0\0\0\3" + b"\0" * 4088)
    return str(p)


@pytest.fixture
def sdir(tmp_path: Path) -> Path:
    return tmp_path / "sandboxes" / "sb1"


def test_no_mounts_means_no_disks(sdir: Path) -> None:
    assert plan_mounts([], sdir) == []


def test_first_file_mount_is_the_root_attached_directly(raw: str, sdir: Path) -> None:
    (p,) = plan_mounts([Mount("ext4", raw)], sdir)
    assert (p.index, p.serial, p.fstype, p.target) == (0, "vsbx-m0", "ext4", "")
    assert (p.source, p.format, p.block, p.readonly, p.build_from) == (raw, "raw", False, False, "")
    assert p.mounts_line() == "vsbx-m0 ext4 rw / -\n"


def test_root_target_slash_is_the_same_as_empty(raw: str, sdir: Path) -> None:
    (p,) = plan_mounts([Mount("ext4", raw, "/")], sdir)
    assert p.target == ""


def test_qcow2_is_detected_by_its_magic_not_its_name(qcow2: str, tmp_path: Path, sdir: Path) -> None:
    disguised = tmp_path / "looks-raw.img"
    shutil.copyfile(qcow2, disguised)
    plans = plan_mounts([Mount("ext4", str(disguised)), Mount("ext4", qcow2, "/data")], sdir)
    assert [p.format for p in plans] == ["qcow2", "qcow2"]


def test_empty_file_is_raw(tmp_path: Path, sdir: Path) -> None:
    f = tmp_path / "empty.img"
    f.touch()
    assert plan_mounts([Mount("ext4", str(f))], sdir)[0].format == "raw"


@pytest.mark.parametrize("fstype", ["ext4", "ext3", "ext2"])
def test_guest_filesystems_are_accepted(raw: str, sdir: Path, fstype: str) -> None:
    assert plan_mounts([Mount(fstype, raw)], sdir)[0].fstype == fstype


@pytest.mark.parametrize("fstype", ["xfs", "nfs", "btrfs", "tmpfs", "", "EXT4"])
def test_other_filesystem_types_are_refused(raw: str, sdir: Path, fstype: str) -> None:
    with pytest.raises(InvalidArgument, match="not supported"):
        plan_mounts([Mount(fstype, raw)], sdir)


def test_extra_mounts_get_their_targets_serials_and_read_only_flag(raw: str, qcow2: str, sdir: Path) -> None:
    plans = plan_mounts([Mount("ext4", raw), Mount("ext4", qcow2, "/data", ("ro",))], sdir)
    assert [(p.serial, p.target, p.readonly) for p in plans] == [("vsbx-m0", "", False), ("vsbx-m1", "/data", True)]
    assert plans[1].mounts_line() == "vsbx-m1 ext4 ro /data -\n"


@pytest.mark.parametrize(
    ("options", "readonly", "guest"),
    [
        (("ro",), True, ()),
        (("ro", "rw"), False, ()),  # the last one wins, as with mount(8)
        (("rw", "ro"), True, ()),
        (("noexec", "nosuid", "nodev", "noatime"), False, ("noexec", "nosuid", "nodev", "noatime")),
        (("bind", "rbind", "rprivate", "loop", "defaults"), False, ()),  # host-only: dropped
        (("ro", "relatime", "discard"), True, ("relatime", "discard")),
    ],
)
def test_options_split_into_read_only_guest_flags_and_ignored(
    raw: str, sdir: Path, options: tuple[str, ...], readonly: bool, guest: tuple[str, ...]
) -> None:
    (p,) = plan_mounts([Mount("ext4", raw, "", options)], sdir)
    assert (p.readonly, p.guest_options) == (readonly, guest)
    expected_opts = ",".join(guest) or "-"
    assert p.mounts_line() == f"vsbx-m0 ext4 {'ro' if readonly else 'rw'} / {expected_opts}\n"


@pytest.mark.parametrize("opt", ["foo", "size=10m", "lowerdir=/x", "no exec", "ro\nrw", "", "x\0y", "\x1b"])
def test_unknown_or_malformed_options_are_refused(raw: str, sdir: Path, opt: str) -> None:
    with pytest.raises(InvalidArgument, match="option"):
        plan_mounts([Mount("ext4", raw, "", (opt,))], sdir)


@pytest.mark.parametrize("target", ["/a/b/../c", "/../etc", "/data/../../etc", "/data/.."])
def test_targets_with_dotdot_are_refused_not_normalised(raw: str, sdir: Path, target: str) -> None:
    """Normalising "/data/../../etc" to "/etc" would mount over the guest's /etc."""
    with pytest.raises(InvalidArgument, match="target"):
        plan_mounts([Mount("ext4", raw), Mount("ext4", raw, target, ("ro",))], sdir)


@pytest.mark.parametrize("target", ["/data", "/data/", "/srv//x", "/a/./b", "/x@y:z,1+2=3"])
def test_good_targets_are_normalised(raw: str, sdir: Path, target: str) -> None:
    plans = plan_mounts([Mount("ext4", raw), Mount("ext4", raw, target, ("ro",))], sdir)
    assert plans[1].target == os.path.normpath(target)
    assert plans[1].mounts_line().split()[3] == os.path.normpath(target)


@pytest.mark.parametrize("target", ["", "data", "./data", "/", "/..", "/a/../..", "/da ta", "/x;y", "/$(id)", "/é"])
def test_bad_targets_of_extra_mounts_are_refused(raw: str, sdir: Path, target: str) -> None:
    with pytest.raises(InvalidArgument, match="target"):
        plan_mounts([Mount("ext4", raw), Mount("ext4", raw, target, ("ro",))], sdir)


def test_first_mount_cannot_have_a_target(raw: str, sdir: Path) -> None:
    with pytest.raises(InvalidArgument, match="root"):
        plan_mounts([Mount("ext4", raw, "/data")], sdir)


def test_two_mounts_on_one_target_are_refused(raw: str, qcow2: str, sdir: Path) -> None:
    with pytest.raises(InvalidArgument, match="share the target"):
        plan_mounts([Mount("ext4", raw), Mount("ext4", raw, "/d", ("ro",)), Mount("ext4", qcow2, "/d/")], sdir)


def test_missing_source_is_refused(tmp_path: Path, sdir: Path) -> None:
    with pytest.raises(InvalidArgument, match="does not exist"):
        plan_mounts([Mount("ext4", str(tmp_path / "nope.img"))], sdir)


def test_character_device_source_is_refused(sdir: Path) -> None:
    with pytest.raises(InvalidArgument, match="neither a file"):
        plan_mounts([Mount("ext4", "/dev/null")], sdir)


def test_a_non_mount_is_refused(sdir: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"rootfs\[0\]"):
        plan_mounts([("ext4", "/x")], sdir)  # type: ignore[list-item]


def test_directory_becomes_an_ext4_image_to_build(tmp_path: Path, raw: str, sdir: Path) -> None:
    d = tmp_path / "tree"
    d.mkdir()
    plans = plan_mounts([Mount("bind", str(d)), Mount("rbind", str(d), "/again", ("ro", "rbind"))], sdir)
    assert [(p.fstype, p.build_from, p.source, p.format, p.block) for p in plans] == [
        ("ext4", str(d), str(sdir / "disks" / "m0.img"), "raw", False),
        ("ext4", str(d), str(sdir / "disks" / "m1.img"), "raw", False),
    ]
    assert plans[1].readonly


@pytest.mark.parametrize("fstype", ["ext4", "xfs", "none"])
def test_directory_needs_a_bind_type(tmp_path: Path, sdir: Path, fstype: str) -> None:
    with pytest.raises(InvalidArgument, match="bind"):
        plan_mounts([Mount(fstype, str(tmp_path))], sdir)


def test_overlay_plans_a_merged_copy(tmp_path: Path, sdir: Path) -> None:
    for n in ("l1", "l2", "up", "work"):
        (tmp_path / n).mkdir()
    m = Mount("overlay", "overlay", "", (f"lowerdir={tmp_path}/l1:{tmp_path}/l2", f"upperdir={tmp_path}/up",
                                         f"workdir={tmp_path}/work"))
    (p,) = plan_mounts([m], sdir)
    assert (p.fstype, p.build_from, p.source) == ("ext4", "overlay", str(sdir / "disks" / "m0.img"))


def test_overlay_without_lowerdir_or_with_a_missing_layer_is_refused(tmp_path: Path, sdir: Path) -> None:
    with pytest.raises(InvalidArgument, match="lowerdir"):
        plan_mounts([Mount("overlay", "overlay", "", (f"upperdir={tmp_path}",))], sdir)
    with pytest.raises(InvalidArgument, match="does not exist"):
        plan_mounts([Mount("overlay", "overlay", "", (f"lowerdir={tmp_path}/gone",))], sdir)


def _overlay(*options: str) -> Mount:
    return Mount("overlay", "overlay", "", options)


@pytest.mark.parametrize("layout", [
    # A lower layer whose name carries an option: unescaped it becomes upperdir=/...
    pytest.param(lambda t: ([f"{t}/lo,upperdir={t}/x"], {}), id="comma-in-lowerdir"),
    # An upper layer with a colon: joined into lowerdir it reads as two layers.
    pytest.param(lambda t: ([f"{t}/lo"], {"upperdir": f"{t}/u:v"}), id="colon-in-upperdir"),
    pytest.param(lambda t: ([f"{t}/lo"], {"upperdir": f"{t}/u,v", "workdir": f"{t}/w"}), id="comma-in-upperdir"),
    pytest.param(lambda t: ([f"{t}/lo\\"], {}), id="backslash-in-lowerdir"),
    pytest.param(lambda t: ([f"{t}/l\\:o"], {}), id="escaped-colon-in-lowerdir"),
    pytest.param(lambda t: (["lo"], {}), id="relative-lowerdir"),
])
def test_overlay_layers_that_the_option_string_cannot_carry_are_refused(
        tmp_path: Path, sdir: Path, monkeypatch: pytest.MonkeyPatch,
        layout: object) -> None:
    monkeypatch.chdir(tmp_path)
    lower, extra = layout(tmp_path)  # type: ignore[operator]
    for d in [*lower, *extra.values(), f"{tmp_path}/x"]:
        os.makedirs(d if os.path.isabs(d) else tmp_path / d, exist_ok=True)
    joined = ":".join(lower)
    opts = (f"lowerdir={joined}", *(f"{k}={v}" for k, v in extra.items()))
    with pytest.raises(InvalidArgument, match="overlay (lowerdir|upperdir|workdir) "):
        plan_mounts([_overlay(*opts)], sdir)


@pytest.fixture
def fake_mount(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``mount`` first on PATH: notes its arguments (one per line) and fails, so nothing is
    mounted and materialize stops right after it."""
    return command_on_path(tmp_path, monkeypatch, "mount", 'printf "%s\\n" "$@" >> "$CALLS"\nexit 32')


def test_materialize_mounts_the_overlay_read_only_with_upperdir_on_top(tmp_path: Path, sdir: Path,
                                                                        fake_mount: Path) -> None:
    for n in ("l1", "l2", "up", "work"):
        (tmp_path / n).mkdir()
    (p,) = plan_mounts([_overlay(f"lowerdir={tmp_path}/l1:{tmp_path}/l2", f"upperdir={tmp_path}/up",
                                 f"workdir={tmp_path}/work")], sdir)
    with pytest.raises(Exception, match="mounting the overlay"):
        materialize(p)
    args = fake_mount.read_text().splitlines()
    assert args[:4] == ["-t", "overlay", "overlay", "-o"]
    assert args[4] == f"ro,lowerdir={tmp_path}/up:{tmp_path}/l1:{tmp_path}/l2"


def test_materialize_never_passes_an_injected_option_to_mount(tmp_path: Path, sdir: Path, fake_mount: Path) -> None:
    # A plan made without plan_mounts' checks (say, from an old record): refused all the same.
    evil = f"{tmp_path}/lo,upperdir={tmp_path}/x"
    os.makedirs(evil)
    os.makedirs(f"{tmp_path}/x")
    m = _overlay(f"lowerdir={evil}")
    plan = DiskPlan(0, m, "vsbx-m0", "ext4", "", False, (), str(sdir / "disks" / "m0.img"), False, "raw", "overlay")
    with pytest.raises(InvalidArgument, match="overlay lowerdir "):
        materialize(plan)
    assert not fake_mount.exists()


def test_planning_touches_nothing(tmp_path: Path, raw: str, sdir: Path) -> None:
    d = tmp_path / "tree"
    d.mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    plan_mounts([Mount("ext4", raw), Mount("bind", str(d), "/t")], sdir)
    assert not sdir.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    with pytest.raises(InvalidArgument):
        plan_mounts([Mount("ext4", raw), Mount("bind", str(d), "/t"), Mount("xfs", raw, "/x")], sdir)
    assert not sdir.exists()


def test_materialize_is_a_no_op_for_file_mounts(raw: str, sdir: Path) -> None:
    (p,) = plan_mounts([Mount("ext4", raw)], sdir)
    before = Path(raw).read_bytes()
    materialize(p)
    assert Path(raw).read_bytes() == before
    assert not sdir.exists()


def _debugfs(image: str, request: str) -> str:
    return subprocess.run(["debugfs", "-R", request, image], capture_output=True, text=True, check=True).stdout


@needs_e2fsprogs
def test_materialize_copies_a_folder_into_an_ext4_image(tmp_path: Path, sdir: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "sub" / "deeper").mkdir(parents=True)
    (tree / "hello.txt").write_text("hello from the host\n")
    (tree / "sub" / "deeper" / "blob.bin").write_bytes(bytes(range(256)) * 64)
    (tree / "run.sh").write_text("#!/bin/sh\necho ran\n")
    os.chmod(tree / "run.sh", 0o755)
    os.symlink("hello.txt", tree / "link")
    (p,) = plan_mounts([Mount("bind", str(tree))], sdir)
    materialize(p)
    img = Path(p.source)
    assert img.is_file() and img.stat().st_size >= 64 << 20
    assert _debugfs(str(img), "cat /hello.txt") == "hello from the host\n"
    listing = _debugfs(str(img), "ls -l /")
    assert "run.sh" in listing and "sub" in listing and "link" in listing
    assert "Mode:  0755" in _debugfs(str(img), "stat /run.sh")
    assert "Fast link dest: \"hello.txt\"" in _debugfs(str(img), "stat /link")
    dump = tmp_path / "blob.out"
    _debugfs(str(img), f"dump /sub/deeper/blob.bin {dump}")
    assert dump.read_bytes() == bytes(range(256)) * 64
    # The source folder is only read.
    assert sorted(x.name for x in tree.iterdir()) == ["hello.txt", "link", "run.sh", "sub"]


@needs_e2fsprogs
def test_materialize_sizes_the_image_for_big_content(tmp_path: Path, sdir: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    with open(tree / "big", "wb") as f:
        f.truncate(80 << 20)  # sparse, but counted at its apparent size
    (p,) = plan_mounts([Mount("bind", str(tree))], sdir)
    materialize(p)
    assert Path(p.source).stat().st_size > 80 << 20
    assert "big" in _debugfs(p.source, "ls /")


def test_disk_plan_is_immutable(raw: str, sdir: Path) -> None:
    (p,) = plan_mounts([Mount("ext4", raw)], sdir)
    assert isinstance(p, DiskPlan)
    with pytest.raises(AttributeError):
        p.readonly = True  # type: ignore[misc]
