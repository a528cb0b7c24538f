"""A crun that lives in the fake guest, CRI-like FIFO ends, and a task engine over them.

:class:`FakeCrun` answers the engine's guest commands the way crun and vsbx-exec do: a
supervised ``crun create``/``crun exec --detach`` publishes a pid in ``<pidfile>.ready`` and
its channel ends with the process's status; ``crun start`` runs ``on_start``; ``crun kill``
and ``kill`` end the process with 128+signal; ``crun delete --force`` kills what is left and
removes the container's cgroup, whose files (``cgroup_files``, by name) ``grep -H`` prints as
busybox does; ``crun update --resources F`` records F's contents in ``updates``.
"""

from __future__ import annotations

import errno
import json
import os
import select
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any as _Any
from typing import TypeVar

from google.protobuf.message import Message

from vmsandbox.guest.fake import ExecCall, FakeGuests, FakeProcess
from vmsandbox.model import ExecResult
from vmsandbox.task.engine import TaskEngine
from vmsandbox.task.fake import FakeStager
from vmsandbox.task.spec import GUEST_POD_FILES

SID = "s" * 64
R = TypeVar("R", bound="Rig")
CID = "c" * 64
#: A guest cgroup of a busy container, as kernel 6.1 writes it (values in bytes/usec).
CGROUP_FILES = {
    "cpu.stat": "usage_usec 53850270\nuser_usec 18742110\nsystem_usec 35108160\nnr_periods 1088\n"
                "nr_throttled 1057\nthrottled_usec 53063542\nnr_bursts 0\nburst_usec 0\n",
    "memory.current": "159744\n",
    "memory.max": "33554432\n",
    "memory.peak": "33554432\n",
    "memory.swap.current": "0\n",
    "memory.swap.max": "max\n",
    "memory.stat": "anon 40960\nfile 8192\nkernel_stack 16384\nslab 94208\nsock 0\nshmem 0\n"
                   "inactive_anon 36864\nactive_anon 4096\ninactive_file 8192\nactive_file 0\n"
                   "pgfault 25219\npgmajfault 3\nworkingset_refault_anon 0\n",
    "memory.events": "low 0\nhigh 0\nmax 4967\noom 291\noom_kill 0\noom_group_kill 0\n",
    "pids.current": "1\n",
    "pids.max": "max\n",
    "io.stat": "254:0 rbytes=1048576 wbytes=4096 rios=12 wios=1 dbytes=0 dios=0\n",
}


def spec(args: list[str] | None = None, **extra: _Any) -> dict[str, _Any]:
    """A config.json like CRI's for a container in sandbox pid 4242."""
    doc: dict[str, _Any] = {
        "ociVersion": "1.1.0",
        "process": {"args": args or ["sh", "-c", "echo hi"], "env": ["PATH=/bin"], "cwd": "/",
                    "terminal": False, "apparmorProfile": "cri-containerd.apparmor.d"},
        "root": {"path": "rootfs"},
        "hostname": "pod",
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
        "linux": {"cgroupsPath": "kubepods-besteffort-pod1.slice:cri-containerd:x",
                  "namespaces": [{"type": "pid"}, {"type": "ipc", "path": "/proc/4242/ns/ipc"},
                                 {"type": "uts", "path": "/proc/4242/ns/uts"}, {"type": "mount"},
                                 {"type": "network", "path": "/proc/4242/ns/net"}]},
    }
    doc.update(extra)
    return doc


@dataclass
class FakeContainer:
    proc: FakeProcess
    pid: int
    started: bool = False


