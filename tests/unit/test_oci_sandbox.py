"""OCI image roots in the orchestration (over the rig's fakes, with the real cache, mkfs.ext4
and qemu-img): the overlay, the record, image_config, exec defaults and the CLI's --image."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.ocibuild import build_busybox_image
from tests.unit.rig import Rig
from tests.unit.test_cli import Cli, cli  # noqa: F401 - a fixture
from vmsandbox import InvalidArgument, Mount, NotFound, SandboxMetadata
from vmsandbox.model import ExecResult
from vmsandbox.sandbox.mounts import check_not_shared, plan_mounts
from vmsandbox.sandbox.ocimount import backing_file

pytestmark = pytest.mark.skipif(not (shutil.which("qemu-img") and shutil.which("mkfs.ext4")),
                                reason="needs qemu-img and mkfs.ext4")


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return build_busybox_image(tmp_path / "busybox")


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    r = Rig(tmp_path)
    yield r  # type: ignore[misc]
    r.close()


def oci(image: Path) -> list[Mount]:
    return [Mount("oci", str(image))]


# --------------------------------------------------------------------------- planning
def test_an_oci_root_is_planned_as_a_qcow2_overlay(image: Path, tmp_path: Path) -> None:
    (p,) = plan_mounts(oci(image), tmp_path / "sb")
    assert (p.source, p.format, p.fstype, p.target, p.build_from) == (
        str(tmp_path / "sb" / "disks" / "m0.qcow2"), "qcow2", "ext4", "", "oci")
    assert p.mounts_line() == "vsbx-m0 ext4 rw / -\n"


def test_an_oci_mount_is_refused_past_the_root_and_when_missing(image: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="can only be the first mount"):
        plan_mounts([Mount("bind", str(tmp_path)), Mount("oci", str(image), "/img")], tmp_path / "sb")
    with pytest.raises(InvalidArgument, match="does not exist"):
        plan_mounts([Mount("oci", str(tmp_path / "nope"))], tmp_path / "sb")


def test_sandboxes_of_one_image_share_it(image: Path) -> None:
    check_not_shared(oci(image), [("other", oci(image))])


# --------------------------------------------------------------------------- the controller
def test_create_unpacks_once_and_backs_each_overlay_with_the_cached_image(rig: Rig, image: Path) -> None:
    lines: list[str] = []
    rig.ctl._oci.cache._progress = lines.append
    rig.ctl.create(SandboxMetadata("a"), rootfs=oci(image))
    cfg = rig.ctl.image_config("a")
    assert cfg is not None and cfg.working_dir == "/work" and cfg.digest.startswith("sha256:")
    base = rig.config.state_dir / "oci" / cfg.digest[7:] / "rootfs.ext4"
    overlay = rig.sandbox_dir("a") / "disks" / "m0.qcow2"
    assert backing_file(overlay) == str(base) and lines == [f"unpacking image {cfg.digest[:19]}… (3 layers)"]
    before = base.stat()
    rig.ctl.create(SandboxMetadata("b"), rootfs=oci(image))
    after = base.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns) and len(lines) == 1
    assert rig.ctl._oci.in_use() == {cfg.digest[7:]}
    xml = rig.domain("a").xml
    assert "m0.qcow2" in xml and "type=\"qcow2\"" in xml
    for sid in ("a", "b"):
        rig.ctl.shutdown(sid)
    assert not overlay.exists() and base.is_file() and rig.ctl._oci.in_use() == set()


def test_the_image_config_is_in_the_record_and_survives_a_restart(rig: Rig, image: Path) -> None:
    rig.ctl.create(SandboxMetadata("a"), rootfs=oci(image))
    cfg = rig.ctl.image_config("a")
    assert rig.record("a")["image"]["env"] == ["PATH=/usr/local/bin:/usr/bin:/bin", "GREETING=hello"]
    assert rig.restart().image_config("a") == cfg
    with pytest.raises(NotFound):
        rig.ctl.image_config("nope")


def test_other_roots_have_no_image_config(rig: Rig, tmp_path: Path) -> None:
    (tmp_path / "tree").mkdir()
    rig.ctl.create(SandboxMetadata("a"), rootfs=[Mount("bind", str(tmp_path / "tree"))])
    assert rig.ctl.image_config("a") is None and rig.record("a")["image"] is None


def test_a_bad_image_fails_the_create_and_leaves_nothing(rig: Rig, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidArgument, match="not an OCI image layout"):
        rig.ctl.create(SandboxMetadata("a"), rootfs=[Mount("oci", str(tmp_path / "empty"))])
    assert rig.leftovers("a") == []


def test_exec_and_spawn_take_the_images_env_cwd_and_user_as_defaults(rig: Rig, tmp_path: Path) -> None:
    image = build_busybox_image(tmp_path / "with-user", config={"User": "app"})
    rig.ctl.create(SandboxMetadata("a"), rootfs=oci(image))
    rig.ctl.start("a")
    rig.guests.execs.clear()
    rig.ctl.exec("a", ["env"])
    rig.ctl.exec("a", ["env"], env={"GREETING": "bye", "X": "1"}, cwd="/tmp", user="root")
    rig.ctl.exec("a", ["env"], in_guest_root=True)
    plain, given, guest_root = rig.guests.execs[-3:]
    assert (plain.env, plain.cwd, plain.user) == (
        {"PATH": "/usr/local/bin:/usr/bin:/bin", "GREETING": "hello"}, "/work", "app")
    assert (given.env, given.cwd, given.user) == (
        {"PATH": "/usr/local/bin:/usr/bin:/bin", "GREETING": "bye", "X": "1"}, "/tmp", "root")
    assert (guest_root.env, guest_root.cwd, guest_root.user) == ({}, None, None)
    proc = rig.ctl.spawn("a", ["sh"], stdout=lambda b: None, stderr=lambda b: None)
    assert (proc.call.env["GREETING"], proc.call.cwd, proc.call.user) == ("hello", "/work", "app")  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- the CLI (test_cli's fixture)


def test_run_image_runs_the_entrypoint_with_the_images_cmd_or_the_given_one(cli: Cli, image: Path) -> None:  # noqa: F811
    cli.rig.guests.handler = lambda call: ExecResult(0, b"" if call.in_guest_root else json.dumps(call.argv).encode(), b"")
    code, out, err = cli("run", "--rm", "--image", str(image), "a")
    assert code == 0, err
    assert json.loads(out) == ["/bin/sh", "-c", 'echo "$GREETING from $(pwd)"']
    code, out, err = cli("run", "--rm", "--image", str(image), "b", "--", "echo hi")
    assert code == 0 and json.loads(out) == ["/bin/sh", "-c", "echo hi"]
    assert cli.rig.leftovers("a") == [] and cli.rig.leftovers("b") == []


def test_create_image_records_an_oci_root_and_refuses_it_with_rootfs(cli: Cli, image: Path, tmp_path: Path,  # noqa: F811
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "data").mkdir()
    assert cli("create", "a", "--image", str(image), "--mount", f"{tmp_path / 'data'}:/data") == (0, "created a\n", "")
    assert [m["type"] for m in cli.rig.record("a")["rootfs"]] == ["oci", "bind"]
    assert cli.rig.record("a")["rootfs"][0]["source"] == os.path.abspath(image)
    with pytest.raises(SystemExit) as ei:
        cli("create", "b", "--image", str(image), "--rootfs", str(image))
    assert ei.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
