"""The Python SDK: :class:`Sandbox` (a VM from an image in one call), its processes and files."""

from __future__ import annotations

from .files import FileInfo, Files
from .process import OutputStream, Process
from .sandbox import CommandFailed, Sandbox

__all__ = ["Sandbox", "Process", "OutputStream", "Files", "FileInfo", "CommandFailed"]
