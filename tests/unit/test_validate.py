"""Sandbox ids and resource annotations: what is accepted, what is refused and why."""

from __future__ import annotations

import pytest

from vmsandbox import InvalidArgument
from vmsandbox.sandbox.validate import (
    ANNOTATION_MEMORY_MIB,
    ANNOTATION_VCPUS,
    MIN_MEMORY_MIB,
    check_sandbox_id,
    resources_from_annotations,
)

LIMITS = {"max_vcpus": 8, "max_memory_mib": 4096}


@pytest.mark.parametrize(
    "sid",
    [
        "a",
        "0",
        "sandbox-1",
        "3f2a9c0e8b7d4e6f9a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8091a2b3c4d5",  # containerd's 64-hex ids
        "pod_x.y:z@w+v-u",
        "x" * 128,
        "a.b",
        "A-Z",
    ],
)
def test_safe_ids_are_returned_unchanged(sid: str) -> None:
    assert check_sandbox_id(sid) == sid


@pytest.mark.parametrize(
    "sid",
    [
        "",
        "a/b",
        "..",
        "a..b",
        ".hidden",
        "-flag",
        "_x",
        "x" * 129,
        "bad\n",
        "sp ace",
        "tab\t",
        "nul\0",
        "é",
        "a\\b",
        "$(id)",
        "a;b",
        "a*",
        "/abs",
    ],
)
def test_unsafe_ids_are_refused(sid: str) -> None:
    with pytest.raises(InvalidArgument):
        check_sandbox_id(sid)


@pytest.mark.parametrize("sid", [None, 1, b"abc", ["a"]])
def test_non_string_ids_are_refused(sid: object) -> None:
    with pytest.raises(InvalidArgument, match="non-empty string"):
        check_sandbox_id(sid)


def test_the_error_names_the_limit_for_a_long_id() -> None:
    with pytest.raises(InvalidArgument, match="128"):
        check_sandbox_id("x" * 129)


def test_no_annotations_leave_the_defaults_to_the_caller() -> None:
    assert resources_from_annotations({}, **LIMITS) == (None, None)
    assert resources_from_annotations({"io.kubernetes.cri.sandbox-name": "x", "other": "7"}, **LIMITS) == (None, None)


@pytest.mark.parametrize(
    ("annotations", "expected"),
    [
        ({ANNOTATION_VCPUS: "2"}, (2, None)),
        ({ANNOTATION_MEMORY_MIB: "384"}, (None, 384)),
        ({ANNOTATION_VCPUS: "1", ANNOTATION_MEMORY_MIB: str(MIN_MEMORY_MIB)}, (1, MIN_MEMORY_MIB)),
        ({ANNOTATION_VCPUS: " 8 ", ANNOTATION_MEMORY_MIB: "4096\n"}, (8, 4096)),  # limits are inclusive
        ({ANNOTATION_VCPUS: "007"}, (7, None)),
    ],
)
def test_good_resource_annotations(annotations: dict[str, str], expected: tuple[int | None, int | None]) -> None:
    assert resources_from_annotations(annotations, **LIMITS) == expected


@pytest.mark.parametrize(
    ("key", "value", "why"),
    [
        (ANNOTATION_VCPUS, "0", "out of range"),
        (ANNOTATION_VCPUS, "-1", "out of range"),
        (ANNOTATION_VCPUS, "9", "out of range"),
        (ANNOTATION_VCPUS, "abc", "whole number"),
        (ANNOTATION_VCPUS, "1.5", "whole number"),
        (ANNOTATION_VCPUS, "", "whole number"),
        (ANNOTATION_VCPUS, "0x2", "whole number"),
        (ANNOTATION_MEMORY_MIB, "1", "out of range"),
        (ANNOTATION_MEMORY_MIB, str(MIN_MEMORY_MIB - 1), "out of range"),
        (ANNOTATION_MEMORY_MIB, "4097", "out of range"),
        (ANNOTATION_MEMORY_MIB, "256Mi", "whole number"),
        (ANNOTATION_MEMORY_MIB, "1e3", "whole number"),
    ],
)
def test_bad_resource_annotations_are_refused_naming_the_key(key: str, value: str, why: str) -> None:
    with pytest.raises(InvalidArgument, match=why) as err:
        resources_from_annotations({key: value}, **LIMITS)
    assert key in str(err.value)
