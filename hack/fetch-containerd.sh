#!/usr/bin/env bash
# Fetch containerd 2.x and the CNI plugins as Debian packages from the unstable suite (Debian
# 12 ships containerd 1.6, which has no sandbox API) and unpack them into a cache folder,
# without installing anything system-wide. The mirror is the one this host's apt already
# uses. Prints the folder; idempotent (a complete cache is reused).
#   hack/fetch-containerd.sh [CACHE_DIR]     (default: .cache/containerd)
# The binaries end up in CACHE_DIR/root/usr/bin (containerd, ctr, containerd-shim-runc-v2)
# and CACHE_DIR/root/usr/lib/cni (bridge, host-local, loopback, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
cache=$(realpath -m "${1:-.cache/containerd}")
root=$cache/root
if [ -x "$root/usr/bin/containerd" ] && [ -x "$root/usr/lib/cni/bridge" ] && [ -f "$cache/versions" ]; then
  echo "$cache"
  exit 0
fi
say() { printf 'fetch-containerd: %s\n' "$*" >&2; }
command -v apt-get >/dev/null || { say "needs apt-get (a Debian or Ubuntu host)"; exit 1; }

mirror=$(images/debian-mirror.sh) || { say "cannot tell the host's Debian mirror"; exit 1; }
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
[ -f "$keyring" ] || { say "missing $keyring (package debian-archive-keyring)"; exit 1; }

apt_dir=$cache/apt
mkdir -p "$apt_dir/lists/partial" "$apt_dir/archives/partial" "$cache/debs"
printf 'deb [signed-by=%s] %s sid main\n' "$keyring" "$mirror" >"$apt_dir/sources.list"
opts=(-o Dir::Etc::SourceList="$apt_dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
      -o Dir::State::Lists="$apt_dir/lists" -o Dir::Cache::Archives="$apt_dir/archives"
      -o Dir::State::Status=/dev/null -o APT::Get::List-Cleanup=0 -o Debug::NoLocking=1 -o APT::Sandbox::User=root)
say "reading the unstable suite's package list from the host's mirror"
apt-get "${opts[@]}" -qq update
cd "$cache/debs"
say "downloading containerd and containernetworking-plugins"
apt-get "${opts[@]}" -qq download containerd containernetworking-plugins
rm -rf "$root"
mkdir -p "$root"
: >"$cache/versions.tmp"
for deb in "$cache"/debs/*.deb; do
  dpkg-deb -x "$deb" "$root"
  dpkg-deb -W --showformat='${Package} ${Version}\n' "$deb" >>"$cache/versions.tmp"
done
rm -f "$cache"/debs/*.deb
rm -rf "$apt_dir/lists" "$apt_dir/archives"
mv "$cache/versions.tmp" "$cache/versions"
say "unpacked: $(paste -sd', ' "$cache/versions")"
echo "$cache"
