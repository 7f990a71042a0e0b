#!/usr/bin/env bash
# Try Portolan on one Debian machine: installs what is missing (etcd, HAProxy, Docker
# Engine, busybox, protoc), starts dockerd if none answers, builds Portolan and a tiny
# demo image, then runs `portolan dev` (Ctrl-C stops everything it started).
# Extra arguments go to `portolan dev` (see `portolan dev --help`).
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
need curl curl
if ! docker info >/dev/null 2>&1; then
  need dockerd docker.io
  need docker docker.io
fi
if [ ${#missing[@]} -gt 0 ]; then
  # shellcheck disable=SC2207
  pkgs=($(printf '%s\n' "${missing[@]}" | sort -u))
  echo "dev: installing ${pkgs[*]}"
  as_root apt-get update -q
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${pkgs[@]}"
fi
if ! docker info >/dev/null 2>&1; then
  echo "dev: starting dockerd in the background (log: /var/log/portolan-dockerd.log)"
  as_root sh -c 'nohup dockerd >/var/log/portolan-dockerd.log 2>&1 &'
  for _ in $(seq 1 120); do
    docker info >/dev/null 2>&1 && break
    sleep 0.5
  done
  docker info >/dev/null 2>&1 || { echo "dev: dockerd did not start; see /var/log/portolan-dockerd.log" >&2; exit 1; }
fi
# No registry can be assumed: build the demo image from busybox, like the tests do.
docker image inspect portolan-demo:latest >/dev/null 2>&1 || bash scripts/build-test-image.sh portolan-demo:latest
cargo build --release --locked
exec target/release/portolan dev "$@"
