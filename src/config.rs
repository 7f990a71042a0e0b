//! Configuration: one TOML file, environment variables, flags — flag wins.
//!
//! The pipeline is `FileConfig::from_str` (pure) → `load(path)` (I/O) → merged with the
//! command-line/environment layer (`cli.rs`, clap with `env`) → `resolve_*` into a
//! validated `RegistrarConfig` / `WatcherConfig`. `resolve_*` collects every problem
//! before failing, so one run of `portolan check` reports them all.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::schema;

pub const DEFAULT_CONFIG_PATH: &str = "/etc/portolan/portolan.toml";
pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:2379";
pub const DEFAULT_TTL_SECS: u64 = 10;
pub const DEFAULT_RESYNC_SECS: u64 = 60;
pub const DEFAULT_STATE_DIR: &str = "/var/lib/portolan";
pub const DEFAULT_WAIT_MIN_MS: u64 = 20;
pub const DEFAULT_WAIT_MAX_MS: u64 = 500;
pub const DEFAULT_COMMAND_TIMEOUT_MS: u64 = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
}

// ---------- the file layer ----------

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub etcd: EtcdFile,
    #[serde(default)]
    pub registrar: RegistrarFile,
    #[serde(default)]
    pub watcher: WatcherFile,
    #[serde(default)]
    pub template: Vec<TemplateResource>,
    /// Folder the file was read from: relative template paths are resolved against it.
    #[serde(skip)]
    pub base_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdFile {
    pub endpoints: Option<Vec<String>>,
    pub prefix: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub dial_timeout_ms: Option<u64>,
    /// PEM CA bundle that signed the etcd servers' certificates (https:// endpoints).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate and key, for etcd's `--client-cert-auth`.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistrarFile {
    pub node: Option<String>,
    pub advertise_ip: Option<String>,
    pub ttl: Option<u64>,
    pub state_dir: Option<PathBuf>,
    pub docker_host: Option<String>,
    pub docker_api_version: Option<String>,
    pub internal: Option<bool>,
    pub resync: Option<u64>,
    pub deregister_on_exit: Option<bool>,
    /// `KEY` or `KEY=VALUE`: register only containers carrying this label.
    pub only_label: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatcherFile {
    pub name: Option<String>,
    pub wait: Option<WaitFile>,
    /// `host:port` for `/metrics` and `/healthz`; unset = no HTTP listener.
    pub listen: Option<String>,
    pub command_timeout_ms: Option<u64>,
}

/// Coalescing of etcd changes (group commit, see `watcher` module docs): a change that
/// finds the watcher idle is applied at once; changes arriving during an apply (or within
/// `min_ms` after it) are batched until `min_ms` pass without a change, but no longer than
/// `max_ms` after that apply started.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaitFile {
    /// Quiet period that closes a batch [default: 20].
    pub min_ms: Option<u64>,
    /// Longest a batched change may wait [default: 500].
    pub max_ms: Option<u64>,
}

/// One `[[template]]` resource, confd style.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateResource {
    pub src: PathBuf,
    pub dest: PathBuf,
    /// `{src}` is replaced by the staged file's path. Run through `sh -c`.
    pub check_cmd: Option<String>,
    /// Preferred reload: HAProxy master CLI socket (`haproxy -W -S <socket>`).
    pub haproxy_master_socket: Option<PathBuf>,
    /// Fallback reload for other setups, run through `sh -c`.
    pub reload_cmd: Option<String>,
    /// HAProxy admin (stats) socket for runtime-API changes without reload.
    pub haproxy_admin_socket: Option<PathBuf>,
    /// File mode of `dest`, octal string like "0644".
    pub mode: Option<String>,
    /// Free-form table handed to the template as `vars` (ports, domain, timeouts), so one
    /// template serves several sites without edits. Empty when unset.
    #[serde(default)]
    pub vars: toml::Table,
}

