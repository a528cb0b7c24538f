"""What the guest is told at boot: the config disk (a tar archive, see images/README.md).

Pure code: from the sandbox, its disks, its network plan and its pod config to the files
the guest's init reads (hostname, mounts, network, resolv.conf, keys).
"""

from __future__ import annotations

import io
import socket
import tarfile
from pathlib import Path
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..errors import InvalidArgument
from ..model import SandboxMetadata
from ..guest.keys import dropbear_private_key, generate_keypair, write_private
from ..network._model import NetworkPlan
from ..payloads.podconfig import PodConfig
from .mounts import DiskPlan

__all__ = ["GuestSettings", "guest_settings", "network_lines", "config_archive", "write_guest_files", "CONFIG_DISK",
           "CLIENT_KEY",
           "ANNOTATION_HOSTNAME", "ANNOTATION_DNS_SERVERS", "ANNOTATION_DNS_SEARCHES", "ANNOTATION_DNS_OPTIONS"]

ANNOTATION_HOSTNAME = "vmsandbox.io/hostname"
ANNOTATION_DNS_SERVERS = "vmsandbox.io/dns-servers"
ANNOTATION_DNS_SEARCHES = "vmsandbox.io/dns-searches"
ANNOTATION_DNS_OPTIONS = "vmsandbox.io/dns-options"


@dataclass(frozen=True)
class GuestSettings:
    hostname: str
    dns_servers: tuple[str, ...] = ()
    dns_searches: tuple[str, ...] = ()
    dns_options: tuple[str, ...] = ()

    def resolv_conf(self) -> str | None:
        if not (self.dns_servers or self.dns_searches or self.dns_options):
            return None
        lines = [f"nameserver {s}" for s in self.dns_servers]
        if self.dns_searches:
            lines.append("search " + " ".join(self.dns_searches))
        if self.dns_options:
            lines.append("options " + " ".join(self.dns_options))
        return "\n".join(lines) + "\n"


CONFIG_DISK = "config.tar"
"""The config disk in the sandbox folder (a tar archive the guest's init reads)."""
CLIENT_KEY = "id_ed25519"
"""The host's private key for the guest agent, in the sandbox folder."""


def _clean_hostname(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-." else "-" for c in name.lower()).strip("-.")
    return (cleaned or "sandbox")[:63]


def _csv(value: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in value.split(",") if x.strip())


def guest_settings(sandbox: SandboxMetadata, annotations: Mapping[str, str], pod: PodConfig | None) -> GuestSettings:
    """Hostname and DNS: the PodSandboxConfig when given, else our annotations, else defaults."""
    if pod is not None and (pod.hostname or pod.dns_servers or pod.dns_searches or pod.dns_options):
        settings = GuestSettings(
            _clean_hostname(pod.hostname or pod.name or sandbox.labels.get("name") or sandbox.id),
            pod.dns_servers, pod.dns_searches, pod.dns_options,
        )
    else:
        settings = GuestSettings(
            _clean_hostname(annotations.get(ANNOTATION_HOSTNAME) or (pod.name if pod else "")
                            or sandbox.labels.get("name") or sandbox.id),
            _csv(annotations.get(ANNOTATION_DNS_SERVERS, "")),
            _csv(annotations.get(ANNOTATION_DNS_SEARCHES, "")),
            _csv(annotations.get(ANNOTATION_DNS_OPTIONS, "")),
        )
    for s in settings.dns_servers:
        try:
            socket.inet_pton(socket.AF_INET6 if ":" in s else socket.AF_INET, s)
        except OSError:
            raise InvalidArgument(f"DNS server {s!r} is not an IP address") from None
    for word in settings.dns_searches + settings.dns_options:
        if not word or any(c.isspace() for c in word) or not word.isprintable():
            raise InvalidArgument(f"bad DNS search domain or option {word!r}")
    return settings


def network_lines(plan: NetworkPlan) -> str:
    """The guest's ``network`` file (images/README.md): ``link MAC MTU``, ``addr MAC CIDR``,
    ``route MAC|- DEST GATEWAY|- 4|6 [onlink]`` (device routes come first in the plan)."""
    mac_of = {i.name: i.mac for i in plan.interfaces}
    out = []
    for i in plan.interfaces:
        out.append(f"link {i.mac} {i.mtu}")
    for i in plan.interfaces:
        out += [f"addr {i.mac} {a.address}/{a.prefixlen}" for a in i.addresses]
    for r in plan.routes:
        dest = "default" if r.is_default else r.destination
        fam = 6 if r.family == socket.AF_INET6 else 4
        out.append(f"route {mac_of.get(r.device, '-')} {dest} {r.gateway or '-'} {fam}" + (" onlink" if r.onlink else ""))
    return "".join(line + "\n" for line in out)


def config_archive(
    *,
    settings: GuestSettings,
    authorized_key: str,
    hostkey: bytes,
    disks: Sequence[DiskPlan],
    network: NetworkPlan | None,
) -> bytes:
    """The config disk's bytes: a ustar archive padded to a 4 KiB multiple."""
    files: dict[str, bytes] = {
        "authorized_keys": (authorized_key + "\n").encode(),
        "hostkey": hostkey,
        "hostname": (settings.hostname + "\n").encode(),
        "hosts": f"127.0.0.1 localhost\n::1 localhost\n127.0.1.1 {settings.hostname}\n".encode(),
    }
    if disks:
        files["mounts"] = "".join(d.mounts_line() for d in disks).encode()
    if network is not None:
        files["network"] = network_lines(network).encode()
    if (resolv := settings.resolv_conf()) is not None:
        files["resolv.conf"] = resolv.encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o600
            tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    return data + b"\0" * (-len(data) % 4096)


def write_guest_files(sandbox_dir: Path, *, settings: GuestSettings, disks: Sequence[DiskPlan],
                      network: NetworkPlan | None) -> str:
    """Fresh keys and the config disk in the sandbox folder (both 0600). Returns the line of
    the guest's host key, to pin when connecting."""
    client, hostkey = generate_keypair(), generate_keypair()
    write_private(sandbox_dir / CLIENT_KEY, client.openssh_private())
    archive = config_archive(settings=settings, authorized_key=client.public_line,
                             hostkey=dropbear_private_key(hostkey), disks=disks, network=network)
    write_private(sandbox_dir / CONFIG_DISK, archive)
    return hostkey.public_line
