"""Applying layer tars: whiteouts, opaque folders, links, metadata, and hostile members that
must never write outside the root (``..``, absolute names, paths through symlinks)."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from tests.ocibuild import device, directory, fifo, file, hardlink, layer, opaque, symlink, whiteout
from vmsandbox import InvalidArgument
from vmsandbox.oci import apply_layer

ROOT = os.geteuid() == 0


def apply(root: Path, *members: tuple[tarfile.TarInfo, bytes]) -> None:
    apply_layer(root, io.BytesIO(layer(members)), what="test layer")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    r.mkdir()
    return r


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder beside the root that hostile members aim at; it must stay untouched."""
    o = tmp_path / "outside"
    o.mkdir()
    (o / "victim").write_text("untouched\n")
    return o


def tree(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath, n)
            rel = p.relative_to(root).as_posix()
            out[rel] = ("-> " + os.readlink(p)) if p.is_symlink() else "/" if p.is_dir() else p.read_text()
    return out


def test_files_folders_and_symlinks_land_with_their_modes_and_times(root: Path) -> None:
    apply(root, directory("etc", 0o750), file("etc/a", "A", 0o640), file("bin/tool", "#!", 0o4755),
          symlink("bin/sh", "tool"), directory("tmp", 0o1777))
    assert tree(root) == {"etc": "/", "etc/a": "A", "bin": "/", "bin/tool": "#!", "bin/sh": "-> tool", "tmp": "/"}
    assert stat.S_IMODE(os.stat(root / "etc").st_mode) == 0o750
    assert stat.S_IMODE(os.stat(root / "etc/a").st_mode) == 0o640
    assert stat.S_IMODE(os.stat(root / "bin/tool").st_mode) == 0o4755
    assert stat.S_IMODE(os.stat(root / "tmp").st_mode) == 0o1777
    assert os.stat(root / "etc").st_mtime == os.stat(root / "etc/a").st_mtime == 1_700_000_000  # dirs set last
    assert os.lstat(root / "bin/sh").st_mtime == 1_700_000_000


@pytest.mark.skipif(not ROOT, reason="ownership and device nodes need root")
def test_owners_devices_and_fifos_as_root(root: Path) -> None:
    apply(root, directory("home/app", 0o700, 1000, 1001), file("home/app/f", "x", 0o600, 1000, 1001),
          device("dev/null", 1, 3), device("dev/loop9", 7, 9, block=True), fifo("run/pipe"))
    st = os.stat(root / "home/app/f")
    assert (st.st_uid, st.st_gid) == (1000, 1001) and os.stat(root / "home/app").st_uid == 1000
    null = os.lstat(root / "dev/null")
    assert stat.S_ISCHR(null.st_mode) and os.major(null.st_rdev) == 1 and os.minor(null.st_rdev) == 3
    assert stat.S_ISBLK(os.lstat(root / "dev/loop9").st_mode)
    assert stat.S_ISFIFO(os.lstat(root / "run/pipe").st_mode)


def test_a_whiteout_removes_a_lower_file_or_folder(root: Path) -> None:
    apply(root, file("etc/gone", "x"), file("etc/kept", "k"), file("var/cache/a/b", "deep"))
    apply(root, whiteout("etc/gone"), whiteout("var/cache"))
    assert tree(root) == {"etc": "/", "etc/kept": "k", "var": "/"}


def test_a_whiteout_does_not_remove_what_its_own_layer_adds(root: Path) -> None:
    apply(root, file("etc/x", "old"))
    apply(root, file("etc/x", "new"), whiteout("etc/x"))
    assert (root / "etc/x").read_text() == "new"


def test_an_opaque_folder_loses_the_lower_content_but_keeps_its_own_layer(root: Path) -> None:
    apply(root, file("opt/a", "a"), file("opt/sub/b", "b"), file("other/c", "c"))
    apply(root, file("opt/new", "n"), directory("opt/sub"), file("opt/sub/own", "o"), opaque("opt"))
    assert tree(root) == {"opt": "/", "opt/new": "n", "opt/sub": "/", "opt/sub/own": "o", "other": "/",
                          "other/c": "c"}


def test_a_whiteout_of_something_missing_is_nothing(root: Path) -> None:
    apply(root, whiteout("nowhere/x"), whiteout("y"))
    assert tree(root) == {}


