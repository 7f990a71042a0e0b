//! The `[registrar]` section and its flags: one Docker host's node name, address, lease
//! and Docker connection; and the `[[service]]` array (file only; `[[registrar.service]]`
//! is the same, spelled inside the section): services of this host that are not
//! containers, found with `portolan ls --addrs` and routed only with `route = true`.
//!
//! ```toml
//! [[service]]
//! name = "db"
//! port = 5432
//! check_tcp = true
//! ```

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use serde::{Deserialize, Serialize};

use super::{at_most_a_day, name_or_hostname, EtcdConfig, Problems};
use crate::schema;
use crate::watcher::policy::Cidr;

pub const DEFAULT_TTL_SECS: u64 = 10;
pub const DEFAULT_RESYNC_SECS: u64 = 60;
pub const DEFAULT_STATE_DIR: &str = "/var/lib/portolan";

/// `[registrar]` in the file and the registrar's flags: each option declared once.
#[derive(Debug, Clone, Default, Deserialize, Serialize, Args)]
#[serde(deny_unknown_fields)]
pub struct RegistrarOptions {
    /// This host's node name, unique in the cluster: its keys live under
    /// <prefix>/nodes/<NAME>/ [default: the full host name].
    #[arg(long, env = "PORTOLAN_NODE", value_name = "NAME")]
    pub node: Option<String>,
    /// IP address clients of this host's published ports use [default: the local
    /// address used to reach etcd].
    #[arg(long, env = "PORTOLAN_ADVERTISE_IP", value_name = "IP")]
    pub advertise_ip: Option<String>,
    /// Networks (CIDRs, comma separated) of this host's addresses other hosts reach: a
    /// port published on one host IP (`-p 10.0.0.7:8080:80`) registers only when that IP
    /// is the advertise IP or lies in one of these; any other (docker0, a bridge) is
    /// skipped with a warning [default: none, only the advertise IP].
    #[arg(
        long = "advertise-networks",
        env = "PORTOLAN_ADVERTISE_NETWORKS",
        value_name = "CIDR[,CIDR…]",
        value_delimiter = ','
    )]
    pub advertise_networks: Option<Vec<String>>,
    /// Lease TTL in seconds: how long a lost host's keys survive it [default: 10].
    #[arg(long, env = "PORTOLAN_TTL", value_name = "SECS")]
    pub ttl: Option<u64>,
    /// Where the lease id is kept across restarts [default: /var/lib/portolan].
    #[arg(long, env = "PORTOLAN_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Docker daemon address, e.g. unix:///var/run/docker.sock [default: DOCKER_HOST or the local socket].
    #[arg(long, env = "PORTOLAN_DOCKER_HOST", value_name = "URI")]
    pub docker_host: Option<String>,
    /// Docker API version to speak, e.g. 1.41 [default: negotiated with the daemon].
    #[arg(long, env = "PORTOLAN_DOCKER_API_VERSION", value_name = "VERSION")]
    pub docker_api_version: Option<String>,
    /// Register container IP and container port instead of advertise IP and published port.
    #[arg(long, env = "PORTOLAN_INTERNAL", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub internal: Option<bool>,
    /// Full reconcile of Docker against etcd every SECS seconds [default: 60].
    #[arg(long, env = "PORTOLAN_RESYNC", value_name = "SECS")]
    pub resync: Option<u64>,
    /// On a clean stop, revoke the lease so this node's keys vanish at once
    /// (otherwise they live until the TTL, so a quick restart causes no churn).
    #[arg(long, env = "PORTOLAN_DEREGISTER_ON_EXIT", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub deregister_on_exit: Option<bool>,
    /// Register only containers carrying this label, e.g. portolan.enable=true or team
    /// (KEY matches any value) [default: every container].
    #[arg(long, env = "PORTOLAN_ONLY_LABEL", value_name = "KEY[=VALUE]")]
    pub only_label: Option<String>,
    /// Serve /metrics (Docker event → etcd latency, writes) and /healthz on this
    /// address, e.g. 127.0.0.1:9478 [default: off].
    #[arg(long, env = "PORTOLAN_LISTEN", value_name = "HOST:PORT")]
    pub listen: Option<String>,
    /// `[[registrar.service]]`: services of this host that are not containers. File
    /// only; None (not an empty list) when absent, so the flag layer never hides the
    /// file's.
    #[arg(skip)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<Vec<ServiceOptions>>,
}

