"""The bare-libvirt baseline: the controller's own domain XML started by libvirt-python alone.

The XML that the controller defined for a template sandbox, renamed and pointed at its own
console, agent socket and a copy of the config disk, is defined and created with bare
libvirt-python, and is ready when :class:`~vmsandbox.guest.agent.GuestAgent` (the same SSH
handshake with the same keys) connects. Its phases have no lifecycle events: the bench
stamps them itself around each libvirt call.
"""

from __future__ import annotations

import io
import struct
import tarfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .console import ConsoleWatcher
from .guestlog import parse_dmesg, parse_uptime
from .phases import Start

__all__ = ["host_key_line_from_config", "bare_domain_xml", "config_disk_of", "BareBaseline", "FIRST_EXEC"]

FIRST_EXEC = ["cat", "/proc/uptime"]


def host_key_line_from_config(config_tar: bytes) -> str:
    """The guest's pinned host key (``ssh-ed25519 AAAA...``) from a config disk.

    The disk is a tar (images/README.md) whose ``hostkey`` member is dropbear's ed25519
    format: string "ssh-ed25519", string (32-byte seed || 32-byte public key).
    """
    with tarfile.open(fileobj=io.BytesIO(config_tar), mode="r:") as tar:
        member = tar.extractfile("hostkey")
        if member is None:
            raise ValueError("config disk has no hostkey")
        blob = member.read()
    (n,) = struct.unpack(">I", blob[:4])
    kind = blob[4:4 + n]
    (m,) = struct.unpack(">I", blob[4 + n:8 + n])
    key = blob[8 + n:8 + n + m]
    if kind != b"ssh-ed25519" or len(key) != 64:
        raise ValueError(f"hostkey is not a dropbear ed25519 key ({kind!r}, {len(key)} bytes)")
    seed, public = key[:32], Ed25519PublicKey.from_public_bytes(key[32:])
    raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
    if Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes(*raw) != public.public_bytes(*raw):
        raise ValueError("hostkey's public half does not belong to its private seed")
    return public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def config_disk_of(xml: str) -> str:
    """The config disk's file (the disk whose serial is ``vsbx-config``) in a domain XML."""
    for disk in ET.fromstring(xml).iter("disk"):
        src = disk.find("source")
        if disk.findtext("serial") == "vsbx-config" and src is not None and src.get("file"):
            return str(src.get("file"))
    raise ValueError("domain XML has no config disk (serial vsbx-config)")


def bare_domain_xml(xml: str, *, name: str, console: str, agent_socket: str, config_disk: str,
                    share: str = "") -> str:
    """The controller's domain XML as a stand-alone domain: renamed, no uuid, no metadata
    (so no controller ever adopts it), its own console file, agent socket and config disk,
    and its own folder for the virtio-fs share (``share``; the template's goes with it)."""
    root = ET.fromstring(xml)
    name_el = root.find("name")
    if name_el is None:
        raise ValueError("domain XML has no <name>")
    name_el.text = name
    for tag in ("uuid", "title", "description", "metadata"):
        for el in root.findall(tag):
            root.remove(el)
    devices = root.find("devices")
    if devices is None:
        raise ValueError("domain XML has no <devices>")
    found = {"console": False, "socket": False, "disk": False}
    for el in list(devices.findall("serial")) + list(devices.findall("console")):
        src = el.find("source")
        if el.get("type") == "file" and src is not None:
            src.set("path", console)
            found["console"] = True
    for chan in devices.findall("channel"):
        src, target = chan.find("source"), chan.find("target")
        if chan.get("type") == "unix" and src is not None and target is not None and target.get("type") == "virtio":
            src.set("path", agent_socket)
            found["socket"] = True
    for disk in devices.findall("disk"):
        serial, src = disk.find("serial"), disk.find("source")
        if serial is not None and serial.text == "vsbx-config" and src is not None:
            src.set("file", config_disk)
            found["disk"] = True
    for fs in devices.findall("filesystem"):
        src = fs.find("source")
        if share and src is not None:
            src.set("dir", share)
    missing = [k for k, ok in found.items() if not ok]
    if missing:
        raise ValueError(f"domain XML lacks the expected {', '.join(missing)}")
    return ET.tostring(root, encoding="unicode")


class BareBaseline:
    """Starts the template domain by bare libvirt-python, one at a time, and removes it.

    ``conn`` is the bench's own libvirt connection; every domain is named ``<prefix>-bare-*``.
    """

    def __init__(self, conn: Any, *, prefix: str, directory: Path, template_xml: str, client_key: bytes,
                 config_disk: Path, watcher: ConsoleWatcher, boot_timeout: float,
                 others: Callable[[], int]) -> None:
        self.conn = conn
        self.prefix = prefix
        self.directory = directory
        self.template_xml = template_xml
        self.client_key = client_key
        self.config_disk = config_disk
        self.host_key = host_key_line_from_config(config_disk.read_bytes())
        self.watcher = watcher
        self.boot_timeout = boot_timeout
        self.others = others
        self.domains: set[str] = set()

    def start(self, tag: str) -> Start:
        """define -> create -> agent answers -> first exec, then remove the domain."""
        from vmsandbox.guest.agent import GuestAgent

        name = f"{self.prefix}-bare-{tag}"
        console, sock = self.directory / f"{tag}.console.log", self.directory / f"{tag}.sock"
        share = self.directory / f"{tag}.shared"
        share.mkdir(mode=0o700, exist_ok=True)
        xml = bare_domain_xml(self.template_xml, name=name, console=str(console),
                              agent_socket=str(sock), config_disk=str(self.config_disk), share=str(share))
        agent = GuestAgent(str(sock), self.client_key, self.host_key, sandbox_id=name)
        self.watcher.watch(name, console)
        self.domains.add(name)
        others = self.others()
        st: dict[str, float | None] = {"t0": time.monotonic()}
        try:
            dom = self.conn.defineXML(xml)
            st["created"] = time.monotonic()
            dom.create()
            st["booted"] = time.monotonic()
            agent.connect(time.monotonic() + self.boot_timeout)
            st["agent_ready"] = time.monotonic()
            st["exec_start"] = time.monotonic()
            r = agent.exec(FIRST_EXEC, timeout=30)
            st["exec_done"] = time.monotonic()
            st.update(self.watcher.unwatch(name))
            dmesg = parse_dmesg(agent.exec(["dmesg"], timeout=30).stdout)
        finally:
            self.watcher.unwatch(name)
            agent.close()
            self.remove(name)
            for f in (console, sock):
                f.unlink(missing_ok=True)
            share.rmdir()
        return Start(id=name, stamps=st, exit_code=r.exit_code, uptime=parse_uptime(r.stdout), dmesg=dmesg,
                     others=others)

    def remove(self, name: str) -> None:
        import libvirt

        try:
            dom = self.conn.lookupByName(name)
        except libvirt.libvirtError:
            self.domains.discard(name)
            return
        try:
            if dom.isActive():
                dom.destroy()
        finally:
            dom.undefine()
        self.domains.discard(name)
