"""The libvirt -> vmsandbox error table (one place, at the adapter's edge)."""

from __future__ import annotations

import libvirt
import pytest

from vmsandbox import AlreadyExists, FailedPrecondition, Internal, NotFound, Unavailable
from vmsandbox.hypervisor.libvirt_driver import start_refused, translate


def err(code: int, domain: int, msg: str = "boom") -> libvirt.libvirtError:
    e = libvirt.libvirtError(msg)
    e.err = (code, domain, msg, libvirt.VIR_ERR_ERROR, "", "", "", 0, 0)
    return e


@pytest.mark.parametrize(("code", "domain", "cls"), [
    (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_FROM_QEMU, NotFound),
    (libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_FROM_REMOTE, Unavailable),
    (libvirt.VIR_ERR_RPC, libvirt.VIR_FROM_RPC, Unavailable),
    (libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_RPC, Unavailable),  # socket to libvirtd
    (libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_QEMU, Internal),  # failure inside the daemon
    (libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_FROM_DOMAIN, FailedPrecondition),
    (libvirt.VIR_ERR_XML_ERROR, libvirt.VIR_FROM_DOMAIN, Internal),
    # Retrying cannot cure these: not Unavailable, which containerd retries forever.
    (libvirt.VIR_ERR_AUTH_FAILED, libvirt.VIR_FROM_REMOTE, FailedPrecondition),
    (libvirt.VIR_ERR_ACCESS_DENIED, libvirt.VIR_FROM_ACCESS, FailedPrecondition),
])
def test_translate(code: int, domain: int, cls: type) -> None:
    out = translate(err(code, domain, "detail"), "doing it")
    assert type(out) is cls
    assert "doing it" in str(out) and "detail" in str(out)


def test_a_name_clash_is_already_exists() -> None:
    e = err(libvirt.VIR_ERR_OPERATION_FAILED, libvirt.VIR_FROM_DOMAIN,
            "operation failed: domain 'vmsandbox-a' already exists with uuid 1234")
    assert type(translate(e, "defining domain vmsandbox-a")) is AlreadyExists
    other = err(libvirt.VIR_ERR_OPERATION_FAILED, libvirt.VIR_FROM_DOMAIN, "operation failed: no more ports")
    assert type(translate(other, "starting")) is FailedPrecondition


@pytest.mark.parametrize(("code", "domain", "refused"), [
    (libvirt.VIR_ERR_INTERNAL_ERROR, libvirt.VIR_FROM_QEMU, True),  # QEMU's own words
    (libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_STORAGE, True),  # "Cannot access storage file"
    (libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_RPC, False),  # the socket to libvirtd
    (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_FROM_QEMU, False),
])
def test_which_start_failures_are_the_vm_refusing_to_start(code: int, domain: int, refused: bool) -> None:
    assert start_refused(err(code, domain)) is refused
