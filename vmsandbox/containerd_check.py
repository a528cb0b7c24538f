"""`vmsandbox doctor --containerd SOCKET`: is this node's containerd set up to use vmsandbox?

Asks containerd itself, over its gRPC socket: its version (2.0 or later has the sandbox
API), whether the ``vmsandbox`` sandbox proxy plugin is loaded (introspection), whether a CRI
runtime handler uses it as its sandboxer (CRI's verbose status carries the CRI config), and,
on containerd 2.3 and later, which pull the pause image before any sandboxer runs, whether
that image is present (an offline node must import it).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import grpc

from .proto.containerd.services.introspection.v1 import introspection_pb2 as intro
from .proto.containerd.services.introspection.v1 import introspection_pb2_grpc as intro_grpc
from .proto.k8s.runtime.v1 import api_pb2 as cri
from .proto.k8s.runtime.v1 import api_pb2_grpc as cri_grpc

__all__ = ["Check", "check_containerd", "DEFAULT_PAUSE_IMAGE"]

SANDBOX_PLUGIN_TYPE = "io.containerd.sandbox.controller.v1"
DEFAULT_PAUSE_IMAGE = "registry.k8s.io/pause:3.10.2"
"""What containerd 2.3's CRI pins as its sandbox image unless configured otherwise."""


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    required: bool = True


def _version(text: str) -> tuple[int, int, int]:
    m = re.match(r"v?(\d+)\.(\d+)(?:\.(\d+))?", text)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)) if m else (0, 0, 0)


def check_containerd(socket: str, *, sandboxer: str = "vmsandbox", pause_image: str | None = None,
                     timeout: float = 5.0) -> list[Check]:
    """The checks, in order; stops early when containerd does not answer."""
    checks: list[Check] = []
    channel = grpc.insecure_channel(f"unix:{socket}")
    try:
        runtime = cri_grpc.RuntimeServiceStub(channel)  # type: ignore[no-untyped-call]
        try:
            ver = runtime.Version(cri.VersionRequest(), timeout=timeout)
        except grpc.RpcError as e:
            return [Check("containerd", False, f"no CRI answer on {socket}: {e.details() if isinstance(e, grpc.Call) else e}")]
        version = _version(ver.runtime_version)
        checks.append(Check("containerd", ver.runtime_name == "containerd" and version >= (2, 0, 0),
                            f"{ver.runtime_name} {ver.runtime_version}" + (
                                "" if version >= (2, 0, 0) else ": containerd 2.0 or later is needed (sandbox API)")))

        try:
            plugins = intro_grpc.IntrospectionStub(channel).Plugins(  # type: ignore[no-untyped-call]
                intro.PluginsRequest(filters=[f"type=={SANDBOX_PLUGIN_TYPE}"]), timeout=timeout).plugins
            ours = [p for p in plugins if p.id == sandboxer]
            if not ours:
                checks.append(Check("proxy plugin", False, f"no [proxy_plugins.{sandboxer}] type = \"sandbox\" loaded "
                                    f"(loaded sandbox controllers: {', '.join(p.id for p in plugins) or 'none'})"))
            elif ours[0].HasField("init_err") and ours[0].init_err.code:
                checks.append(Check("proxy plugin", False, f"{sandboxer} failed to load: {ours[0].init_err.message}"))
            else:
                checks.append(Check("proxy plugin", True, f"{SANDBOX_PLUGIN_TYPE} {sandboxer} loaded"))
        except grpc.RpcError as e:
            checks.append(Check("proxy plugin", False, f"introspection failed: {e}"))

        try:
            info = runtime.Status(cri.StatusRequest(verbose=True), timeout=timeout).info
            runtimes = json.loads(info.get("config", "{}")).get("containerd", {}).get("runtimes", {})
            handlers = sorted(n for n, r in runtimes.items() if isinstance(r, dict) and r.get("sandboxer") == sandboxer)
            with_options = [n for n in handlers if runtimes[n].get("options")]
            detail = (f"runtime handler(s) {', '.join(handlers)} use sandboxer {sandboxer}" if handlers
                      else f"no CRI runtime has sandboxer = \"{sandboxer}\"")
            # containerd 2.1.0-2.3.0 cannot start a task in a sandbox whose runtime has a
            # non-runc options table (it unmarshals them as runc options).
            options_break = bool(with_options) and (2, 1, 0) <= version <= (2, 3, 0)
            if options_break:
                detail += f"; remove the options table of {', '.join(with_options)} (containerd 2.1.0-2.3.0)"
            checks.append(Check("runtime handler", bool(handlers) and not options_break, detail))
        except (grpc.RpcError, ValueError) as e:
            checks.append(Check("runtime handler", False, f"cannot read CRI's config: {e}"))

        image = pause_image or DEFAULT_PAUSE_IMAGE
        needed = version >= (2, 3, 0)
        try:
            found = cri_grpc.ImageServiceStub(channel).ImageStatus(  # type: ignore[no-untyped-call]
                cri.ImageStatusRequest(image=cri.ImageSpec(image=image)), timeout=timeout).HasField("image")
        except grpc.RpcError:
            found = False
        if found:
            checks.append(Check("pause image", True, f"{image} present", required=needed))
        else:
            why = ("containerd >= 2.3 pulls it before any sandboxer runs: import it on an offline node "
                   "(ctr -n k8s.io images import)") if needed else "not needed by this containerd"
            checks.append(Check("pause image", not needed, f"{image} missing; {why}", required=needed))
    finally:
        channel.close()
    return checks
