#!/usr/bin/env bash
# Installs Portolan from the synced repository (/portolan) in the same layout as the
# Debian package: /usr/bin/portolan (built on the host with `cargo build --release`),
# the units and the HAProxy drop-in under /lib/systemd/system, the default template
# under /usr/share/portolan/templates, the portolan user and /var/lib/portolan.
set -euo pipefail
repo=/portolan
bin=$repo/target/release/portolan

if [ ! -x "$bin" ]; then
  echo "no $bin: run 'cargo build --release' on the host, then 'vagrant rsync && vagrant provision'" >&2
  exit 1
fi
install -m 0755 "$bin" /usr/bin/portolan
install -m 0644 -t /lib/systemd/system "$repo"/systemd/portolan-registrar.service "$repo"/systemd/portolan-watcher.service
install -d /lib/systemd/system/haproxy.service.d
install -m 0644 "$repo"/systemd/haproxy.service.d/portolan.conf /lib/systemd/system/haproxy.service.d/portolan.conf
install -d /usr/share/portolan/templates
install -m 0644 "$repo"/templates/haproxy.cfg.tera /usr/share/portolan/templates/haproxy.cfg.tera
install -d /etc/portolan
# The package's own postinst: the portolan user and /var/lib/portolan, daemon-reload.
sh "$repo"/packaging/postinst configure
portolan --version
