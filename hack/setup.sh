#!/usr/bin/env bash
# Prepare a Debian/Ubuntu host for vmsandbox: system packages, a Python venv with our
# dependencies, and a running libvirtd + virtlogd. Idempotent; changes only what is missing
# and says what it changed. Run from the repo root as root.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf 'setup: %s\n' "$*"; }
[ "$(id -u)" -eq 0 ] || { echo "setup: must run as root (libvirt system instance, netns, taps)" >&2; exit 1; }

PKGS=(qemu-system-x86 qemu-utils libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients
      libvirt-dev pkg-config busybox-static dropbear-bin cpio e2fsprogs iproute2 kmod
      gcc libc6-dev make patch bzip2 xz-utils python3 python3-venv python3-dev procps util-linux crun qemu-system-common)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# libvirtd refuses to start without its QEMU user (normally made by libvirt-daemon-system).
if ! getent passwd libvirt-qemu >/dev/null; then
  getent group kvm >/dev/null || groupadd --system kvm
  getent group libvirt-qemu >/dev/null || groupadd --system libvirt-qemu
  useradd --system --no-create-home --home-dir /var/lib/libvirt --shell /usr/sbin/nologin \
          -g libvirt-qemu -G kvm libvirt-qemu
  say "created system user libvirt-qemu"
fi
# Debian's udev rule makes /dev/kvm root:kvm 0660. Without it libvirt's access check (as
# libvirt-qemu) disagrees with its cached QEMU capabilities and it re-probes QEMU (~50 s)
# on every domain definition.
if [ -c /dev/kvm ] && [ "$(stat -c %G:%a /dev/kvm)" != "kvm:660" ] && [ "$(stat -c %a /dev/kvm)" != "666" ]; then
  chgrp kvm /dev/kvm && chmod 660 /dev/kvm
  say "set /dev/kvm to root:kvm 0660 (as Debian's udev rule does)"
fi
mkdir -p /var/log/libvirt/qemu /var/run/libvirt /var/lib/libvirt/qemu /var/cache/libvirt/qemu

if ! pgrep -x virtlogd >/dev/null; then
  virtlogd -d
  say "started virtlogd"
fi
if ! pgrep -x libvirtd >/dev/null; then
  libvirtd -d
  say "started libvirtd"
fi
for _ in $(seq 1 50); do
  virsh -c qemu:///system version >/dev/null 2>&1 && break
  sleep 0.2
done
virsh -c qemu:///system version >/dev/null || { echo "setup: libvirtd does not answer on qemu:///system" >&2; exit 1; }

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  say "created .venv"
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[dev,bench]'
say "Python dependencies installed in .venv"
say "ok"
