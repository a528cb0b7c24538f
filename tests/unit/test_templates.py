"""Template starts over the fakes: which path a start takes, what the restored guest is sent,
fallbacks, stale and corrupt templates, and recovery. The real thing: tests/integration/test_templates.py."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest

from vmsandbox import SandboxMetadata
from vmsandbox.errors import FailedPrecondition, InvalidArgument
from vmsandbox.guest.fake import ExecCall
from vmsandbox.model import ExecResult
from vmsandbox.sandbox.controller import DOMAIN_PREFIX
from vmsandbox.sandbox.templates import TEMPLATE_DOMAIN_PREFIX

from .rig import Rig


@pytest.fixture(autouse=True)
def no_settling(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("vmsandbox.sandbox.templates._SETTLE", 0.0)  # a fake guest reports no pages


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    r = Rig(tmp_path, templates=True)
    yield r  # type: ignore[misc]
    r.close()


def templates(rig: Rig) -> list[Path]:
    root = rig.config.state_dir / "templates"
    return sorted(p for p in root.iterdir()) if root.is_dir() else []


def setup_calls(rig: Rig) -> list[ExecCall]:
    return [c for c in rig.guests.execs if c.argv[:2] == ("/sbin/vsbx-setup", "restore")]


def start(rig: Rig, sid: str, **annotations: str) -> str:
    rig.ctl.create(SandboxMetadata(id=sid), annotations={f"vmsandbox.io/{k}": v for k, v in annotations.items()})
    rig.ctl.start(sid)
    return rig.ctl.status(sid, verbose=True).info["start"]


def test_a_start_restores_the_template_it_built_and_hands_the_guest_its_identity(rig: Rig) -> None:
    assert start(rig, "a") == "template"
    d = rig.hv.domains[DOMAIN_PREFIX + "a"]
    assert d.restores == 1 and d.starts == 0
    assert any("<filesystem" in x for x in d.attached)  # the share is plugged in after the restore
    assert "<name>vmsandbox-a</name>" in d.live_xml
    # QEMU loads stand-ins for the boot files the restored guest never reads again
    (tpl,) = templates(rig)
    assert f"<kernel>{tpl / 'stub-vmlinuz'}</kernel>" in d.live_xml and "stub-initrd" in d.live_xml
    assert (tpl / "stub-vmlinuz").read_bytes()[0x202:0x206] == b"HdrS"
    # the restore gives back the pages the template's RAM had zero, known from its build
    assert rig.hv.trimmed == [(DOMAIN_PREFIX + "a", {"/memfd:memory-backend-memfd (deleted)": [(0, 4096)]})]
    (call,) = setup_calls(rig)
    assert call.in_guest_root and call.stdin is not None
    seed, config = call.stdin[:64], call.stdin[64:]
    assert len(seed) == 64 and seed != bytes(64)
    assert config == (rig.config.state_dir / "sandboxes" / "a" / "config.tar").read_bytes()
    names = tarfile.open(fileobj=io.BytesIO(config)).getnames()
    assert {"authorized_keys", "hostkey", "hostname"} <= set(names)
    assert int(call.argv[2]) > 0  # the host's clock, in ns
    channel = rig.guests.channels[-1]
    assert channel.rekeyed  # later connections use the sandbox's keys, not the template's


def test_a_second_sandbox_reuses_the_template_and_gets_its_own_entropy(rig: Rig) -> None:
    start(rig, "a")
    start(rig, "b")
    assert len(templates(rig)) == 1
    builders = [n for n in rig.hv.domains if n.startswith(TEMPLATE_DOMAIN_PREFIX)]
    assert builders == []  # the transient template VM is gone after its save
    a, b = setup_calls(rig)
    assert a.stdin is not None and b.stdin is not None and a.stdin[:64] != b.stdin[:64]


def test_cold_by_annotation_or_config_and_bad_values_refused(rig: Rig, tmp_path: Path) -> None:
    assert start(rig, "c", start="cold") == "cold"
    assert rig.hv.domains[DOMAIN_PREFIX + "c"].starts == 1
    assert templates(rig) == []  # nothing was built for it
    with pytest.raises(InvalidArgument):
        rig.ctl.create(SandboxMetadata(id="d"), annotations={"vmsandbox.io/start": "warm"})
    assert not (rig.config.state_dir / "sandboxes" / "d").exists()


def test_a_template_that_cannot_be_built_falls_back_to_a_cold_boot(rig: Rig) -> None:
    rig.hv.fp.fail("save", FailedPrecondition("no space"))
    assert start(rig, "a") == "cold"
    assert templates(rig) == []  # no half-built template stays
    assert not [n for n in rig.hv.domains if n.startswith(TEMPLATE_DOMAIN_PREFIX)]
    assert start(rig, "b") == "template"  # the next start builds it


def test_a_corrupt_template_is_never_used_and_is_rebuilt(rig: Rig) -> None:
    start(rig, "a")
    (tpl,) = templates(rig)
    image = tpl / "memory.save"
    data = bytearray(image.read_bytes())
    data[-3] ^= 0xFF  # same size, other bytes
    image.write_bytes(bytes(data))
    rig.restart()
    assert start(rig, "b") == "template"
    assert rig.hv.domains[DOMAIN_PREFIX + "b"].restores == 1
    manifest = json.loads((tpl / "manifest.json").read_text())
    assert manifest["sha256"] != "" and (tpl / "memory.save").read_bytes() != bytes(data)  # rebuilt


def test_a_new_image_makes_a_new_template_and_the_stale_one_goes(rig: Rig) -> None:
    start(rig, "a")
    (old,) = templates(rig)
    rig.images.manifest["initramfs.img"] = "another"  # a changed image: another key
    shutil.copytree(rig.images.dir, rig.images.dir.parent / "img2")
    rig.images.dir = rig.images.dir.parent / "img2"
    (rig.images.dir / "manifest.json").write_text(json.dumps(rig.images.manifest))
    rig.ctl.shutdown("a")
    rig.restart()
    rig.ctl.create(SandboxMetadata(id="b"))
    rig.ctl.start("b")
    assert rig.ctl.status("b", verbose=True).info["start"] == "template"
    (new,) = templates(rig)
    assert new != old


def test_a_failed_restore_boots_cold_and_drops_the_template(rig: Rig) -> None:
    start(rig, "a")
    rig.hv.fp.fail("restore", FailedPrecondition("qemu: load of migration failed"))
    assert start(rig, "b") == "cold"
    d = rig.hv.domains[DOMAIN_PREFIX + "b"]
    assert d.starts == 1 and d.restores == 0
    assert templates(rig) == []  # never used again ...
    assert start(rig, "c") == "template"  # ... the next start builds a new one


def test_a_failed_personalization_fails_the_start_and_leaves_nothing(rig: Rig) -> None:
    def handler(call: ExecCall) -> ExecResult:
        if call.argv[:1] == ("/sbin/vsbx-setup",):
            return ExecResult(1, b"", b"tar: short read\n")
        return ExecResult(0, b"", b"")

    rig.guests.handler = handler
    rig.ctl.create(SandboxMetadata(id="a"))
    with pytest.raises(FailedPrecondition, match="set-up failed"):
        rig.ctl.start("a")
    assert rig.leftovers("a") == []


def test_a_controller_restart_recovers_a_template_started_sandbox(rig: Rig) -> None:
    start(rig, "a")
    ctl = rig.restart()
    assert ctl.status("a").state == "SANDBOX_READY"
    assert ctl.status("a", verbose=True).info["start"] == "template"
    r = ctl.exec("a", ["true"])
    assert r.exit_code == 0
    rec_key = json.loads((rig.config.state_dir / "sandboxes" / "a" / "record.json").read_text())["host_key"]
    assert rig.guests.channels[-1]._host_key == rec_key  # the new channel pins the sandbox's key


def test_a_template_builder_left_by_a_crash_and_partial_folders_are_removed(rig: Rig) -> None:
    rig.hv.fp.fail("save", KeyboardInterrupt())
    rig.ctl.create(SandboxMetadata(id="a"))
    with pytest.raises(KeyboardInterrupt):
        rig.ctl.start("a")
    partial = rig.config.state_dir / "templates" / ".x.partial"
    partial.mkdir(parents=True, exist_ok=True)
    rig.restart()
    rig.ctl.image()
    assert not partial.exists()
    assert not [n for n in rig.hv.domains if n.startswith(TEMPLATE_DOMAIN_PREFIX)]


def test_warm_template_builds_once(rig: Rig) -> None:
    first = rig.ctl.warm_template()
    again = rig.ctl.warm_template()
    assert first.built and not again.built and first.key == again.key and first.path == again.path
    assert os.path.isfile(first.path / "memory.save")
    other = rig.ctl.warm_template(memory_mib=512)
    assert other.key != first.key
    with pytest.raises(InvalidArgument):
        rig.ctl.warm_template(memory_mib=1)


def test_only_the_most_recently_used_templates_are_kept(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("vmsandbox.sandbox.templates.KEEP", 2)
    keys = [rig.ctl.warm_template(memory_mib=m).key for m in (128, 192)]
    manifests = [rig.config.state_dir / "templates" / k / "manifest.json" for k in keys]
    os.utime(manifests[0], (1e9, 1e9))
    os.utime(manifests[1], (1e9 + 10, 1e9 + 10))
    rig.ctl.warm_template(memory_mib=128)  # used again: now newer than the 192 one
    assert manifests[0].stat().st_mtime > 1e9 + 10
    third = rig.ctl.warm_template(memory_mib=320).key
    assert sorted(p.name for p in templates(rig)) == sorted([keys[0], third])


def test_starts_past_the_limit_wait_for_a_slot(tmp_path: Path) -> None:
    import threading
    import time as _time

    rig = Rig(tmp_path, max_parallel_starts=1)
    try:
        running = []
        peak = [0]
        lock = threading.Lock()
        orig = rig.hv.start

        def slow_start(name: str) -> None:
            with lock:
                running.append(name)
                peak[0] = max(peak[0], len(running))
            _time.sleep(0.2)
            orig(name)
            with lock:
                running.remove(name)

        rig.hv.start = slow_start  # type: ignore[method-assign]
        for sid in ("a", "b", "c"):
            rig.ctl.create(SandboxMetadata(id=sid))
        threads = [threading.Thread(target=rig.ctl.start, args=(sid,)) for sid in ("a", "b", "c")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert peak[0] == 1 and all(rig.ctl.status(s).state == "SANDBOX_READY" for s in ("a", "b", "c"))
    finally:
        rig.close()


def test_a_build_finishing_leaves_another_shapes_build_in_progress_alone(rig: Rig) -> None:
    import threading

    inside = threading.Event()
    go_on = threading.Event()
    orig = rig.hv.save

    def slow_save(name: str, path: str) -> None:
        if not inside.is_set():
            inside.set()
            go_on.wait(10)
        orig(name, path)

    rig.hv.save = slow_save  # type: ignore[method-assign]
    first = threading.Thread(target=rig.ctl.warm_template, kwargs={"memory_mib": 192})
    first.start()
    assert inside.wait(10)  # the 192 MiB build is saving: its .partial folder is in use
    rig.ctl.warm_template(memory_mib=128)  # another shape's build finishes and cleans up
    go_on.set()
    first.join(10)
    assert len(templates(rig)) == 2  # both built: the first one's folder was left alone
