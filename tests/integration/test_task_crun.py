"""The task engine with the guest's real crun (no share yet: the rootfs is a busybox tree
built inside the guest, and the stager writes files over exec).

Checks what the design rests on: a supervised ``crun create`` leaves the init reparented to
vsbx-exec, whose channel then ends with the init's status; ``crun exec --detach`` likewise.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import unique
from tests.integration.test_guest_process import running_guest
from tests.unit.task_rig import Fifo, fifos
from vmsandbox import LibvirtController, NotFound
from vmsandbox.model import PtySize
from vmsandbox.sandbox.ports import GuestChannel
from vmsandbox.task import IoSpec, StagedBundle, Status, TaskEngine

pytestmark = pytest.mark.integration

BASE = "/run/vsbx-test-crun"


class GuestTreeStager:
    """A busybox rootfs per container, made in the guest's tmpfs; files written over exec."""

    def __init__(self, channel: Callable[[], GuestChannel]) -> None:
        self.channel = channel

    def _sh(self, script: str, stdin: bytes | None = None) -> None:
        r = self.channel().exec(["sh", "-c", script], stdin=stdin, in_guest_root=True, timeout=60)
        assert r.exit_code == 0, r.stderr

    def stage(self, container_id: str, rootfs: object, binds: object) -> StagedBundle:
        d = f"{BASE}/{container_id}"
        self._sh(f"mkdir -p {d}/rootfs/bin {d}/rootfs/proc {d}/rootfs/dev {d}/rootfs/sys {d}/rootfs/tmp && "
                 f"cp /bin/busybox {d}/rootfs/bin/ && for a in sh sleep cat echo ls tty stty; do "
                 f"ln -s busybox {d}/rootfs/bin/$a; done")
        return StagedBundle(d, f"{d}/rootfs", {})

    def put_file(self, container_id: str, name: str, data: bytes) -> str:
        path = f"{BASE}/{container_id}/{name}"
        self._sh(f"cat > {path}", data)
        return path

    def guest_file(self, container_id: str, name: str, *, create: bool = False) -> int | None:
        return None  # nothing of the guest dir is visible to the host: the init is not kept

    def unstage(self, container_id: str) -> None:
        self._sh(f"rm -rf {BASE}/{container_id}")


@pytest.fixture(scope="module")
def channel(controller: LibvirtController) -> Iterator[GuestChannel]:
    with running_guest(controller, "crun") as ch:
        if ch.exec(["crun", "--version"], in_guest_root=True, timeout=30).exit_code != 0:
            pytest.skip("the guest image has no crun")
        yield ch


@pytest.fixture
def engine(channel: GuestChannel) -> Iterator[TaskEngine]:
    eng = TaskEngine("crun", lambda: channel, GuestTreeStager(lambda: channel), ready_timeout=60)
    yield eng
    eng.close()


def oci_spec(channel: GuestChannel, args: list[str]) -> dict[str, object]:
    """crun's own default spec (``crun spec``), with our args and host-like pod namespaces."""
    d = f"/tmp/{unique('spec')}"
    r = channel.exec(["sh", "-c", f"mkdir -p {d} && cd {d} && crun spec && cat config.json && rm -rf {d}"],
                     in_guest_root=True, timeout=30)
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    doc["process"]["args"] = args
    doc["process"]["terminal"] = False
    doc["linux"]["namespaces"] = [ns for ns in doc["linux"]["namespaces"] if ns["type"] != "network"]
    doc["linux"]["namespaces"].append({"type": "network", "path": "/proc/4242/ns/net"})  # CRI's host path
    return dict(doc)


def bundle(tmp: Path, doc: dict[str, object]) -> str:
    d = tmp / "bundle"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(doc))
    return str(d)


def test_a_container_under_real_crun(engine: TaskEngine, channel: GuestChannel, tmp_path: Path) -> None:
    cid = unique("crun")
    doc = oci_spec(channel, ["sh", "-c", "echo in-container; echo oops >&2; exec sleep 60"])
    with fifos(tmp_path, "init") as (_, o, e), fifos(tmp_path, "x") as (_, xo, xe):
        t0 = time.monotonic()
        pid = engine.create(cid, bundle=bundle(tmp_path, doc), rootfs=(), io=IoSpec("", o.path, e.path))
        created = time.monotonic() - t0
        o.collect()
        e.collect()
        assert pid > 1 and engine.state(cid).status is Status.CREATED
        engine.start(cid)
        deadline = time.monotonic() + 30
        while b"in-container\n" not in o.data:
            assert time.monotonic() < deadline, (bytes(o.data), bytes(e.data))
            time.sleep(0.05)
        engine.exec(cid, "x", io=IoSpec("", xo.path, xe.path),
                    process={"args": ["sh", "-c", "echo $$; exit 3"], "cwd": "/", "env": ["PATH=/bin"]})
        xo.collect()
        xe.collect()
        xpid = engine.start(cid, "x")
        ex = engine.wait(cid, "x")
        assert ex is not None and ex.exit_status == 3, bytes(xe.data)
        assert xo.eof.wait(5) and xo.data.strip().isdigit()  # its pid in the container's pid namespace
        assert xpid > 1
        engine.delete(cid, "x")
        engine.kill(cid, signal=9)
        init = engine.wait(cid)
        assert init is not None and init.exit_status == 137
        assert e.eof.wait(5) and bytes(e.data) == b"oops\n"
        with pytest.raises(NotFound):
            engine.kill(cid, signal=9, all=True)
        assert engine.delete(cid).exit_status == 137
        r = channel.exec(["crun", "list"], in_guest_root=True, timeout=30)
        assert cid not in r.stdout.decode()
        print(f"crun create {created:.2f}s")


