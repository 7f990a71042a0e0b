# Shared by scripts/dev.sh and scripts/test-env.sh (sourced, not run).
# shellcheck shell=bash

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# The packages a build of Portolan needs, as NEED:PACKAGE pairs for ensure_packages.
# etcd-client's build script runs protoc on etcd's .proto files, which import
# google/protobuf/descriptor.proto: protoc alone (protobuf-compiler) is not enough, the
# well-known types come with libprotobuf-dev. Check for the file, not the command.
# pkg-config, cc and git: cargo's own needs on a bare machine.
# shellcheck disable=SC2034  # read by the scripts that source this file
BUILD_PACKAGES=(
  protoc:protobuf-compiler
  /usr/include/google/protobuf/descriptor.proto:libprotobuf-dev
  cc:build-essential
  pkg-config:pkg-config
  git:git
  curl:curl
  update-ca-certificates:ca-certificates
)

# have NEED: a NEED starting with / is a file that must exist; otherwise a command.
have() {
  case $1 in
    /*) [ -e "$1" ] ;;
    *) command -v "$1" >/dev/null 2>&1 ;;
  esac
}

# ensure_packages NEED:PACKAGE…  installs, in one apt run, the packages whose command
# (or file, for a NEED starting with /) is missing. apt-get update runs only when
# something is missing. Afterwards every NEED is checked again, so a package that does
# not provide what was asked for fails here, not in the middle of a build.
ensure_packages() {
  local missing=() pair
  for pair in "$@"; do
    have "${pair%%:*}" || missing+=("${pair#*:}")
  done
  [ ${#missing[@]} -gt 0 ] || return 0
  local pkgs
  mapfile -t pkgs < <(printf '%s\n' "${missing[@]}" | sort -u)
  echo "installing ${pkgs[*]}"
  as_root apt-get update -q
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${pkgs[@]}"
  local still=()
  for pair in "$@"; do
    have "${pair%%:*}" || still+=("${pair%%:*} (from ${pair#*:})")
  done
  if [ ${#still[@]} -gt 0 ]; then
    echo "still missing after apt-get install: ${still[*]}" >&2
    return 1
  fi
}

# ensure_docker LOG: installs Docker Engine (dockerd and the CLI) if missing, and starts
# dockerd in the background when no engine answers (no systemd needed), then waits for
# it. The binaries are installed even when some engine already answers (a shared socket,
# DOCKER_HOST): callers that run a dockerd of their own need them.
ensure_docker() {
  local log=$1
  ensure_packages dockerd:docker.io docker:docker.io
  docker info >/dev/null 2>&1 && return 0
  echo "starting dockerd in the background (log: $log)"
  as_root sh -c "nohup dockerd >'$log' 2>&1 &"
  for _ in $(seq 1 120); do
    if [ -S /var/run/docker.sock ] && docker info >/dev/null 2>&1; then return 0; fi
    sleep 0.5
  done
  echo "dockerd did not come up; see $log" >&2
  return 1
}
