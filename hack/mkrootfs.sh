#!/usr/bin/env bash
# Make a small ext4 root filesystem image (busybox) to use as a sandbox rootfs.
# Usage: hack/mkrootfs.sh OUT.img [SIZE_MIB]   (needs busybox-static and e2fsprogs)
set -euo pipefail
out=${1:?usage: mkrootfs.sh OUT.img [SIZE_MIB]}
size=${2:-64}
tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
mkdir -p "$tree"/{bin,sbin,etc,proc,sys,dev,tmp,root,var,run,usr/bin,data}
cp /bin/busybox "$tree/bin/busybox"
for applet in $(/bin/busybox --list); do
  [ "$applet" = busybox ] || ln -sf busybox "$tree/bin/$applet"
done
cat > "$tree/etc/os-release" <<'OS'
NAME="vmsandbox test rootfs"
ID=vsbxrootfs
PRETTY_NAME="vmsandbox busybox rootfs"
OS
echo 'root:x:0:0:root:/root:/bin/sh' > "$tree/etc/passwd"
echo 'root:x:0:' > "$tree/etc/group"
chmod 1777 "$tree/tmp"
rm -f "$out"
truncate -s "${size}M" "$out"
mkfs.ext4 -q -F -L vsbxroot -d "$tree" "$out"
echo "$out"
