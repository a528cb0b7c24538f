#!/usr/bin/env bash
# Build the default vmsandbox guest: the kernel from Debian's cloud kernel package and a
# small initramfs (busybox, the virtio and virtio-fs modules, our init, dropbear, the agent
# and crun).
# Usage: images/build.sh OUT_DIR   (writes vmlinuz, initramfs.img, manifest.json)
# Env: VMSANDBOX_KERNEL_PACKAGE (default: what linux-image-cloud-<arch> depends on).
set -euo pipefail
out=${1:?usage: build.sh OUT_DIR}
here=$(cd "$(dirname "$0")" && pwd)
step() { printf 'image: %s\n' "$*" >&2; }

arch=$(dpkg --print-architecture)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"

# Debian's cloud flavour first; Ubuntu's kvm/virtual flavours as fallbacks (untested).
resolve() {
  for meta in "linux-image-cloud-$arch" linux-image-kvm linux-image-virtual; do
    apt-cache depends "$meta" 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}' | grep . && return 0
  done
  return 1
}
pkg=${VMSANDBOX_KERNEL_PACKAGE:-}
if [ -z "$pkg" ]; then
  pkg=$(resolve) || { apt-get update -qq; pkg=$(resolve) || true; }
fi
[ -n "$pkg" ] || { echo "image: cannot resolve a kernel package (set VMSANDBOX_KERNEL_PACKAGE)" >&2; exit 1; }
step "downloading kernel package $pkg"
(cd "$work" && apt-get download -q "$pkg" >/dev/null 2>&1) ||
  { apt-get update -qq && (cd "$work" && apt-get download -q "$pkg" >/dev/null); }
dpkg-deb -x "$work"/"$pkg"_*.deb "$work/kernel"
kver=$(ls "$work/kernel/lib/modules")

step "assembling initramfs for kernel $kver"
root=$work/root
mkdir -p "$root"/{bin,sbin,etc,proc,sys,dev,run,tmp,root,rootfs,newroot,lib/modules,usr/bin,usr/sbin,var/log}
cp /bin/busybox "$root/bin/busybox"
for applet in $(/bin/busybox --list); do
  [ "$applet" = busybox ] || ln -sf busybox "$root/bin/$applet"
done
mods=$work/kernel/lib/modules/$kver
: > "$root/etc/modules"
while read -r m; do
  ko=$(find "$mods" \( -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" \) | head -n1)
  if [ -z "$ko" ]; then
    # Built into this kernel: nothing to load.
    grep -q "/$m.ko\$" "$mods/modules.builtin" 2>/dev/null && continue
    echo "image: module $m not found in $pkg" >&2; exit 1
  fi
  case $ko in
    *.xz) xz -dc "$ko" > "$root/lib/modules/$m.ko" ;;
    *.zst) zstd -qdc "$ko" > "$root/lib/modules/$m.ko" ;;
    *) cp "$ko" "$root/lib/modules/" ;;
  esac
  echo "$m" >> "$root/etc/modules"
done < "$here/modules"

# A host binary (installed as GUEST_PATH, default the same path) and the shared libraries
# ldd finds for it.
with_libs() {
  [ -x "$1" ] || { echo "image: $1 is missing (hack/setup.sh installs it)" >&2; exit 1; }
  cp "$1" "$root${2:-$1}"
  for lib in $(ldd "$1" | grep -o '/[^ ]*'); do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
}
step "building dropbear from Debian's source with images/dropbear/*.patch"
"$here/dropbear/build.sh" "$work/dropbear"
with_libs "$work/dropbear" /usr/sbin/dropbear
with_libs /usr/bin/crun  # the OCI runtime for containers in the guest (Debian's crun)

gcc -static -O2 -o "$root/sbin/vsbx-agent" "$here/agent/agent.c"
ln -sf vsbx-agent "$root/sbin/vsbx-exec"
install -m 755 "$here/init" "$root/init"
install -m 755 "$here/vsbx-poweroff" "$root/sbin/vsbx-poweroff"
install -m 755 "$here/vsbx-setup" "$root/sbin/vsbx-setup"
# nobody/nogroup (Debian's ids): an unprivileged user for exec's user (token u) in the guest
# root; it has no keys, so no login. Containers use their own rootfs's files.
printf '%s\n' 'root:x:0:0:root:/root:/sbin/vsbx-exec' 'nobody:x:65534:65534:nobody:/nonexistent:/bin/false' \
  > "$root/etc/passwd"
printf '%s\n' 'root:x:0:' 'nogroup:x:65534:' > "$root/etc/group"
echo '/sbin/vsbx-exec' > "$root/etc/shells"
printf 'os=linux\n' > "$root/etc/vmsandbox-release"

(cd "$root" && find . -print0 | cpio --null -o -H newc --quiet | gzip -1) > "$work/initramfs.img"
cp "$work/kernel/boot/vmlinuz-$kver" "$work/vmlinuz"

case $arch in
  amd64) oci_arch=amd64; variant= ;;
  arm64) oci_arch=arm64; variant=v8 ;;
  *) oci_arch=$arch; variant= ;;
esac
busybox_version=$(/bin/busybox | awk 'NR == 1 {print $2}')  # awk reads all: head would SIGPIPE busybox (exit 141 under pipefail)
dropbear_version=$("$work/dropbear" -V 2>&1 | awk '{print $2}' | head -n1)+vsbx
crun_version=$(crun --version | awk 'NR == 1 {print $3}')
mkdir -p "$out"
cp "$work/vmlinuz" "$work/initramfs.img" "$out/"
cat > "$out/manifest.json" <<JSON
{
  "name": "default",
  "os": "linux",
  "architecture": "$oci_arch",
  "variant": "$variant",
  "kernel_version": "$kver",
  "kernel_package": "$pkg",
  "busybox_version": "$busybox_version",
  "dropbear_version": "$dropbear_version",
  "crun_version": "$crun_version",
  "built_at": "$(date -u +%Y-%m-%dT%H:%M:%SZ)",
  "files": {
    "vmlinuz": "$(sha256sum "$out/vmlinuz" | cut -d' ' -f1)",
    "initramfs.img": "$(sha256sum "$out/initramfs.img" | cut -d' ' -f1)"
  }
}
JSON
step "built $(du -h "$out/initramfs.img" | cut -f1) initramfs and kernel $kver in $out"
