"""Templates: a generic guest booted once per image and shape, saved, and restored as sandboxes.

A template is the libvirt save image of a guest that booted with an empty config and waits
on its agent. Its key covers everything the saved state depends on: the template's domain
XML (shape, kernel and command line, machine, firmware, devices), the image, the libvirt and
QEMU versions and this module's format; any change gives another key, so a stale template
is never found, and templates of other images or versions are removed. A template lives in
``<state_dir>/templates/<key>/``: ``memory.save``, ``manifest.json`` (with the image's
sha256, checked before first use in a process; a corrupt one is removed and rebuilt) and the
template's own keys, which are only good for the first contact with a restored guest.

Restoring one as a sandbox (:meth:`Templates.restore`): the saved header is rewritten to the
sandbox's name, UUID, console, agent socket and config disk (QEMU never sees the
difference), the zero pages the load made resident are given back while it is paused, its
disks, NICs and share are plugged in, and it resumes. :meth:`Templates.personalize` then
hands the guest its identity over the template's keys (clock, fresh entropy, the sandbox's
config: mounts, network, hostname, DNS, its own keys) and switches the channel to the
sandbox's keys.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from ..config import Config, VirtType
from ..errors import FailedPrecondition, InvalidArgument
from ..guest.keys import dropbear_private_key, generate_keypair, write_private
from ..hypervisor.domain import SPARE_PORT_INDEX, build_domain_xml, hotplugged, restore_xml
from ..hypervisor.savefile import read_save_image
from ..image import GuestImage
from .guestconfig import CLIENT_KEY, CONFIG_DISK, GuestSettings, config_archive
from .ports import GuestChannel, GuestFactory, Hypervisor
from .spec import Size, domain_spec
from .statedir import agent_socket_path

__all__ = ["Templates", "Template", "TemplateInfo", "ANNOTATION_START", "wants_template", "TEMPLATE_DOMAIN_PREFIX"]

log = logging.getLogger(__name__)

ANNOTATION_START = "vmsandbox.io/start"
"""``cold`` boots the sandbox's VM; ``template`` (the default when Config.templates) restores it."""
TEMPLATE_DOMAIN_PREFIX = "vsbxtpl-"
FORMAT = 1
SPARE_PORTS = 8
KEEP = 8
"""Templates kept (the most recently used): older shapes and settings are removed."""
"""Free PCIe root ports in a template: how many disks, NICs and shares a restore can plug in."""
_IMAGE, _MANIFEST, _HOST_KEY = "memory.save", "manifest.json", "hostkey.pub"
_STUB_KERNEL, _STUB_INITRD, _ZEROS = "stub-vmlinuz", "stub-initrd", "zeros.json"
_SETUP = "/sbin/vsbx-setup"
_SETTLE = 3.0  # after the build's last session: the agent waits for a host again, and the guest has
# reported the pages drop_caches freed (page reporting runs 2 s after a free), which then save as zero pages


def wants_template(annotations: Mapping[str, str], config: Config) -> bool:
    """Whether a sandbox asks to start from a template. InvalidArgument for a bad value."""
    value = annotations.get(ANNOTATION_START, "")
    if value not in ("", "cold", "template"):
        raise InvalidArgument(f"{ANNOTATION_START} must be cold or template, not {value!r}")
    return value == "template" or (value == "" and config.templates)


@dataclass(frozen=True)
class TemplateInfo:
    """A template on disk: ``built`` when this call made it, in ``build_seconds``."""

    key: str
    path: Path
    built: bool
    build_seconds: float


@dataclass(frozen=True)
class Template:
    key: str
    path: Path
    saved_xml: str
    client_key: bytes
    host_key: str
    zeros: dict[str, list[tuple[int, int]]]  # the template's all-zero pages (what a restore gives back)

    @property
    def image(self) -> Path:
        return self.path / _IMAGE


