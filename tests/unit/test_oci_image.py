"""Reading images: the three input formats, index -> manifest selection, digests, media
types and config parsing; the cache (built once, reused, pruned)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.ocibuild import (BUSYBOX_CONFIG, BUSYBOX_EXPECT, FORMATS, Member, build_busybox_image, directory, file,
                            layer, symlink, write_image)
from vmsandbox import ImageConfig, InvalidArgument
from vmsandbox.oci import ImageCache, open_source, read_image
from vmsandbox.oci.cache import unpack
from vmsandbox.oci.image import host_architecture, parse_config

ARCH = host_architecture()
L1 = layer([directory("etc"), file("etc/one", "1\n")])


def read(path: Path) -> tuple[str, ImageConfig]:
    src = open_source(path)
    try:
        img = read_image(src)
        return img.digest, img.config
    finally:
        src.close()


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_gives_the_busybox_tree_and_config(tmp_path: Path, fmt: str) -> None:
    path = build_busybox_image(tmp_path / "img", fmt)
    src = open_source(path)
    img = read_image(src)
    out = tmp_path / "tree"
    out.mkdir()
    unpack(src, img, out)
    src.close()
    for name, content in BUSYBOX_EXPECT.items():
        p = out / name.lstrip("/")
        assert (p.read_text() if p.exists() else None) == content, name
    assert os.readlink(out / "bin/sh") == "busybox"
    assert img.config.env == tuple(BUSYBOX_CONFIG["Env"]) and img.config.working_dir == "/work"
    assert img.config.command() == ["/bin/sh", "-c", 'echo "$GREETING from $(pwd)"']
    assert (img.config.os, img.config.architecture, len(img.layers)) == ("linux", ARCH, 3)


def test_the_digest_is_the_manifests_in_every_oci_format(tmp_path: Path) -> None:
    digests = {fmt: read(build_busybox_image(tmp_path / fmt, fmt))[0] for fmt in FORMATS}
    assert digests["layout"] == digests["oci-archive"] == digests["docker-save-oci"]
    manifest = json.loads((tmp_path / "layout" / "index.json").read_text())["manifests"][0]["digest"]
    assert digests["layout"] == manifest and digests["docker-save"] != manifest  # legacy: the config's


def _platform_index(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A layout whose index names an image per platform, the host's inside a nested index."""
    d = tmp_path / "multi"
    d.mkdir()
    mine = write_image(d, [L1], {"Cmd": ["mine"]}, arch=ARCH)
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    other = write_image(other_dir, [L1], {"Cmd": ["other"]}, arch="s390x")
    for p in (other_dir / "blobs/sha256").iterdir():
        (d / "blobs/sha256" / p.name).write_bytes(p.read_bytes())
    m = lambda dig, arch: {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": dig, "size": 1,  # noqa: E731
                           "platform": {"os": "linux", "architecture": arch}}
    nested = json.dumps({"schemaVersion": 2, "manifests": [m(mine, ARCH)]}).encode()
    nested_digest = "sha256:" + hashlib.sha256(nested).hexdigest()
    (d / "blobs/sha256" / nested_digest[7:]).write_bytes(nested)
    index = {"schemaVersion": 2, "manifests": [
        m(other, "s390x"),
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": other, "size": 1,
         "platform": {"os": "unknown", "architecture": "unknown"}},  # an attestation, as buildx writes
        {"mediaType": "application/vnd.oci.image.index.v1+json", "digest": nested_digest, "size": len(nested)}]}
    (d / "index.json").write_text(json.dumps(index))
    return d, {"mine": mine, "other": other}


def test_the_hosts_platform_is_picked_through_nested_indexes(tmp_path: Path) -> None:
    d, digests = _platform_index(tmp_path)
    digest, cfg = read(d)
    assert digest == digests["mine"] and cfg.cmd == ("mine",)


def test_no_manifest_for_the_host_names_what_there_is(tmp_path: Path) -> None:
    d = tmp_path / "arm"
    d.mkdir()
    write_image(d, [L1], arch="s390x")
    with pytest.raises(InvalidArgument, match="is for linux/s390x"):
        read(d)
    index = json.loads((d / "index.json").read_text())
    index["manifests"][0]["platform"] = {"os": "linux", "architecture": "s390x"}
    (d / "index.json").write_text(json.dumps(index))
    with pytest.raises(InvalidArgument, match=r"no manifest for linux/\w+ \(it has linux/s390x\)"):
        read(d)


def test_two_images_for_the_host_are_ambiguous(tmp_path: Path) -> None:
    d = tmp_path / "two"
    d.mkdir()
    write_image(d, [L1])
    index = json.loads((d / "index.json").read_text())
    index["manifests"] *= 2
    (d / "index.json").write_text(json.dumps(index))
    with pytest.raises(InvalidArgument, match="holds 2 images"):
        read(d)


