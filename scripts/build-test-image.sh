#!/usr/bin/env bash
# Builds the busybox test image from scratch (no registry needed): busybox-static plus a
# tiny /bin/serve that runs httpd on :8080 with a page naming the container.
set -euo pipefail
image=${1:-portolan-test-busybox:latest}
busybox=$(command -v busybox)
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
cp "$busybox" "$ctx/busybox"
cat > "$ctx/serve" <<'SH'
#!/bin/sh
# Page body: the container's host name (its short id) unless PAGE is set.
mkdir -p /www
echo "${PAGE:-$(hostname)}" > /www/index.html
exec httpd -f -p "${PORT:-8080}" -h /www
SH
chmod +x "$ctx/serve"
cat > "$ctx/Dockerfile" <<'DF'
FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]
COPY serve /bin/serve
EXPOSE 8080
CMD ["/bin/serve"]
DF
# The legacy builder needs no buildx plugin; its deprecation notice is noise unless
# the build fails.
if ! out=$(DOCKER_BUILDKIT=0 docker build -q -t "$image" "$ctx" 2>&1); then
  echo "$out" >&2
  exit 1
fi
echo "built $image"
