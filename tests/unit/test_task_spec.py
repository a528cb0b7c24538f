"""config.json rewritten for the guest: a pure function over JSON documents."""

from __future__ import annotations

import pytest

from tests.unit.task_rig import CID, spec
from vmsandbox import InvalidArgument
from vmsandbox.model import PtySize
from vmsandbox.task.spec import load_spec, rewrite_process, rewrite_spec
from vmsandbox.task.terminal import console_size

ROOT = f"/run/vsbx/shared/{CID}/rootfs"


def rw(doc: dict, sources: dict[str, str] | None = None) -> dict:  # type: ignore[type-arg]
    return rewrite_spec(doc, container_id=CID, guest_rootfs=ROOT, sources=sources or {})


def test_host_namespace_paths_are_dropped_and_own_namespaces_kept() -> None:
    out = rw(spec())
    assert out["linux"]["namespaces"] == [{"type": "pid"}, {"type": "mount"}]
    assert "hostname" not in out  # the uts namespace is the guest's: its hostname is the pod's


def test_root_cgroups_hooks_and_labels_are_the_guests() -> None:
    doc = spec(hooks={"prestart": [{"path": "/usr/bin/nvidia-hook"}]})
    doc["linux"]["resources"] = {"cpu": {"shares": 2, "cpus": "0-63", "mems": "0", "quota": 1000}}
    doc["linux"]["mountLabel"] = "system_u:object_r:container_file_t"
    out = rw(doc)
    assert out["root"] == {"path": ROOT}
    assert out["linux"]["cgroupsPath"] == f"/vsbx/{CID}"
    assert out["linux"]["resources"]["cpu"] == {"shares": 2, "quota": 1000}
    assert "hooks" not in out and "mountLabel" not in out["linux"]
    assert "apparmorProfile" not in out["process"]
    assert out["process"]["args"] == ["sh", "-c", "echo hi"] and out["process"]["env"] == ["PATH=/bin"]


def test_the_input_is_not_modified() -> None:
    doc = spec()
    before = repr(doc)
    rw(doc)
    assert repr(doc) == before


def test_bind_sources_map_to_their_staged_guest_paths() -> None:
    doc = spec()
    doc["mounts"] += [
        {"destination": "/data", "type": "bind", "source": "/var/lib/kubelet/pods/u/volumes/v", "options": ["rbind"]},
        {"destination": "/etc/hosts", "type": "bind", "source": "/var/lib/cri/sb/hosts", "options": ["bind", "ro"]},
        {"destination": "/sub", "source": "/var/lib/kubelet/pods/u/volumes/v/sub/", "options": ["rbind", "rw"]},
    ]
    out = rw(doc, {"/var/lib/kubelet/pods/u/volumes/v": "/g/0", "/var/lib/cri/sb/hosts": "/g/1"})
    assert [m["source"] for m in out["mounts"]] == ["proc", "/g/0", "/g/1", "/g/0/sub"]
    assert out["mounts"][0] == {"destination": "/proc", "type": "proc", "source": "proc"}


def test_a_bind_source_that_was_not_staged_is_refused() -> None:
    doc = spec()
    doc["mounts"].append({"destination": "/x", "type": "bind", "source": "/etc/secret", "options": ["rbind"]})
    with pytest.raises(InvalidArgument, match="/etc/secret.*not shared"):
        rw(doc, {"/etc/secret-other": "/g/0"})


