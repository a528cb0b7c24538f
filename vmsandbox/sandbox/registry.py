"""The controller's in-memory sandboxes: one entry per record, with its locks.

An entry's ``op_lock`` serialises the operations on one sandbox (never held across
sandboxes); ``state_lock`` guards its record and the ``exited`` condition that wakes
waiters. A sandbox being created has an entry without a record: other callers see NotFound
and a second create of the same id sees AlreadyExists.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any as _Any

from ..errors import AlreadyExists, NotFound
from .ports import GuestChannel
from .store import SandboxRecord, Store
from .validate import check_sandbox_id

__all__ = ["Entry", "Registry"]


@dataclass
class Entry:
    """In-memory companion of a record: locks, the exit condition, the agent connection."""

    record: SandboxRecord  # None (despite the type) only while the sandbox is being created
    op_lock: threading.RLock = field(default_factory=threading.RLock)
    state_lock: threading.Lock = field(default_factory=threading.Lock)
    agent: GuestChannel | None = None
    removed: bool = False
    agent_lock: threading.Lock = field(default_factory=threading.Lock)
    last_exit_check: float = 0.0

    def __post_init__(self) -> None:
        self.exited = threading.Condition(self.state_lock)

    def check_live(self) -> None:
        """Call with op_lock held: the sandbox may have been removed while we queued."""
        if self.removed:
            raise NotFound(f"sandbox {self.record.id} not found", sandbox_id=self.record.id)


class Registry:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._entries: dict[str, Entry] = {}
        self._lock = threading.Lock()

    def get(self, sandbox_id: str) -> Entry:
        """The visible entry of ``sandbox_id``; NotFound while it is missing, being created or removed."""
        check_sandbox_id(sandbox_id)
        with self._lock:
            e = self._entries.get(sandbox_id)
        if e is None or e.removed or e.record is None:
            raise NotFound(f"sandbox {sandbox_id} not found", sandbox_id=sandbox_id)
        return e

    def find(self, sandbox_id: str) -> Entry | None:
        """The visible entry, or None (for event handlers, which must not raise)."""
        with self._lock:
            e = self._entries.get(sandbox_id)
        return e if e is not None and e.record is not None and not e.removed else None

    def reserve(self, sandbox_id: str) -> Entry:
        """A new entry in the creating state, its op_lock held; AlreadyExists if the id is taken."""
        e = Entry(record=None)  # type: ignore[arg-type]  # filled in by create, before anyone sees it
        with self._lock:
            if sandbox_id in self._entries or self.store.exists(sandbox_id):
                raise AlreadyExists(f"sandbox {sandbox_id} already exists", sandbox_id=sandbox_id)
            self._entries[sandbox_id] = e
            e.op_lock.acquire()
        return e

    def add(self, record: SandboxRecord) -> Entry:
        e = Entry(record=record)
        with self._lock:
            self._entries[record.id] = e
        return e

    def forget(self, sandbox_id: str) -> None:
        with self._lock:
            self._entries.pop(sandbox_id, None)

    def visible(self) -> list[Entry]:
        """Every created, not removed entry, sorted by id."""
        with self._lock:
            entries = [e for e in self._entries.values() if e.record is not None and not e.removed]
        return sorted(entries, key=lambda e: e.record.id)

    def save(self, e: Entry, **changes: _Any) -> SandboxRecord:
        """Apply changes to the record and persist them (caller holds e.state_lock)."""
        rec = e.record.evolve(**changes)
        self.store.save(rec)
        e.record = rec
        return rec