@pytest.mark.parametrize("what", ["manifest", "config", "layer"])
def test_a_blob_that_does_not_match_its_digest_is_refused_naming_it(tmp_path: Path, what: str) -> None:
    d = tmp_path / "img"
    d.mkdir()
    digest = write_image(d, [L1], gzip_layers=[False])
    manifest = json.loads((d / "blobs/sha256" / digest[7:]).read_text())
    blob = {"manifest": digest, "config": manifest["config"]["digest"],
            "layer": manifest["layers"][0]["digest"]}[what]
    p = d / "blobs/sha256" / blob[7:]
    p.write_bytes(p.read_bytes().replace(b"1", b"2") if what != "manifest" else p.read_bytes() + b" ")
    with pytest.raises(InvalidArgument, match=f"blob {blob} does not match its digest"):
        src = open_source(d)
        unpack(src, read_image(src), tmp_path)


def rewrite_tar(src_path: Path, dst_path: Path, change: Callable[[tarfile.TarInfo, bytes], list[Member]]) -> None:
    """Copy a tarball, each member replaced by what ``change(member, data)`` gives."""
    with tarfile.open(src_path) as src, tarfile.open(dst_path, "w") as dst:
        for m in src.getmembers():
            for info, data in change(m, src.extractfile(m).read()):  # type: ignore[union-attr]
                dst.addfile(info, io.BytesIO(data) if info.isreg() else None)


def test_a_legacy_docker_layer_is_checked_against_its_diff_id(tmp_path: Path) -> None:
    path = tmp_path / "save.tar"
    write_image(path, [L1], fmt="docker-save")
    altered = tmp_path / "altered.tar"
    rewrite_tar(path, altered, lambda m, data: [(m, data.replace(b"1\n", b"9\n") if m.name.endswith("layer.tar")
                                                 else data)])
    s = open_source(altered)
    with pytest.raises(InvalidArgument, match="does not match its diff_id"):
        unpack(s, read_image(s), tmp_path)


def test_zstd_layers_are_not_supported(tmp_path: Path) -> None:
    d = tmp_path / "z"
    d.mkdir()
    digest = write_image(d, [L1])
    p = d / "blobs/sha256" / digest[7:]
    m = json.loads(p.read_text())
    m["layers"][0]["mediaType"] = "application/vnd.oci.image.layer.v1.tar+zstd"
    raw = json.dumps(m).encode()
    new = hashlib.sha256(raw).hexdigest()
    (d / "blobs/sha256" / new).write_bytes(raw)
    index = json.loads((d / "index.json").read_text())
    index["manifests"][0]["digest"] = "sha256:" + new
    (d / "index.json").write_text(json.dumps(index))
    with pytest.raises(InvalidArgument, match="zstd-compressed .* not supported"):
        read(d)


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "does not exist"),
    (lambda p: p.mkdir(), "not an OCI image layout nor a docker save"),
    (lambda p: p.write_bytes(b"not a tar at all" * 100), "not a readable tarball"),
    (lambda p: (p.mkdir(), (p / "index.json").write_text("{")), "index.json is not JSON"),
    (lambda p: (p.mkdir(), (p / "index.json").write_text('{"manifests": [{"mediaType": '
                                                         '"application/vnd.oci.image.manifest.v1+json", '
                                                         '"digest": "md5:abc"}]}')), "malformed digest"),
    (lambda p: (p.mkdir(), (p / "index.json").write_text('{"manifests": [{"mediaType": '
                                                         '"application/vnd.oci.image.manifest.v1+json", "digest": '
                                                         '"sha256:' + "0" * 64 + '"}]}')), "cannot be read"),
], ids=["missing", "empty-folder", "not-a-tar", "bad-json", "bad-digest", "missing-blob"])
def test_bad_paths_and_files_are_invalid_with_a_clear_message(tmp_path: Path, make: object, message: str) -> None:
    p = tmp_path / "img"
    make(p)  # type: ignore[operator]
    with pytest.raises(InvalidArgument, match=message):
        read(p)


def test_config_parsing_takes_the_config_object_and_refuses_bad_types() -> None:
    doc = {"os": "linux", "architecture": "arm64", "config": {"Env": ["A=1", "B=x=y"], "WorkingDir": "/w",
           "User": "app:app", "Entrypoint": None, "Cmd": ["sh"]}, "rootfs": {"diff_ids": []}}
    cfg, diff_ids = parse_config(doc, "sha256:" + "a" * 64)
    assert cfg == ImageConfig("sha256:" + "a" * 64, ("A=1", "B=x=y"), "/w", "app:app", (), ("sh",), "linux", "arm64")
    assert cfg.environ() == {"A": "1", "B": "x=y"} and diff_ids == ()
    with pytest.raises(InvalidArgument, match="Env must be a list of strings"):
        parse_config({"config": {"Env": "A=1"}}, "sha256:" + "a" * 64)
    with pytest.raises(InvalidArgument, match="WorkingDir must be a string"):
        parse_config({"config": {"WorkingDir": 3}}, "sha256:" + "a" * 64)


