"""One JSON record per sandbox, written atomically after every state change.

Layout: ``<state_dir>/sandboxes/<id>/record.json``. A record is what a new controller needs
to find, stop, wait for and remove a sandbox that an earlier controller made.
"""

from __future__ import annotations

import base64
import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any as _Any

from ..errors import InvalidArgument, VmSandboxError
from ..model import AnyMessage, ImageConfig, Mount, Phase, Platform, Runtime, SandboxMetadata
from ..network._model import NetworkPlan
from ..oci.image import config_from_json, config_to_json
from ..payloads.podconfig import PodConfig, parse_pod_config

__all__ = ["SandboxRecord", "Store"]

log = logging.getLogger(__name__)
RECORD = "record.json"
LOCK = ".lock"
VERSION = 1


@dataclass(frozen=True)
class SandboxRecord:
    """Everything persisted about one sandbox."""

    id: str
    domain: str
    phase: Phase
    created_at: datetime
    sandbox: SandboxMetadata
    vcpus: int
    memory_mib: int
    image_dir: str
    agent_socket: str
    host_key: str
    rootfs: tuple[Mount, ...] = ()
    options: AnyMessage | None = None
    netns_path: str = ""
    annotations: dict[str, str] = field(default_factory=dict)
    started_at: datetime | None = None
    exited_at: datetime | None = None
    exit_status: int | None = None
    pid: int = 0
    taps: tuple[str, ...] = ()
    network: NetworkPlan | None = None
    max_memory_mib: int = 0  # what memory may grow to while it runs (the domain's <memory>)
    pod: PodConfig | None = None  # ``options`` decoded at create (the raw Any stays for containerd)
    platform: Platform | None = None  # the guest image's, at create (None: a record from before)
    start_path: str = ""  # how its VM came up: "cold" (a boot) or "template" (a restore); "" before
    image: ImageConfig | None = None  # the OCI image config of an ``oci`` root mount

    def evolve(self, **changes: _Any) -> SandboxRecord:
        return replace(self, **changes)


def _any_to(a: AnyMessage | None) -> dict[str, str] | None:
    return None if a is None else {"type_url": a.type_url, "value": base64.b64encode(a.value).decode()}


def _any_from(d: dict[str, str] | None) -> AnyMessage | None:
    return None if d is None else AnyMessage(d["type_url"], base64.b64decode(d["value"]))


def _platform_from(d: object) -> Platform | None:
    if d is None:
        return None
    keys = ("os", "architecture", "variant", "os_version")
    if not isinstance(d, dict) or not all(isinstance(d.get(k, ""), str) for k in keys):
        raise InvalidArgument(f"platform must be an object of strings, not {d!r}")
    return Platform(d["os"], d["architecture"], d.get("variant", ""), d.get("os_version", ""))


def _dt_to(t: datetime | None) -> str | None:
    return None if t is None else t.isoformat()


def _dt_from(s: str | None) -> datetime | None:
    return None if s is None else datetime.fromisoformat(s)


def _sandbox_to(s: SandboxMetadata) -> dict[str, _Any]:
    return {
        "id": s.id,
        "runtime": {"name": s.runtime.name, "options": _any_to(s.runtime.options)},
        "spec": _any_to(s.spec),
        "labels": dict(s.labels),
        "extensions": {k: _any_to(v) for k, v in s.extensions.items()},
        "sandboxer": s.sandboxer,
        "created_at": _dt_to(s.created_at),
        "updated_at": _dt_to(s.updated_at),
    }


def _sandbox_from(d: dict[str, _Any]) -> SandboxMetadata:
    return SandboxMetadata(
        id=d["id"],
        runtime=Runtime(d["runtime"]["name"], _any_from(d["runtime"]["options"])),
        spec=_any_from(d["spec"]),
        labels=dict(d["labels"]),
        extensions={k: a for k, v in d["extensions"].items() if (a := _any_from(v)) is not None},
        sandboxer=d["sandboxer"],
        created_at=_dt_from(d["created_at"]),
        updated_at=_dt_from(d["updated_at"]),
    )