/// One `[[registrar.service]]`: a service of this host that is not a container (a
/// database or cache member), registered under this node on its lease, so it joins and
/// leaves with the host. Its settings mean what the container labels of the same name
/// mean (`portolan.tags`, `portolan.check.http`, …) and are read by the same code.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceOptions {
    /// Service name, lower case.
    pub name: String,
    pub port: u16,
    /// Host to register (an IP address or DNS name) [default: the advertise IP].
    pub addr: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    /// 0..=256 [default: 100].
    pub weight: Option<u32>,
    /// Probe: `GET` this path; 2xx or 3xx passes.
    pub check_http: Option<String>,
    /// Probe: a TCP connect that stays open.
    pub check_tcp: Option<bool>,
    /// `500ms`, `5s`, `1m` [default: 5s].
    pub check_interval: Option<String>,
    /// [default: 2s].
    pub check_timeout: Option<String>,
    /// Failures in a row that deregister [default: 3].
    pub check_fall: Option<u32>,
    /// Successes in a row that register again [default: 2].
    pub check_rise: Option<u32>,
    /// Route it through the front door (a backend and a Host rule in the default
    /// templates) [default: false: registered to be found, e.g. by `portolan ls
    /// --addrs`, never routed — a host's etcd peers must not become reachable at
    /// `Host: etcd-peers.<domain>`].
    pub route: Option<bool>,
    // Route options (README, "Routing"), with `route = true`: the labels of the same
    // names (`portolan.hosts`, `portolan.check.path` as `check_path`, …).
    /// Extra host names, `*.example.org` wildcards among them.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// false: no `<name>.<domain>` route [default: true].
    pub default_host: Option<bool>,
    /// A path prefix, `/api` (longest prefix wins, then host).
    pub path: Option<String>,
    /// Take the path prefix off before the request reaches the service.
    pub strip_prefix: Option<bool>,
    /// `http` or `tcp` (with `sni` or `listen`) [default: http].
    pub mode: Option<String>,
    /// TLS server names passed through unterminated on the shared HTTPS port.
    #[serde(default)]
    pub sni: Vec<String>,
    /// A TCP port of its own on the front door.
    pub listen: Option<u16>,
    /// `roundrobin`, `leastconn`, `source` or `uri` [default: roundrobin].
    pub balance: Option<String>,
    /// `cookie`: a client sticks to one server.
    pub sticky: Option<String>,
    /// HAProxy's own HTTP check of each server: `GET` this path.
    pub check_path: Option<String>,
    /// HAProxy's `timeout server`, `30s`.
    pub timeout_server: Option<String>,
    /// Client networks allowed (CIDRs); others get 403.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Connections per server at most.
    pub maxconn: Option<u32>,
}