impl FileConfig {
    /// Parses TOML text. Pure; `origin` only names the file in errors.
    pub fn from_str(text: &str, origin: &Path) -> Result<FileConfig, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_path_buf(),
            message: e.to_string(),
        })
    }

    /// Reads `path`. A missing file is an error only when the user named it:
    /// the default path may legitimately not exist.
    pub fn load(path: Option<&Path>) -> Result<FileConfig, ConfigError> {
        let (path, explicit) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if !explicit && e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(FileConfig::default())
            }
            Err(source) => return Err(ConfigError::Read { path, source }),
        };
        let mut cfg = FileConfig::from_str(&text, &path)?;
        cfg.base_dir = path
            .parent()
            .map(|p| {
                if p.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    p
                }
            })
            .map(Path::to_path_buf);
        for t in &mut cfg.template {
            if let Some(base) = &cfg.base_dir {
                if t.src.is_relative() {
                    t.src = base.join(&t.src);
                }
                if t.dest.is_relative() {
                    t.dest = base.join(&t.dest);
                }
                for sock in [&mut t.haproxy_master_socket, &mut t.haproxy_admin_socket]
                    .into_iter()
                    .flatten()
                {
                    if sock.is_relative() {
                        *sock = base.join(&*sock);
                    }
                }
            }
        }
        Ok(cfg)
    }
}

// ---------- the flag / environment layer (filled by cli.rs) ----------

#[derive(Debug, Clone, Default)]
pub struct EtcdOverrides {
    pub endpoints: Option<Vec<String>>,
    pub prefix: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Default)]
pub struct RegistrarOverrides {
    pub etcd: EtcdOverrides,
    pub node: Option<String>,
    pub advertise_ip: Option<String>,
    pub ttl: Option<u64>,
    pub state_dir: Option<PathBuf>,
    pub docker_host: Option<String>,
    pub docker_api_version: Option<String>,
    pub internal: Option<bool>,
    pub resync: Option<u64>,
    pub deregister_on_exit: Option<bool>,
    pub only_label: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct WatcherOverrides {
    pub etcd: EtcdOverrides,
    pub name: Option<String>,
    pub listen: Option<String>,
}

// ---------- resolved, validated configuration ----------

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    /// Normalised: leading slash, no trailing slash.
    pub prefix: String,
    pub username: Option<String>,
    pub password: Option<String>,
    pub dial_timeout: Duration,
    /// TLS for https:// endpoints; None = plain http.
    pub tls: Option<EtcdTls>,
}

impl EtcdConfig {
    /// A config for tests and `portolan dev`: one endpoint, given prefix.
    pub fn local(endpoint: &str, prefix: &str) -> EtcdConfig {
        EtcdConfig {
            endpoints: vec![endpoint.to_string()],
            prefix: schema::normalize_prefix(prefix).expect("valid prefix"),
            username: None,
            password: None,
            dial_timeout: Duration::from_secs(2),
            tls: None,
        }
    }
}

/// Files for TLS to etcd. Read at connect time, so renewed certificates are picked up
/// on the next reconnect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdTls {
    pub ca_file: PathBuf,
    /// Client certificate and key, both or neither.
    pub client: Option<(PathBuf, PathBuf)>,
}

#[derive(Debug, Clone)]
pub struct RegistrarConfig {
    pub etcd: EtcdConfig,
    pub node: String,
    /// None: detect (the local address used to reach the first etcd endpoint).
    pub advertise_ip: Option<IpAddr>,
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
}

#[derive(Debug, Clone)]
pub struct WatcherConfig {
    pub etcd: EtcdConfig,
    pub name: String,
    pub wait_min: Duration,
    pub wait_max: Duration,
    pub listen: Option<SocketAddr>,
    pub command_timeout: Duration,
    pub templates: Vec<TemplateResource>,
}

fn resolve_etcd(file: &EtcdFile, o: &EtcdOverrides, problems: &mut Vec<String>) -> EtcdConfig {
    let endpoints = o
        .endpoints
        .clone()
        .or_else(|| file.endpoints.clone())
        .unwrap_or_else(|| vec![DEFAULT_ENDPOINT.to_string()]);
    let endpoints: Vec<String> = endpoints
        .iter()
        .flat_map(|e| e.split(','))
        .map(|e| e.trim().to_string())
        .filter(|e| !e.is_empty())
        .collect();
    if endpoints.is_empty() {
        problems.push("etcd endpoints: none given (--etcd-endpoints http://HOST:2379)".into());
    }
    for e in &endpoints {
        if !(e.starts_with("http://") || e.starts_with("https://")) && e.contains("://") {
            problems.push(format!(
                "etcd endpoint {e:?}: use http://host:port or https://host:port"
            ));
        }
    }
    let raw_prefix = o
        .prefix
        .clone()
        .or_else(|| file.prefix.clone())
        .unwrap_or_else(|| schema::DEFAULT_PREFIX.to_string());
    let prefix = schema::normalize_prefix(&raw_prefix).unwrap_or_else(|e| {
        problems.push(format!("etcd prefix: {e}"));
        schema::DEFAULT_PREFIX.to_string()
    });
    let username = o.username.clone().or_else(|| file.username.clone());
    let password = o.password.clone().or_else(|| file.password.clone());
    if username.is_some() != password.is_some() {
        problems.push("etcd auth: username and password go together".into());
    }
    let tls = resolve_tls(file, o, &endpoints, problems);
    EtcdConfig {
        endpoints,
        prefix,
        username,
        password,
        dial_timeout: Duration::from_millis(at_least_min_timeout(
            "etcd.dial_timeout_ms",
            file.dial_timeout_ms.unwrap_or(2000),
            problems,
        )),
        tls,
    }
}

