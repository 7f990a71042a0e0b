#!/usr/bin/env bash
# One member of the three-member etcd cluster (Debian's etcd-server, configured through
# /etc/default/etcd). Usage: etcd.sh NAME IP INITIAL_CLUSTER
set -euo pipefail
name=$1
ip=$2
initial_cluster=$3
# shellcheck source-path=SCRIPTDIR source=lib.sh
. /portolan/vagrant/provision/lib.sh

apt_install etcd-server etcd-client

marker="# written by portolan vagrant/provision/etcd.sh"
if ! grep -qF "$marker" /etc/default/etcd 2>/dev/null; then
  # The package has started a throwaway single-member cluster; a member of a new
  # cluster must start from an empty data dir. Only on the first run: a re-provision
  # keeps the data.
  systemctl stop etcd
  rm -rf /var/lib/etcd/default
  cat >/etc/default/etcd <<CONF
$marker
ETCD_NAME=$name
ETCD_DATA_DIR=/var/lib/etcd/default
ETCD_LISTEN_PEER_URLS=http://$ip:2380
ETCD_LISTEN_CLIENT_URLS=http://$ip:2379,http://127.0.0.1:2379
ETCD_ADVERTISE_CLIENT_URLS=http://$ip:2379
ETCD_INITIAL_ADVERTISE_PEER_URLS=http://$ip:2380
ETCD_INITIAL_CLUSTER=$initial_cluster
ETCD_INITIAL_CLUSTER_STATE=new
ETCD_INITIAL_CLUSTER_TOKEN=portolan-vagrant
CONF
fi

systemctl enable etcd
# --no-block: a member reports ready only once it has a quorum, and its peers are
# provisioned after it. The Docker and load-balancer hosts wait for the whole cluster.
systemctl start --no-block etcd
echo "etcd member $name on $ip started; cluster: $initial_cluster"
