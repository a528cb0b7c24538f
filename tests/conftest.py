"""Shared test fixtures.

Integration tests (marker ``integration``) need root, a running libvirtd and the tools that
hack/setup.sh installs. Locally they are skipped when those are missing; under CI
(``CI=true``) a skipped test is a failure, so CI cannot go green without booting guests.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
TEST_PREFIX = "vsbxt"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter is not None else 0
    if IN_CI and skipped:
        if reporter is not None:
            reporter.write_line(f"CI: {skipped} test(s) were skipped; in CI a skip is a failure", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _missing_prereqs() -> str | None:
    if os.geteuid() != 0:
        return "integration tests need root"
    try:
        import libvirt

        libvirt.open("qemu:///system").close()
    except Exception as e:  # noqa: BLE001
        return f"libvirtd does not answer on qemu:///system ({e}); run hack/setup.sh"
    for tool in ("mkfs.ext4", "gcc", "cpio", "/bin/busybox", "/usr/sbin/dropbear", "/usr/bin/crun",
                 "/usr/lib/qemu/virtiofsd"):
        if not (shutil.which(tool) or os.path.exists(tool)):
            return f"{tool} is missing; run hack/setup.sh"
    return None


@pytest.fixture(scope="session")
def prereqs() -> None:
    why = _missing_prereqs()
    if why:
        if IN_CI:
            pytest.fail(f"integration prerequisites missing in CI: {why}")
        pytest.skip(why)


def unique(name: str = "") -> str:
    """A unique name with the test prefix, for sandboxes, namespaces and files."""
    return f"{TEST_PREFIX}-{secrets.token_hex(3)}" + (f"-{name}" if name else "")


@pytest.fixture(scope="session")
def test_root(prereqs: None) -> Iterator[Path]:
    """A folder QEMU (running as libvirt-qemu) can traverse; pytest's tmp dirs are 0700."""
    d = Path(tempfile.mkdtemp(prefix=f"{TEST_PREFIX}-", dir="/var/tmp"))
    os.chmod(d, 0o711)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def qemu_tmp(test_root: Path) -> Iterator[Path]:
    """A per-test folder under :func:`test_root` for disk images QEMU must open."""
    d = Path(tempfile.mkdtemp(dir=test_root))
    os.chmod(d, 0o711)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def state_dir(test_root: Path) -> Iterator[Path]:
    """One state dir for the whole session (the guest image is built once into it)."""
    d = test_root / "state"
    d.mkdir()
    yield d


@pytest.fixture(scope="session")
def controller(state_dir: Path) -> Iterator[object]:
    from vmsandbox import LibvirtController

    c = LibvirtController(state_dir=state_dir, virt_type=os.environ.get("VMSANDBOX_VIRT_TYPE", "auto"))
    c.image()
    yield c
    for row in c.list():
        c.shutdown(row.id)
    c.close()
    assert_no_domains_left(state_dir)


def assert_no_domains_left(state_dir: Path) -> None:
    """No libvirt domain tagged with this state dir may remain."""
    import libvirt

    from vmsandbox.hypervisor.domain import METADATA_NS, parse_metadata

    conn = libvirt.open("qemu:///system")
    try:
        left = []
        for dom in conn.listAllDomains(0):
            try:
                meta = parse_metadata(dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS))
            except libvirt.libvirtError:
                continue
            if meta.get("state-dir") == str(state_dir):
                left.append(dom.name())
        assert not left, f"domains left behind: {left}"
    finally:
        conn.close()


@pytest.fixture
def sandbox_ids(controller: object) -> Iterator[list[str]]:
    """Append ids you create; they are shut down (and checked gone) after the test."""
    ids: list[str] = []
    yield ids
    for sid in ids:
        controller.shutdown(sid)  # type: ignore[attr-defined]
        assert not (controller.config.state_dir / "sandboxes" / sid).exists()  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def rootfs_image(test_root: Path) -> Path:
    """A busybox ext4 image made by hack/mkrootfs.sh (a template: copy before writing)."""
    out = test_root / "rootfs-template.img"
    subprocess.run(["bash", str(REPO / "hack" / "mkrootfs.sh"), str(out)], check=True, capture_output=True)
    return out


@pytest.fixture
def rootfs_copy(rootfs_image: Path, qemu_tmp: Path) -> Path:
    """A private writable copy of the busybox rootfs image (in a QEMU-reachable folder)."""
    dst = qemu_tmp / "rootfs.img"
    shutil.copyfile(rootfs_image, dst)
    return dst
