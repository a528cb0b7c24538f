#!/usr/bin/env bash
# The main job, end to end on a fresh Debian/Ubuntu host: set the host up, build the default
# guest image, boot a sandbox on a small busybox rootfs disk, run commands in it, show its
# status, platform and metrics, stop it, wait for it and remove it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash hack/setup.sh
export VMSANDBOX_PROGRESS=1
vms() { .venv/bin/vmsandbox "$@"; }
id="demo-$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')"
work=/var/lib/vmsandbox/demo
mkdir -p "$work" && chmod 711 /var/lib/vmsandbox "$work"
trap 'vms shutdown "$id" >/dev/null 2>&1 || true; rm -f "$work/$id.img"' EXIT

echo "== guest image"; vms image build
echo "== rootfs disk"; bash hack/mkrootfs.sh "$work/$id.img" 64
echo "== create + start $id"
vms create "$id" --rootfs "$work/$id.img" --memory-mib 256
vms start "$id"
echo "== exec (no shell: argv goes straight to the guest)"
vms exec "$id" -- uname -a
vms exec "$id" -- cat /etc/os-release
vms exec "$id" -- sh -c 'echo "hello from $(hostname), $(nproc) vCPU, $(grep MemTotal /proc/meminfo)"'
echo "== status"; vms status "$id"
echo "== platform"; vms platform "$id"
echo "== metrics (cgroups v2, as containerd reads them)"; vms metrics "$id" | head -n 20
echo "== stop + wait"; vms stop "$id"; vms wait "$id"
echo "== shutdown"; vms shutdown "$id"
vms list
echo "demo: ok"