def until(f: Fifo, want: bytes, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while want not in f.data:
        assert time.monotonic() < deadline, bytes(f.data)
        time.sleep(0.05)


def test_a_terminal_container_and_a_terminal_exec_under_real_crun(engine: TaskEngine, channel: GuestChannel,
                                                                   tmp_path: Path) -> None:
    """process.terminal: crun's pty (console socket) is the container's controlling terminal."""
    cid = unique("tty")
    # SIGWINCH is awaited in a sleep loop: busybox ash defers a trap that comes during a read
    # until input arrives.
    script = ("tty; stty size; trap 'stty size; w=1' WINCH; echo ready; while [ -z \"$w\" ]; do sleep 0.1; done; "
              "until read line; do :; done; echo got:$line; exec sleep 60")
    doc = oci_spec(channel, ["sh", "-c", script])
    with fifos(tmp_path, "init", stdin=True) as (i, o, e), fifos(tmp_path, "x", stdin=True) as (xi, xo, xe):
        assert i is not None and xi is not None
        e.close()  # CRI reads no stderr of a tty: nothing may wait for a reader there
        t0 = time.monotonic()
        engine.create(cid, bundle=bundle(tmp_path, doc), rootfs=(), io=IoSpec(i.path, o.path, e.path, terminal=True))
        created = time.monotonic() - t0
        o.collect()
        i.open_writer()
        engine.resize(cid, "", PtySize(100, 30))  # before Start, as containerd may
        engine.start(cid)
        until(o, b"ready")
        assert b"/dev/pts/0\r\n" in o.data and b"30 100\r\n" in o.data, bytes(o.data)
        engine.resize(cid, "", PtySize(120, 40))
        until(o, b"40 120")
        i.write(b"hello\r")
        until(o, b"got:hello")
        assert b"hello\r\n" in o.data  # the container's terminal echoes what the stdin FIFO brought

        engine.exec(cid, "x", io=IoSpec(xi.path, xo.path, xe.path, terminal=True),
                    process={"args": ["sh", "-c", "tty; stty size; cat; echo cat:$?; exit 3"], "cwd": "/",
                             "env": ["PATH=/bin"], "terminal": True, "consoleSize": {"width": 90, "height": 20}})
        xo.collect()
        xi.open_writer()
        engine.start(cid, "x")  # consoleSize (as ctr sets it): the size from the start, no ResizePty yet
        until(xo, b"20 90")
        xi.write(b"typed\r")
        until(xo, b"typed\r\ntyped\r\n")  # echo, then cat's copy
        xi.close()
        engine.close_io(cid, "x")  # ^D: cat sees EOF
        ex = engine.wait(cid, "x")
        assert ex is not None and ex.exit_status == 3, bytes(xo.data)
        assert xo.eof.wait(5) and b"cat:0" in xo.data and b"/dev/pts/" in xo.data
        engine.delete(cid, "x")
        engine.exec(cid, "missing", io=IoSpec("", xo.path, xe.path, terminal=True),
                    process={"args": ["no-such-binary"], "cwd": "/", "env": ["PATH=/bin"], "terminal": True})
        engine.start(cid, "missing")
        ex = engine.wait(cid, "missing")
        assert ex is not None and ex.exit_status == 127
        engine.delete(cid, "missing")

        engine.kill(cid, signal=9)
        init = engine.wait(cid)
        assert init is not None and init.exit_status == 137
        assert o.eof.wait(5)
        assert engine.delete(cid).exit_status == 137
        r = channel.exec(["sh", "-c", "ls /run/vsbx/ | grep -c '^tty-' || true"], in_guest_root=True, timeout=30)
        assert r.stdout.strip() == b"0", "a console socket stayed behind"
        print(f"terminal crun create {created:.2f}s")
