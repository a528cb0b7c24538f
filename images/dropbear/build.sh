#!/usr/bin/env bash
# Build the guest's dropbear: Debian's source of the installed dropbear-bin, Debian's patches,
# then ours (*.patch here), with the bundled libtomcrypt/libtommath and no zlib.
# Usage: images/dropbear/build.sh OUT_BINARY
# Why not the distro binary: Debian 12's 2022.83 closes new channels while other channels end
# (check-close-unstarted.patch says how), which lost about one exec in three under load.
set -euo pipefail
out=${1:?usage: dropbear/build.sh OUT_BINARY}
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"  # apt's _apt user writes the download here

version=$(dpkg-query -W -f '${Version}' dropbear-bin 2>/dev/null || echo none)
# Built once per (Debian version, our patches, this script, arch) and cached: a fresh state
# dir builds a new image, and compiling dropbear costs about a minute under load.
cache=${VMSANDBOX_BUILD_CACHE:-/var/cache/vmsandbox}/dropbear
key=$( { echo "$version $(uname -m)"; cat "$0" "$here"/*.patch; } | sha256sum | cut -c1-16)
if [ -x "$cache/$key/dropbear" ]; then
  install -m 755 "$cache/$key/dropbear" "$out"
  exit 0
fi
# A private deb-src list: the host's apt configuration is left as it is.
mkdir -p "$work/lists/partial"
cat > "$work/src.sources" <<SRC
Types: deb-src
URIs: $("$here/../debian-mirror.sh")
Suites: $(. /etc/os-release && echo "$VERSION_CODENAME")
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
apt_src=(-o "Dir::Etc::SourceList=$work/src.sources" -o Dir::Etc::SourceParts=/dev/null
         -o "Dir::State::Lists=$work/lists")
apt-get -qq "${apt_src[@]}" update >/dev/null
# The installed version's source; the suite's current one when the archive moved on.
(cd "$work" && { apt-get -qq "${apt_src[@]}" source --download-only "dropbear=$version" ||
                 apt-get -qq "${apt_src[@]}" source --download-only dropbear; } >/dev/null 2>&1)
tar -xjf "$work"/dropbear_*.orig.tar.bz2 -C "$work"
src=$(echo "$work"/dropbear-*/)
src=${src%/}
tar -xJf "$work"/dropbear_*.debian.tar.xz -C "$src"
while read -r p; do
  case $p in ''|'#'*) continue ;; esac
  patch -d "$src" -p1 -s < "$src/debian/patches/$p"
done < "$src/debian/patches/series"
for p in "$here"/*.patch; do
  patch -d "$src" -p1 -s < "$p"
done
cp "$src/debian/localoptions.h" "$src/"
(cd "$src" && ./configure -q --enable-bundled-libtom --disable-zlib --disable-lastlog --disable-utmp \
   --disable-utmpx --disable-wtmp --disable-wtmpx --disable-pututline --disable-pututxline >/dev/null &&
 make -s -j"$(nproc)" PROGRAMS=dropbear >/dev/null 2>&1)
install -m 755 "$src/dropbear" "$out"
mkdir -p "$cache"
tmp=$(mktemp -d "$cache/.build-XXXXXX")
install -m 755 "$src/dropbear" "$tmp/dropbear"
rm -rf "${cache:?}/$key" && mv "$tmp" "$cache/$key" || rm -rf "$tmp"  # a concurrent build may have won
