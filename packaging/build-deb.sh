#!/usr/bin/env bash
# Builds the Debian package with dpkg-deb (no cargo-deb, which CI would have to compile
# on every run). Usage:
#   packaging/build-deb.sh                 cargo build --release, then package that binary
#   packaging/build-deb.sh --bin PATH      package an existing binary (the tests pass theirs)
# Options: --out DIR (default target/debian), --compression xz|gzip|none (default xz).
# Prints the path of the .deb it wrote. Needs dpkg-deb, dpkg-shlibdeps (dpkg-dev), strip.
#
# Contents: /usr/bin/portolan; /lib/systemd/system/portolan-{registrar,watcher}.service
# and haproxy.service.d/portolan.conf; /usr/share/portolan/templates/; the example
# configs /etc/portolan/{registrar,watcher}.toml as conffiles; /usr/share/doc/portolan/;
# the man pages the binary prints (`portolan man --out-dir`) in /usr/share/man/man1/.
# The postinst creates the portolan user and /var/lib/portolan.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)

bin=""
out="$repo/target/debian"
compression=xz
while [ $# -gt 0 ]; do
  case $1 in
    --bin) bin=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --compression) compression=$2; shift 2 ;;
    -h | --help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-deb: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
case $compression in xz | gzip | none) ;; *) echo "build-deb: --compression xz|gzip|none" >&2; exit 2 ;; esac

# A field of the [package] section of Cargo.toml.
package_field() {
  awk -v key="$1" '
    /^\[/ { in_package = ($0 == "[package]") }
    in_package && $0 ~ "^" key " *= *\"" { sub(/^[^"]*"/, ""); sub(/"[^"]*$/, ""); print; exit }
  ' "$repo/Cargo.toml"
}
version=$(package_field version)
# Debian wants a synopsis under 80 characters; Cargo.toml's description is longer.
synopsis="keeps an HAProxy front door in step with Docker containers, via etcd"
[ -n "$version" ] || { echo "build-deb: no version in $repo/Cargo.toml" >&2; exit 1; }

if [ -z "$bin" ]; then
  (cd "$repo" && cargo build --release --locked)
  bin="$repo/target/release/portolan"
fi
[ -x "$bin" ] || { echo "build-deb: $bin is not an executable" >&2; exit 1; }
template="$repo/templates/haproxy.cfg.tera"
[ -f "$template" ] || { echo "build-deb: the default template $template is missing" >&2; exit 1; }

arch=$(dpkg --print-architecture)
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
root="$stage/portolan_${version}_${arch}"

install -d "$root/DEBIAN" "$root/usr/bin" "$root/lib/systemd/system/haproxy.service.d" \
  "$root/usr/share/portolan/templates" "$root/etc/portolan" "$root/usr/share/doc/portolan"
strip --strip-unneeded -o "$root/usr/bin/portolan" "$bin"
chmod 0755 "$root/usr/bin/portolan"
install -m 0644 "$repo/systemd/portolan-registrar.service" "$repo/systemd/portolan-watcher.service" \
  "$root/lib/systemd/system/"
install -m 0644 "$repo/systemd/haproxy.service.d/portolan.conf" "$root/lib/systemd/system/haproxy.service.d/"
install -m 0644 "$repo"/templates/*.tera "$root/usr/share/portolan/templates/"
install -m 0644 "$repo/systemd/etc/portolan/registrar.toml" "$repo/systemd/etc/portolan/watcher.toml" \
  "$root/etc/portolan/"
install -m 0644 "$repo/README.md" "$root/usr/share/doc/portolan/README.md"
# Man pages from the command line itself, so they never drift from --help.
install -d "$root/usr/share/man/man1"
"$bin" man --out-dir "$root/usr/share/man/man1"
gzip -9n "$root"/usr/share/man/man1/*.1
chmod 0644 "$root"/usr/share/man/man1/*.1.gz
cat >"$root/usr/share/doc/portolan/copyright" <<COPYRIGHT
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: portolan

Files: *
License: Apache-2.0
 On Debian systems, the full text of the Apache License 2.0 is in
 /usr/share/common-licenses/Apache-2.0.
COPYRIGHT
install -m 0755 "$repo/packaging/postinst" "$repo/packaging/prerm" "$repo/packaging/postrm" "$root/DEBIAN/"
printf '%s\n' /etc/portolan/registrar.toml /etc/portolan/watcher.toml >"$root/DEBIAN/conffiles"

# Shared-library dependencies, as dh_shlibdeps would compute them.
mkdir -p "$stage/shlibs/debian"
printf 'Source: portolan\n\nPackage: portolan\nArchitecture: any\n' >"$stage/shlibs/debian/control"
shlibs=$(cd "$stage/shlibs" && dpkg-shlibdeps -O "$root/usr/bin/portolan" 2>/dev/null | sed -n 's/^shlibs:Depends=//p')
[ -n "$shlibs" ] || { echo "build-deb: dpkg-shlibdeps found no dependencies for $bin" >&2; exit 1; }

(cd "$root" && find usr lib -type f -print0 | sort -z | xargs -0 md5sum >DEBIAN/md5sums)
installed_size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
cat >"$root/DEBIAN/control" <<CONTROL
Package: portolan
Version: $version
Architecture: $arch
Maintainer: Portolan developers <portolan@example.invalid>
Installed-Size: $installed_size
Depends: $shlibs, adduser
Suggests: haproxy (>= 2.6), docker.io, etcd-client
Section: net
Priority: optional
Description: $synopsis
 portolan registrar runs on every Docker host and keeps its running containers
 registered in etcd, on a lease, so a dead host disappears by itself.
 portolan watcher runs beside HAProxy: it renders the config from etcd, checks it
 with haproxy -c, swaps it in atomically and reloads HAProxy without dropping a
 request. portolan ls lists what is registered. Ships systemd units, an HAProxy
 drop-in for master-worker mode and a default template.
CONTROL

mkdir -p "$out"
deb="$out/portolan_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Z"$compression" --build "$root" "$deb" >/dev/null
echo "$deb"
