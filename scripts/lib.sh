# Shared by scripts/dev.sh and scripts/test-env.sh (sourced, not run).
# shellcheck shell=bash

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# ensure_packages CMD:PACKAGE…  installs, in one apt run, the packages whose command is
# missing. apt-get update runs only when something is missing.
ensure_packages() {
  local missing=() pair
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
  done
  [ ${#missing[@]} -gt 0 ] || return 0
  local pkgs
  mapfile -t pkgs < <(printf '%s\n' "${missing[@]}" | sort -u)
  echo "installing ${pkgs[*]}"
  as_root apt-get update -q
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${pkgs[@]}"
}

# ensure_docker LOG: installs Docker Engine if missing and starts dockerd in the
# background when no engine answers (no systemd needed), then waits for it.
ensure_docker() {
  local log=$1
  docker info >/dev/null 2>&1 && return 0
  ensure_packages dockerd:docker.io docker:docker.io
  echo "starting dockerd in the background (log: $log)"
  as_root sh -c "nohup dockerd >'$log' 2>&1 &"
  for _ in $(seq 1 120); do
    if [ -S /var/run/docker.sock ] && docker info >/dev/null 2>&1; then return 0; fi
    sleep 0.5
  done
  echo "dockerd did not come up; see $log" >&2
  return 1
}
