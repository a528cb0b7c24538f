"""The high-level sandbox (:class:`vmsandbox.Sandbox`): one call to a running VM from an
image, then commands, processes, files and terminals in it, and one call to remove it all.

It drives a controller of this process (one per state dir, shared by every sandbox the
program opens, closed with the last) through the same API containerd's path uses.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

from ..config import Config
from ..errors import DeadlineExceeded, InvalidArgument, VmSandboxError
from ..model import ExecResult, ImageConfig, Mount, PtySize, SandboxMetadata
from ..sandbox.ports import GuestProcess, OutputSink
from .files import ControllerFileOps, Files
from .process import OutputCallback, Process

__all__ = ["Sandbox", "CommandFailed", "Backend", "SDK_LABEL"]

log = logging.getLogger(__name__)

SDK_LABEL = "vmsandbox.io/sdk"
"""Label of the sandboxes :meth:`Sandbox.create` makes (``vmsandbox list`` shows them)."""
DEFAULT_TTY = (24, 80)


class CommandFailed(VmSandboxError):
    """``run(..., check=True)`` of a command that exited non-zero; ``result`` is its outcome."""

    def __init__(self, argv: Sequence[str], result: ExecResult, *, sandbox_id: str) -> None:
        tail = result.stderr[-400:].decode(errors="replace").strip()
        super().__init__(f"{list(argv)!r} exited {result.exit_code}" + (f": {tail}" if tail else ""),
                         sandbox_id=sandbox_id)
        self.argv = list(argv)
        self.result = result


class Backend(Protocol):
    """What a :class:`Sandbox` needs of a controller (:class:`vmsandbox.LibvirtController` has it)."""

    def create(self, sandbox: SandboxMetadata, *, rootfs: Sequence[Mount] = (), netns_path: str = "",
               annotations: Mapping[str, str] | None = None) -> None: ...

    def start(self, sandbox_id: str) -> object: ...

    def shutdown(self, sandbox_id: str) -> None: ...

    def exec(self, sandbox_id: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
             cwd: str | None = None, stdin: bytes | None = None, timeout: float | None = None,
             max_output: int | None = None, user: str | None = None,
             in_guest_root: bool = False) -> ExecResult: ...

    def spawn(self, sandbox_id: str, argv: Sequence[str], *, stdout: OutputSink, stderr: OutputSink,
              env: Mapping[str, str] | None = None, cwd: str | None = None, user: str | None = None,
              tty: bool = False, size: PtySize | None = None, in_guest_root: bool = False) -> GuestProcess: ...

    def share_path(self, sandbox_id: str) -> Path: ...

    def close(self) -> None: ...


# ---------------------------------------------------------------------- shared controllers
_shared_lock = threading.Lock()
_shared: dict[Path, tuple[Backend, int]] = {}


def _acquire(config: Config) -> Backend:
    from ..host import LibvirtController

    key = config.state_dir.resolve()
    with _shared_lock:
        ctl, users = _shared.get(key, (None, 0))
        if ctl is None:
            ctl = LibvirtController(config=config)
        _shared[key] = (ctl, users + 1)
        return ctl


def _release(ctl: Backend) -> None:
    with _shared_lock:
        for key, (c, users) in list(_shared.items()):
            if c is ctl:
                if users > 1:
                    _shared[key] = (c, users - 1)
                    return
                del _shared[key]
                break
        else:
            return
    ctl.close()


def _argv(command: Sequence[str] | str) -> list[str]:
    if isinstance(command, str):
        return ["/bin/sh", "-c", command]
    argv = list(command)
    if not argv or not all(isinstance(a, str) for a in argv):
        raise InvalidArgument("a command is a non-empty list of strings (or one string for /bin/sh -c)")
    return argv


class Sandbox:
    """A running sandbox: a VM of its own, from an OCI image or the default guest.

    Make one with :meth:`create` (or :meth:`attach` to one that runs already), use it, then
    :meth:`close` it, best as a context manager::

        with Sandbox.create(image="busybox.tar", memory_mib=512) as sb:
            print(sb.run(["echo", "hi"]).text)

    Thread-safe: commands, processes and file operations may run from many threads at once.
    Commands run in the image's root with its Env, WorkingDir and User (each call may
    override them), never through a shell unless given one string (``/bin/sh -c``).
    """

    def __init__(self, backend: Backend, sandbox_id: str, *, image: ImageConfig | None = None,
                 env: Mapping[str, str] | None = None, cwd: str | None = None, user: str | None = None,
                 owned: bool = True, shared: bool = False) -> None:
        self._b = backend
        self.id = sandbox_id
        self.image = image
        """The image's config (None for the default guest)."""
        self._env = dict(env or {})
        self._cwd = cwd
        self._user = user
        self._owned = owned
        self._shared = shared
        self._closed = False
        self._lock = threading.Lock()
        self._processes: set[Process] = set()
        self.files = Files(_Ops(self), sandbox_id=sandbox_id, cwd=cwd or (image.working_dir if image else "") or "/")
        """Files in the sandbox: :class:`vmsandbox.sdk.files.Files`."""

    # ------------------------------------------------------------------ making one
    @classmethod
    def create(cls, image: str | os.PathLike[str] | None = None, *, id: str | None = None,
               vcpus: int | None = None, memory_mib: int | None = None, network: str | None = None,
               env: Mapping[str, str] | None = None, cwd: str | None = None, user: str | None = None,
               mounts: Sequence[Mount] = (), annotations: Mapping[str, str] | None = None,
               labels: Mapping[str, str] | None = None, controller: Backend | None = None,
               config: Config | None = None) -> Sandbox:
        """Create and boot a sandbox; returns once commands can run in it.

        ``image``: an OCI image layout folder or an image tarball (``docker save``,
        ``skopeo copy ... oci-archive:``), unpacked once into a cache and shared read-only
        (each sandbox writes to its own layer); None runs commands in the default guest's root.
        ``network``: a network namespace path (``/var/run/netns/NAME``) whose eth0 the guest
        takes over; None gives no network. ``env``/``cwd``/``user``: defaults for every
        command, over the image's. ``mounts``: more disks (:class:`vmsandbox.Mount`).
        ``controller``: a controller to use (else one of this process, from ``config`` or
        the environment). Errors: InvalidArgument for a bad image or option, AlreadyExists
        for a taken ``id``; whatever fails leaves nothing behind.
        """
        if controller is None:
            backend, shared = _acquire(config or Config.from_env()), True
        else:
            backend, shared = controller, False
        sandbox_id = id or f"sdk-{secrets.token_hex(6)}"
        notes = dict(annotations or {})
        if vcpus is not None:
            notes["vmsandbox.io/vcpus"] = str(vcpus)
        if memory_mib is not None:
            notes["vmsandbox.io/memory-mib"] = str(memory_mib)
        rootfs = list(mounts)
        if image is not None:
            rootfs.insert(0, Mount("oci", os.path.abspath(os.fspath(image))))
        elif rootfs:
            raise InvalidArgument("mounts need an image (the first mount is the root)")
        created = False
        try:
            backend.create(SandboxMetadata(sandbox_id, labels={SDK_LABEL: "1", **(labels or {})}),
                           rootfs=rootfs, netns_path=network or "", annotations=notes)
            created = True
            backend.start(sandbox_id)
            config_of = getattr(backend, "image_config", None)
            img = config_of(sandbox_id) if config_of is not None else None
        except BaseException:
            if created:
                try:
                    backend.shutdown(sandbox_id)
                except Exception:  # noqa: BLE001 - the original error matters more
                    log.warning("sandbox %s: removing it after a failed create failed", sandbox_id, exc_info=True)
            if shared:
                _release(backend)
            raise
        return cls(backend, sandbox_id, image=img, env=env, cwd=cwd, user=user, owned=True, shared=shared)

    @classmethod
    def attach(cls, sandbox_id: str, *, controller: Backend | None = None, config: Config | None = None,
               owned: bool = False) -> Sandbox:
        """A handle on the running sandbox ``sandbox_id`` (made by the CLI, say). ``owned``:
        :meth:`close` removes it (else close only lets go of it). NotFound when unknown."""
        if controller is None:
            backend, shared = _acquire(config or Config.from_env()), True
        else:
            backend, shared = controller, False
        try:
            backend.share_path(sandbox_id)  # NotFound for an unknown id
            config_of = getattr(backend, "image_config", None)
            img = config_of(sandbox_id) if config_of is not None else None
        except BaseException:
            if shared:
                _release(backend)
            raise
        return cls(backend, sandbox_id, image=img, owned=owned, shared=shared)

    # ------------------------------------------------------------------ commands
    def _defaults(self, env: Mapping[str, str] | None, cwd: str | None,
                  user: str | None) -> tuple[dict[str, str], str | None, str | None]:
        self._check_open()
        return {**self._env, **(env or {})}, cwd or self._cwd, user or self._user

    def run(self, command: Sequence[str] | str, *, env: Mapping[str, str] | None = None, cwd: str | None = None,
            user: str | None = None, stdin: bytes | str | None = None, timeout: float | None = None,
            check: bool = False, max_output: int | None = None, on_stdout: OutputCallback | None = None,
            on_stderr: OutputCallback | None = None) -> ExecResult:
        """Run a command to its end and return its exit code and output.

        ``command``: argv (no shell), or one string run by ``/bin/sh -c``. Output is collected
        up to ``max_output`` bytes (default 32 MiB; past it the command is stopped and
        FailedPrecondition raised), unless ``on_stdout``/``on_stderr`` take it as it comes
        (then it is not collected: the result's streams are empty). DeadlineExceeded after
        ``timeout`` s (the command is killed); ``check``: CommandFailed for a non-zero exit.
        """
        argv = _argv(command)
        data = stdin.encode() if isinstance(stdin, str) else stdin
        if on_stdout is None and on_stderr is None:
            env_, cwd_, user_ = self._defaults(env, cwd, user)
            res = self._b.exec(self.id, argv, env=env_, cwd=cwd_, stdin=data, timeout=timeout,
                               max_output=max_output, user=user_)
        else:
            with self.spawn(argv, env=env, cwd=cwd, user=user, on_stdout=on_stdout or (lambda _: None),
                            on_stderr=on_stderr or (lambda _: None), timeout=timeout) as proc:
                if data:
                    proc.write(data)
                proc.close_stdin()
                code = proc.wait()
                if proc.timed_out:
                    raise DeadlineExceeded(f"{argv[0]!r} ran longer than {timeout}s and was killed",
                                           sandbox_id=self.id)
            res = ExecResult(code, b"", b"")
        if check and res.exit_code != 0:
            raise CommandFailed(argv, res, sandbox_id=self.id)
        return res

    def spawn(self, command: Sequence[str] | str, *, env: Mapping[str, str] | None = None, cwd: str | None = None,
              user: str | None = None, on_stdout: OutputCallback | None = None,
              on_stderr: OutputCallback | None = None, timeout: float | None = None) -> Process:
        """Start a command and return at once with its :class:`~vmsandbox.sdk.process.Process`:
        iterate ``proc.stdout``/``proc.stderr`` (or pass callbacks), ``write`` to its stdin,
        ``send_signal``, ``wait``. ``timeout``: killed (SIGKILL) after that many seconds."""
        return self._start(_argv(command), env=env, cwd=cwd, user=user, on_stdout=on_stdout, on_stderr=on_stderr,
                           timeout=timeout, tty=None)

    def pty(self, command: Sequence[str] | str | None = None, *, rows: int = DEFAULT_TTY[0],
            cols: int = DEFAULT_TTY[1], env: Mapping[str, str] | None = None, cwd: str | None = None,
            user: str | None = None, on_output: OutputCallback | None = None) -> Process:
        """A command (default ``/bin/sh``) on a terminal of ``rows`` x ``cols``: one output
        stream (``proc.stdout``), ``proc.resize(rows, cols)``, keys as bytes to ``write``
        (``b"\\x03"`` is Ctrl-C, ``b"\\x04"`` Ctrl-D)."""
        argv = _argv(command) if command is not None else ["/bin/sh"]
        return self._start(argv, env=env, cwd=cwd, user=user, on_stdout=on_output, on_stderr=None, timeout=None,
                           tty=PtySize(width=cols, height=rows))

    def shell(self, *, rows: int = DEFAULT_TTY[0], cols: int = DEFAULT_TTY[1]) -> Process:
        """An interactive ``/bin/sh`` on a terminal (:meth:`pty`)."""
        return self.pty(["/bin/sh"], rows=rows, cols=cols)

    def _start(self, argv: list[str], *, env: Mapping[str, str] | None, cwd: str | None, user: str | None,
               on_stdout: OutputCallback | None, on_stderr: OutputCallback | None, timeout: float | None,
               tty: PtySize | None) -> Process:
        env_, cwd_, user_ = self._defaults(env, cwd, user)

        def start(out: OutputSink, err: OutputSink) -> GuestProcess:
            return self._b.spawn(self.id, argv, stdout=out, stderr=err, env=env_, cwd=cwd_, user=user_,
                                 tty=tty is not None, size=tty)

        proc = _Tracked(self, argv, start, on_stdout=on_stdout, on_stderr=on_stderr, tty=tty is not None,
                        timeout=timeout)
        with self._lock:
            self._processes = {p for p in self._processes if p.returncode is None}
            self._processes.add(proc)
        return proc

    # ------------------------------------------------------------------ the end
    def _check_open(self) -> None:
        if self._closed:
            raise InvalidArgument("this sandbox was closed", sandbox_id=self.id)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """End its processes and, for a sandbox this handle made (or attached as owned),
        remove it: VM, disks, share, network wiring. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            procs = list(self._processes)
        try:
            for p in procs:
                p.close()
            if self._owned:
                self._b.shutdown(self.id)
        finally:
            if self._shared:
                _release(self._b)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Sandbox {self.id}{' closed' if self._closed else ''}>"


class _Tracked(Process):
    """A process its sandbox forgets once it was closed."""

    def __init__(self, sb: Sandbox, *args: object, **kw: object) -> None:
        self._sb = sb
        super().__init__(*args, **kw)  # type: ignore[arg-type]

    def close(self) -> None:
        super().close()
        with self._sb._lock:
            self._sb._processes.discard(self)


class _Ops(ControllerFileOps):
    """The files' commands of a sandbox, refused once it was closed."""

    def __init__(self, sb: Sandbox) -> None:
        super().__init__(sb._b, sb.id, image_user=sb.image.user if sb.image else "")
        self._sb = sb

    def run_root(self, argv: Sequence[str]) -> ExecResult:
        self._sb._check_open()
        return super().run_root(argv)