impl ServiceOptions {
    /// The settings as the labels a container would carry for them: the registrar
    /// reads both with one parser.
    pub fn labels(&self) -> HashMap<String, String> {
        let mut labels = HashMap::new();
        labels.insert("portolan.service".to_string(), self.name.clone());
        let optional = [
            (
                "portolan.tags",
                (!self.tags.is_empty()).then(|| self.tags.join(",")),
            ),
            ("portolan.weight", self.weight.map(|n| n.to_string())),
            ("portolan.check.http", self.check_http.clone()),
            ("portolan.check.tcp", self.check_tcp.map(|b| b.to_string())),
            ("portolan.check.interval", self.check_interval.clone()),
            ("portolan.check.timeout", self.check_timeout.clone()),
            (
                "portolan.check.fall",
                self.check_fall.map(|n| n.to_string()),
            ),
            (
                "portolan.check.rise",
                self.check_rise.map(|n| n.to_string()),
            ),
            ("portolan.route", self.route.map(|b| b.to_string())),
            (
                "portolan.hosts",
                (!self.hosts.is_empty()).then(|| self.hosts.join(",")),
            ),
            (
                "portolan.default_host",
                self.default_host.map(|b| b.to_string()),
            ),
            ("portolan.path", self.path.clone()),
            (
                "portolan.strip_prefix",
                self.strip_prefix.map(|b| b.to_string()),
            ),
            ("portolan.mode", self.mode.clone()),
            (
                "portolan.sni",
                (!self.sni.is_empty()).then(|| self.sni.join(",")),
            ),
            ("portolan.listen", self.listen.map(|p| p.to_string())),
            ("portolan.balance", self.balance.clone()),
            ("portolan.sticky", self.sticky.clone()),
            ("portolan.check.path", self.check_path.clone()),
            ("portolan.timeout.server", self.timeout_server.clone()),
            (
                "portolan.allow",
                (!self.allow.is_empty()).then(|| self.allow.join(",")),
            ),
            ("portolan.maxconn", self.maxconn.map(|n| n.to_string())),
        ];
        for (k, v) in optional {
            if let Some(v) = v {
                labels.insert(k.to_string(), v);
            }
        }
        labels
    }
}

#[derive(Debug, Clone)]
pub struct RegistrarConfig {
    pub etcd: EtcdConfig,
    pub node: String,
    /// None: detect (the local address used to reach the first etcd endpoint).
    pub advertise_ip: Option<IpAddr>,
    /// `advertise_networks`: where a port bound to one host IP may register.
    pub advertise_networks: Vec<Cidr>,
    pub ttl: Duration,
    pub state_dir: PathBuf,
    /// None: the local default (DOCKER_HOST or /var/run/docker.sock).
    pub docker_host: Option<String>,
    /// None: negotiate with the daemon.
    pub docker_api_version: Option<String>,
    pub internal: bool,
    pub resync: Duration,
    pub deregister_on_exit: bool,
    /// `KEY` or `KEY=VALUE`: only containers carrying this label are registered
    /// (Docker label filter syntax). None: every container.
    pub only_label: Option<String>,
    /// `[[hook]]`s for register, deregister and drain events.
    pub hooks: Vec<super::HookConfig>,
    /// `[[registrar.service]]`s, validated: each one registers.
    pub services: Vec<ServiceOptions>,
    /// `/metrics` and `/healthz`; None: no HTTP listener.
    pub listen: Option<std::net::SocketAddr>,
}