def record_to_json(r: SandboxRecord) -> dict[str, _Any]:
    return {
        "version": VERSION,
        "id": r.id,
        "domain": r.domain,
        "phase": r.phase.value,
        "created_at": _dt_to(r.created_at),
        "sandbox": _sandbox_to(r.sandbox),
        "vcpus": r.vcpus,
        "memory_mib": r.memory_mib,
        "image_dir": r.image_dir,
        "agent_socket": r.agent_socket,
        "host_key": r.host_key,
        "rootfs": [{"type": m.type, "source": m.source, "target": m.target, "options": list(m.options)} for m in r.rootfs],
        "options": _any_to(r.options),
        "netns_path": r.netns_path,
        "annotations": dict(r.annotations),
        "started_at": _dt_to(r.started_at),
        "exited_at": _dt_to(r.exited_at),
        "exit_status": r.exit_status,
        "pid": r.pid,
        "taps": list(r.taps),
        "network": r.network.to_json() if r.network is not None else None,
        "start_path": r.start_path,
        "max_memory_mib": r.max_memory_mib,
        "pod": r.pod.to_json() if r.pod is not None else None,
        "platform": asdict(r.platform) if r.platform is not None else None,
        "image": config_to_json(r.image) if r.image is not None else None,
    }


def record_from_json(d: dict[str, _Any]) -> SandboxRecord:
    created = _dt_from(d["created_at"])
    assert created is not None
    options = _any_from(d["options"])
    if "pod" in d:
        pod = PodConfig.from_json(d["pod"]) if d["pod"] is not None else None
    else:  # a record written before the field: decoded from the options once, here
        pod = parse_pod_config(options)
    return SandboxRecord(
        id=d["id"],
        domain=d["domain"],
        phase=Phase(d["phase"]),
        created_at=created,
        sandbox=_sandbox_from(d["sandbox"]),
        vcpus=int(d["vcpus"]),
        memory_mib=int(d["memory_mib"]),
        image_dir=d["image_dir"],
        agent_socket=d["agent_socket"],
        host_key=d["host_key"],
        rootfs=tuple(Mount(m["type"], m["source"], m["target"], tuple(m["options"])) for m in d["rootfs"]),
        options=options,
        netns_path=d["netns_path"],
        annotations=dict(d["annotations"]),
        started_at=_dt_from(d["started_at"]),
        exited_at=_dt_from(d["exited_at"]),
        exit_status=d["exit_status"],
        pid=int(d["pid"]),
        taps=tuple(d["taps"]),
        network=NetworkPlan.from_json(d["network"]) if d["network"] is not None else None,
        # Records written before this field: the boot-time rule of that version (twice, capped).
        max_memory_mib=int(d["max_memory_mib"]) if "max_memory_mib" in d else 2 * int(d["memory_mib"]),
        pod=pod,
        platform=_platform_from(d.get("platform")),
        start_path=str(d.get("start_path", "")),
        image=config_from_json(d["image"]) if d.get("image") is not None else None,
    )


