"""Per-sandbox SSH keys: the client key we log in with and the guest's pinned host key.

Both are ed25519. The host key is handed to the guest's dropbear in dropbear's own key
format, so no conversion tool is needed at create time.
"""

from __future__ import annotations

import base64
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

__all__ = ["KeyPair", "generate_keypair", "dropbear_private_key"]


def _sshstr(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


@dataclass(frozen=True)
class KeyPair:
    private: Ed25519PrivateKey

    @property
    def public_raw(self) -> bytes:
        return self.private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @property
    def public_blob(self) -> bytes:
        """The SSH wire form of the public key (what a server presents)."""
        return _sshstr(b"ssh-ed25519") + _sshstr(self.public_raw)

    @property
    def public_line(self) -> str:
        """``ssh-ed25519 AAAA...`` as in authorized_keys / known_hosts."""
        return "ssh-ed25519 " + base64.b64encode(self.public_blob).decode()

    def openssh_private(self) -> bytes:
        return self.private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )


def generate_keypair() -> KeyPair:
    return KeyPair(Ed25519PrivateKey.generate())


def dropbear_private_key(kp: KeyPair) -> bytes:
    """The key in dropbear's format: string "ssh-ed25519", string (seed || public)."""
    seed = kp.private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    return _sshstr(b"ssh-ed25519") + _sshstr(seed + kp.public_raw)


def write_private(path: Path, data: bytes) -> None:
    """Write a secret file created 0600 (never briefly world-readable)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