impl RegistrarOptions {
    /// Validates the merged options into a [`RegistrarConfig`], adding every problem found.
    /// `top_level` is the file's `[[service]]` array; `self.service` its
    /// `[[registrar.service]]` (the alias): both register, each named by its spelling.
    pub(super) fn resolve(
        &self,
        etcd: EtcdConfig,
        top_level: &[ServiceOptions],
        problems: &mut Problems,
    ) -> RegistrarConfig {
        let node = name_or_hostname(self.node.as_deref(), "--node", problems);
        let listen = self.listen.as_deref().and_then(|l| {
            l.parse::<std::net::SocketAddr>()
                .map_err(|_| {
                    problems.push(format!(
                        "registrar listen {l:?}: expected host:port like 127.0.0.1:9478 (--listen)"
                    ))
                })
                .ok()
        });
        if !schema::is_valid_name(&node) {
            problems.push(format!(
                "node {node:?}: must match [A-Za-z0-9][A-Za-z0-9_.-]{{0,127}} (--node NAME)"
            ));
        }
        let advertise_ip = self.advertise_ip.as_deref().and_then(|s| {
            s.parse::<IpAddr>()
                .map_err(|_| {
                    problems.push(format!(
                        "advertise ip {s:?} is not an IP address (--advertise-ip 10.0.0.5)"
                    ))
                })
                .ok()
        });
        let mut advertise_networks = Vec::new();
        for n in self.advertise_networks.iter().flatten() {
            match n.parse::<Cidr>() {
                Ok(c) => advertise_networks.push(c),
                Err(e) => problems.push(format!(
                    "registrar.advertise_networks: {e} (--advertise-networks 10.0.0.0/24)"
                )),
            }
        }
        let ttl = self.ttl.unwrap_or(DEFAULT_TTL_SECS);
        if !(2..=3600).contains(&ttl) {
            problems.push(format!("ttl {ttl}: must be between 2 and 3600 seconds"));
        }
        let resync = at_most_a_day(
            "registrar.resync",
            self.resync.unwrap_or(DEFAULT_RESYNC_SECS),
            1,
            problems,
        );
        if resync == 0 {
            problems.push("resync 0: must be at least 1 second".into());
        }
        if let Some(v) = &self.docker_api_version {
            let ok = v
                .split_once('.')
                .is_some_and(|(a, b)| a.parse::<u32>().is_ok() && b.parse::<u32>().is_ok());
            if !ok {
                problems.push(format!(
                    "docker api version {v:?}: expected MAJOR.MINOR like 1.41 (or leave it unset to negotiate)"
                ));
            }
        }
        if let Some(l) = &self.only_label {
            let key = l.split_once('=').map_or(l.as_str(), |(k, _)| k);
            if key.is_empty() || l.chars().any(|c| c.is_whitespace() || c.is_control()) {
                problems.push(format!(
                    "only label {l:?}: expected KEY or KEY=VALUE without spaces (--only-label portolan.enable=true)"
                ));
            }
        }
        let services = self.services(top_level, &node, problems);
        RegistrarConfig {
            etcd,
            node,
            advertise_ip,
            advertise_networks,
            ttl: Duration::from_secs(ttl),
            state_dir: self
                .state_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
            docker_host: self.docker_host.clone(),
            docker_api_version: self.docker_api_version.clone(),
            internal: self.internal.unwrap_or(false),
            resync: Duration::from_secs(resync),
            deregister_on_exit: self.deregister_on_exit.unwrap_or(false),
            only_label: self.only_label.clone(),
            hooks: Vec::new(),
            services,
            listen,
        }
    }