/// Shortest timeout accepted: below it every check or dial "times out" at once.
const MIN_TIMEOUT_MS: u64 = 100;

/// `ms`, or a problem naming `key` when it is below [`MIN_TIMEOUT_MS`].
fn at_least_min_timeout(key: &str, ms: u64, problems: &mut Vec<String>) -> u64 {
    if ms < MIN_TIMEOUT_MS {
        problems.push(format!(
            "{key} = {ms}: must be at least {MIN_TIMEOUT_MS} (milliseconds)"
        ));
    }
    ms
}

fn resolve_tls(
    file: &EtcdFile,
    o: &EtcdOverrides,
    endpoints: &[String],
    problems: &mut Vec<String>,
) -> Option<EtcdTls> {
    let ca = o.ca_file.clone().or_else(|| file.ca_file.clone());
    let cert = o.cert_file.clone().or_else(|| file.cert_file.clone());
    let key = o.key_file.clone().or_else(|| file.key_file.clone());
    let https = endpoints
        .iter()
        .filter(|e| e.starts_with("https://"))
        .count();
    for path in [&ca, &cert, &key].into_iter().flatten() {
        if !path.is_file() {
            problems.push(format!("etcd TLS file {} does not exist", path.display()));
        }
    }
    if cert.is_some() != key.is_some() {
        problems
            .push("etcd TLS: cert_file and key_file go together (--etcd-cert, --etcd-key)".into());
    }
    match ca {
        None if https > 0 => {
            problems.push(
                "etcd endpoints use https:// but no CA is given: set [etcd] ca_file or --etcd-ca"
                    .into(),
            );
            None
        }
        None => {
            if cert.is_some() {
                problems.push("etcd TLS: a client certificate needs ca_file (--etcd-ca) and https:// endpoints".into());
            }
            None
        }
        Some(ca_file) => {
            if https != endpoints.len() {
                problems.push("etcd TLS: with ca_file every endpoint must be https://".into());
            }
            Some(EtcdTls {
                ca_file,
                client: cert.zip(key),
            })
        }
    }
}

/// This machine's host name, as a valid node/watcher name.
pub fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .map(|h| h.split('.').next().unwrap_or("").to_string())
        .filter(|h| schema::is_valid_name(h))
        .unwrap_or_else(|| "localhost".to_string())
}

