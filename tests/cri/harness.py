"""A private containerd 2.x and a `vmsandbox serve` process, as a Kubernetes node runs them.

Everything containerd touches lives in one temp folder: config, root, state, its gRPC and
ttrpc sockets, pod network namespaces (``netns_mounts_under_state_dir``), the CNI config and
host-local's IP store. containerd runs inside a network namespace of its own (``nsenter
--net``, so it keeps the host's mount namespace and vmsandbox sees its netns mounts): the CNI
bridge and the pods' veths live there, and that namespace plays the node for traffic tests.
Processes are ended by their PID; every mount under the folder is unmounted at the end.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from tests.conftest import REPO, TEST_PREFIX
from vmsandbox.proto.k8s.runtime.v1 import api_pb2 as cri
from vmsandbox.proto.k8s.runtime.v1 import api_pb2_grpc as cri_grpc

CONTAINERD_ENV = "VMSANDBOX_TEST_CONTAINERD"
"""Path of a containerd binary to test against (``ctr`` beside it); default: Debian unstable's,
fetched by hack/fetch-containerd.sh."""
CNI_ENV = "VMSANDBOX_TEST_CNI_BIN"
CNI_CACHE = "/var/lib/cni"
RUNTIME_HANDLER = "vmsandbox"
DEPLOY_SOCKET = "/run/vmsandbox/vmsandbox.sock"
PAUSE_IMAGE = "localhost/vmsandbox-test/pause:1"
BUSYBOX_IMAGE = "localhost/vmsandbox-test/busybox:1"


@dataclass(frozen=True)
class Binaries:
    containerd: Path
    ctr: Path
    cni_bin: Path
    version: str


def find_binaries() -> Binaries:
    """The containerd under test: $VMSANDBOX_TEST_CONTAINERD, else Debian unstable's (fetched once)."""
    if os.environ.get(CONTAINERD_ENV):
        containerd = Path(os.environ[CONTAINERD_ENV])
        cni = Path(os.environ.get(CNI_ENV, "/usr/lib/cni"))
    else:
        out = subprocess.run(["bash", str(REPO / "hack" / "fetch-containerd.sh")], capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"hack/fetch-containerd.sh failed: {out.stderr.strip()}")
        root = Path(out.stdout.strip()) / "root"
        containerd, cni = root / "usr/bin/containerd", Path(os.environ.get(CNI_ENV, root / "usr/lib/cni"))
    ctr = containerd.with_name("ctr")
    for p in (containerd, ctr, cni / "bridge", cni / "host-local", cni / "loopback"):
        if not p.exists():
            raise RuntimeError(f"{p} is missing")
    version = subprocess.run([str(containerd), "--version"], capture_output=True, text=True, check=True).stdout.split()[2]
    return Binaries(containerd, ctr, cni, version)


def unmount_under(root: Path) -> None:
    """Unmount every mount point at or below ``root``, deepest first."""
    prefix = str(root.resolve())
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for mp in sorted({p for p in points if p == prefix or p.startswith(prefix + "/")}, key=len, reverse=True):
        subprocess.run(["umount", "-l", mp], capture_output=True, check=False)


def sh(*args: str, check: bool = True) -> str:
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