class Templates:
    """The templates under ``<state_dir>/templates``: found, built, checked and restored."""

    def __init__(self, config: Config, virt_type: VirtType, hv: Hypervisor, guest: GuestFactory,
                 progress: Callable[[str], None] | None = None) -> None:
        self.config, self._virt, self._hv, self._guest = config, virt_type, hv, guest
        self._progress = progress or (lambda _msg: None)
        self.root = config.state_dir / "templates"
        self._lock = threading.Lock()
        self._key_locks: dict[str, threading.Lock] = {}
        # key -> (inode, size, mtime_ns) of the save image, and the template read with it:
        # a start re-reads nothing while the image is the one whose checksum was verified
        self._checked: dict[str, tuple[tuple[int, int, int], Template]] = {}
        self._building: set[str] = set()  # keys whose .partial folder a build of ours is filling
        self._versions: dict[str, str] | None = None

    # ------------------------------------------------------------------ keys
    def _spec_xml(self, image: GuestImage, size: Size, *, name: str, sid: str, sdir: Path, sock: str) -> str:
        spec = domain_spec(sandbox_id=sid, domain=name, config=self.config, virt_type=self._virt, image=image,
                           sandbox_dir=sdir, agent_socket=sock, size=size, disks=(), taps=(), network=None)
        return build_domain_xml(replace(spec, shared_memory=True, spare_ports=SPARE_PORTS,
                                        extra_metadata={"template": "1"}))

    def key(self, image: GuestImage, size: Size) -> str:
        """The key of the template for ``image`` and ``size`` on this host."""
        if self._versions is None:
            info = self._hv.host_info()
            self._versions = {k: info.get(k, "") for k in ("libvirt_version", "hypervisor_version", "hypervisor")}
        xml = self._spec_xml(image, size, name="TEMPLATE", sid="TEMPLATE", sdir=Path("/TEMPLATE"), sock="/TEMPLATE.sock")
        blob = json.dumps({"format": FORMAT, "xml": xml, "image": str(image.directory), "ports": SPARE_PORT_INDEX,
                           "manifest": image.manifest, **self._versions}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    def _key_lock(self, key: str) -> threading.Lock:
        with self._lock:
            return self._key_locks.setdefault(key, threading.Lock())

    # ------------------------------------------------------------------ find / build
    def get(self, image: GuestImage, size: Size) -> Template:
        """The template for ``image`` and ``size``, built first when missing. A corrupt one
        is removed and rebuilt. Errors of a build propagate."""
        return self.ensure(image, size)[0]

    def ensure(self, image: GuestImage, size: Size) -> tuple[Template, TemplateInfo]:
        key = self.key(image, size)
        with self._key_lock(key):
            tpl = self._load(key)
            if tpl is not None:
                return tpl, TemplateInfo(key, tpl.path, False, 0.0)
            t0 = time.monotonic()
            with self._lock:
                self._building.add(key)
            try:
                self._build(key, image, size)
            finally:
                with self._lock:
                    self._building.discard(key)
            tpl = self._load(key)
            if tpl is None:
                raise FailedPrecondition(f"template {key} was built but does not check out")
            return tpl, TemplateInfo(key, tpl.path, True, time.monotonic() - t0)

    def warm(self, image: GuestImage, size: Size, progress: Callable[[str], None] | None = None) -> TemplateInfo:
        """The template for ``image`` and ``size``, built now if missing (``progress`` hears
        of the build instead of the controller's own progress)."""
        saved = self._progress
        if progress is not None:
            self._progress = progress
        try:
            return self.ensure(image, size)[1]
        finally:
            self._progress = saved

    def _load(self, key: str) -> Template | None:
        path = self.root / key
        try:
            st = os.stat(path / _IMAGE)
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
            known = self._checked.get(key)
            if known is not None and known[0] == stamp:
                tpl = known[1]
            else:
                manifest = json.loads((path / _MANIFEST).read_text())
                if manifest.get("format") != FORMAT or manifest.get("size") != st.st_size:
                    raise ValueError("its size or format changed")
                if _sha256(path / _IMAGE) != manifest.get("sha256"):
                    raise ValueError("its checksum does not match")
                saved = read_save_image(path / _IMAGE)
                zeros = {name: [(int(a), int(b)) for a, b in runs]
                         for name, runs in json.loads((path / _ZEROS).read_text()).items()}
                tpl = Template(key, path, saved.xml, (path / CLIENT_KEY).read_bytes(),
                               (path / _HOST_KEY).read_text().strip(), zeros)
                self._checked[key] = (stamp, tpl)
            os.utime(path / _MANIFEST)  # last used: what clean() keeps
        except FileNotFoundError:
            if path.exists():
                self.discard(key, "it is incomplete")
            return None
        except (OSError, ValueError, KeyError) as e:
            self.discard(key, str(e))
            return None
        return tpl

    def discard(self, key: str, why: str) -> None:
        """Remove a template that must not be used again."""
        log.warning("template %s: removing it: %s", key, why)
        self._checked.pop(key, None)
        shutil.rmtree(self.root / key, ignore_errors=True)

    def _build(self, key: str, image: GuestImage, size: Size) -> None:
        # Traversable (not readable) by the unprivileged QEMU user, as the sandbox folders.
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o711)
        work = self.root / f".{key}.partial"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        os.chmod(work, 0o711)
        name, sid = TEMPLATE_DOMAIN_PREFIX + key[:16], "template-" + key[:16]
        sock = agent_socket_path(self.config.state_dir, sid)
        Path(sock).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        client, host = generate_keypair(), generate_keypair()
        write_private(work / CLIENT_KEY, client.openssh_private())
        (work / _HOST_KEY).write_text(host.public_line + "\n")
        _write_stubs(image, work)
        write_private(work / CONFIG_DISK, config_archive(settings=GuestSettings("sandbox"), authorized_key=client.public_line,
                                                          hostkey=dropbear_private_key(host), disks=(), network=None))
        xml = self._spec_xml(image, size, name=name, sid=sid, sdir=work, sock=sock)
        self._progress(f"template {key}: booting a {size.vcpus} vCPU, {size.memory_mib} MiB guest to save")
        t0 = time.monotonic()
        try:
            with _removed(sock):
                self._hv.create_transient(xml)
                agent = self._guest(sock, client.openssh_private(), host.public_line, sid)
                try:
                    agent.connect(time.monotonic() + self.config.boot_timeout, booting=True)
                    # Freed page cache is reported to the host and saved as zero pages.
                    agent.exec(["/bin/sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"], in_guest_root=True,
                               timeout=30)
                finally:
                    agent.close()
                self._progress(f"template {key}: booted in {time.monotonic() - t0:.1f}s; saving")
                time.sleep(_SETTLE)
                # Paused, its RAM is what the save holds: its zero pages are those of every
                # restore, which can then give them back without reading its RAM.
                self._hv.pause(name)
                (work / _ZEROS).write_text(json.dumps(self._hv.zero_map(name)))
                self._hv.save(name, str(work / _IMAGE))
            saved = read_save_image(work / _IMAGE)
            manifest = {"format": FORMAT, "key": key, "size": saved.size, "sha256": _sha256(work / _IMAGE),
                        "image": str(image.directory), "image_digest": _image_digest(image), "vcpus": size.vcpus, "memory_mib": size.memory_mib,
                        "max_memory_mib": size.max_memory_mib, "spare_ports": SPARE_PORTS, **(self._versions or {}),
                        "build_seconds": round(time.monotonic() - t0, 3), "created": time.time()}
            (work / _MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            os.replace(work, self.root / key)
        except BaseException:
            self._hv.destroy(name)
            shutil.rmtree(work, ignore_errors=True)
            raise
        self._progress(f"template {key}: ready ({saved.size >> 20} MiB) after {time.monotonic() - t0:.1f}s")
        self.clean(image)
        log.info("template %s: built in %.1fs (%d MiB)", key, time.monotonic() - t0, saved.size >> 20)

    def clean(self, image: GuestImage | None = None) -> None:
        """Remove half-built templates and (given the current image) those of other images,
        versions or formats: they can never be used again."""
        if not self.root.is_dir():
            return
        info = self._hv.host_info()
        with self._lock:
            building = {f".{k}.partial" for k in self._building}
        for path in self.root.iterdir():
            if path.name.startswith("."):
                if path.name not in building:  # left by a build that died
                    shutil.rmtree(path, ignore_errors=True)
                continue
            try:
                m = json.loads((path / _MANIFEST).read_text())
            except (OSError, ValueError):
                self.discard(path.name, "it has no readable manifest")
                continue
            stale = m.get("format") != FORMAT or any(m.get(k) != info.get(k) for k in ("libvirt_version", "hypervisor_version"))
            if image is not None and (m.get("image"), m.get("image_digest")) != (str(image.directory), _image_digest(image)):
                stale = True
            if stale:
                self.discard(path.name, "it was made for another image or libvirt/QEMU version")
        kept = sorted((p for p in self.root.iterdir() if not p.name.startswith(".")),
                      key=lambda p: (p / _MANIFEST).stat().st_mtime if (p / _MANIFEST).exists() else 0.0, reverse=True)
        for path in kept[KEEP:]:
            self.discard(path.name, f"only the {KEEP} most recently used templates are kept")

    # ------------------------------------------------------------------ restore
    def restore(self, tpl: Template, domain: str, scratch: Path) -> None:
        """Bring the defined (shut off) domain up from ``tpl``, with its own devices, running.
        ValueError when the template does not fit the domain (nothing was started); a
        template that libvirt could not restore is removed first."""
        defined = self._hv.xml(domain)
        xml = restore_xml(tpl.saved_xml, defined, kernel=str(tpl.path / _STUB_KERNEL), initrd=str(tpl.path / _STUB_INITRD))
        devices = hotplugged(defined)
        if len(devices) > SPARE_PORTS:
            raise ValueError(f"{len(devices)} devices to plug in, the template has {SPARE_PORTS} free ports")
        _prefill_console(tpl, scratch / "console.log")
        t0 = time.monotonic()
        try:
            self._hv.restore(str(tpl.image), xml, str(scratch))
        except (ValueError, FailedPrecondition) as err:
            # libvirt or QEMU could not load it (a libvirt that went away is Unavailable and
            # says nothing about the template): never again; the next start builds a new one.
            self.discard(tpl.key, f"restoring it failed: {err}")
            raise
        t1 = time.monotonic()
        try:
            freed = self._hv.trim_memory(domain, tpl.zeros)
            t2 = time.monotonic()
            for dev in devices:
                self._hv.attach(domain, dev)
            t3 = time.monotonic()
            self._hv.resume(domain)
        except BaseException:
            self._hv.destroy(domain)
            raise
        log.info("domain %s: restored from template %s in %.2fs (%d MiB of zero pages given back in %.2fs, "
                 "%d device(s) plugged in in %.2fs)", domain, tpl.key, t1 - t0, freed >> 20, t2 - t1, len(devices), t3 - t2)

    def personalize(self, tpl: Template, *, sandbox_id: str, sandbox_dir: Path, socket: str, host_key: str,
                    deadline: float, alive: Callable[[], bool]) -> GuestChannel:
        """Reach the restored guest with the template's keys and give it the sandbox's
        identity; the channel returned authenticates with the sandbox's keys from now on.
        FailedPrecondition when the guest's set-up fails."""
        agent = self._guest(socket, tpl.client_key, tpl.host_key, sandbox_id)
        t0 = time.monotonic()
        try:
            agent.connect(deadline, alive=alive, booting=True)
            t1 = time.monotonic()
            config = (sandbox_dir / CONFIG_DISK).read_bytes()
            r = agent.exec([_SETUP, "restore", str(time.time_ns())], stdin=os.urandom(64) + config,
                           in_guest_root=True, timeout=max(5.0, deadline - time.monotonic()))
            if r.exit_code != 0:
                raise FailedPrecondition(f"the restored guest's set-up failed ({r.exit_code}): "
                                         f"{r.stderr.decode(errors='replace').strip()[-300:]}", sandbox_id=sandbox_id)
            agent.rekey((sandbox_dir / CLIENT_KEY).read_bytes(), host_key)
            log.info("sandbox %s: the restored guest answered in %.2fs and took its identity in %.2fs", sandbox_id,
                     t1 - t0, time.monotonic() - t1)
        except BaseException:
            agent.close()
            raise
        return agent


class _removed:
    """Removes a stale socket file before and after (QEMU binds it afresh)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __enter__(self) -> None:
        self._rm()

    def __exit__(self, *exc: object) -> None:
        self._rm()

    def _rm(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _write_stubs(image: GuestImage, folder: Path) -> None:
    """The boot files a restore names instead of the image's: QEMU loads ``-kernel`` into a
    private buffer at start (14 MiB per VM) though a restored guest never reads it again. A
    bzImage's setup sectors (its header, which QEMU parses) and a page are a kernel to QEMU."""
    with open(image.kernel, "rb") as f:
        head = f.read(0x210)
    if head[0x202:0x206] != b"HdrS":
        raise FailedPrecondition(f"{image.kernel} is not a bzImage")
    setup = (head[0x1F1] or 4) + 1
    with open(image.kernel, "rb") as f:
        stub = f.read(setup * 512) + bytes(4096)
    for name, data in ((_STUB_KERNEL, stub), (_STUB_INITRD, bytes(512))):
        (folder / name).write_bytes(data)
        os.chmod(folder / name, 0o644)


def _prefill_console(tpl: Template, console: Path) -> None:
    """The sandbox's console log begins with the template's boot, then says it was restored."""
    try:
        boot = (tpl.path / "console.log").read_bytes()[-(256 << 10):]
    except OSError:
        boot = b""
    note = f"\r\nvmsandbox: restored from template {tpl.key} (the boot above was the template's)\r\n".encode()
    fd = os.open(console, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(boot + note)


def _image_digest(image: GuestImage) -> str:
    """What the image's manifest says of it (its files' checksums): a rebuilt image differs."""
    return hashlib.sha256(json.dumps(image.manifest, sort_keys=True, default=str).encode()).hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
