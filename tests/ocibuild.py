"""Build small OCI images for tests: any layers, in any of the three input formats.

``build_busybox_image(dest, fmt)`` makes a three-layer image from the host's static busybox
(see :data:`BUSYBOX_EXPECT` for what its root should hold); :func:`write_image` writes any
layers (tar bytes, see :func:`layer`) with a config, for the hostile cases.

Formats: ``layout`` (an OCI image layout folder), ``oci-archive`` (a tarball of one, as
``skopeo copy ... oci-archive:x.tar`` writes), ``docker-save`` (a legacy ``docker save``:
manifest.json, ``<id>/layer.tar``, no index.json) and ``docker-save-oci`` (Docker 25+:
both manifest.json and an OCI layout in the same tarball).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["FORMATS", "BUSYBOX_CONFIG", "BUSYBOX_EXPECT", "Member", "build_busybox_image", "write_image", "layer", "file",
           "directory", "symlink", "hardlink", "whiteout", "opaque", "device", "fifo", "image_config"]

FORMATS = ("layout", "oci-archive", "docker-save", "docker-save-oci")
MTIME = 1_700_000_000
Member = tuple[tarfile.TarInfo, bytes]

BUSYBOX_CONFIG: dict[str, Any] = {
    "Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "GREETING=hello"],
    "WorkingDir": "/work",
    "Entrypoint": ["/bin/sh", "-c"],
    "Cmd": ['echo "$GREETING from $(pwd)"'],
}
# path -> content (str), or None for "must not exist"; what the busybox image's root holds.
BUSYBOX_EXPECT: dict[str, str | None] = {
    "/etc/os-release": "ID=vsbxoci\n",
    "/work/hello.txt": "hello from layer 2\n",
    "/work/hello-link.txt": "hello from layer 2\n",
    "/etc/layer2": "2\n",
    "/etc/layer3": "3\n",
    "/etc/remove-me": None,  # whited out by layer 3
    "/opt/old/a.txt": None,  # opt/old made opaque by layer 3
    "/opt/old/b.txt": None,
    "/opt/old/c.txt": "new in layer 3\n",
    "/opt/kept.txt": "kept\n",
}


def _info(name: str, kind: bytes, mode: int, uid: int = 0, gid: int = 0) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.uid, ti.gid, ti.mtime = kind, mode, uid, gid, MTIME
    return ti


def file(name: str, data: bytes | str, mode: int = 0o644, uid: int = 0, gid: int = 0) -> Member:
    raw = data.encode() if isinstance(data, str) else data
    ti = _info(name, tarfile.REGTYPE, mode, uid, gid)
    ti.size = len(raw)
    return ti, raw


def directory(name: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> Member:
    return _info(name, tarfile.DIRTYPE, mode, uid, gid), b""


def symlink(name: str, target: str) -> Member:
    ti = _info(name, tarfile.SYMTYPE, 0o777)
    ti.linkname = target
    return ti, b""


def hardlink(name: str, target: str) -> Member:
    ti = _info(name, tarfile.LNKTYPE, 0o644)
    ti.linkname = target
    return ti, b""


def whiteout(path: str) -> Member:
    """The member that removes ``path`` of the lower layers."""
    head, _, base = path.rpartition("/")
    return file(f"{head}/.wh.{base}" if head else f".wh.{base}", b"")


def opaque(folder: str) -> Member:
    """The member that empties ``folder`` of the lower layers' content."""
    return file(f"{folder.rstrip('/')}/.wh..wh..opq", b"")


def device(name: str, major: int, minor: int, mode: int = 0o666, block: bool = False) -> Member:
    ti = _info(name, tarfile.BLKTYPE if block else tarfile.CHRTYPE, mode)
    ti.devmajor, ti.devminor = major, minor
    return ti, b""


def fifo(name: str, mode: int = 0o644) -> Member:
    return _info(name, tarfile.FIFOTYPE, mode), b""


