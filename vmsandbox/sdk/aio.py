"""The SDK for asyncio: :class:`AsyncSandbox`, the same operations awaited.

A thin layer: each call runs the synchronous one in a worker thread
(``asyncio.to_thread``), so an event loop is never blocked by a VM boot, a command or a
copy. Processes stay :class:`~vmsandbox.sdk.process.Process` objects, whose blocking calls
(``wait``, reading streams) go through :meth:`AsyncSandbox.wait` and :func:`achunks`.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Sequence
from typing import Any

from ..model import ExecResult
from .files import FileInfo
from .process import OutputStream, Process
from .sandbox import Sandbox

__all__ = ["AsyncSandbox", "achunks"]


async def achunks(stream: OutputStream) -> AsyncIterator[bytes]:
    """The chunks of ``stream`` as they arrive, without blocking the event loop."""
    while (chunk := await asyncio.to_thread(stream.read_chunk)) is not None:
        yield chunk


class AsyncSandbox:
    """:class:`~vmsandbox.sdk.Sandbox` for asyncio (``async with await AsyncSandbox.create(...)``)."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sync = sandbox
        self.id = sandbox.id

    @classmethod
    async def create(cls, image: str | os.PathLike[str] | None = None, **options: Any) -> AsyncSandbox:
        """As :meth:`Sandbox.create` (same options)."""
        return cls(await asyncio.to_thread(Sandbox.create, image, **options))

    async def run(self, command: Sequence[str] | str, **options: Any) -> ExecResult:
        """:meth:`Sandbox.run`, awaited."""
        return await asyncio.to_thread(self.sync.run, command, **options)

    async def spawn(self, command: Sequence[str] | str, **options: Any) -> Process:
        """:meth:`Sandbox.spawn`, awaited; read its streams with :func:`achunks`."""
        return await asyncio.to_thread(self.sync.spawn, command, **options)

    async def wait(self, process: Process, timeout: float | None = None) -> int:
        """:meth:`Process.wait` of ``process`` without blocking the loop."""
        return await asyncio.to_thread(process.wait, timeout)

    async def write_file(self, path: str, data: bytes | str, *, mode: int = 0o644) -> None:
        """:meth:`Files.write`, awaited."""
        await asyncio.to_thread(self.sync.files.write, path, data, mode=mode)

    async def read_file(self, path: str, *, max_bytes: int = 256 << 20) -> bytes:
        """:meth:`Files.read`, awaited."""
        return await asyncio.to_thread(self.sync.files.read, path, max_bytes=max_bytes)

    async def upload(self, local: str | os.PathLike[str], path: str) -> None:
        """:meth:`Files.upload`, awaited."""
        await asyncio.to_thread(self.sync.files.upload, local, path)

    async def download(self, path: str, local: str | os.PathLike[str]) -> None:
        """:meth:`Files.download`, awaited."""
        await asyncio.to_thread(self.sync.files.download, path, local)

    async def list_files(self, path: str = ".") -> list[FileInfo]:
        """:meth:`Files.list`, awaited."""
        return await asyncio.to_thread(self.sync.files.list, path)

    async def close(self) -> None:
        """:meth:`Sandbox.close`, awaited."""
        await asyncio.to_thread(self.sync.close)

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


