"""The container's OCI spec, rewritten for the guest (pure: JSON documents in, JSON out).

containerd writes ``config.json`` for the host: namespace paths ``/proc/<sandbox pid>/ns/*``,
a host cgroupsPath, bind sources on the host, hooks and LSM labels of the host. In the guest
the pod *is* the VM: containers share the guest's network, ipc, uts (and, for a pod-wide pid
namespace, pid) namespaces, so an entry that names a host path is dropped (the container
joins the guest's); entries without a path (a namespace of its own) are kept. CRI writes no
hostname, hosts or resolv.conf for a proxy sandboxer: the guest's copies of the pod's (from
its config disk) are bound at /etc/* unless the spec mounts those paths itself.
"""

from __future__ import annotations

import copy
import json
import posixpath
import re
from collections.abc import Collection, Mapping
from typing import Any as _Any

from ..errors import InvalidArgument

__all__ = ["GUEST_POD_FILES", "POD_FILES", "pod_file_mounts", "rewrite_spec", "rewrite_process", "load_spec", "is_bind", "guest_cgroups_path", "guest_resources",
           "JOINABLE_NAMESPACES", "GUEST_CGROUP_PARENT"]

GUEST_CGROUP_PARENT = "/vsbx"
GUEST_POD_FILES = "/run/vsbx/config"
"""Where the guest keeps the pod's hostname, hosts and resolv.conf (images/init's $cfg)."""
POD_FILES = ("hostname", "hosts", "resolv.conf")
#: Namespaces a container may share with the pod; in the guest that means with the guest itself.
JOINABLE_NAMESPACES = frozenset({"network", "ipc", "uts", "pid", "user"})
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_BIND = ("bind", "rbind")


def guest_cgroups_path(container_id: str) -> str:
    """Where the container's cgroup lives in the guest (crun's cgroupfs manager)."""
    return f"{GUEST_CGROUP_PARENT}/{container_id}"


def guest_resources(resources: Mapping[str, _Any]) -> dict[str, _Any]:
    """runtime-spec LinuxResources for the guest (at create and at update): host CPU and NUMA
    numbers mean nothing in a guest with fewer vCPUs, so cpu.cpus and cpu.mems are dropped."""
    out = dict(resources)
    if isinstance(out.get("cpu"), dict):
        out["cpu"] = {k: v for k, v in out["cpu"].items() if k not in ("cpus", "mems")}
    return out


def _bind_source(source: str, sources: Mapping[str, str]) -> str:
    """The guest path of a host bind source: the longest staged host prefix that contains it."""
    src = posixpath.normpath(source)
    for host in sorted(sources, key=len, reverse=True):
        h = posixpath.normpath(host)
        if src == h:
            return sources[host]
        if src.startswith(h.rstrip("/") + "/"):
            return posixpath.join(sources[host], posixpath.relpath(src, h))
    raise InvalidArgument(f"bind mount source {source!r} is not shared with the guest")


def is_bind(m: Mapping[str, _Any]) -> bool:
    return m.get("type") == "bind" or any(o in _BIND for o in m.get("options", ()) or ())


def rewrite_process(process: Mapping[str, _Any], *, terminal: bool | None = None) -> dict[str, _Any]:
    """A runtime-spec Process for the guest: the host's LSM labels go; ``terminal`` is kept, or
    set to the task's (the engine gives crun a console socket for it), and so is
    ``consoleSize`` (the terminal's first size; ResizePty changes it later)."""
    if not isinstance(process, Mapping):
        raise InvalidArgument("the process spec must be a JSON object")
    out = copy.deepcopy(dict(process))
    args = out.get("args")
    if not isinstance(args, list) or not args or not all(isinstance(a, str) for a in args):
        raise InvalidArgument("process.args must be a non-empty list of strings")
    cwd = out.get("cwd", "/")
    if not isinstance(cwd, str) or not cwd.startswith("/"):
        raise InvalidArgument(f"process.cwd must be an absolute path, not {cwd!r}")
    env = out.get("env", [])
    if not isinstance(env, list) or not all(isinstance(e, str) for e in env):
        raise InvalidArgument("process.env must be a list of strings")
    out["cwd"] = cwd
    out["terminal"] = bool(out.get("terminal", False)) if terminal is None else terminal
    out.pop("apparmorProfile", None)
    out.pop("selinuxLabel", None)
    return out