    /// The static services of `[[service]]` (the documented spelling) and
    /// `[[registrar.service]]`, every problem named by its section and number.
    fn services(
        &self,
        top_level: &[ServiceOptions],
        node: &str,
        problems: &mut Problems,
    ) -> Vec<ServiceOptions> {
        let nested = self.service.clone().unwrap_or_default();
        let spelled = top_level
            .iter()
            .enumerate()
            .map(|(i, s)| ("[[service]]", i + 1, s))
            .chain(
                nested
                    .iter()
                    .enumerate()
                    .map(|(i, s)| ("[[registrar.service]]", i + 1, s)),
            );
        let mut seen = std::collections::BTreeSet::new();
        let mut services = Vec::new();
        for (section, n, s) in spelled {
            for p in
                crate::registrar::service_problems(&s.labels(), s.port, s.addr.as_deref(), node)
            {
                problems.push(format!("{section} #{n} ({:?}): {p}", s.name));
            }
            if s.tags.iter().any(|t| t.contains(',')) {
                problems.push(format!(
                    "{section} #{n} ({:?}): tags: one tag per string, without commas",
                    s.name
                ));
            }
            if !seen.insert((s.name.clone(), s.port)) {
                problems.push(format!(
                    "{section} #{n} ({:?}): port {} is listed twice for this service",
                    s.name, s.port
                ));
            }
            services.push(s.clone());
        }
        services
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::{resolve_registrar, ConfigError, FileConfig, RegistrarArgs};
    use super::*;

    fn resolve(text: &str) -> Result<RegistrarConfig, ConfigError> {
        let file = FileConfig::from_str(text, Path::new("t.toml")).unwrap();
        let flags = RegistrarArgs {
            registrar: RegistrarOptions {
                node: Some("host-a".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        resolve_registrar(&file, &flags)
    }

    #[test]
    fn services_from_the_file_survive_the_flag_layer() {
        let c = resolve(
            r#"
[[registrar.service]]
name = "db"
port = 5432
tags = ["primary"]
check_tcp = true
check_interval = "1s"

[[registrar.service]]
name = "cache"
port = 6379
addr = "10.0.0.7"
"#,
        )
        .unwrap();
        assert_eq!(c.services.len(), 2);
        assert_eq!(c.services[0].name, "db");
        assert_eq!(c.services[0].check_tcp, Some(true));
        assert_eq!(c.services[1].addr.as_deref(), Some("10.0.0.7"));
        let labels = c.services[0].labels();
        assert_eq!(labels["portolan.check.interval"], "1s");
        assert_eq!(labels["portolan.tags"], "primary");
        assert!(resolve("").unwrap().services.is_empty());
    }

    /// A `[[service]]` takes the route options as fields of the labels' names, read by
    /// the labels' code; they need `route = true`, and a bad one names the field.
    #[test]
    fn service_route_fields_become_the_records_route() {
        let c = resolve(
            r#"
[[service]]
name = "pg"
port = 5432
route = true
mode = "tcp"
listen = 15432
allow = ["10.0.0.0/8"]
maxconn = 20

[[service]]
name = "api"
port = 8080
route = true
hosts = ["api.example.com", "*.api.example.com"]
path = "/v1"
strip_prefix = true
balance = "leastconn"
sticky = "cookie"
check_path = "/healthz"
timeout_server = "45s"
default_host = false
"#,
        )
        .unwrap();
        let settings = crate::registrar::selector::fixtures::settings();
        let reg = |s: &ServiceOptions| {
            crate::registrar::selector::service(&s.labels(), s.port, None, &settings)
        };
        let pg = reg(&c.services[0]).unwrap();
        assert!(pg.record.to_json().ends_with(
            r#""route":{"mode":"tcp","listen":15432,"allow":["10.0.0.0/8"],"maxconn":20}}"#
        ));
        let api = reg(&c.services[1]).unwrap();
        let r = api.record.route.options().unwrap();
        assert_eq!(r.hosts, ["api.example.com", "*.api.example.com"]);
        assert_eq!(
            (r.path.as_deref(), r.strip_prefix, r.default_host),
            (Some("/v1"), true, Some(false))
        );
        assert_eq!(r.check_path.as_deref(), Some("/healthz"));
        // `portolan check` and the start refuse these, naming the section and field.
        let ConfigError::Invalid(p) = resolve(
            r#"
[[service]]
name = "quiet"
port = 9000
path = "/x"

[[service]]
name = "bad"
port = 9001
route = true
path = "/x\n    bind :9999"
"#,
        )
        .unwrap_err() else {
            panic!()
        };
        assert!(
            p[0].contains("(\"quiet\"): route options") && p[0].contains("add route = true"),
            "{p:?}"
        );
        assert!(
            p[1].contains("(\"bad\"): path = ") && p[1].contains("not a path"),
            "{p:?}"
        );
    }

    /// `[[service]]` is the documented spelling, `[[registrar.service]]` its alias: both
    /// register, a problem names the spelling it is in, and neither is routed unless
    /// it says `route = true`.
    #[test]
    fn service_and_registrar_service_both_register_unrouted_by_default() {
        let c = resolve(
            "[[service]]
name = \"etcd-peers\"
port = 2380
             [[service]]
name = \"api\"
port = 8080
route = true
             [[registrar.service]]
name = \"db\"
port = 5432
",
        )
        .unwrap();
        let names: Vec<_> = c.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["etcd-peers", "api", "db"]);
        let settings = crate::registrar::selector::fixtures::settings();
        let reg = |s: &ServiceOptions| {
            crate::registrar::selector::service(&s.labels(), s.port, None, &settings).unwrap()
        };
        assert!(!reg(&c.services[0]).record.route.is_routed());
        assert!(reg(&c.services[1]).record.route.is_routed());
        assert!(!reg(&c.services[2]).record.route.is_routed());
        assert!(reg(&c.services[0])
            .record
            .to_json()
            .contains(r#""route":false"#));
        assert!(!reg(&c.services[1]).record.to_json().contains("route"));

        let ConfigError::Invalid(p) = resolve(
            "[[registrar.service]]
name = \"ok\"
port = 1
             [[service]]
name = \"Bad Name\"
port = 2
",
        )
        .unwrap_err() else {
            panic!()
        };
        assert!(
            p.iter()
                .any(|p| p.starts_with("[[service]] #1 (\"Bad Name\")")),
            "{p:?}"
        );
        let ConfigError::Invalid(p) = resolve(
            "[[service]]
name = \"db\"
port = 1
[[registrar.service]]
name = \"db\"
port = 1
",
        )
        .unwrap_err() else {
            panic!()
        };
        assert!(
            p[0].contains("[[registrar.service]] #1") && p[0].contains("twice"),
            "{p:?}"
        );
    }

    #[test]
    fn advertise_networks_from_the_file_or_the_flag() {
        assert!(resolve("").unwrap().advertise_networks.is_empty());
        let c =
            resolve("[registrar]\nadvertise_networks = [\"10.0.0.0/24\", \"fd00::/8\"]\n").unwrap();
        assert_eq!(
            c.advertise_networks
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["10.0.0.0/24", "fd00::/8"]
        );
        let ConfigError::Invalid(p) =
            resolve("[registrar]\nadvertise_networks = [\"10.0.0.1/24\", \"lan\"]\n").unwrap_err()
        else {
            panic!()
        };
        let all = p.join("\n");
        assert!(
            all.contains("advertise_networks")
                && all.contains("\"lan\"")
                && all.contains("10.0.0.1/24"),
            "{all}"
        );
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: RegistrarOptions,
        }
        let flags = <Cli as clap::Parser>::parse_from([
            "x",
            "--advertise-networks",
            "10.1.0.0/16,10.2.0.0/16",
        ])
        .args;
        assert_eq!(flags.advertise_networks.unwrap().len(), 2);
    }

    #[test]
    fn every_problem_of_a_service_is_named() {
        let ConfigError::Invalid(p) = resolve(
            r#"
[[registrar.service]]
name = "Db"
port = 0
check_http = "health"

[[registrar.service]]
name = "db"
port = 5432
tags = ["a,b"]
check_fall = 0
check_tcp = true

[[registrar.service]]
name = "db"
port = 5432
"#,
        )
        .unwrap_err() else {
            panic!()
        };
        let all = p.join("\n");
        for needle in [
            "#1 (\"Db\"): name \"Db\"",
            "#1 (\"Db\"): port = 0",
            "#1 (\"Db\"): check_http = \"health\"",
            "#2 (\"db\"): tags: one tag per string",
            "#2 (\"db\"): check_fall = \"0\"",
            "#3 (\"db\"): port 5432 is listed twice",
        ] {
            assert!(all.contains(needle), "{needle}: {all}");
        }
        assert!(matches!(
            FileConfig::from_str(
                "[[registrar.service]]\nname = \"db\"\nport = 1\nextra = 1\n",
                Path::new("t")
            ),
            Err(ConfigError::Parse { .. })
        ));
    }
}
