"""Fixtures of the unit tier: a controller over in-memory fakes (tests/unit/rig.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.rig import Rig


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.close()


@pytest.fixture
def quick_rig(tmp_path: Path) -> Iterator[Rig]:
    """A rig with short boot and stop deadlines, for tests that wait them out."""
    r = Rig(tmp_path, stop_timeout=0.3, boot_timeout=0.3)
    yield r
    r.close()
