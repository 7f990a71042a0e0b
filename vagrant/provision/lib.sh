#!/usr/bin/env bash
# Helpers shared by the provisioning scripts (sourced, from the synced repository).

export DEBIAN_FRONTEND=noninteractive

# apt-get install, with one `apt-get update` per machine.
apt_install() {
  if [ ! -e /var/lib/portolan-vagrant-apt-updated ]; then
    apt-get update -q
    touch /var/lib/portolan-vagrant-apt-updated
  fi
  apt-get install -y -q --no-install-recommends "$@"
}

# "http://a:2379,http://b:2379" -> "http://a:2379", "http://b:2379" (TOML array body).
toml_list() {
  local items=() out=""
  IFS=, read -ra items <<<"$1"
  for item in "${items[@]}"; do
    out+="${out:+, }\"$item\""
  done
  printf '%s' "$out"
}

# /etc/portolan/registrar.toml for a Docker host: registrar_toml NODE IP ENDPOINTS
registrar_toml() {
  cat <<CONF
# Written by vagrant/provision/docker-host.sh from systemd/etc/portolan/registrar.toml.
[etcd]
endpoints = [$(toml_list "$3")]
prefix = "/portolan"

[registrar]
node = "$1"
advertise_ip = "$2"
ttl = 10
state_dir = "/var/lib/portolan"
resync = 60
deregister_on_exit = false
CONF
}

# /etc/portolan/watcher.toml for the load balancer: watcher_toml NAME ENDPOINTS
watcher_toml() {
  cat <<CONF
# Written by vagrant/provision/lb.sh from systemd/etc/portolan/watcher.toml.
[etcd]
endpoints = [$(toml_list "$2")]
prefix = "/portolan"

[watcher]
name = "$1"
wait = { min_ms = 20, max_ms = 500 }
listen = "127.0.0.1:9477"

[[template]]
src = "/usr/share/portolan/templates/haproxy.cfg.tera"
dest = "/etc/haproxy/haproxy.cfg"
check_cmd = "haproxy -c -f {src}"
haproxy_master_socket = "/run/haproxy-master.sock"
haproxy_admin_socket = "/run/haproxy/admin.sock"
mode = "0644"

[template.vars]
admin_socket = "/run/haproxy/admin.sock"
admin_socket_group = "portolan-watcher"
CONF
}

# Waits until every etcd endpoint answers healthy (the members come up one by one).
wait_for_etcd() {
  local endpoints=$1
  for _ in $(seq 1 180); do
    if etcdctl --endpoints "$endpoints" endpoint health >/dev/null 2>&1; then
      return 0
    fi
    sleep 1
  done
  echo "etcd at $endpoints is not healthy after 180 s; see 'journalctl -u etcd' on the etcd machines" >&2
  etcdctl --endpoints "$endpoints" endpoint health >&2 || true
  return 1
}
