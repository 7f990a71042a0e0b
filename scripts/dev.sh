#!/usr/bin/env bash
# Try Portolan on one Debian machine: installs what is missing (etcd, HAProxy, Docker
# Engine, busybox, protoc and its include files), starts dockerd if none answers, builds Portolan and a tiny
# demo image, then runs `portolan dev` (Ctrl-C stops everything it started).
# Extra arguments go to `portolan dev` (see `portolan dev --help`).
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/lib.sh
. scripts/lib.sh

ensure_packages "${BUILD_PACKAGES[@]}" etcd:etcd-server etcdctl:etcd-client haproxy:haproxy \
  busybox:busybox-static
ensure_docker /var/log/portolan-dockerd.log
# No registry can be assumed: build the demo image from busybox, like the tests do. One
# built before it stopped on SIGTERM at once (no such label) is built again.
if [ "$(docker image inspect -f '{{ index .Config.Labels "portolan.demo.stops-on-term" }}' portolan-demo:latest 2>/dev/null)" != true ]; then
  bash scripts/build-test-image.sh portolan-demo:latest --stop-on-term
fi
cargo build --release --locked
exec target/release/portolan dev "$@"
