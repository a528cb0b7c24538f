"""Index, manifest and config of an image: the one manifest for this host, its verified layers."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from typing import Any as _Any

from ..errors import InvalidArgument
from ..model import ImageConfig
from .source import MAX_JSON, Source, blob_name, check_digest

__all__ = ["Image", "Layer", "read_image", "host_architecture", "parse_config", "config_to_json", "config_from_json"]

INDEX_TYPES = frozenset({"application/vnd.oci.image.index.v1+json",
                         "application/vnd.docker.distribution.manifest.list.v2+json"})
MANIFEST_TYPES = frozenset({"application/vnd.oci.image.manifest.v1+json",
                            "application/vnd.docker.distribution.manifest.v2+json"})
# media type -> compression ("" for a plain tar)
LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar": "",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.docker.image.rootfs.diff.tar": "",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
}
_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386", "ppc64le": "ppc64le",
         "s390x": "s390x", "riscv64": "riscv64"}


def host_architecture() -> str:
    """This host's architecture in OCI names (``amd64``, ``arm64``, ...)."""
    m = os.uname().machine
    return _ARCH.get(m, m)


@dataclass(frozen=True)
class Layer:
    """One layer: its file in the source, the digests to check and how it is compressed."""

    name: str
    digest: str  # of the blob as stored ("" when the source does not name it: a legacy docker save)
    diff_id: str  # of the uncompressed tar, from the config ("" when unknown)
    compression: str  # "" or "gzip"; "auto" for a legacy docker save (sniffed)


@dataclass(frozen=True)
class Image:
    """An image ready to unpack: ``digest`` is its manifest's (its cache key)."""

    digest: str
    config: ImageConfig
    layers: tuple[Layer, ...]


def _read(src: Source, name: str, digest: str = "") -> bytes:
    with src.open(name) as f:
        data = f.read(MAX_JSON + 1)
    if len(data) > MAX_JSON:
        raise InvalidArgument(f"image {src.where}: {name} is larger than {MAX_JSON} bytes")
    if digest and hashlib.sha256(data).hexdigest() != check_digest(digest):
        raise InvalidArgument(f"image {src.where}: blob {digest} does not match its digest (corrupt or altered)")
    return data


def _json(src: Source, name: str, digest: str = "") -> _Any:
    try:
        return json.loads(_read(src, name, digest))
    except ValueError as e:
        raise InvalidArgument(f"image {src.where}: {name} is not JSON ({e})") from e


def _obj(v: object, what: str) -> dict[str, _Any]:
    if not isinstance(v, dict):
        raise InvalidArgument(f"{what} must be a JSON object")
    return v


def _strings(v: object, what: str) -> tuple[str, ...]:
    if v is None:
        return ()
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise InvalidArgument(f"{what} must be a list of strings, not {v!r}")
    return tuple(v)


def _string(v: object, what: str) -> str:
    if v is None:
        return ""
    if not isinstance(v, str):
        raise InvalidArgument(f"{what} must be a string, not {v!r}")
    return v


def parse_config(doc: object, digest: str) -> tuple[ImageConfig, tuple[str, ...]]:
    """(the ImageConfig, the layers' diff_ids) of an image config document."""
    d = _obj(doc, "the image config")
    c = _obj(d.get("config") or {}, "the image config's config")
    cfg = ImageConfig(digest=digest, env=_strings(c.get("Env"), "Env"), working_dir=_string(c.get("WorkingDir"), "WorkingDir"),
                      user=_string(c.get("User"), "User"), entrypoint=_strings(c.get("Entrypoint"), "Entrypoint"),
                      cmd=_strings(c.get("Cmd"), "Cmd"), os=_string(d.get("os"), "os") or "linux",
                      architecture=_string(d.get("architecture"), "architecture") or host_architecture())
    diff_ids = _strings(_obj(d.get("rootfs") or {}, "rootfs").get("diff_ids"), "rootfs.diff_ids")
    for i in diff_ids:
        check_digest(i)
    return cfg, diff_ids


def config_to_json(c: ImageConfig) -> dict[str, _Any]:
    return asdict(c)


def config_from_json(d: dict[str, _Any]) -> ImageConfig:
    return ImageConfig(digest=str(d["digest"]), env=tuple(d["env"]), working_dir=str(d["working_dir"]),
                       user=str(d["user"]), entrypoint=tuple(d["entrypoint"]), cmd=tuple(d["cmd"]),
                       os=str(d["os"]), architecture=str(d["architecture"]))


def _platform(desc: dict[str, _Any]) -> str:
    p = desc.get("platform")
    if not isinstance(p, dict):
        return ""
    return f"{p.get('os', '')}/{p.get('architecture', '')}"