pub fn resolve_registrar(
    file: &FileConfig,
    o: &RegistrarOverrides,
) -> Result<RegistrarConfig, ConfigError> {
    let mut problems = Vec::new();
    let etcd = resolve_etcd(&file.etcd, &o.etcd, &mut problems);
    let f = &file.registrar;
    let node = o
        .node
        .clone()
        .or_else(|| f.node.clone())
        .unwrap_or_else(hostname);
    if !schema::is_valid_name(&node) {
        problems.push(format!(
            "node {node:?}: must match [A-Za-z0-9][A-Za-z0-9_.-]{{0,127}} (--node NAME)"
        ));
    }
    let advertise_ip = match o.advertise_ip.clone().or_else(|| f.advertise_ip.clone()) {
        None => None,
        Some(s) => match s.parse::<IpAddr>() {
            Ok(ip) => Some(ip),
            Err(_) => {
                problems.push(format!(
                    "advertise ip {s:?} is not an IP address (--advertise-ip 10.0.0.5)"
                ));
                None
            }
        },
    };
    let ttl = o.ttl.or(f.ttl).unwrap_or(DEFAULT_TTL_SECS);
    if !(2..=3600).contains(&ttl) {
        problems.push(format!("ttl {ttl}: must be between 2 and 3600 seconds"));
    }
    let resync = o.resync.or(f.resync).unwrap_or(DEFAULT_RESYNC_SECS);
    if resync == 0 {
        problems.push("resync 0: must be at least 1 second".into());
    }
    let docker_api_version = o
        .docker_api_version
        .clone()
        .or_else(|| f.docker_api_version.clone());
    if let Some(v) = &docker_api_version {
        let ok = v
            .split_once('.')
            .is_some_and(|(a, b)| a.parse::<u32>().is_ok() && b.parse::<u32>().is_ok());
        if !ok {
            problems.push(format!(
                "docker api version {v:?}: expected MAJOR.MINOR like 1.41 (or leave it unset to negotiate)"
            ));
        }
    }
    let only_label = o.only_label.clone().or_else(|| f.only_label.clone());
    if let Some(l) = &only_label {
        let key = l.split_once('=').map_or(l.as_str(), |(k, _)| k);
        if key.is_empty() || l.chars().any(|c| c.is_whitespace() || c.is_control()) {
            problems.push(format!(
                "only label {l:?}: expected KEY or KEY=VALUE without spaces (--only-label portolan.enable=true)"
            ));
        }
    }
    let cfg = RegistrarConfig {
        etcd,
        node,
        advertise_ip,
        ttl: Duration::from_secs(ttl),
        state_dir: o
            .state_dir
            .clone()
            .or_else(|| f.state_dir.clone())
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
        docker_host: o.docker_host.clone().or_else(|| f.docker_host.clone()),
        docker_api_version,
        internal: o.internal.or(f.internal).unwrap_or(false),
        resync: Duration::from_secs(resync),
        deregister_on_exit: o
            .deregister_on_exit
            .or(f.deregister_on_exit)
            .unwrap_or(false),
        only_label,
    };
    if problems.is_empty() {
        Ok(cfg)
    } else {
        Err(ConfigError::Invalid(problems))
    }
}

