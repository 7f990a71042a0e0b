#!/usr/bin/env bash
# The load balancer: HAProxy in master-worker mode (the drop-in from install-portolan.sh)
# and portolan-watcher. Usage: lb.sh NAME ETCD_ENDPOINTS(comma separated)
set -euo pipefail
name=$1
endpoints=$2
# shellcheck source-path=SCRIPTDIR source=lib.sh
. /portolan/vagrant/provision/lib.sh

apt_install haproxy etcd-client curl
# The package's postinst gives the watcher's group /etc/haproxy, which exists only now.
sh /portolan/packaging/postinst configure
# The drop-in was installed before HAProxy started, but a re-provision must apply it too.
systemctl daemon-reload
systemctl restart haproxy
for _ in $(seq 1 50); do
  [ -S /run/haproxy-master.sock ] && break
  sleep 0.1
done
[ -S /run/haproxy-master.sock ] || { echo "HAProxy has no master socket; see 'systemctl cat haproxy'" >&2; exit 1; }

watcher_toml "$name" "$endpoints" >/etc/portolan/watcher.toml
portolan check --config /etc/portolan/watcher.toml

wait_for_etcd "$endpoints"
systemctl enable --now portolan-watcher
portolan ls --config /etc/portolan/watcher.toml
echo "$name: front door on port 80; try: curl -H 'Host: hello.localhost' http://<this host>/"