def test_a_pod_user_namespace_goes_with_its_mappings() -> None:
    doc = spec()
    doc["linux"]["namespaces"].append({"type": "user", "path": "/proc/4242/ns/user"})
    doc["linux"]["uidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]
    doc["linux"]["gidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]
    out = rw(doc)
    assert "uidMappings" not in out["linux"] and "gidMappings" not in out["linux"]


@pytest.mark.parametrize("kind", ["mount", "cgroup", "time"])
def test_joining_a_host_namespace_that_is_not_the_pods_is_refused(kind: str) -> None:
    doc = spec()
    doc["linux"]["namespaces"] = [{"type": kind, "path": "/proc/1/ns/" + kind}]
    with pytest.raises(InvalidArgument, match=kind):
        rw(doc)


def test_the_terminal_and_its_size_are_kept_for_the_console_socket() -> None:
    p = rewrite_process({"args": ["sh"], "terminal": True, "consoleSize": {"height": 1, "width": 2}})
    assert p == {"args": ["sh"], "terminal": True, "cwd": "/", "consoleSize": {"height": 1, "width": 2}}
    assert console_size(p) == PtySize(2, 1)
    for bad in ({"terminal": False, "consoleSize": {"height": 1, "width": 2}}, {"terminal": True},
                {"terminal": True, "consoleSize": {"height": 0, "width": 2}}, {"terminal": True, "consoleSize": 3}):
        assert console_size(bad) is None
    assert rewrite_process({"args": ["sh"], "terminal": True}, terminal=False)["terminal"] is False


@pytest.mark.parametrize("process", [{}, {"args": []}, {"args": "sh"}, {"args": ["sh", 1]},
                                     {"args": ["sh"], "cwd": "rel"}, {"args": ["sh"], "env": "A=1"}])
def test_a_bad_process_is_refused(process: dict) -> None:  # type: ignore[type-arg]
    with pytest.raises(InvalidArgument):
        rewrite_process(process)


@pytest.mark.parametrize("doc", [{}, {"process": "x"}, []])
def test_a_document_that_is_no_spec_is_refused(doc: object) -> None:
    with pytest.raises(InvalidArgument):
        rewrite_spec(doc, container_id=CID, guest_rootfs=ROOT, sources={})  # type: ignore[arg-type]


@pytest.mark.parametrize("cid", ["", "../x", "a/b", "x" * 129, "-a"])
def test_a_bad_container_id_is_refused(cid: str) -> None:
    with pytest.raises(InvalidArgument):
        rewrite_spec(spec(), container_id=cid, guest_rootfs=ROOT, sources={})


@pytest.mark.parametrize("data", [b"", b"{", b"[]", b"\xff"])
def test_load_spec_refuses_what_is_not_a_json_object(data: bytes) -> None:
    with pytest.raises(InvalidArgument):
        load_spec(data)


def test_the_guest_crun_is_given_a_runtime_spec_version_it_knows() -> None:
    from vmsandbox.task.spec import GUEST_OCI_VERSION, rewrite_spec

    # containerd 2.1 writes 1.2.x; crun 1.8.1 refused it with "unknown version specified".
    out = rewrite_spec({"ociVersion": "1.2.1", "process": {"args": ["sh"], "cwd": "/"}}, container_id="c1",
                       guest_rootfs="/run/vsbx/shared/c1/rootfs", sources={})
    assert out["ociVersion"] == GUEST_OCI_VERSION == "1.0.2"


def test_the_guests_pod_files_are_bound_where_the_spec_has_none() -> None:
    doc = spec()
    doc["mounts"].append({"destination": "/etc/hosts", "type": "bind", "source": "/var/lib/kubelet/hosts",
                          "options": ["rbind"]})
    out = rewrite_spec(doc, container_id=CID, guest_rootfs=ROOT, sources={"/var/lib/kubelet/hosts": "/g/hosts"},
                       pod_files={"hostname", "hosts", "resolv.conf"})
    by_dest = {m["destination"]: m for m in out["mounts"]}
    assert by_dest["/etc/hosts"]["source"] == "/g/hosts"  # the spec's own wins
    assert by_dest["/etc/resolv.conf"] == {"destination": "/etc/resolv.conf", "type": "bind",
                                           "source": "/run/vsbx/config/resolv.conf",
                                           "options": ["rbind", "rprivate", "rw"]}
    assert by_dest["/etc/hostname"]["source"] == "/run/vsbx/config/hostname"
    assert [m["destination"] for m in out["mounts"]].count("/etc/hosts") == 1
    # A guest without DNS settings has no resolv.conf: nothing to bind.
    assert "/etc/resolv.conf" not in {m["destination"] for m in rw(spec())["mounts"]}
    out = rewrite_spec(spec(), container_id=CID, guest_rootfs=ROOT, sources={}, pod_files={"hosts"})
    assert [m["destination"] for m in out["mounts"]] == ["/proc", "/etc/hosts"]