@dataclass
class FakeCrun:
    guests: FakeGuests
    files: dict[str, bytes] = field(default_factory=dict)
    containers: dict[str, FakeContainer] = field(default_factory=dict)
    execs: dict[int, FakeProcess] = field(default_factory=dict)
    next_pid: int = 100
    fail_create: bytes | None = None  # stderr of a failing crun create
    on_start: Callable[[FakeProcess], None] = lambda proc: None
    on_exec: Callable[[FakeProcess], None] = lambda proc: None
    commands: list[tuple[str, ...]] = field(default_factory=list)
    pod_files: tuple[str, ...] = ("hostname", "hosts", "authorized_keys")  # the guest's config dir
    cgroup_files: dict[str, str] = field(default_factory=lambda: dict(CGROUP_FILES))
    updates: list[tuple[str, _Any]] = field(default_factory=list)
    stager: FakeStager | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.guests.handler = self.handle
        self.guests.on_spawn = self.spawned

    def _pid(self) -> int:
        with self.lock:
            self.next_pid += 1
            return self.next_pid

    def spawned(self, proc: FakeProcess) -> None:
        argv = proc.call.argv
        self.commands.append(argv)
        pidfile = proc.call.supervise_pidfile
        assert argv[0] == "crun" and pidfile, argv
        if argv[1] == "create":
            if self.fail_create is not None:
                def fail(err: bytes = self.fail_create) -> None:
                    proc.emit(err, 2)
                    proc.exit(1)
                threading.Thread(target=fail).start()
                return
            pid = self._pid()
            self.containers[argv[-1]] = FakeContainer(proc, pid)
        else:
            assert argv[1:3] == ("exec", "--detach"), argv
            pid = self._pid()
            self.execs[pid] = proc
            threading.Thread(target=self.on_exec, args=(proc,), daemon=True).start()
        self.files[pidfile + ".ready"] = f"{pid}\n".encode()

    def handle(self, call: ExecCall) -> ExecResult:
        argv = call.argv
        self.commands.append(argv)
        if argv == ("ls", GUEST_POD_FILES):
            return ExecResult(0, "".join(f + "\n" for f in self.pod_files).encode(), b"")
        if argv[0] == "sh" and len(argv) == 5 and argv[3].endswith(".ready"):  # the engine's wait for a pid
            data = self.files.get(argv[3])
            if data is None:
                time.sleep(0.01)  # the guest waits a moment for it, then says "not yet"
            return ExecResult(0, data, b"") if data is not None else ExecResult(3, b"", b"")
        if argv[0] == "cat":
            data = self.files.get(argv[1])
            return ExecResult(0, data, b"") if data is not None else ExecResult(1, b"", b"No such file\n")
        if argv[:2] == ("crun", "start"):
            c = self.containers[argv[2]]
            c.started = True
            threading.Thread(target=self.on_start, args=(c.proc,), daemon=True).start()
            return ExecResult(0, b"", b"")
        if argv[:2] == ("crun", "kill"):
            k = self.containers.get(argv[-2])
            if k is None or k.proc.done:
                return ExecResult(1, b"", b"container is not running\n")
            k.proc.exit(128 + int(argv[-1]))
            return ExecResult(0, b"", b"")
        if argv[:2] == ("crun", "delete"):
            gone = self.containers.pop(argv[-1], None)
            if gone is not None and not gone.proc.done:
                gone.proc.exit(137)
            return ExecResult(0, b"", b"")
        if argv[0] == "grep":
            out = []
            for path in argv[4:]:
                cid, name = path.split("/")[-2:]
                if cid in self.containers and name in self.cgroup_files:
                    out += [f"{path}:{line}" for line in self.cgroup_files[name].splitlines()]
            return ExecResult(0 if out else 2, "".join(line + "\n" for line in out).encode(), b"")
        if argv[:3] == ("crun", "update", "--resources"):
            assert self.stager is not None
            if argv[4] not in self.containers:
                return ExecResult(1, b"", b"container does not exist\n")
            self.updates.append((argv[4], json.loads(self.stager.files[argv[3]])))
            return ExecResult(0, b"", b"")
        if argv[0] == "kill":
            p = self.execs.get(int(argv[2]))
            if p is None or p.done:
                return ExecResult(1, b"", b"no such process\n")
            p.exit(128 + int(argv[1][1:]))
            return ExecResult(0, b"", b"")
        raise AssertionError(f"unexpected guest command {argv}")


