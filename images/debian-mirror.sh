#!/usr/bin/env bash
# Print the host's Debian mirror: the first URI of an apt source that carries the main archive
# (not security). Used by hack/fetch-containerd.sh and images/dropbear/build.sh, so that a
# host whose apt goes through its own mirror is asked nothing of deb.debian.org.
set -euo pipefail
mirror=""
for f in /etc/apt/sources.list.d/*.sources; do
  [ -f "$f" ] || continue
  mirror=$(awk '/^URIs:/ {for (i = 2; i <= NF; i++) if ($i !~ /security/) {print $i; exit}}' "$f")
  [ -n "$mirror" ] && break
done
if [ -z "$mirror" ] && [ -f /etc/apt/sources.list ]; then
  mirror=$(awk '$1 == "deb" && $0 !~ /security/ {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; exit}}' /etc/apt/sources.list)
fi
[ -n "$mirror" ] || { echo "found no Debian mirror in /etc/apt/sources.list{,.d}" >&2; exit 1; }
echo "$mirror"
