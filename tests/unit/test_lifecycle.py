"""The lifecycle over fakes: create, start, stop, wait, shutdown, their rollbacks and retries.

No libvirtd, no guest: the same orchestration code as in production runs over the in-memory
hypervisor, network and guest agents of tests/unit/rig.py, with failpoints on every step.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.rig import Rig
from vmsandbox import errors
from vmsandbox.model import Phase, Sandbox


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.close()


def test_create_start_stop_wait_shutdown(rig: Rig) -> None:
    plan = rig.pod_netns()
    rig.ctl.create(Sandbox("a"), netns_path=plan.netns_path)
    assert rig.ctl.status("a").state == "SANDBOX_NOTREADY"
    inst = rig.ctl.start("a")
    assert inst.pid > 0 and rig.ctl.status("a").state == "SANDBOX_READY"
    assert not rig.net.netns[plan.netns_path].has_addresses  # the guest has them now
    rig.ctl.stop("a")
    st = rig.ctl.wait("a", timeout=5)
    assert st.exit_status == 0
    assert rig.net.netns[plan.netns_path].has_addresses  # given back at stop
    rig.ctl.shutdown("a")
    assert rig.leftovers("a") == []
    rig.ctl.shutdown("a")  # idempotent


def test_a_failed_start_removes_everything(rig: Rig) -> None:
    plan = rig.pod_netns()
    rig.ctl.create(Sandbox("a"), netns_path=plan.netns_path)
    rig.guests.fp.fail("connect", errors.DeadlineExceeded("guest agent did not answer in time"))
    with pytest.raises(errors.DeadlineExceeded):
        rig.ctl.start("a")
    assert rig.leftovers("a") == []
    assert rig.net.netns[plan.netns_path].has_addresses
    with pytest.raises(errors.NotFound):
        rig.ctl.status("a")
