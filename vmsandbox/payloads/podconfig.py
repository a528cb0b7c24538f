"""The pod's ``runtime.v1.PodSandboxConfig`` that containerd's CRI sends in Create's options.

:func:`parse_pod_config` turns the options Any into a typed :class:`PodConfig`; :func:`vcpus_from`
and :func:`memory_mib_from` size the VM from the pod's resources plus its RuntimeClass
overhead. Only the fields vmsandbox uses are decoded; everything else in the message is ignored.
:meth:`PodConfig.to_json` / :meth:`PodConfig.from_json` keep it in a sandbox's record.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from fractions import Fraction
from typing import Any, get_args, get_origin, get_type_hints

from google.protobuf.message import DecodeError

from ..errors import InvalidArgument
from ..model import AnyMessage
from ..proto.k8s.runtime.v1 import api_pb2

__all__ = [
    "POD_SANDBOX_CONFIG_TYPE",
    "PodConfig",
    "PortMapping",
    "parse_pod_config",
    "vcpus_from",
    "memory_mib_from",
]

#: typeurl of the message (containerd writes the bare proto full name).
POD_SANDBOX_CONFIG_TYPE = "runtime.v1.PodSandboxConfig"

MiB = 1024 * 1024


@dataclass(frozen=True)
class PortMapping:
    """One ``PortMapping``; ``protocol`` is ``TCP``, ``UDP`` or ``SCTP``."""

    protocol: str
    container_port: int
    host_port: int = 0
    host_ip: str = ""


@dataclass(frozen=True)
class PodConfig:
    """The fields of a ``PodSandboxConfig`` that vmsandbox reads.

    Resource figures are CFS values in microseconds and byte counts, 0 when not specified, as
    in CRI. ``cpu_*``/``memory_limit_bytes`` come from ``linux.resources`` (the sum of the
    pod's containers), ``overhead_*`` from ``linux.overhead`` (the RuntimeClass overhead).
    """

    name: str = ""
    uid: str = ""
    namespace: str = ""
    attempt: int = 0
    hostname: str = ""
    log_directory: str = ""
    dns_servers: tuple[str, ...] = ()
    dns_searches: tuple[str, ...] = ()
    dns_options: tuple[str, ...] = ()
    port_mappings: tuple[PortMapping, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    cgroup_parent: str = ""
    sysctls: dict[str, str] = field(default_factory=dict)
    cpu_quota: int = 0
    cpu_period: int = 0
    cpu_shares: int = 0
    cpuset_cpus: str = ""
    memory_limit_bytes: int = 0
    overhead_cpu_quota: int = 0
    overhead_cpu_period: int = 0
    overhead_memory_limit_bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        """Every field as JSON values (``json.dumps`` works on it); read back by :meth:`from_json`."""
        return _to_json(self)

    @classmethod
    def from_json(cls, data: object) -> PodConfig:
        """Rebuild a pod config written by :meth:`to_json` (a field it lacks takes its default).

        Raises InvalidArgument naming the first field that is missing or not of its type.
        """
        pod: PodConfig = _from_json(cls, data, "pod config")
        return pod


_JSON_KIND: dict[object, str] = {tuple: "a list", dict: "an object", str: "a string", int: "an integer"}


def _to_json(obj: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, tuple):
            v = [_to_json(x) if is_dataclass(x) else x for x in v]
        elif isinstance(v, dict):
            v = dict(v)
        out[f.name] = v
    return out


def _from_json(cls: Any, data: object, where: str) -> Any:
    if not isinstance(data, dict):
        raise InvalidArgument(f"{where} must be an object, not {type(data).__name__}")
    hints = get_type_hints(cls)
    values = {}
    for f in fields(cls):
        if f.name in data:
            values[f.name] = _value(hints[f.name], data[f.name], f"{where}.{f.name}")
        elif f.default is MISSING and f.default_factory is MISSING:
            raise InvalidArgument(f"{where} lacks {f.name!r}")
    return cls(**values)


def _value(hint: Any, v: object, where: str) -> Any:
    origin, args = get_origin(hint), get_args(hint)
    if is_dataclass(hint):
        return _from_json(hint, v, where)
    if origin is tuple and isinstance(v, list):
        return tuple(_value(args[0], x, f"{where}[{i}]") for i, x in enumerate(v))
    if origin is dict and isinstance(v, dict):
        return {k: _value(args[1], x, f"{where}[{k!r}]") for k, x in v.items()}
    if hint in (str, int) and type(v) is hint:  # a JSON true is no int here
        return v
    raise InvalidArgument(f"{where} must be {_JSON_KIND.get(origin or hint, hint)}, not {v!r}")


def parse_pod_config(any: AnyMessage | None) -> PodConfig | None:
    """Decode Create's options when they hold a ``runtime.v1.PodSandboxConfig``.

    Returns None for no options or options of another type (the caller keeps unknown types
    rather than rejecting them). Accepts the bare and the ``type.googleapis.com/`` type URL.
    Raises InvalidArgument when the type matches but the bytes do not decode.
    """
    if any is None or any.type_name != POD_SANDBOX_CONFIG_TYPE:
        return None
    msg = api_pb2.PodSandboxConfig()
    try:
        msg.ParseFromString(any.value)
    except DecodeError as e:
        raise InvalidArgument(f"cannot decode {POD_SANDBOX_CONFIG_TYPE} in create options: {e}") from e
    md, dns, linux = msg.metadata, msg.dns_config, msg.linux
    res, ovh = linux.resources, linux.overhead
    return PodConfig(
        name=md.name,
        uid=md.uid,
        namespace=md.namespace,
        attempt=md.attempt,
        hostname=msg.hostname,
        log_directory=msg.log_directory,
        dns_servers=tuple(dns.servers),
        dns_searches=tuple(dns.searches),
        dns_options=tuple(dns.options),
        port_mappings=tuple(
            PortMapping(
                protocol=api_pb2.Protocol.Name(p.protocol) if p.protocol in api_pb2.Protocol.values() else str(p.protocol),
                container_port=p.container_port,
                host_port=p.host_port,
                host_ip=p.host_ip,
            )
            for p in msg.port_mappings
        ),
        labels=dict(msg.labels),
        annotations=dict(msg.annotations),
        cgroup_parent=linux.cgroup_parent,
        sysctls=dict(linux.sysctls),
        cpu_quota=res.cpu_quota,
        cpu_period=res.cpu_period,
        cpu_shares=res.cpu_shares,
        cpuset_cpus=res.cpuset_cpus,
        memory_limit_bytes=res.memory_limit_in_bytes,
        overhead_cpu_quota=ovh.cpu_quota,
        overhead_cpu_period=ovh.cpu_period,
        overhead_memory_limit_bytes=ovh.memory_limit_in_bytes,
    )


def vcpus_from(pc: PodConfig) -> int | None:
    """vCPUs for the pod's CPU limit plus overhead: ceil(quota / period); None without a limit.

    The overhead counts only when the pod itself has a limit (quota > 0 and period > 0); it is
    taken over its own period (the pod's when unset). Exact arithmetic, no float rounding.
    """
    if pc.cpu_quota <= 0 or pc.cpu_period <= 0:
        return None
    cpus = Fraction(pc.cpu_quota, pc.cpu_period)
    if pc.overhead_cpu_quota > 0:
        ovh_period = pc.overhead_cpu_period if pc.overhead_cpu_period > 0 else pc.cpu_period
        cpus += Fraction(pc.overhead_cpu_quota, ovh_period)
    return max(1, math.ceil(cpus))


def memory_mib_from(pc: PodConfig) -> int | None:
    """MiB for the pod's memory limit plus overhead, rounded up; None without a limit."""
    if pc.memory_limit_bytes <= 0:
        return None
    total = pc.memory_limit_bytes + max(0, pc.overhead_memory_limit_bytes)
    return -(-total // MiB)
