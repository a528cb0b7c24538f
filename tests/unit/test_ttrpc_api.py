"""vmsandbox.ttrpc's curated API: what ``__all__`` lists exists, is ours and is documented."""

from __future__ import annotations

import inspect

import pytest

from vmsandbox import ttrpc


def test_star_import_gives_exactly_all() -> None:
    ns: dict[str, object] = {}
    exec("from vmsandbox.ttrpc import *", ns)
    assert sorted(k for k in ns if k != "__builtins__") == sorted(ttrpc.__all__)


@pytest.mark.parametrize("name", [n for n in ttrpc.__all__ if callable(getattr(ttrpc, n))])
def test_exported_callables_are_ours_and_documented(name: str) -> None:
    obj = getattr(ttrpc, name)
    assert obj.__module__.startswith("vmsandbox.ttrpc.") and "._" not in obj.__module__
    assert (inspect.getdoc(obj) or "").strip(), f"{name} has no docstring"
    if inspect.isclass(obj):
        bare = [a for a, v in vars(obj).items() if inspect.isfunction(v) and not a.startswith("_")
                and not (inspect.getdoc(v) or "").strip()]
        assert bare == [], f"{name}: undocumented public methods {bare}"
