"""The one error -> status code table, shared by the gRPC server and ttrpc."""

from __future__ import annotations

import grpc
import pytest

from vmsandbox import errors
from vmsandbox.codes import ERROR_CODES, Code, code_for, error_for
from vmsandbox.server import ERROR_CODES as GRPC_CODES


def test_the_grpc_table_is_the_same_table() -> None:
    assert {cls: code.value[0] for cls, code in GRPC_CODES.items()} == {cls: int(c) for cls, c in ERROR_CODES.items()}
    assert {c.name for c in Code} == {sc.name for sc in grpc.StatusCode}
    assert all(Code[sc.name] == sc.value[0] for sc in grpc.StatusCode)


def test_every_error_class_has_a_code() -> None:
    classes = {getattr(errors, n) for n in errors.__all__} - {errors.VmSandboxError}
    assert classes == set(ERROR_CODES)


def test_a_subclass_gets_its_base_code_and_anything_else_is_internal() -> None:
    class Gone(errors.NotFound):
        pass

    assert code_for(Gone("x")) is Code.NOT_FOUND
    assert code_for(errors.VmSandboxError("x")) is Code.INTERNAL
    assert code_for(KeyError("x")) is Code.INTERNAL


@pytest.mark.parametrize("cls", sorted(ERROR_CODES, key=lambda c: c.__name__))
def test_error_for_inverts_the_table(cls: type[errors.VmSandboxError]) -> None:
    err = error_for(int(ERROR_CODES[cls]), "it went wrong")
    assert type(err) is cls and str(err) == "it went wrong"


def test_codes_without_a_class_keep_their_name() -> None:
    err = error_for(Code.RESOURCE_EXHAUSTED, "too big")
    assert isinstance(err, errors.Internal) and str(err) == "RESOURCE_EXHAUSTED: too big"
    assert str(error_for(99, "odd")) == "status code 99: odd"
