#!/usr/bin/env bash
# A Docker host: Docker Engine, portolan-registrar, and one demo container.
# Usage: docker-host.sh NODE ADVERTISE_IP ETCD_ENDPOINTS(comma separated)
set -euo pipefail
node=$1
ip=$2
endpoints=$3
# shellcheck source-path=SCRIPTDIR source=lib.sh
. /portolan/vagrant/provision/lib.sh

apt_install docker.io etcd-client busybox-static

registrar_toml "$node" "$ip" "$endpoints" >/etc/portolan/registrar.toml
portolan check --config /etc/portolan/registrar.toml

wait_for_etcd "$endpoints"
systemctl enable --now portolan-registrar

# A demo service built from busybox (no registry needed): `hello`, published on a
# random host port, page = container id.
if ! docker image inspect portolan-demo:latest >/dev/null 2>&1; then
  bash /portolan/scripts/build-test-image.sh portolan-demo:latest
fi
if ! docker container inspect hello >/dev/null 2>&1; then
  docker run -d --name hello --restart unless-stopped \
    -l portolan.service=hello -p 8080 portolan-demo:latest
fi
echo "$node: registrar running; demo container 'hello' published on $(docker port hello 8080/tcp | head -1)"
