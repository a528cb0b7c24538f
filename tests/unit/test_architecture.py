"""The shape of the code, checked: which module may import which library, and module sizes.

Orchestration (vmsandbox/sandbox) reaches libvirt, pyroute2 and paramiko only through the
ports; each of those libraries has one adapter package; the gRPC server depends on the
contract, not on the orchestration.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "vmsandbox"
ADAPTER_OF = {"libvirt": "hypervisor", "pyroute2": "network", "paramiko": "guest"}
ADAPTER_MODULES = {"vmsandbox.hypervisor.libvirt_driver", "vmsandbox.network._wiring", "vmsandbox.network._netlink",
                   "vmsandbox.guest.agent", "vmsandbox.network"}


def modules() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if "proto" not in p.relative_to(PKG).parts)


def imports(path: Path) -> set[str]:
    """Absolute names of everything ``path`` imports (relative imports resolved)."""
    mod = ".".join(("vmsandbox",) + path.relative_to(PKG).with_suffix("").parts).removesuffix(".__init__")
    pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}
    return out


@pytest.mark.parametrize("library, package", sorted(ADAPTER_OF.items()))
def test_each_library_has_one_adapter_package(library: str, package: str) -> None:
    users = [p.relative_to(PKG).as_posix() for p in modules()
             if any(i == library or i.startswith(library + ".") for i in imports(p))]
    assert users and all(u.startswith(package + "/") for u in users), users


def test_orchestration_imports_no_adapter() -> None:
    for p in (PKG / "sandbox").glob("*.py"):
        bad = {i for i in imports(p) if i in ADAPTER_MODULES or i.split(".")[0] in (*ADAPTER_OF, "grpc")}
        assert not bad, f"{p.name} imports {bad}"


def test_the_server_depends_on_the_contract_only() -> None:
    for p in (PKG / "server").glob("*.py"):
        bad = {i for i in imports(p) if i.startswith(("vmsandbox.sandbox", "vmsandbox.hypervisor", "vmsandbox.network",
                                                        "vmsandbox.guest", "vmsandbox.host"))}
        assert not bad, f"server/{p.name} imports {bad}"


def test_payloads_are_pure() -> None:
    """What containerd carries in an Any is decoded by protobuf alone: no adapter library, no
    grpc, nothing of the orchestration or the adapters."""
    allowed = ("vmsandbox.payloads", "vmsandbox.proto", "vmsandbox.errors", "vmsandbox.model", "google.protobuf")
    for p in (PKG / "payloads").glob("*.py"):
        bad = {i for i in imports(p) if i.startswith("vmsandbox") or i.split(".")[0] in (*ADAPTER_OF, "grpc", "google")}
        bad = {i for i in bad if not i.startswith(allowed)}
        assert not bad, f"payloads/{p.name} imports {bad}"


def test_ttrpc_is_the_wire_protocol_only() -> None:
    """ttrpc needs protobuf and nothing else: no grpc, no adapter, no task, no orchestration."""
    allowed = ("vmsandbox.ttrpc", "vmsandbox.proto", "vmsandbox.errors", "vmsandbox.codes", "vmsandbox.unixsocket")
    for p in (PKG / "ttrpc").glob("*.py"):
        bad = {i for i in imports(p) if i.startswith("vmsandbox") and not i.startswith(allowed)}
        bad |= {i for i in imports(p) if i.split(".")[0] in (*ADAPTER_OF, "grpc")}
        assert not bad, f"ttrpc/{p.name} imports {bad}"


def test_the_task_service_reaches_no_adapter_library() -> None:
    for p in (PKG / "task").glob("*.py"):
        bad = {i for i in imports(p) if i in ADAPTER_MODULES or i.split(".")[0] in (*ADAPTER_OF, "grpc")}
        bad |= {i for i in imports(p) if i.startswith(("vmsandbox.hypervisor", "vmsandbox.server", "vmsandbox.host"))}
        assert not bad, f"task/{p.name} imports {bad}"


def test_no_module_is_over_500_lines() -> None:
    long = {p.relative_to(PKG).as_posix(): n for p in modules() if (n := len(p.read_text().splitlines())) > 500}
    assert not long, long


CONCRETE = ("vmsandbox.host", "vmsandbox.hypervisor", "vmsandbox.network", "vmsandbox.guest", "vmsandbox.server",
            "vmsandbox.sandbox")


@pytest.mark.parametrize("path", sorted((PKG / "cli").glob("*.py")), ids=lambda p: f"cli/{p.name}")
def test_in_the_cli_only_wiring_picks_concrete_parts(path: Path) -> None:
    """The CLI is the composition root; its parser, commands, doctor and output name no
    adapter, orchestration or server: they get them from cli/wiring.py."""
    bad = {i for i in imports(path) if i.startswith(CONCRETE)}
    assert path.name == "wiring.py" or not bad, f"cli/{path.name} imports {bad}"


def test_nothing_but_the_entry_points_imports_the_cli() -> None:
    users = {p.relative_to(PKG).as_posix() for p in modules() if p.parent.name != "cli"
             and any(i == "vmsandbox.cli" or i.startswith("vmsandbox.cli.") for i in imports(p))}
    assert users <= {"__main__.py"}, users
