"""The public API is exactly ``vmsandbox.__all__``: every name exists, is ours, is documented,
and nothing else public leaks from the package namespace."""

from __future__ import annotations

import __future__
import enum
import inspect
import types

import pytest

import vmsandbox

PUBLIC = [n for n in vmsandbox.__all__ if n != "__version__"]


def test_all_has_no_duplicates_and_no_private_names() -> None:
    assert len(set(vmsandbox.__all__)) == len(vmsandbox.__all__)
    assert [n for n in vmsandbox.__all__ if n.startswith("_") and n != "__version__"] == []


@pytest.mark.parametrize("name", vmsandbox.__all__)
def test_every_exported_name_exists(name: str) -> None:
    assert hasattr(vmsandbox, name), f"vmsandbox.__all__ lists {name!r}, which does not exist"


def test_star_import_gives_exactly_all() -> None:
    ns: dict[str, object] = {}
    exec("from vmsandbox import *", ns)
    assert sorted(k for k in ns if k != "__builtins__") == sorted(vmsandbox.__all__)


def test_version_is_a_string() -> None:
    assert isinstance(vmsandbox.__version__, str) and vmsandbox.__version__


@pytest.mark.parametrize("name", PUBLIC)
def test_exported_objects_are_ours_and_not_modules(name: str) -> None:
    obj = getattr(vmsandbox, name)
    assert not isinstance(obj, types.ModuleType), f"{name} is a module; export what it contains instead"
    module = getattr(obj, "__module__", "")
    assert module == "vmsandbox" or module.startswith("vmsandbox."), f"{name} re-exports {module}.{name}"
    # Private modules (a leading underscore anywhere in the path) must not show through.
    assert not any(part.startswith("_") for part in module.split(".")), f"{name} is defined in private {module}"


def _own_doc(obj: object) -> str:
    doc = inspect.getdoc(obj) or ""
    if inspect.isclass(obj) and doc.startswith(f"{obj.__name__}("):
        return ""  # the signature dataclasses put there when the class has no docstring
    if inspect.isclass(obj) and issubclass(obj, enum.Enum) and doc in ("An enumeration.", ""):
        return ""
    return doc


@pytest.mark.parametrize("name", PUBLIC)
def test_exported_objects_are_documented(name: str) -> None:
    assert _own_doc(getattr(vmsandbox, name)).strip(), f"vmsandbox.{name} has no docstring"


def _public_methods(cls: type) -> list[tuple[str, object]]:
    out = []
    for attr, value in vars(cls).items():
        if attr.startswith("_"):
            continue
        if isinstance(value, (staticmethod, classmethod)):
            out.append((attr, value.__func__))
        elif inspect.isfunction(value):
            out.append((attr, value))
    return out


@pytest.mark.parametrize("name", [n for n in PUBLIC if inspect.isclass(getattr(vmsandbox, n))])
def test_public_methods_of_exported_classes_are_documented(name: str) -> None:
    cls = getattr(vmsandbox, name)
    undocumented = [attr for attr, fn in _public_methods(cls) if not (inspect.getdoc(fn) or "").strip()]
    assert undocumented == [], f"vmsandbox.{name}: undocumented public methods {undocumented}"


def test_controller_protocol_has_the_nine_operations_and_the_implementation_satisfies_it() -> None:
    ops = {"create", "start", "platform", "stop", "wait", "status", "shutdown", "metrics", "update"}
    assert {a for a, _ in _public_methods(vmsandbox.Controller)} == ops
    for op in ops:
        assert callable(getattr(vmsandbox.LibvirtController, op))
        proto = inspect.signature(getattr(vmsandbox.Controller, op))
        impl = inspect.signature(getattr(vmsandbox.LibvirtController, op))
        assert list(impl.parameters) == list(proto.parameters), f"{op}: {impl} differs from the contract {proto}"


def test_errors_form_one_hierarchy() -> None:
    errors = [getattr(vmsandbox, n) for n in PUBLIC if inspect.isclass(getattr(vmsandbox, n))
              and issubclass(getattr(vmsandbox, n), BaseException)]
    # containerd's errdefs classes under one base, and the SDK's CommandFailed (check=True)
    assert vmsandbox.VmSandboxError in errors and vmsandbox.CommandFailed in errors and len(errors) == 10
    for e in errors:
        assert issubclass(e, vmsandbox.VmSandboxError)
    err = vmsandbox.NotFound("sandbox x not found", sandbox_id="x")
    assert err.sandbox_id == "x" and str(err) == "sandbox x not found"


def test_nothing_public_leaks_from_the_namespace() -> None:
    """Every public attribute of the package is listed in __all__, or is one of its submodules
    (Python binds imported submodules on the package; they are not part of the API)."""
    leaked = []
    for attr, value in vars(vmsandbox).items():
        if attr.startswith("_") or attr in vmsandbox.__all__:
            continue
        if isinstance(value, types.ModuleType) and value.__name__ == f"vmsandbox.{attr}":
            continue
        if isinstance(value, __future__._Feature):
            continue  # `from __future__ import annotations` binds this name; harmless
        leaked.append(attr)
    assert leaked == [], f"public names outside __all__: {leaked}"


def test_no_exported_name_shadows_a_typing_name() -> None:
    """``from vmsandbox import *`` next to ``from typing import *`` must not replace, say, typing.Any."""
    import typing

    assert sorted(set(vmsandbox.__all__) & set(typing.__all__)) == []