def layer(members: Sequence[Member]) -> bytes:
    """An uncompressed layer tar of ``members`` (in their order)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for ti, data in members:
            tar.addfile(ti, io.BytesIO(data) if ti.isreg() else None)
    return buf.getvalue()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def image_config(layers: Sequence[bytes], config: dict[str, Any] | None = None, *, arch: str = "amd64",
                 os_name: str = "linux") -> bytes:
    doc = {"architecture": arch, "os": os_name, "config": dict(config or {}),
           "rootfs": {"type": "layers", "diff_ids": [f"sha256:{_sha(t)}" for t in layers]}}
    return json.dumps(doc, sort_keys=True).encode()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode = len(data), MTIME, 0o644
    tar.addfile(ti, io.BytesIO(data))


def write_image(dest: Path, layers: Sequence[bytes], config: dict[str, Any] | None = None, *, fmt: str = "layout",
                gzip_layers: Sequence[bool] | None = None, arch: str = "amd64", index: dict[str, Any] | None = None,
                extra_blobs: Sequence[bytes] = ()) -> str:
    """Write an image of ``layers`` (uncompressed tars) at ``dest`` in ``fmt``; returns its
    digest as vmsandbox names it (the manifest's; the config's for ``docker-save``).
    ``gzip_layers`` picks the layers stored gzipped (default: all); ``index`` replaces the
    generated index.json (its blobs in ``extra_blobs``)."""
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not one of {FORMATS}")
    zipped = list(gzip_layers) if gzip_layers is not None else [True] * len(layers)
    cfg = image_config(layers, config, arch=arch)
    blobs: dict[str, bytes] = {_sha(cfg): cfg}
    descs = []
    for tar, z in zip(layers, zipped):
        stored = gzip.compress(tar, mtime=0) if z and fmt != "docker-save" else tar
        blobs[_sha(stored)] = stored
        descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar" + ("+gzip" if stored is not tar else ""),
                      "digest": f"sha256:{_sha(stored)}", "size": len(stored)})
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      "digest": f"sha256:{_sha(cfg)}", "size": len(cfg)},
                           "layers": descs}, sort_keys=True).encode()
    blobs[_sha(manifest)] = manifest
    for b in extra_blobs:
        blobs[_sha(b)] = b
    idx = index if index is not None else {
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": f"sha256:{_sha(manifest)}",
                       "size": len(manifest), "annotations": {"org.opencontainers.image.ref.name": "latest"}}]}
    files: dict[str, bytes] = {}
    if fmt != "docker-save":
        files["oci-layout"] = b'{"imageLayoutVersion": "1.0.0"}'
        files["index.json"] = json.dumps(idx).encode()
        files.update({f"blobs/sha256/{h}": b for h, b in blobs.items()})
    if fmt.startswith("docker-save"):
        legacy = [f"{_sha(t)}/layer.tar" for t in layers] if fmt == "docker-save" else [d["digest"].replace(
            "sha256:", "blobs/sha256/") for d in descs]
        config_name = f"{_sha(cfg)}.json" if fmt == "docker-save" else f"blobs/sha256/{_sha(cfg)}"
        files["manifest.json"] = json.dumps([{"Config": config_name, "RepoTags": ["vsbx/test:latest"],
                                              "Layers": legacy}]).encode()
        if fmt == "docker-save":
            files[config_name] = cfg
            files.update({name: t for name, t in zip(legacy, layers)})
    if fmt == "layout":
        for name, data in files.items():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes(data)
    else:
        with tarfile.open(dest, "w") as tar:
            for name, data in sorted(files.items()):
                _add(tar, name, data)
    return f"sha256:{_sha(cfg if fmt == 'docker-save' else manifest)}"


def busybox_layers(busybox: Path = Path("/bin/busybox")) -> list[bytes]:
    """The three layers of :func:`build_busybox_image`."""
    applets = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=True).stdout.split()
    base: list[Member] = [directory("bin"), file("bin/busybox", busybox.read_bytes(), 0o755)]
    base += [symlink(f"bin/{a}", "busybox") for a in applets if a != "busybox"]
    base += [directory("etc"), file("etc/passwd", "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n"),
             file("etc/group", "root:x:0:\napp:x:1000:\n"), file("etc/os-release", "ID=vsbxoci\n"),
             file("etc/remove-me", "gone in layer 3\n"), directory("tmp", 0o1777), directory("root", 0o700),
             directory("home"), directory("home/app", 0o755, 1000, 1000), directory("proc"), directory("sys"),
             directory("dev"), directory("opt"), directory("opt/old"), file("opt/old/a.txt", "a\n"),
             file("opt/old/b.txt", "b\n"), file("opt/kept.txt", "kept\n")]
    two = [directory("work", 0o755, 1000, 1000), file("work/hello.txt", "hello from layer 2\n"),
           hardlink("work/hello-link.txt", "work/hello.txt"), file("etc/layer2", "2\n"),
           directory("usr"), directory("usr/bin"), file("usr/bin/greet", '#!/bin/sh\necho "$GREETING from $(pwd)"\n', 0o755)]
    three = [whiteout("etc/remove-me"), directory("opt/old"), opaque("opt/old"), file("opt/old/c.txt", "new in layer 3\n"),
             file("etc/layer3", "3\n")]
    return [layer(base), layer(two), layer(three)]


def build_busybox_image(dest: Path, fmt: str = "layout", *, config: dict[str, Any] | None = None,
                        busybox: Path = Path("/bin/busybox")) -> Path:
    """A three-layer busybox image at ``dest`` (a folder for ``layout``, else a tarball) in
    ``fmt`` (one of :data:`FORMATS`); returns ``dest``. Its config is :data:`BUSYBOX_CONFIG`:
    ``PATH`` and ``GREETING=hello``, WorkingDir /work, Entrypoint ``/bin/sh -c`` and a Cmd
    that prints ``hello from /work``; its root holds :data:`BUSYBOX_EXPECT`, a user ``app``
    (uid 1000, group ``app`` 1000) and ``/usr/bin/greet`` (prints the same as the Cmd).
    Layer 1 is busybox with its applets as symlinks, /etc and a few folders (gzipped); layer 2
    adds /work with a file and a hard link to it (plain tar); layer 3 whites out
    /etc/remove-me and makes /opt/old opaque (gzipped). ``config`` entries (``User``, ...)
    replace those of :data:`BUSYBOX_CONFIG` (another config: another image digest)."""
    if fmt == "layout":
        dest.mkdir(parents=True, exist_ok=True)
    write_image(dest, busybox_layers(busybox), {**BUSYBOX_CONFIG, **(config or {})}, fmt=fmt, gzip_layers=[True, False, True],
                arch={"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine))
    return dest
