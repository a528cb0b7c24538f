"""The network steps of the lifecycle: taps made at create (and noted until the record holds
them), the netns wired back at stop, everything removed at shutdown. Over the Network port."""

from __future__ import annotations

import logging
from contextlib import ExitStack

from ..errors import VmSandboxError
from ..network._model import NetworkPlan
from .ports import Network
from .store import SandboxRecord, Store
from .undo import quietly

__all__ = ["NetSteps"]

log = logging.getLogger(__name__)


class NetSteps:
    def __init__(self, network: Network, store: Store) -> None:
        self._net = network
        self._store = store

    def make_taps(self, sandbox_id: str, netns_path: str, plan: NetworkPlan | None, undo: ExitStack) -> list[str]:
        """The taps of a new sandbox (none without a netns), with their undo on ``undo``;
        first removes what an earlier create of the same id noted and could not remove."""
        if (noted := self._store.noted_taps(sandbox_id)) is not None:
            self.drop_taps(sandbox_id, *noted)
        if plan is None:
            return []
        taps = self._net.tap_names(sandbox_id, len(plan.interfaces))
        # All or nothing, and a taken name is refused: only what it made is ours.
        self._net.create_taps(taps)
        undo.callback(quietly(self.drop_taps, sandbox_id, netns_path, taps))
        self._store.note_taps(sandbox_id, netns_path, taps)
        return taps

    def drop_taps(self, sandbox_id: str, netns_path: str, taps: list[str]) -> None:
        """Remove taps a create made, then their note (kept when the removal fails)."""
        self._net.detach(netns_path, taps, None)
        self._store.forget_taps(sandbox_id)

    def unwire(self, rec: SandboxRecord) -> None:
        """Give the netns its interfaces back (addresses, no redirects); taps stay for a restart."""
        if rec.network is None:
            return
        try:
            self._net.detach(rec.netns_path, [], rec.network)
        except VmSandboxError as err:
            log.warning("sandbox %s: restoring its network namespace failed: %s", rec.id, err)

    def remove(self, rec: SandboxRecord) -> None:
        """The taps deleted and the netns given its interfaces back."""
        if rec.taps or rec.network is not None:
            self._net.detach(rec.netns_path, list(rec.taps), rec.network)
