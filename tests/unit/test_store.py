"""Sandbox records: lossless JSON, atomic saves, and what load_all reports after a crash."""

from __future__ import annotations

import json
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from vmsandbox import AnyMessage, Mount, Phase, Platform, Runtime, SandboxMetadata
from vmsandbox.network import Address, Interface, NetworkPlan, Route
from vmsandbox.payloads.podconfig import POD_SANDBOX_CONFIG_TYPE, PodConfig, PortMapping, parse_pod_config
from vmsandbox.proto.k8s.runtime.v1 import api_pb2
from vmsandbox.sandbox import store as store_mod
from vmsandbox.sandbox.store import SandboxRecord, Store, record_from_json, record_to_json

T0 = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=timezone.utc)
POD = PodConfig(name="web-0", uid="u-1", namespace="prod", attempt=2, hostname="web-0", log_directory="/var/log/pods/x",
                dns_servers=("10.96.0.10",), dns_searches=("svc.cluster.local",), dns_options=("ndots:5",),
                port_mappings=(PortMapping("UDP", 53, 5353, "127.0.0.1"), PortMapping("TCP", 80)),
                labels={"app": "web"}, annotations={"ünï": "cødé"}, cgroup_parent="/kubepods/podu-1",
                sysctls={"net.ipv4.ip_forward": "1"}, cpu_quota=150_000, cpu_period=100_000, cpu_shares=1536,
                cpuset_cpus="0-1", memory_limit_bytes=256 << 20, overhead_cpu_quota=25_000, overhead_cpu_period=100_000,
                overhead_memory_limit_bytes=64 << 20)


def pod_options() -> AnyMessage:
    """The PodSandboxConfig CRI would send for POD's resources (what an old record kept)."""
    msg = api_pb2.PodSandboxConfig(hostname="web-0")
    msg.metadata.name = "web-0"
    msg.linux.resources.memory_limit_in_bytes = 256 << 20
    msg.linux.overhead.memory_limit_in_bytes = 64 << 20
    return AnyMessage(POD_SANDBOX_CONFIG_TYPE, msg.SerializeToString())


def full_record(sid: str = "sb-1") -> SandboxRecord:
    """A record with every field set to something non-default."""
    sandbox = SandboxMetadata(
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
        pod=POD,
        platform=Platform("linux", "arm64", "v8", "10.0"),
    )


def minimal_record(sid: str = "sb-min") -> SandboxRecord:
    return SandboxRecord(id=sid, domain=f"vmsandbox-{sid}", phase=Phase.CREATED, created_at=T0, sandbox=SandboxMetadata(sid),
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


def test_the_pod_config_and_platform_are_typed_fields_of_the_json() -> None:
    d = record_to_json(full_record())
    assert d["pod"]["hostname"] == "web-0" and d["pod"]["memory_limit_bytes"] == 256 << 20
    assert d["pod"]["port_mappings"][0] == {"protocol": "UDP", "container_port": 53, "host_port": 5353,
                                            "host_ip": "127.0.0.1"}
    assert d["platform"] == {"os": "linux", "architecture": "arm64", "variant": "v8", "os_version": "10.0"}
    back = record_from_json(json.loads(json.dumps(d)))
    assert back.pod == POD and back.platform == Platform("linux", "arm64", "v8", "10.0")
    assert record_to_json(minimal_record())["pod"] is None


def test_a_record_written_before_the_typed_fields_loads() -> None:
    """An older version kept only the raw options: the pod config is decoded from them, once,
    at load; the platform stays unknown (the status view reads the image manifest then)."""
    d = record_to_json(full_record().evolve(options=pod_options()))
    del d["pod"], d["platform"]
    rec = record_from_json(json.loads(json.dumps(d)))
    assert rec.pod == parse_pod_config(pod_options()) and rec.pod is not None
    assert (rec.pod.memory_limit_bytes, rec.pod.overhead_memory_limit_bytes, rec.pod.hostname) == \
        (256 << 20, 64 << 20, "web-0")
    assert rec.platform is None and rec.options == pod_options()
    d = record_to_json(full_record())  # options of another type: no pod config
    del d["pod"]
    assert record_from_json(d).pod is None


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


@pytest.mark.parametrize("field, value", [
    pytest.param("pod", "web-0", id="pod-not-an-object"),
    pytest.param("pod", {"memory_limit_bytes": "lots"}, id="pod-mistyped-figure"),
    pytest.param("pod", {"dns_servers": "10.0.0.1"}, id="pod-list-as-string"),
    pytest.param("pod", {"labels": {"a": 1}}, id="pod-label-not-a-string"),
    pytest.param("pod", {"port_mappings": [{"protocol": "TCP"}]}, id="pod-port-without-container-port"),
    pytest.param("pod", {"attempt": True}, id="pod-bool-for-int"),
    pytest.param("platform", {"os": "linux"}, id="platform-without-architecture"),
    pytest.param("platform", "linux/amd64", id="platform-not-an-object"),
])
def test_a_record_with_an_unreadable_typed_field_is_quarantined(
        store: Store, field: str, value: object, caplog: pytest.LogCaptureFixture) -> None:
    _save_new(store, full_record("ok"))
    d = record_to_json(full_record("bad"))
    d[field] = value
    store.dir("bad").mkdir()
    (store.dir("bad") / "record.json").write_text(json.dumps(d))
    records, _ = store.load_all()
    assert [r.id for r in records] == ["ok"] and records[0].pod == POD
    assert store.quarantined() == {"bad"} and "bad/record.json" in caplog.text


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
