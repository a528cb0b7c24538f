"""The README's examples are tests: each ```python block after a ``<!-- readme-test: NAME -->``
line runs as its own program, as a reader would run it, and must exit 0 (the blocks assert
what they show). They run in a folder holding ``busybox.tar`` (tests/ocibuild.py, with User ``app``), against a
state dir of their own (the session's guest image and templates are linked in, not rebuilt).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import REPO

pytestmark = pytest.mark.integration

_BLOCK = re.compile(r"<!-- readme-test: ([\w-]+) -->\n```python\n(.*?)\n```", re.S)


def readme_examples() -> list[tuple[str, str]]:
    return _BLOCK.findall((REPO / "README.md").read_text())


def test_the_readme_has_sdk_examples() -> None:
    names = [n for n, _ in readme_examples()]
    assert {"sdk-basics", "sdk-processes", "sdk-files", "sdk-terminal"} <= set(names), names
    assert len(names) == len(set(names))


@pytest.fixture(scope="module")
def example_env(test_root: Path, state_dir: Path, controller: object) -> dict[str, str]:
    """A state dir for the examples' own controllers, with the session's built guest image
    and start templates hard-linked in (the session controller built them)."""
    own = test_root / "readme-state"
    own.mkdir(exist_ok=True)
    for sub in ("images", "templates"):
        if (state_dir / sub).exists() and not (own / sub).exists():
            shutil.copytree(state_dir / sub, own / sub, copy_function=os.link)
    env = dict(os.environ, VMSANDBOX_STATE_DIR=str(own), PYTHONPATH=str(REPO))
    return env


@pytest.mark.parametrize("name,code", readme_examples(), ids=[n for n, _ in readme_examples()])
def test_readme_example(name: str, code: str, example_env: dict[str, str], qemu_tmp: Path) -> None:
    from tests.ocibuild import BUSYBOX_CONFIG, build_busybox_image

    build_busybox_image(qemu_tmp / "busybox.tar", fmt="docker-save-oci", config={**BUSYBOX_CONFIG, "User": "app"})
    (qemu_tmp / "example.py").write_text(code + "\n")
    r = subprocess.run([sys.executable, "example.py"], cwd=qemu_tmp, env=example_env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, f"README example {name} failed:\n{r.stdout}\n{r.stderr}"
    state = Path(example_env["VMSANDBOX_STATE_DIR"])
    left = list((state / "sandboxes").iterdir()) if (state / "sandboxes").exists() else []
    assert left == [], f"README example {name} left sandboxes behind: {left}"