class Store:
    """The sandbox folders and records under ``<state_dir>/sandboxes``."""

    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / "sandboxes"
        self.quarantine_root = state_dir / "quarantine"
        self.taps_root = state_dir / "taps"

    def dir(self, sandbox_id: str) -> Path:
        return self.root / sandbox_id

    def exists(self, sandbox_id: str) -> bool:
        return self.dir(sandbox_id).exists()

    def save(self, record: SandboxRecord) -> None:
        """Atomically replace the record (temp file, fsync, rename, fsync of the folder)."""
        _write_atomic(self.dir(record.id), RECORD, json.dumps(record_to_json(record), indent=1, sort_keys=True))

    def note_taps(self, sandbox_id: str, netns_path: str, taps: list[str]) -> None:
        """Note the taps a create made (``<state_dir>/taps/<id>.json``) until its record
        holds them: if the create is cut short, or its rollback fails to remove them, they
        are known to be ours (:meth:`noted_taps`), for recovery and a retry to remove."""
        self.taps_root.mkdir(mode=0o700, parents=True, exist_ok=True)
        _write_atomic(self.taps_root, f"{sandbox_id}.json", json.dumps({"netns_path": netns_path, "taps": list(taps)}))

    def noted_taps(self, sandbox_id: str) -> tuple[str, list[str]] | None:
        """(netns path, taps) that :meth:`note_taps` noted for the sandbox, None when none."""
        try:
            d = json.loads((self.taps_root / f"{sandbox_id}.json").read_text())
            return str(d["netns_path"]), [str(t) for t in d["taps"]]
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("ignoring the unreadable tap note of sandbox %s: %s", sandbox_id, e)
            return None

    def noted_tap_ids(self) -> list[str]:
        """The sandboxes with a tap note, sorted."""
        if not self.taps_root.is_dir():
            return []
        return sorted(p.stem for p in self.taps_root.glob("*.json") if not p.name.startswith("."))

    def forget_taps(self, sandbox_id: str) -> None:
        """Drop the tap note (the record holds the taps now, or they are gone). Never raises."""
        try:
            os.unlink(self.taps_root / f"{sandbox_id}.json")
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("could not remove the tap note of sandbox %s: %s", sandbox_id, e)

    def load_all(self, *, quarantine: bool = True) -> tuple[list[SandboxRecord], list[Path]]:
        """(records, folders without a record: leftovers of an interrupted create).

        A folder whose record cannot be read is moved to ``<state_dir>/quarantine/`` with an
        error in the log, and loading goes on: one damaged file must not stop the controller
        from serving every other sandbox. :meth:`quarantined` lists those ids. With
        ``quarantine=False`` (a controller that only observes) it is skipped and left in place.
        """
        records: list[SandboxRecord] = []
        strays: list[Path] = []
        if not self.root.is_dir():
            return records, strays
        for d in sorted(self.root.iterdir()):
            if not d.is_dir():
                continue
            try:
                records.append(record_from_json(json.loads((d / RECORD).read_text())))
            except FileNotFoundError:
                strays.append(d)
            except (OSError, ValueError, KeyError, TypeError, AttributeError, VmSandboxError) as e:
                if quarantine:
                    self._quarantine(d, e)
                else:
                    log.error("sandbox record %s is unreadable (%s); skipped", d / RECORD, e)
        return records, strays

    def _quarantine(self, d: Path, err: BaseException) -> None:
        # <state_dir>/quarantine/<id>/<n>/: the same id may be quarantined more than once.
        home = self.quarantine_root / d.name
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        target = home / str(len(list(home.iterdir())) + 1)
        os.replace(d, target)
        log.error("sandbox record %s is unreadable (%s: %s); moved its folder to %s and left its VM alone",
                  d / RECORD, type(err).__name__, err, target)

    def quarantined(self) -> set[str]:
        """Ids whose folders were quarantined (their domains must not be taken for orphans)."""
        if not self.quarantine_root.is_dir():
            return set()
        return {p.name for p in self.quarantine_root.iterdir()}

    def hold(self, sandbox_id: str) -> int:
        """Take the sandbox folder's lock (an exclusive flock on ``.lock``) and return its fd:
        a create holds it until its record is written, so that another process's recovery
        does not take the half-made folder for a leftover. Close the fd to release it."""
        fd = os.open(self.dir(sandbox_id) / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    def wait_unheld(self, sandbox_id: str, timeout: float) -> bool:
        """Wait until nobody holds the folder's lock (True), or ``timeout`` seconds (False)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                fd = os.open(self.dir(sandbox_id) / LOCK, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                return True
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return False
            finally:
                os.close(fd)
            time.sleep(0.05)

    def load(self, sandbox_id: str) -> SandboxRecord | None:
        """The record of one sandbox, None when it has none (yet)."""
        try:
            return record_from_json(json.loads((self.dir(sandbox_id) / RECORD).read_text()))
        except FileNotFoundError:
            return None

    def remove(self, sandbox_id: str) -> None:
        """Delete the sandbox's folder and everything in it (idempotent)."""
        shutil.rmtree(self.dir(sandbox_id), ignore_errors=True)


def _write_atomic(d: Path, name: str, text: str) -> None:
    """Replace ``d/name`` by ``text`` atomically (temp file, fsync, rename, fsync of ``d``)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{Path(name).stem}-", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, d / name)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(d)  # the rename itself survives a power cut only once the folder is synced


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
