#!/usr/bin/env bash
# Makes this Debian machine ready for Portolan's tests: installs what is missing
# (etcd, HAProxy, Docker Engine, busybox, protoc, wrk, shellcheck, vagrant), starts
# dockerd in the background when no engine answers, and builds the busybox test image.
# Idempotent: a second run does nothing but check.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
need() { command -v "$1" >/dev/null 2>&1 || missing+=("$2"); }
need etcd etcd-server
need etcdctl etcd-client
need haproxy haproxy
need busybox busybox-static
need protoc protobuf-compiler
need wrk wrk
need socat socat
need shellcheck shellcheck
need vagrant vagrant
need curl curl
need systemd-analyze systemd
need dpkg-deb dpkg
need dpkg-shlibdeps dpkg-dev
need strip binutils
[ -x /bin/kill ] || missing+=(procps)
need ip iproute2
need iptables iptables
if ! docker info >/dev/null 2>&1; then
  need dockerd docker.io
  need docker docker.io
fi

if [ ${#missing[@]} -gt 0 ]; then
  # shellcheck disable=SC2207
  pkgs=($(printf '%s\n' "${missing[@]}" | sort -u))
  echo "test-env: installing ${pkgs[*]}"
  as_root apt-get update -q
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${pkgs[@]}"
fi

if ! docker info >/dev/null 2>&1; then
  echo "test-env: starting dockerd in the background (log: /var/log/portolan-test-dockerd.log)"
  as_root sh -c 'nohup dockerd >/var/log/portolan-test-dockerd.log 2>&1 &'
  for _ in $(seq 1 120); do
    if [ -S /var/run/docker.sock ] && docker info >/dev/null 2>&1; then break; fi
    sleep 0.5
  done
  docker info >/dev/null 2>&1 || { echo "test-env: dockerd did not come up; see /var/log/portolan-test-dockerd.log" >&2; exit 1; }
fi

# Leftovers of an earlier, interrupted run would confuse the registrar tests.
stale=$(docker ps -aq --filter label=portolan.test)
if [ -n "$stale" ]; then
  # shellcheck disable=SC2086
  docker rm -f -v $stale >/dev/null
fi

docker image inspect portolan-test-busybox:latest >/dev/null 2>&1 || bash scripts/build-test-image.sh
echo "test-env: ready (etcd $(etcd --version | head -1 | awk '{print $3}'), $(haproxy -v | head -1 | awk '{print $1, $3}'), docker $(docker version --format '{{.Server.Version}}'))"