def test_aufs_metadata_is_skipped(root: Path) -> None:
    apply(root, directory(".wh..wh.plnk"), file(".wh..wh.plnk/123.456", "x"), file(".wh..wh.aufs", ""))
    assert tree(root) == {}


def test_hard_links_share_the_inode_also_across_layers(root: Path) -> None:
    apply(root, file("a", "data"))
    apply(root, hardlink("b", "a"), file("c", "c"), hardlink("d", "c"))
    assert os.stat(root / "a").st_ino == os.stat(root / "b").st_ino
    assert os.stat(root / "c").st_ino == os.stat(root / "d").st_ino


def test_an_upper_layer_replaces_types(root: Path) -> None:
    apply(root, file("x", "file"), directory("y"), file("y/z", "z"), symlink("lib", "usr/lib"))
    apply(root, directory("x"), file("y", "now a file"), directory("lib"), file("lib/real", "r"))
    assert tree(root) == {"x": "/", "y": "now a file", "lib": "/", "lib/real": "r"}


def test_a_dot_dot_name_is_refused(root: Path, outside: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"climbs out of the root"):
        apply(root, file("../outside/victim", "pwned"))
    with pytest.raises(InvalidArgument, match=r"climbs out"):
        apply(root, file("a/../../outside/new", "pwned"))
    assert (outside / "victim").read_text() == "untouched\n" and not (outside / "new").exists()


def test_an_absolute_name_stays_inside_the_root(root: Path, outside: Path) -> None:
    apply(root, file(f"{outside}/victim", "inside"))
    assert (outside / "victim").read_text() == "untouched\n"
    assert (root / outside.relative_to("/") / "victim").read_text() == "inside"


@pytest.mark.parametrize("target", ["abs", "rel"])
def test_a_member_through_a_symlink_of_the_same_layer_is_refused(root: Path, outside: Path, target: str) -> None:
    link = str(outside) if target == "abs" else "../outside"
    with pytest.raises(InvalidArgument, match=r"goes through /escape, which is not a folder"):
        apply(root, symlink("escape", link), file("escape/victim", "pwned"))
    assert (outside / "victim").read_text() == "untouched\n"


def test_a_member_through_a_symlink_of_a_lower_layer_is_refused(root: Path, outside: Path) -> None:
    apply(root, directory("etc"), symlink("etc/evil", str(outside)))
    for hostile in (file("etc/evil/victim", "pwned"), file("etc/evil/new", "pwned"), directory("etc/evil/d"),
                    symlink("etc/evil/l", "/"), whiteout("etc/evil/victim"), opaque("etc/evil")):
        with pytest.raises(InvalidArgument, match="not a folder"):
            apply(root, hostile)
    assert sorted(os.listdir(outside)) == ["victim"] and (outside / "victim").read_text() == "untouched\n"


def test_a_hard_link_through_a_symlink_or_out_of_the_root_is_refused(root: Path, outside: Path) -> None:
    apply(root, symlink("out", str(outside)))
    with pytest.raises(InvalidArgument, match="not a folder"):
        apply(root, hardlink("stolen", "out/victim"))
    with pytest.raises(InvalidArgument, match="climbs out"):
        apply(root, hardlink("stolen", "../outside/victim"))
    with pytest.raises(InvalidArgument, match="to missing"):
        apply(root, hardlink("stolen", "nope"))
    assert not (root / "stolen").exists() and os.stat(outside / "victim").st_nlink == 1


def test_a_file_replacing_a_symlink_replaces_the_link_not_its_target(root: Path, outside: Path) -> None:
    apply(root, symlink("f", str(outside / "victim")))
    apply(root, file("f", "mine"))
    assert not (root / "f").is_symlink() and (root / "f").read_text() == "mine"
    assert (outside / "victim").read_text() == "untouched\n"


def test_a_hard_link_to_a_symlink_links_the_symlink(root: Path, outside: Path) -> None:
    apply(root, symlink("l", str(outside / "victim")), hardlink("h", "l"))
    assert os.readlink(root / "h") == str(outside / "victim")
    apply(root, file("h", "over"))  # replaces the link entry, never writes through it
    assert (outside / "victim").read_text() == "untouched\n"


def test_a_broken_tar_is_invalid(root: Path) -> None:
    with pytest.raises(InvalidArgument, match="not a readable tar"):
        apply_layer(root, io.BytesIO(layer([file("a", "x" * 2000)])[:1000]), what="layer 1")
