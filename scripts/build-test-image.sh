#!/usr/bin/env bash
# Builds the busybox test image from scratch (no registry needed): busybox-static plus a
# tiny /bin/serve that runs httpd on :8080 with a page naming the container.
#   build-test-image.sh [IMAGE] [--stop-on-term]
# --stop-on-term (the tour's demo image): /bin/serve exits at once on SIGTERM, so
# `docker stop` takes no 10 s. Without it (the tests' image) httpd runs as PID 1, which
# ignores SIGTERM: a `docker stop` lasts its whole timeout, the window the drain tests
# measure in.
set -euo pipefail
image=portolan-test-busybox:latest
stop_on_term=0
for arg in "$@"; do
  case $arg in
    --stop-on-term) stop_on_term=1 ;;
    -*) echo "build-test-image: unknown option $arg" >&2; exit 2 ;;
    *) image=$arg ;;
  esac
done
busybox=$(command -v busybox)
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
cp "$busybox" "$ctx/busybox"
if [ "$stop_on_term" = 1 ]; then
  cat > "$ctx/serve" <<'SH'
#!/bin/sh
# Page body: the container's host name (its short id) unless PAGE is set.
mkdir -p /www
echo "${PAGE:-$(hostname)}" > /www/index.html
# PID 1 gets no default signal handling: without this trap SIGTERM would be ignored.
httpd -f -p "${PORT:-8080}" -h /www &
pid=$!
trap 'kill "$pid" 2>/dev/null; exit 0' TERM INT
wait "$pid"
SH
  label=true
else
  cat > "$ctx/serve" <<'SH'
#!/bin/sh
# Page body: the container's host name (its short id) unless PAGE is set.
mkdir -p /www
echo "${PAGE:-$(hostname)}" > /www/index.html
exec httpd -f -p "${PORT:-8080}" -h /www
SH
  label=false
fi
chmod +x "$ctx/serve"
cat > "$ctx/Dockerfile" <<DF
FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]
COPY serve /bin/serve
LABEL portolan.demo.stops-on-term="$label"
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
