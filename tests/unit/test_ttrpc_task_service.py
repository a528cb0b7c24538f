"""The containerd.task.v3.Task skeleton: every rpc of shim.proto is served, each Unimplemented."""

from __future__ import annotations

import pytest

from tests.unit.ttrpc_rig import ME, socket_dir
from vmsandbox import errors
from vmsandbox.proto.containerd.task.v3 import shim_pb2 as pb
from vmsandbox.task import RPCS, SERVICE_NAME, TaskService
from vmsandbox.ttrpc import Client, Server

SERVICE = pb.DESCRIPTOR.services_by_name["Task"]


def test_the_table_is_every_rpc_of_the_proto_with_its_types() -> None:
    assert SERVICE.full_name == SERVICE_NAME
    assert [(name, req.DESCRIPTOR.full_name, resp.DESCRIPTOR.full_name) for name, req, resp in RPCS] == [
        (m.name, m.input_type.full_name, m.output_type.full_name) for m in SERVICE.methods]
    assert len(RPCS) == 17


def test_every_rpc_answers_unimplemented_over_ttrpc() -> None:
    with socket_dir() as d, Server(allowed_uids=(ME,)) as server:
        TaskService().register(server)
        server.start(f"{d}/task.sock")
        with Client(f"ttrpc+unix://{server.path}") as c:
            for name, req, resp in RPCS:
                with pytest.raises(errors.Unimplemented, match=f"^{SERVICE_NAME}/{name} is not implemented yet$"):
                    c.call(SERVICE_NAME, name, req(), resp, timeout=5)
            with pytest.raises(errors.Unimplemented, match="^method Events$"):  # not in 2.1's proto
                c.call(SERVICE_NAME, "Events", pb.StateRequest(), pb.StateResponse, timeout=5)