# --------------------------------------------------------------------------- the cache
def test_the_cache_builds_once_and_reuses(tmp_path: Path) -> None:
    image = build_busybox_image(tmp_path / "img")
    lines: list[str] = []
    cache = ImageCache(tmp_path / "oci", progress=lines.append)
    with cache.use(image) as first:
        assert first.built and first.rootfs.is_file() and first.rootfs.stat().st_mode & 0o777 == 0o600
    st = first.rootfs.stat()
    assert lines == [f"unpacking image {first.digest[:19]}… (3 layers)"]
    assert json.loads((first.directory / "config.json").read_text())["working_dir"] == "/work"
    assert st.st_size >= 256 << 20 and st.st_blocks * 512 < st.st_size  # headroom, sparse
    with cache.use(tmp_path / "img") as again:
        assert not again.built and again.config == first.config
    st2 = again.rootfs.stat()
    assert (st2.st_ino, st2.st_mtime_ns) == (st.st_ino, st.st_mtime_ns) and len(lines) == 1


def test_a_stale_partial_entry_is_removed_and_a_failed_build_leaves_none(tmp_path: Path) -> None:
    image = build_busybox_image(tmp_path / "img")
    digest = read(image)[0]
    partial = tmp_path / "oci" / f"{digest[7:]}.partial"
    (partial / "tree").mkdir(parents=True)
    (partial / "junk").write_text("from a crash")
    with ImageCache(tmp_path / "oci").use(image) as c:
        assert c.built
    assert not partial.exists() and sorted(p.name for p in (tmp_path / "oci").iterdir()) == [digest[7:], f"{digest[7:]}.lock"]
    bad = tmp_path / "bad"
    bad.mkdir()
    write_image(bad, [layer([file("../x", "y")])])
    with pytest.raises(InvalidArgument, match="climbs out"):
        with ImageCache(tmp_path / "oci").use(bad):
            pass
    assert [p.name for p in (tmp_path / "oci").iterdir() if not p.name.endswith(".lock")] == [digest[7:]]


def test_two_concurrent_uses_build_the_image_once(tmp_path: Path) -> None:
    image = build_busybox_image(tmp_path / "img")
    lines: list[str] = []
    results = []
    cache = ImageCache(tmp_path / "oci", progress=lines.append)

    def use() -> None:
        with ImageCache(tmp_path / "oci", progress=lines.append).use(image) as c:
            results.append(c.built)
    threads = [threading.Thread(target=use) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False, False, True] and len(lines) == 1 and len(cache.entries()) == 1


def test_prune_keeps_the_recent_and_the_used(tmp_path: Path) -> None:
    used: set[str] = set()
    cache = ImageCache(tmp_path / "oci", keep=2, in_use=lambda: used)
    digests = []
    for i in range(5):
        d = tmp_path / f"img{i}"
        d.mkdir()
        write_image(d, [layer([file("n", str(i))])])
        with cache.use(d) as c:
            digests.append(c.digest[7:])
            os.utime(c.directory / "last-used", (1000 + i, 1000 + i))
        if i == 0:
            used.add(digests[0])  # a sandbox's overlay backs the oldest
    left = {p.name for p in cache.entries()}
    # the used one (the oldest), the one just used, and the two most recent other unused ones
    assert left == {digests[0], digests[2], digests[3], digests[4]}


def test_prune_sweeps_partials_of_other_images_unless_a_build_holds_them(tmp_path: Path) -> None:
    import fcntl

    cache = ImageCache(tmp_path / "oci")
    stale, busy = "a" * 64, "b" * 64
    for h in (stale, busy):
        (tmp_path / "oci" / f"{h}.partial" / "tree").mkdir(parents=True)
    with open(tmp_path / "oci" / f"{busy}.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        cache.prune()
    assert not (tmp_path / "oci" / f"{stale}.partial").exists() and (tmp_path / "oci" / f"{busy}.partial").exists()


def test_prune_removes_nothing_when_the_users_cannot_be_told(tmp_path: Path) -> None:
    def broken() -> set[str]:
        raise OSError("unreadable overlay")
    cache = ImageCache(tmp_path / "oci", keep=0, in_use=broken)
    for i in range(2):
        d = tmp_path / f"img{i}"
        d.mkdir()
        write_image(d, [layer([file("n", str(i))])])
        with cache.use(d):
            pass
    assert len(cache.entries()) == 2 and cache.prune() == []


def test_a_docker_save_whose_layer_tars_are_symlinks_into_blobs_is_read(tmp_path: Path) -> None:
    """Docker 25+ without its index.json (as some tools repack it): ``<id>/layer.tar`` links
    to ``../blobs/sha256/<hex>``, resolved inside the tarball."""
    legacy = tmp_path / "legacy.tar"
    write_image(legacy, [L1], fmt="docker-save")
    linked = tmp_path / "linked.tar"

    def into_blobs(m: tarfile.TarInfo, data: bytes) -> list[Member]:
        if not m.name.endswith("/layer.tar"):
            return [(m, data)]
        blob = "blobs/sha256/" + hashlib.sha256(data).hexdigest()
        return [file(blob, data), symlink(m.name, "../" + blob)]
    rewrite_tar(legacy, linked, into_blobs)
    s = open_source(linked)
    out = tmp_path / "tree"
    out.mkdir()
    unpack(s, read_image(s), out)
    assert (out / "etc/one").read_text() == "1\n"