class Containerd:
    """A private containerd whose CRI runtime handler ``vmsandbox`` uses our serve socket."""

    def __init__(self, bins: Binaries, root: Path, sandboxer_socket: Path) -> None:
        self.bins, self.root, self.sandboxer_socket = bins, root, sandboxer_socket
        self.token = secrets.token_hex(3)
        self.node_ns = f"{TEST_PREFIX}-{self.token}-node"
        self.subnet = f"10.244.{secrets.randbelow(200) + 10}"
        self.socket = root / "containerd.sock"
        self.config = root / "config.toml"
        self.log = root / "containerd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._run_containerd_existed = os.path.exists("/run/containerd")
        self._var_lib_cni_existed = os.path.exists(CNI_CACHE)
        self._channel: grpc.Channel | None = None

    # -- set-up -------------------------------------------------------------------------
    def prepare(self) -> None:
        for d in ("root", "state", "cni/net.d", "cni/ipam", "cni/cache", "opt", "cdi"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        sh("ip", "netns", "add", self.node_ns)
        sh("ip", "-n", self.node_ns, "link", "set", "lo", "up")
        cni = {
            "cniVersion": "1.0.0",
            "name": f"{TEST_PREFIX}-{self.token}",
            "plugins": [{
                "type": "bridge", "bridge": "cnivsbx0", "isGateway": True, "ipMasq": False,
                "ipam": {"type": "host-local", "ranges": [[{"subnet": f"{self.subnet}.0/24"}]],
                         "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(self.root / "cni/ipam")},
            }],
        }
        (self.root / "cni/net.d/10-vsbxt.conflist").write_text(json.dumps(cni, indent=2))
        r = self.root
        # The proxy plugin and runtime handler come from the drop-in an admin installs.
        dropin = (REPO / "deploy" / "containerd" / "vmsandbox.toml").read_text()
        assert DEPLOY_SOCKET in dropin
        (r / "vmsandbox.toml").write_text(dropin.replace(DEPLOY_SOCKET, str(self.sandboxer_socket)))
        self.config.write_text(f"""\
version = 3
imports = ['{r}/vmsandbox.toml']
root = '{r}/root'
state = '{r}/state'
disabled_plugins = ['io.containerd.nri.v1.nri', 'io.containerd.snapshotter.v1.btrfs',
                    'io.containerd.snapshotter.v1.devmapper', 'io.containerd.snapshotter.v1.zfs',
                    'io.containerd.snapshotter.v1.blockfile', 'io.containerd.snapshotter.v1.erofs',
                    'io.containerd.tracing.processor.v1.otlp', 'io.containerd.internal.v1.tracing']

[grpc]
  address = '{self.socket}'
[ttrpc]
  address = '{self.socket}.ttrpc'
[debug]
  level = 'info'

[plugins]
  [plugins.'io.containerd.internal.v1.opt']
    path = '{r}/opt'
  [plugins.'io.containerd.cri.v1.images']
    snapshotter = 'overlayfs'
    [plugins.'io.containerd.cri.v1.images'.pinned_images]
      sandbox = '{PAUSE_IMAGE}'
  [plugins.'io.containerd.cri.v1.runtime']
    netns_mounts_under_state_dir = true
    enable_cdi = false
    cdi_spec_dirs = ['{r}/cdi']
    [plugins.'io.containerd.cri.v1.runtime'.cni]
      bin_dirs = ['{self.bins.cni_bin}']
      conf_dir = '{r}/cni/net.d'
      max_conf_num = 1
  [plugins.'io.containerd.grpc.v1.cri']
    stream_server_address = '127.0.0.1'
    stream_server_port = '0'
""")

    # -- process ------------------------------------------------------------------------
    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None
        self.proc = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{self.node_ns}", "--", str(self.bins.containerd), "--config", str(self.config)],
            stdout=subprocess.DEVNULL, stderr=open(self.log, "ab"),
            # containerd resolves runtime_type to containerd-shim-vmsandbox-v1 when it reloads
            # the tasks of running containers at a restart: the venv's bin must be on its PATH.
            env={**os.environ, "TMPDIR": str(self.root),
                 "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])},
        )
        deadline = time.monotonic() + 60
        while True:
            assert self.proc.poll() is None, f"containerd exited: {self.log.read_text()[-4000:]}"
            if self.socket.exists():
                try:
                    self.runtime().Version(cri.VersionRequest(), timeout=2)
                    break
                except grpc.RpcError:
                    pass
            assert time.monotonic() < deadline, f"containerd did not answer CRI: {self.log.read_text()[-4000:]}"
            time.sleep(0.1)

    def stop(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def cleanup(self) -> list[str]:
        """Stop containerd and remove what it made outside its folder. Returns the CNI
        result-cache entries of our network that were left (a pod whose CNI DEL never ran)."""
        self.stop()
        unmount_under(self.root)
        if os.path.exists(f"/run/netns/{self.node_ns}"):
            sh("ip", "netns", "del", self.node_ns, check=False)
        # containerd 2.1 creates an empty /run/containerd even when its state is elsewhere.
        if not self._run_containerd_existed:
            try:
                os.rmdir("/run/containerd")
            except OSError:
                pass
        # libcni caches results under /var/lib/cni (containerd 2.1 offers no setting for it)
        # and removes each entry at CNI DEL.
        results = Path(CNI_CACHE) / "results"
        left = sorted(p.name for p in results.glob(f"{TEST_PREFIX}-{self.token}-*")) if results.is_dir() else []
        if not self._var_lib_cni_existed and not left:
            shutil.rmtree(CNI_CACHE, ignore_errors=True)
        return left

    # -- clients --------------------------------------------------------------------------
    def channel(self) -> grpc.Channel:
        if self._channel is None:
            self._channel = grpc.insecure_channel(f"unix://{self.socket}")
        return self._channel

    def runtime(self) -> cri_grpc.RuntimeServiceStub:
        return cri_grpc.RuntimeServiceStub(self.channel())

    def images(self) -> cri_grpc.ImageServiceStub:
        return cri_grpc.ImageServiceStub(self.channel())

    def ctr(self, *args: str) -> str:
        return sh(str(self.bins.ctr), "--address", str(self.socket), "-n", "k8s.io", *args)

    def import_image(self, tar: Path) -> None:
        self.ctr("images", "import", "--all-platforms", str(tar))

    def in_node(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a command in the node's network namespace (where the CNI bridge is)."""
        done = subprocess.run(["ip", "netns", "exec", self.node_ns, *args], capture_output=True, text=True)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed in the node namespace: {done.stderr.strip()}")
        return done
