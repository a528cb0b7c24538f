"""Sandbox records: lossless JSON, atomic saves, and what load_all reports after a crash."""

from __future__ import annotations

import json
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from vmsandbox import AnyMessage, Mount, Phase, Runtime, Sandbox
from vmsandbox.network import Address, Interface, NetworkPlan, Route
from vmsandbox.sandbox import store as store_mod
from vmsandbox.sandbox.store import SandboxRecord, Store, record_from_json, record_to_json

T0 = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=timezone.utc)


def full_record(sid: str = "sb-1") -> SandboxRecord:
    """A record with every field set to something non-default."""
    sandbox = Sandbox(
        id=sid,
        runtime=Runtime("io.containerd.vmsandbox.v1", AnyMessage("type.googleapis.com/runtimeoptions.v1.Options", b"\x0a\x01x")),
        spec=AnyMessage("types.containerd.io/opencontainers/runtime-spec/1/Spec", b'{"ociVersion":"1.1.0"}'),
        labels={"name": "web", "io.kubernetes.pod.namespace": "default", "ünï": "cødé"},
        extensions={"ext": AnyMessage("example.com/Ext", bytes(range(256)))},
        sandboxer="vmsandbox",
        created_at=T0,
        updated_at=T0 + timedelta(seconds=1),
    )
    return SandboxRecord(
        id=sid,
        domain=f"vmsandbox-{sid}",
        phase=Phase.STOPPED,
        created_at=T0,
        sandbox=sandbox,
        vcpus=2,
        memory_mib=384,
        max_memory_mib=768,
        image_dir="/var/lib/vmsandbox/images/default/abc",
        agent_socket="/var/lib/vmsandbox/sock/x.sock",
        host_key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB host",
        rootfs=(Mount("ext4", "/r.img"), Mount("bind", "/srv/d", "/data", ("ro", "nosuid"))),
        options=AnyMessage("k8s.io/PodSandboxConfig", b"\x00\xff"),
        netns_path="/var/run/netns/cni-1",
        annotations={"vmsandbox.io/vcpus": "2", "k": ""},
        started_at=T0 + timedelta(seconds=2),
        exited_at=T0 + timedelta(seconds=3, microseconds=5),
        exit_status=137,
        pid=4242,
        taps=("vsbx0", "vsbx1"),
        network=NetworkPlan("/var/run/netns/cni-1", (Interface("eth0", "52:54:00:00:00:01", 1400,
                                                               (Address("10.1.0.5", 24, 2),)),),
                            (Route("default", "10.1.0.1", 2, "eth0"),)),
    )


def minimal_record(sid: str = "sb-min") -> SandboxRecord:
    return SandboxRecord(id=sid, domain=f"vmsandbox-{sid}", phase=Phase.CREATED, created_at=T0, sandbox=Sandbox(sid),
                         vcpus=1, memory_mib=256, image_dir="/i", agent_socket="/s", host_key="k")


@pytest.mark.parametrize("make", [full_record, minimal_record])
def test_record_survives_json_unchanged(make: object) -> None:
    rec = make()  # type: ignore[operator]
    text = json.dumps(record_to_json(rec))
    back = record_from_json(json.loads(text))
    assert back == rec
    assert back.created_at.tzinfo is not None and back.exited_at == rec.exited_at


def test_json_is_versioned_and_readable() -> None:
    d = record_to_json(full_record())
    assert d["version"] == 1
    assert d["phase"] == "stopped"
    assert d["created_at"] == "2026-01-02T03:04:05.678901+00:00"
    assert d["rootfs"][1] == {"type": "bind", "source": "/srv/d", "target": "/data", "options": ["ro", "nosuid"]}


def test_evolve_changes_only_what_is_named() -> None:
    rec = minimal_record()
    later = rec.evolve(phase=Phase.RUNNING, pid=7)
    assert (later.phase, later.pid) == (Phase.RUNNING, 7)
    assert later.evolve(phase=Phase.CREATED, pid=0) == rec
    assert rec.phase is Phase.CREATED  # records are immutable values


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path)
    s.root.mkdir()
    return s