pub fn resolve_watcher(
    file: &FileConfig,
    o: &WatcherOverrides,
) -> Result<WatcherConfig, ConfigError> {
    let mut problems = Vec::new();
    let etcd = resolve_etcd(&file.etcd, &o.etcd, &mut problems);
    let f = &file.watcher;
    let name = o
        .name
        .clone()
        .or_else(|| f.name.clone())
        .unwrap_or_else(hostname);
    if !schema::is_valid_name(&name) {
        problems.push(format!(
            "watcher name {name:?}: must match [A-Za-z0-9][A-Za-z0-9_.-]{{0,127}}"
        ));
    }
    let wait = f.wait.clone().unwrap_or_default();
    let wait_min = wait.min_ms.unwrap_or(DEFAULT_WAIT_MIN_MS);
    let wait_max = wait.max_ms.unwrap_or(DEFAULT_WAIT_MAX_MS.max(wait_min));
    if wait_max < wait_min {
        problems.push(format!(
            "watcher.wait: max_ms {wait_max} is below min_ms {wait_min}"
        ));
    }
    let listen = match o.listen.clone().or_else(|| f.listen.clone()) {
        None => None,
        Some(s) => match s.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                problems.push(format!(
                    "watcher.listen {s:?}: expected host:port like 127.0.0.1:9477"
                ));
                None
            }
        },
    };
    if file.template.is_empty() {
        problems.push("no [[template]] resource: add one with src, dest and check_cmd".into());
    }
    for (i, t) in file.template.iter().enumerate() {
        let n = i + 1;
        if !t.src.is_file() {
            problems.push(format!(
                "template #{n}: src {} does not exist or is not a file",
                t.src.display()
            ));
        }
        match t.dest.parent() {
            Some(d) if d.as_os_str().is_empty() || d.is_dir() => {}
            _ => problems.push(format!(
                "template #{n}: the folder of dest {} does not exist",
                t.dest.display()
            )),
        }
        if t.haproxy_master_socket.is_some() && t.reload_cmd.is_some() {
            problems.push(format!(
                "template #{n}: set haproxy_master_socket or reload_cmd, not both"
            ));
        }
        if t.haproxy_admin_socket.is_some()
            && t.haproxy_master_socket.is_none()
            && t.reload_cmd.is_none()
        {
            problems.push(format!(
                "template #{n}: haproxy_admin_socket needs haproxy_master_socket or reload_cmd too: the runtime API only takes membership changes, and falls back to a reload"
            ));
        }
        if let Some(m) = &t.mode {
            if u32::from_str_radix(m, 8)
                .map(|v| v > 0o7777)
                .unwrap_or(true)
            {
                problems.push(format!(
                    "template #{n}: mode {m:?} is not an octal mode like \"0644\""
                ));
            }
        }
        if let Some(c) = &t.check_cmd {
            if !c.contains("{src}") {
                problems.push(format!(
                    "template #{n}: check_cmd {c:?} does not mention {{src}}, so it would not check the new file"
                ));
            }
        }
    }
    for (i, a) in file.template.iter().enumerate() {
        for b in &file.template[i + 1..] {
            if a.dest == b.dest {
                problems.push(format!(
                    "two templates write the same dest {}",
                    a.dest.display()
                ));
            }
        }
    }
    let cfg = WatcherConfig {
        etcd,
        name,
        wait_min: Duration::from_millis(wait_min),
        wait_max: Duration::from_millis(wait_max),
        listen,
        command_timeout: Duration::from_millis(at_least_min_timeout(
            "watcher.command_timeout_ms",
            f.command_timeout_ms.unwrap_or(DEFAULT_COMMAND_TIMEOUT_MS),
            &mut problems,
        )),
        templates: file.template.clone(),
    };
    if problems.is_empty() {
        Ok(cfg)
    } else {
        Err(ConfigError::Invalid(problems))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_design_example() {
        let text = r#"
[etcd]
endpoints = ["http://127.0.0.1:2379"]
prefix = "/portolan"

[watcher]
name = "lb-1"
wait = { min_ms = 20, max_ms = 500 }

[[template]]
src = "templates/haproxy.cfg.tera"
dest = "/etc/haproxy/haproxy.cfg"
check_cmd = "haproxy -c -q -f {src}"
haproxy_master_socket = "/run/haproxy-master.sock"
"#;
        let f = FileConfig::from_str(text, Path::new("x.toml")).unwrap();
        assert_eq!(f.template.len(), 1);
        assert_eq!(f.watcher.wait.unwrap().max_ms, Some(500));
    }

    #[test]
    fn unknown_fields_name_the_field() {
        let err = FileConfig::from_str("[etcd]\nendpoint = []\n", Path::new("x.toml")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("endpoint"), "{msg}");
        assert!(msg.contains("x.toml"), "{msg}");
    }

    #[test]
    fn flags_win_over_file() {
        let f = FileConfig::from_str(
            "[etcd]\nprefix = \"/file\"\n[registrar]\nnode = \"filenode\"\nttl = 30\n",
            Path::new("x"),
        )
        .unwrap();
        let o = RegistrarOverrides {
            node: Some("flagnode".into()),
            etcd: EtcdOverrides {
                endpoints: Some(vec!["http://a:1,http://b:2".into()]),
                ..Default::default()
            },
            ..Default::default()
        };
        let c = resolve_registrar(&f, &o).unwrap();
        assert_eq!(c.node, "flagnode");
        assert_eq!(c.ttl, Duration::from_secs(30));
        assert_eq!(c.etcd.prefix, "/file");
        assert_eq!(c.etcd.endpoints, vec!["http://a:1", "http://b:2"]);
    }

    #[test]
    fn collects_every_problem() {
        let o = RegistrarOverrides {
            node: Some("bad node".into()),
            advertise_ip: Some("nope".into()),
            ttl: Some(0),
            ..Default::default()
        };
        let ConfigError::Invalid(p) = resolve_registrar(&FileConfig::default(), &o).unwrap_err()
        else {
            panic!()
        };
        assert_eq!(p.len(), 3, "{p:?}");
    }

    #[test]
    fn only_label_from_file_and_flag() {
        let f = FileConfig::from_str(
            "[registrar]\nonly_label = \"portolan.enable=true\"\n",
            Path::new("x"),
        )
        .unwrap();
        let c = resolve_registrar(&f, &RegistrarOverrides::default()).unwrap();
        assert_eq!(c.only_label.as_deref(), Some("portolan.enable=true"));
        let o = RegistrarOverrides {
            only_label: Some("team".into()),
            ..Default::default()
        };
        assert_eq!(
            resolve_registrar(&f, &o).unwrap().only_label.as_deref(),
            Some("team")
        );
        let o = RegistrarOverrides {
            docker_api_version: Some("v1".into()),
            ..Default::default()
        };
        assert!(resolve_registrar(&f, &o).is_err());
        for bad in ["", "=x", "a b=c"] {
            let o = RegistrarOverrides {
                only_label: Some(bad.into()),
                ..Default::default()
            };
            assert!(resolve_registrar(&f, &o).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn template_vars_and_relative_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        std::fs::write(
            &path,
            "[[template]]\nsrc = \"t.tera\"\ndest = \"out.cfg\"\n\
             haproxy_master_socket = \"master.sock\"\n\
             [template.vars]\ndomain = \"example.org\"\ntcp_ports = { db = 5432 }\n",
        )
        .unwrap();
        let f = FileConfig::load(Some(&path)).unwrap();
        let t = &f.template[0];
        assert_eq!(t.vars["domain"].as_str(), Some("example.org"));
        assert_eq!(t.vars["tcp_ports"]["db"].as_integer(), Some(5432));
        assert_eq!(
            t.haproxy_master_socket.as_deref(),
            Some(dir.path().join("master.sock").as_path())
        );
    }

    #[test]
    fn etcd_tls_rules() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "x").unwrap();
        let https = |ca: Option<PathBuf>| RegistrarOverrides {
            etcd: EtcdOverrides {
                endpoints: Some(vec!["https://127.0.0.1:2379".into()]),
                ca_file: ca,
                ..Default::default()
            },
            ..Default::default()
        };
        let f = FileConfig::default();
        let c = resolve_registrar(&f, &https(Some(ca.clone()))).unwrap();
        assert_eq!(c.etcd.tls.unwrap().ca_file, ca);
        let err = resolve_registrar(&f, &https(None)).unwrap_err().to_string();
        assert!(err.contains("--etcd-ca"), "{err}");
        let err = resolve_registrar(&f, &https(Some(dir.path().join("missing.pem"))))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.pem"), "{err}");
        let mut mixed = https(Some(ca));
        mixed.etcd.endpoints = Some(vec!["http://127.0.0.1:2379".into()]);
        assert!(resolve_registrar(&f, &mixed).is_err());
    }

    #[test]
    fn admin_socket_needs_a_reload_to_fall_back_on() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("t.tera"), "x").unwrap();
        let path = dir.path().join("p.toml");
        std::fs::write(
            &path,
            "[[template]]\nsrc = \"t.tera\"\ndest = \"out.cfg\"\n\
             haproxy_admin_socket = \"admin.sock\"\n",
        )
        .unwrap();
        let f = FileConfig::load(Some(&path)).unwrap();
        let err = resolve_watcher(&f, &WatcherOverrides::default()).unwrap_err();
        assert!(
            err.to_string().contains("haproxy_admin_socket needs"),
            "{err}"
        );
    }

    #[test]
    fn watcher_needs_templates() {
        let err =
            resolve_watcher(&FileConfig::default(), &WatcherOverrides::default()).unwrap_err();
        assert!(err.to_string().contains("[[template]]"));
    }

    #[test]
    fn timeouts_below_100ms_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("t.tera"), "x").unwrap();
        let path = dir.path().join("p.toml");
        let write = |etcd: &str, watcher: &str| {
            std::fs::write(
                &path,
                format!(
                    "[etcd]\n{etcd}\n[watcher]\n{watcher}\n\
                     [[template]]\nsrc = \"t.tera\"\ndest = \"out.cfg\"\n"
                ),
            )
            .unwrap();
            FileConfig::load(Some(&path)).unwrap()
        };
        let o = WatcherOverrides::default();
        let f = write("dial_timeout_ms = 0", "command_timeout_ms = 0");
        let err = resolve_watcher(&f, &o).unwrap_err().to_string();
        assert!(err.contains("etcd.dial_timeout_ms = 0"), "{err}");
        assert!(err.contains("watcher.command_timeout_ms = 0"), "{err}");
        let f = write("dial_timeout_ms = 99", "");
        let err = resolve_watcher(&f, &o).unwrap_err().to_string();
        assert!(err.contains("etcd.dial_timeout_ms = 99"), "{err}");
        let f = write("dial_timeout_ms = 100", "command_timeout_ms = 100");
        let c = resolve_watcher(&f, &o).unwrap();
        assert_eq!(c.command_timeout, Duration::from_millis(100));
        assert_eq!(c.etcd.dial_timeout, Duration::from_millis(100));
    }
}
