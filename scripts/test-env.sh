#!/usr/bin/env bash
# Makes this Debian machine ready for Portolan's tests: installs what is missing
# (etcd, HAProxy, Docker Engine, busybox, protoc, wrk, shellcheck, vagrant, Pebble, …), starts
# dockerd in the background when no engine answers, and builds the busybox test image.
# Idempotent: a second run does nothing but check.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

ensure_packages "${BUILD_PACKAGES[@]}" etcd:etcd-server etcdctl:etcd-client haproxy:haproxy \
  busybox:busybox-static wrk:wrk socat:socat \
  shellcheck:shellcheck vagrant:vagrant openssl:openssl \
  systemd-analyze:systemd dpkg-deb:dpkg dpkg-shlibdeps:dpkg-dev strip:binutils \
  /bin/kill:procps ip:iproute2 iptables:iptables chromium:chromium \
  pebble:pebble
ensure_docker /var/log/portolan-test-dockerd.log

# Leftovers of an earlier, interrupted run would confuse the registrar tests.
stale=$(docker ps -aq --filter label=portolan.test)
if [ -n "$stale" ]; then
  # shellcheck disable=SC2086
  docker rm -f -v $stale >/dev/null
fi

docker image inspect portolan-test-busybox:latest >/dev/null 2>&1 || bash scripts/build-test-image.sh
echo "test-env: ready (etcd $(etcd --version | head -1 | awk '{print $3}'), $(haproxy -v | head -1 | awk '{print $1, $3}'), docker $(docker version --format '{{.Server.Version}}'))"