GUEST_OCI_VERSION = "1.0.2"
"""The runtime-spec version the guest's crun is given."""


def pod_file_mounts(present: Collection[str], mounts: Collection[Mapping[str, _Any]]) -> list[dict[str, _Any]]:
    """Bind mounts of the guest's pod files in ``present`` (names from :data:`POD_FILES`) at
    /etc/<name>, read-write as CRI mounts its own, for each destination ``mounts`` lacks."""
    taken = {posixpath.normpath(str(m.get("destination", ""))) for m in mounts}
    return [{"destination": f"/etc/{name}", "type": "bind", "source": f"{GUEST_POD_FILES}/{name}",
             "options": ["rbind", "rprivate", "rw"]}
            for name in POD_FILES if name in present and f"/etc/{name}" not in taken]


def rewrite_spec(spec: Mapping[str, _Any], *, container_id: str, guest_rootfs: str,
                 sources: Mapping[str, str], pod_files: Collection[str] = (),
                 terminal: bool | None = None) -> dict[str, _Any]:
    """containerd's spec for ``container_id`` as crun in the guest must see it.

    ``guest_rootfs`` is where the staged rootfs appears in the guest; ``sources`` maps host
    directories (volumes, sandbox files) to their guest paths; ``terminal`` (the task's, when
    given) replaces ``process.terminal``. Raises InvalidArgument for a
    spec that is not an OCI document, a namespace path we cannot honour, or a bind source
    that was not staged. ``pod_files``: which of :data:`POD_FILES` the guest has (see
    :func:`pod_file_mounts`).
    """
    if not _ID.match(container_id):
        raise InvalidArgument(f"container id {container_id!r} is not valid")
    if not isinstance(spec, Mapping) or not isinstance(spec.get("process"), Mapping):
        raise InvalidArgument("config.json is not an OCI runtime spec (no process)")
    out = copy.deepcopy(dict(spec))
    # crun 1.8.1 (Debian 12) refuses containerd 2.x's "1.2.x" ("unknown version specified");
    # it reads the 1.x fields it knows and ignores the rest.
    out["ociVersion"] = GUEST_OCI_VERSION
    out["process"] = rewrite_process(spec["process"], terminal=terminal)
    root = dict(out.get("root") or {})
    root["path"] = guest_rootfs
    out["root"] = root
    out.pop("hooks", None)  # host binaries

    linux = dict(out.get("linux") or {})
    namespaces, dropped = [], set()
    for ns in linux.get("namespaces") or []:
        kind, path = ns.get("type"), ns.get("path")
        if not path:
            namespaces.append(ns)
        elif kind in JOINABLE_NAMESPACES:
            dropped.add(kind)  # the pod's: the guest's own
        else:
            raise InvalidArgument(f"cannot join a {kind} namespace at host path {path!r} in the guest")
    linux["namespaces"] = namespaces
    if "uts" in dropped:
        out.pop("hostname", None)  # the guest's hostname is the pod's; crun refuses it without a new uts ns
        out.pop("domainname", None)
    if "user" in dropped:
        linux.pop("uidMappings", None)
        linux.pop("gidMappings", None)
    linux["cgroupsPath"] = guest_cgroups_path(container_id)
    if isinstance(linux.get("resources"), dict):
        linux["resources"] = guest_resources(linux["resources"])
    linux.pop("mountLabel", None)
    out["linux"] = linux

    mounts = []
    for m in out.get("mounts") or []:
        m = dict(m)
        if is_bind(m):
            m["source"] = _bind_source(str(m.get("source", "")), sources)
        mounts.append(m)
    out["mounts"] = mounts + pod_file_mounts(pod_files, mounts)
    return out


def load_spec(data: bytes) -> dict[str, _Any]:
    """Parse config.json; InvalidArgument when it is not a JSON object."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidArgument(f"config.json is not JSON: {e}") from e
    if not isinstance(doc, dict):
        raise InvalidArgument("config.json is not a JSON object")
    return doc
