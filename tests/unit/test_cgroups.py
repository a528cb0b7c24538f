"""cgroup_parent placement over a fake /sys/fs/cgroup tree."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmsandbox import InvalidArgument
from vmsandbox.sandbox.cgroups import cgroup_relpath, libvirt_partition, place_process


def test_relpath_of_both_drivers() -> None:
    assert cgroup_relpath("/kubepods/burstable/pod1") == "kubepods/burstable/pod1"
    assert cgroup_relpath("kubepods-burstable-pod1.slice") == \
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice"
    assert cgroup_relpath("kubepods.slice") == "kubepods.slice"
    for bad in ("/kubepods/../etc", "..", "a\nb"):
        with pytest.raises(InvalidArgument):
            cgroup_relpath(bad)


def _cgroup(d: Path) -> Path:
    d.mkdir(parents=True)
    (d / "cgroup.procs").write_text("")
    return d


def test_v1_hierarchies_where_the_cgroup_exists(tmp_path: Path) -> None:
    cpu = _cgroup(tmp_path / "cpu" / "kubepods" / "pod1")
    mem = _cgroup(tmp_path / "memory" / "kubepods" / "pod1")
    (tmp_path / "pids").mkdir()  # hierarchy without that cgroup: skipped
    placed = place_process(os.getpid(), "/kubepods/pod1", root=tmp_path)
    assert placed == [cpu, mem]
    assert (cpu / "cgroup.procs").read_text() == f"{os.getpid()}\n"


def test_v2_unified_and_missing(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpu memory\n")
    pod = _cgroup(tmp_path / "kubepods.slice" / "kubepods-pod2.slice")
    assert place_process(42, "kubepods-pod2.slice", root=tmp_path) == [pod]
    assert place_process(42, "kubepods-nothere.slice", root=tmp_path) == []


@pytest.mark.parametrize("parent, partition", [
    ("kubepods-burstable-pod1.slice", "/kubepods/burstable/pod1"),
    ("kubepods.slice", "/kubepods"),
    ("/kubepods/burstable/pod1", ""),  # cgroupfs driver: libvirt would look under *.partition
    ("kubepods--x.slice", ""),
    ("kubepods", ""),
])
def test_libvirt_partition_only_for_systemd_slices(tmp_path: Path, parent: str, partition: str) -> None:
    (tmp_path / "systemd").mkdir()
    assert libvirt_partition(parent, systemd_run=tmp_path / "systemd") == partition
    assert libvirt_partition(parent, systemd_run=tmp_path / "absent") == ""