def _save_new(store: Store, rec: SandboxRecord) -> None:
    store.dir(rec.id).mkdir()
    store.save(rec)


def test_save_then_load_all(store: Store) -> None:
    a, b = full_record("a"), minimal_record("b")
    _save_new(store, b)
    _save_new(store, a)
    records, strays = store.load_all()
    assert records == [a, b]  # sorted by folder name
    assert strays == []
    assert store.exists("a") and not store.exists("c")


def test_save_replaces_the_record_and_leaves_no_temp_files(store: Store) -> None:
    rec = minimal_record()
    _save_new(store, rec)
    store.save(rec.evolve(phase=Phase.RUNNING, pid=99))
    assert [p.name for p in store.dir(rec.id).iterdir()] == ["record.json"]
    (loaded,), _ = store.load_all()
    assert (loaded.phase, loaded.pid) == (Phase.RUNNING, 99)


def test_a_failed_save_keeps_the_old_record_and_no_temp_file(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    rec = minimal_record()
    _save_new(store, rec)
    before = (store.dir(rec.id) / "record.json").read_bytes()

    def boom(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_mod.os, "replace", boom)
    with pytest.raises(OSError):
        store.save(rec.evolve(phase=Phase.RUNNING))
    monkeypatch.undo()
    assert (store.dir(rec.id) / "record.json").read_bytes() == before
    assert [p.name for p in store.dir(rec.id).iterdir()] == ["record.json"]


def test_save_writes_through_a_temp_file_then_renames(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reader never sees a half-written record: the final name only appears via rename."""
    rec = minimal_record()
    store.dir(rec.id).mkdir()
    seen: list[tuple[str, str, bool]] = []
    real_replace = os.replace

    def spy(src: str, dst: str) -> None:
        seen.append((os.path.basename(src), os.path.basename(dst), os.path.exists(dst)))
        json.loads(Path(src).read_text())  # complete before it becomes visible
        real_replace(src, dst)

    monkeypatch.setattr(store_mod.os, "replace", spy)
    store.save(rec)
    assert len(seen) == 1
    tmp_name, final, existed = seen[0]
    assert final == "record.json" and tmp_name.startswith(".record-") and not existed


def test_folders_without_a_record_are_strays(store: Store) -> None:
    _save_new(store, minimal_record("ok"))
    (store.root / "half-made").mkdir()
    (store.root / "stray-file").write_text("not a folder")
    records, strays = store.load_all()
    assert [r.id for r in records] == ["ok"]
    assert strays == [store.root / "half-made"]


@pytest.mark.parametrize("content", ["{not json", "{}", '{"id": "x"}', "[]"])
def test_an_unreadable_record_is_quarantined_and_the_rest_still_load(
        store: Store, content: str, caplog: pytest.LogCaptureFixture) -> None:
    _save_new(store, minimal_record("ok"))
    store.dir("bad").mkdir()
    (store.dir("bad") / "record.json").write_text(content)
    records, strays = store.load_all()
    assert [r.id for r in records] == ["ok"] and strays == []
    assert "bad/record.json" in caplog.text and "unreadable" in caplog.text
    assert not store.dir("bad").exists()
    assert (store.quarantine_root / "bad" / "1" / "record.json").read_text() == content
    assert store.quarantined() == {"bad"}
    # The same id damaged again later is kept beside the first one, and nothing is lost.
    store.dir("bad").mkdir()
    (store.dir("bad") / "record.json").write_text(content)
    store.load_all()
    assert sorted(p.name for p in (store.quarantine_root / "bad").iterdir()) == ["1", "2"]


def test_load_all_without_a_sandboxes_folder(tmp_path: Path) -> None:
    assert Store(tmp_path / "nowhere").load_all() == ([], [])


def test_remove_is_idempotent_and_takes_everything(store: Store) -> None:
    rec = minimal_record()
    _save_new(store, rec)
    (store.dir(rec.id) / "disks").mkdir()
    (store.dir(rec.id) / "disks" / "m0.img").write_bytes(b"x")
    store.remove(rec.id)
    assert not store.dir(rec.id).exists()
    store.remove(rec.id)
    assert store.load_all() == ([], [])