def _manifests(src: Source, index: dict[str, _Any], want: str, seen: list[str], depth: int = 0) -> list[dict[str, _Any]]:
    """The manifest descriptors of ``index`` (nested indexes followed) for platform ``want``
    or with no platform; ``seen`` collects the platforms passed over."""
    if depth > 4:
        raise InvalidArgument(f"image {src.where}: indexes nested too deep")
    out: list[dict[str, _Any]] = []
    for desc in index.get("manifests") or []:
        desc = _obj(desc, "a manifest descriptor")
        plat = _platform(desc)
        if plat and plat != want:
            seen.append(plat)
            continue
        mt = desc.get("mediaType")
        if mt in INDEX_TYPES:
            nested = _obj(_json(src, blob_name(desc.get("digest")), desc["digest"]), "a nested index")
            out += _manifests(src, nested, want, seen, depth + 1)
        elif mt in MANIFEST_TYPES:
            out.append(desc)
    return out


def _from_manifest(src: Source, digest: str, arch: str) -> Image:
    m = _obj(_json(src, blob_name(digest), digest), "the image manifest")
    cdesc = _obj(m.get("config"), "the manifest's config")
    cfg, diff_ids = parse_config(_json(src, blob_name(cdesc.get("digest")), cdesc["digest"]), digest)
    layers: list[Layer] = []
    descs = m.get("layers") or []
    if not isinstance(descs, list):
        raise InvalidArgument("the manifest's layers must be a list")
    if diff_ids and len(diff_ids) != len(descs):
        raise InvalidArgument(f"image {src.where}: the manifest has {len(descs)} layers, its config {len(diff_ids)} diff_ids")
    for i, ld in enumerate(descs):
        ld = _obj(ld, "a layer descriptor")
        mt = str(ld.get("mediaType", ""))
        if "zstd" in mt:
            raise InvalidArgument(f"image {src.where}: layer {ld.get('digest')} is zstd-compressed ({mt}), which is not "
                                  "supported (gzip or plain tar layers only)")
        if mt not in LAYER_TYPES:
            raise InvalidArgument(f"image {src.where}: layer media type {mt!r} is not supported")
        layers.append(Layer(blob_name(ld.get("digest")), ld["digest"], diff_ids[i] if diff_ids else "", LAYER_TYPES[mt]))
    _check_platform(src, cfg, arch)
    return Image(digest, cfg, tuple(layers))


def _check_platform(src: Source, cfg: ImageConfig, arch: str) -> None:
    if (cfg.os, cfg.architecture) != ("linux", arch):
        raise InvalidArgument(f"image {src.where} is for {cfg.os}/{cfg.architecture}, not linux/{arch}")


def _from_docker_manifest(src: Source, arch: str) -> Image:
    """A docker save without an OCI layout: manifest.json names the config and the layer tars
    by path; the layers are checked against the config's diff_ids, and the image's digest
    is its config's (docker's image id): there is no manifest blob."""
    entries = _json(src, "manifest.json")
    if not isinstance(entries, list) or len(entries) != 1:
        n = len(entries) if isinstance(entries, list) else "no"
        raise InvalidArgument(f"image {src.where}: a docker save of {n} images; save exactly one")
    e = _obj(entries[0], "manifest.json's entry")
    config_name = _string(e.get("Config"), "Config")
    data = _read(src, config_name)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    stem = config_name.rsplit("/", 1)[-1].removesuffix(".json")
    if len(stem) == 64 and stem != digest[7:]:
        raise InvalidArgument(f"image {src.where}: blob {config_name} does not match its digest (corrupt or altered)")
    try:
        doc = json.loads(data)
    except ValueError as err:
        raise InvalidArgument(f"image {src.where}: {config_name} is not JSON ({err})") from err
    cfg, diff_ids = parse_config(doc, digest)
    names = _strings(e.get("Layers"), "Layers")
    if len(diff_ids) != len(names):
        raise InvalidArgument(f"image {src.where}: {len(names)} layers but {len(diff_ids)} diff_ids in its config")
    _check_platform(src, cfg, arch)
    return Image(digest, cfg, tuple(Layer(n, "", d, "auto") for n, d in zip(names, diff_ids)))


def read_image(src: Source, arch: str | None = None) -> Image:
    """The image in ``src`` for linux/``arch`` (default: the host's).

    The layout's index.json is preferred (docker save writes one too since Docker 25); nested
    indexes are followed; with several images (or none) for the platform, InvalidArgument.
    Every blob read is checked against its digest (InvalidArgument naming the blob).
    """
    arch = arch or host_architecture()
    if src.exists("index.json"):
        index = _obj(_json(src, "index.json"), "index.json")
        seen: list[str] = []
        found = _manifests(src, index, f"linux/{arch}", seen)
        if len(found) == 1:
            return _from_manifest(src, _string(found[0].get("digest"), "digest"), arch)
        if not found:
            other = f" (it has {', '.join(sorted(set(seen)))})" if seen else ""
            raise InvalidArgument(f"image {src.where} has no manifest for linux/{arch}{other}")
        raise InvalidArgument(f"image {src.where} holds {len(found)} images for linux/{arch}; give a layout of one")
    if src.exists("manifest.json"):
        return _from_docker_manifest(src, arch)
    raise InvalidArgument(f"{src.where} is not an OCI image layout nor a docker save (no index.json or manifest.json)")