class EventLog:
    """An event sink that records (namespace, topic, event)."""

    def __init__(self) -> None:
        self.got: list[tuple[str, str, Message]] = []
        self.cond = threading.Condition()

    def publish(self, namespace: str, topic: str, event: Message) -> None:
        with self.cond:
            self.got.append((namespace, topic, event))
            self.cond.notify_all()

    def topics(self, until: str = "", times: int = 1, timeout: float = 5) -> list[str]:
        """The topics so far; first waits (up to ``timeout``) for ``until`` to be among them
        ``times`` times."""
        with self.cond:
            self.cond.wait_for(lambda: not until or sum(t == until for _, t, _ in self.got) >= times, timeout)
            return [t for _, t, _ in self.got]


class Rig:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.guests = FakeGuests()
        self.channel = self.guests("/fake.sock", b"", "key", SID)
        self.channel.connect(time.monotonic() + 1)
        self.stager = FakeStager()
        self.crun = FakeCrun(self.guests, stager=self.stager)
        self.events = EventLog()
        self.engine = TaskEngine(SID, lambda: self.channel, self.stager, ready_timeout=5, fifo_timeout=1,
                                 events=self.events)

    def bundle(self, doc: dict[str, _Any] | None = None, name: str = CID) -> str:
        d = self.tmp / "bundles" / name
        (d / "rootfs").mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(doc or spec()))
        return str(d)

    def guest_spec(self, cid: str = CID) -> dict[str, _Any]:
        return dict(json.loads(self.stager.files[f"/run/vsbx/shared/{cid}/config.json"]))


class Fifo:
    """CRI's end of one FIFO: a reader (stdout/stderr) or a writer (stdin)."""

    def __init__(self, path: Path, mode: str) -> None:
        os.mkfifo(path)
        self.path, self.mode = str(path), mode
        self.fd: int | None = None
        self.data = bytearray()
        self.eof = threading.Event()
        self._reader: threading.Thread | None = None
        self._stop = threading.Event()
        if mode == "r":  # CRI opens readers before Create
            self.fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)

    def collect(self) -> None:
        """Read until EOF in a thread; call once the task side opened its writer."""
        fd = self.fd
        assert fd is not None

        def run() -> None:
            while not self._stop.is_set():
                select.select([fd], [], [], 0.2)
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    break
                self.data += chunk
            self.eof.set()
        self._reader = threading.Thread(target=run, daemon=True)
        self._reader.start()

    def open_writer(self) -> None:
        self.fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)

    def write(self, data: bytes) -> None:
        assert self.fd is not None
        os.write(self.fd, data)

    def close(self) -> None:
        self._stop.set()
        if self._reader is not None:
            self._reader.join(5)
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)


@contextmanager
def fifos(d: Path, prefix: str, stdin: bool = False) -> Iterator[tuple[Fifo | None, Fifo, Fifo]]:
    i = Fifo(d / f"{prefix}-stdin", "w") if stdin else None
    o, e = Fifo(d / f"{prefix}-stdout", "r"), Fifo(d / f"{prefix}-stderr", "r")
    try:
        yield i, o, e
    finally:
        for f in (i, o, e):
            if f is not None:
                f.close()


def open_fds() -> set[str]:
    """What this process has open (to check that nothing leaks)."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise
    return out


@contextmanager
def leak_checked(rig: R) -> Iterator[R]:
    """Yield ``rig``; then close its engine and check that no file under its tmp dir stays open."""
    before = open_fds()
    yield rig
    rig.engine.close()
    leaked = {f for f in open_fds() - before if str(rig.tmp) in f}
    assert not leaked, f"files left open: {leaked}"
