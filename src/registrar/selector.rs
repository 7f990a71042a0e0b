//! What a container asks to be registered as: its labels (and registrator's `SERVICE_*`
//! environment variables), its published ports and its state become a list of
//! `Registration`s. Pure: it reads a `docker inspect` document and nothing else.
//!
//! Lookup order for a setting `<x>` of container port `<p>`, most specific first:
//! `portolan.port.<p>.<x>` label, `SERVICE_<p>_<X>` env, `portolan.<x>` label,
//! `SERVICE_<X>` env (the env fallback exists for `service`, `ignore` and `tags` only,
//! as in registrator).
//!
//! Any bad input makes the whole container a list of `Warning`s, each naming the
//! container and the label: registering half of a misconfigured container would be a
//! surprise, skipping it with a clear message is not.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use bollard::models::{ContainerInspectResponse, HealthStatusEnum, PortBinding};

use crate::schema::{self, InstanceRecord, DEFAULT_WEIGHT, MAX_WEIGHT};

pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(5);
pub const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(2);
pub const DEFAULT_CHECK_FALL: u32 = 3;
pub const DEFAULT_CHECK_RISE: u32 = 2;

/// The part of the registrar's configuration the selector needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub node: String,
    /// Address of this host for published ports bound to every interface.
    pub advertise_ip: IpAddr,
    /// Register container IP and container port instead.
    pub internal: bool,
}

/// One key this node wants in etcd: `<prefix>/services/<service>/<instance>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub service: String,
    pub instance: String,
    pub record: InstanceRecord,
    /// The registrar's own probe of `record.addr`, if the labels ask for one.
    pub check: Option<Check>,
}

impl Registration {
    pub fn key(&self, prefix: &str) -> String {
        schema::service_key(prefix, &self.service, &self.instance)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub kind: CheckKind,
    pub interval: Duration,
    pub timeout: Duration,
    /// Failures in a row that deregister.
    pub fall: u32,
    /// Successes in a row that register again after a fall.
    pub rise: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckKind {
    /// `GET <path>`; any 2xx or 3xx answer is a success.
    Http {
        path: String,
    },
    Tcp,
}

/// A problem with one container's configuration. The container is not registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    /// `name (short id)`.
    pub container: String,
    /// The label or environment variable at fault (or `image` for a default name).
    pub label: String,
    pub message: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "container {}: {}: {}",
            self.container, self.label, self.message
        )
    }
}

/// Whether a container may be registered at all, from its Docker state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    Up,
    NotRunning,
    Paused,
    Restarting,
    /// Has a HEALTHCHECK that has not passed yet.
    HealthStarting,
    Unhealthy,
}

/// Running, not paused, and healthy if the image has a HEALTHCHECK.
pub fn gate(c: &ContainerInspectResponse) -> Gate {
    let Some(state) = &c.state else {
        return Gate::NotRunning;
    };
    if state.restarting == Some(true) {
        return Gate::Restarting;
    }
    if state.running != Some(true) {
        return Gate::NotRunning;
    }
    if state.paused == Some(true) {
        return Gate::Paused;
    }
    match state.health.as_ref().and_then(|h| h.status) {
        Some(HealthStatusEnum::STARTING) => Gate::HealthStarting,
        Some(HealthStatusEnum::UNHEALTHY) => Gate::Unhealthy,
        _ => Gate::Up,
    }
}

/// `name (short id)` for messages; either part may be missing in a broken document.
pub fn display_name(c: &ContainerInspectResponse) -> String {
    let id: String = c.id.as_deref().unwrap_or("").chars().take(12).collect();
    match c.name.as_deref().map(|n| n.trim_start_matches('/')) {
        Some(n) if !n.is_empty() => format!("{n} ({id})"),
        _ => id,
    }
}

/// The registrations a running container asks for. Does not look at the state: call
/// `gate` first (a stopped container has no published ports, which would read as
/// port labels naming unpublished ports).
pub fn registrations(
    c: &ContainerInspectResponse,
    settings: &Settings,
) -> Result<Vec<Registration>, Vec<Warning>> {
    let mut w = Warnings {
        container: display_name(c),
        list: Vec::new(),
    };
    let Some(id) =
        c.id.as_deref()
            .filter(|id| id.len() >= 12 && id.bytes().all(|b| b.is_ascii_hexdigit()))
    else {
        w.push("Id", "the container has no valid id in docker inspect");
        return Err(w.list);
    };
    let empty_labels = HashMap::new();
    let config = c.config.as_ref();
    let meta = Meta {
        labels: config
            .and_then(|c| c.labels.as_ref())
            .unwrap_or(&empty_labels),
        env: config
            .and_then(|c| c.env.as_ref())
            .map(|env| {
                env.iter()
                    .filter_map(|e| e.split_once('='))
                    .filter(|(k, _)| k.starts_with("SERVICE_"))
                    .collect()
            })
            .unwrap_or_default(),
    };

    let ports = ports(c, settings);
    check_port_labels(&meta, &ports, &mut w);
    check_container_labels(&meta, &mut w);

    let base_name = meta.lookup(None, "service");
    let image_name = config
        .and_then(|c| c.image.as_deref())
        .and_then(image_base_name);
    let several = ports.len() > 1;
    let mut out = Vec::new();
    for (&port, addr) in &ports {
        let Some(addr) = addr else {
            w.push(
                &format!("port {port}/tcp"),
                "published without a usable host port or container IP",
            );
            continue;
        };
        if let Some((src, v)) = meta.lookup(Some(port), "ignore") {
            match parse_ignore(&src, v) {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => {
                    w.push(&src, &e);
                    continue;
                }
            }
        }
        let service = match meta.lookup_port_only(port, "service") {
            Some((src, name)) => Some((src, name.to_string())),
            None => match (&base_name, &image_name) {
                (Some((src, name)), _) => Some((src.clone(), suffixed(name, port, several))),
                (None, Some(name)) => Some(("image".to_string(), suffixed(name, port, several))),
                (None, None) => None,
            },
        };
        let Some((service_src, service)) = service else {
            w.push(
                "image",
                "the image has no name to derive a service name from: set portolan.service",
            );
            continue;
        };
        if !schema::is_valid_name(&service) {
            w.push(
                &service_src,
                &format!("service name {service:?} must match [A-Za-z0-9][A-Za-z0-9_.-]{{0,127}}"),
            );
            continue;
        }
        let tags = match meta.lookup(Some(port), "tags") {
            Some((src, v)) => match parse_tags(v) {
                Ok(t) => t,
                Err(e) => {
                    w.push(&src, &e);
                    continue;
                }
            },
            None => Vec::new(),
        };
        let weight = match meta.label(Some(port), "weight") {
            Some((src, v)) => match v.trim().parse::<u32>() {
                Ok(n) if n <= MAX_WEIGHT => n,
                _ => {
                    w.push(
                        &src,
                        &format!("weight {v:?} is not a number in 0..={MAX_WEIGHT}"),
                    );
                    continue;
                }
            },
            None => DEFAULT_WEIGHT,
        };
        let check = match check(&meta, port) {
            Ok(c) => c,
            Err((src, e)) => {
                w.push(&src, &e);
                continue;
            }
        };
        let instance = schema::instance_id(&settings.node, id, port);
        out.push(Registration {
            service,
            record: InstanceRecord {
                addr: addr.to_string(),
                node: settings.node.clone(),
                container: id.chars().take(12).collect(),
                port: Some(port),
                tags,
                weight,
            },
            instance,
            check,
        });
    }
    if w.list.is_empty() {
        Ok(out)
    } else {
        Err(w.list)
    }
}

struct Warnings {
    container: String,
    list: Vec<Warning>,
}

impl Warnings {
    fn push(&mut self, label: &str, message: &str) {
        self.list.push(Warning {
            container: self.container.clone(),
            label: label.to_string(),
            message: message.to_string(),
        });
    }
}

struct Meta<'a> {
    labels: &'a HashMap<String, String>,
    /// Only `SERVICE_*` variables.
    env: BTreeMap<&'a str, &'a str>,
}

impl Meta<'_> {
    /// `portolan.port.<p>.<name>`, then `portolan.<name>`. Returns (source, value).
    fn label(&self, port: Option<u16>, name: &str) -> Option<(String, &str)> {
        port.and_then(|p| self.get_label(&format!("portolan.port.{p}.{name}")))
            .or_else(|| self.get_label(&format!("portolan.{name}")))
    }

    fn get_label(&self, key: &str) -> Option<(String, &str)> {
        self.labels
            .get(key)
            .map(|v| (format!("label {key}={v:?}"), v.as_str()))
    }

    fn get_env(&self, key: &str) -> Option<(String, &str)> {
        self.env.get(key).map(|v| (format!("env {key}={v:?}"), *v))
    }

    /// The port-specific label or env variable only.
    fn lookup_port_only(&self, port: u16, name: &str) -> Option<(String, &str)> {
        self.get_label(&format!("portolan.port.{port}.{name}"))
            .or_else(|| {
                registrator_env(name).and_then(|e| self.get_env(&format!("SERVICE_{port}_{e}")))
            })
    }

    /// Labels and registrator env, most specific first (see the module docs).
    fn lookup(&self, port: Option<u16>, name: &str) -> Option<(String, &str)> {
        port.and_then(|p| self.lookup_port_only(p, name))
            .or_else(|| self.get_label(&format!("portolan.{name}")))
            .or_else(|| registrator_env(name).and_then(|e| self.get_env(&format!("SERVICE_{e}"))))
    }
}

/// registrator's name for a setting: `SERVICE_NAME`, `SERVICE_<p>_TAGS`, …
fn registrator_env(setting: &str) -> Option<&'static str> {
    match setting {
        "service" => Some("NAME"),
        "ignore" => Some("IGNORE"),
        "tags" => Some("TAGS"),
        _ => None,
    }
}

/// Per-port label names (after `portolan.port.<p>.`) and container label names under
/// `portolan.check.`. Other `portolan.<x>` labels are left to users (e.g. `--only-label`).
const PORT_SETTINGS: &[&str] = &[
    "service",
    "ignore",
    "tags",
    "weight",
    "check.http",
    "check.tcp",
    "check.interval",
    "check.timeout",
    "check.fall",
    "check.rise",
];

fn check_port_labels(meta: &Meta, ports: &BTreeMap<u16, Option<String>>, w: &mut Warnings) {
    let mut keys: Vec<&String> = meta
        .labels
        .keys()
        .filter(|k| k.starts_with("portolan.port."))
        .collect();
    keys.sort();
    let published = || {
        if ports.is_empty() {
            "none".to_string()
        } else {
            ports
                .keys()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    for key in keys {
        let rest = &key["portolan.port.".len()..];
        let (port, setting) = rest.split_once('.').unwrap_or((rest, ""));
        let label = format!("label {key}");
        match port.parse::<u16>() {
            Ok(p) if ports.contains_key(&p) => {}
            Ok(p) => w.push(
                &label,
                &format!(
                    "names port {p}, which this container does not publish (published: {})",
                    published()
                ),
            ),
            Err(_) => w.push(&label, &format!("{port:?} is not a port number")),
        }
        if !PORT_SETTINGS.contains(&setting) {
            w.push(
                &label,
                &format!(
                    "unknown setting {setting:?}; known: {}",
                    PORT_SETTINGS.join(", ")
                ),
            );
        }
    }
}

fn check_container_labels(meta: &Meta, w: &mut Warnings) {
    let mut keys: Vec<&String> = meta
        .labels
        .keys()
        .filter(|k| k.starts_with("portolan.check."))
        .collect();
    keys.sort();
    for key in keys {
        let setting = &key["portolan.".len()..];
        if !PORT_SETTINGS.contains(&setting) {
            w.push(
                &format!("label {key}"),
                "unknown check setting; known: http, tcp, interval, timeout, fall, rise",
            );
        }
    }
}

/// Container port → the address to register (None: published but unusable). TCP only:
/// HAProxy balances TCP and HTTP.
fn ports(c: &ContainerInspectResponse, settings: &Settings) -> BTreeMap<u16, Option<String>> {
    let mut out = BTreeMap::new();
    let host_mode = c
        .host_config
        .as_ref()
        .and_then(|h| h.network_mode.as_deref())
        == Some("host");
    let exposed: BTreeSet<u16> = c
        .config
        .as_ref()
        .and_then(|c| c.exposed_ports.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|p| tcp_port(p))
        .collect();
    let port_map = c.network_settings.as_ref().and_then(|n| n.ports.as_ref());
    if host_mode {
        // The container shares the host's network: its ports are the host's ports.
        for p in exposed {
            out.insert(p, Some(addr(settings.advertise_ip, p)));
        }
        return out;
    }
    if settings.internal {
        let ip = container_ip(c);
        let mapped = port_map
            .into_iter()
            .flat_map(|m| m.keys())
            .filter_map(|p| tcp_port(p));
        for p in exposed.iter().copied().chain(mapped) {
            out.insert(p, ip.map(|ip| addr(ip, p)));
        }
        return out;
    }
    for (spec, bindings) in port_map.into_iter().flatten() {
        let Some(p) = tcp_port(spec) else { continue };
        let Some(bindings) = bindings.as_ref().filter(|b| !b.is_empty()) else {
            continue;
        };
        out.insert(p, published_addr(bindings, settings.advertise_ip));
    }
    out
}

fn tcp_port(spec: &str) -> Option<u16> {
    let (port, proto) = spec.split_once('/').unwrap_or((spec, "tcp"));
    (proto == "tcp").then(|| port.parse().ok()).flatten()
}

fn addr(ip: IpAddr, port: u16) -> String {
    schema::Addr {
        host: ip.to_string(),
        port,
    }
    .to_string()
}

/// A binding on every interface (0.0.0.0 or ::) is reached at the advertise IP; a
/// binding on one host IP (127.0.0.1, 10.0.0.5) only at that IP. Wildcard bindings win,
/// IPv4 first, so the choice is stable whatever order Docker lists them in.
fn published_addr(bindings: &[PortBinding], advertise: IpAddr) -> Option<String> {
    let mut candidates: Vec<(u8, String, u16)> = bindings
        .iter()
        .filter_map(|b| {
            let port = b
                .host_port
                .as_deref()
                .and_then(|p| p.parse::<u16>().ok())
                .filter(|p| *p != 0)?;
            let host_ip = b.host_ip.as_deref().unwrap_or("");
            Some(match host_ip {
                "" | "0.0.0.0" => (0, advertise.to_string(), port),
                "::" => (1, advertise.to_string(), port),
                ip => (2, ip.parse::<IpAddr>().ok()?.to_string(), port),
            })
        })
        .collect();
    candidates.sort();
    let (_, ip, port) = candidates.into_iter().next()?;
    let ip: IpAddr = ip.parse().ok()?;
    Some(addr(ip, port))
}

/// The container's IP on the network it was started with, else on the first network
/// (by name) that gave it one.
fn container_ip(c: &ContainerInspectResponse) -> Option<IpAddr> {
    let networks = c.network_settings.as_ref()?.networks.as_ref()?;
    let mode = c
        .host_config
        .as_ref()
        .and_then(|h| h.network_mode.as_deref());
    let ip_of = |name: &str| {
        networks
            .get(name)
            .and_then(|n| n.ip_address.as_deref())
            .and_then(|ip| ip.parse::<IpAddr>().ok())
    };
    let preferred = match mode {
        Some("default") | None => ip_of("bridge"),
        Some(m) => ip_of(m),
    };
    preferred.or_else(|| {
        let mut names: Vec<&String> = networks.keys().collect();
        names.sort();
        names.into_iter().find_map(|n| ip_of(n))
    })
}

fn suffixed(name: &str, port: u16, several: bool) -> String {
    if several {
        format!("{name}-{port}")
    } else {
        name.to_string()
    }
}

/// `registry.example.com:5000/team/web:1.2@sha256:…` → `web`. None for an image given
/// by id, which has no name to offer.
pub fn image_base_name(image: &str) -> Option<String> {
    let image = image.trim();
    if image.starts_with("sha256:")
        || (image.len() >= 12 && image.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return None;
    }
    let without_digest = image.split('@').next().unwrap_or("");
    let last = without_digest.rsplit('/').next().unwrap_or("");
    let name = last.split(':').next().unwrap_or("");
    (!name.is_empty()).then(|| name.to_string())
}

/// Labels must say true or false; registrator's `SERVICE_IGNORE` ignores on any value
/// but an explicit false.
fn parse_ignore(source: &str, v: &str) -> Result<bool, String> {
    if source.starts_with("env ") {
        return Ok(!matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "" | "0" | "false" | "no"
        ));
    }
    parse_bool(v)
}

fn parse_bool(v: &str) -> Result<bool, String> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" | "" => Ok(false),
        _ => Err(format!("{v:?} is not true or false")),
    }
}

fn parse_tags(v: &str) -> Result<Vec<String>, String> {
    let mut tags = Vec::new();
    for t in v.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        if !schema::is_valid_tag(t) {
            return Err(format!(
                "tag {t:?}: tags must match [A-Za-z0-9_.:=-]{{1,64}}, separated by commas"
            ));
        }
        if !tags.iter().any(|x| x == t) {
            tags.push(t.to_string());
        }
    }
    Ok(tags)
}

/// `500ms`, `5s`, `1m`; a bare number is seconds.
pub fn parse_duration(v: &str) -> Result<Duration, String> {
    let v = v.trim();
    let (num, unit) = match v.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => v.split_at(i),
        None => (v, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{v:?} is not a duration like 500ms, 5s or 1m"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("{v:?} is not a duration like 500ms, 5s or 1m")),
    };
    if !(0.0..=3600.0).contains(&secs) {
        return Err(format!("{v:?} is out of range (at most 1h)"));
    }
    Ok(Duration::from_secs_f64(secs))
}

type LabelError = (String, String);

fn check(meta: &Meta, port: u16) -> Result<Option<Check>, LabelError> {
    // Per-port check labels replace the container's as a whole, so a port can opt out
    // of an HTTP check meant for another port with `portolan.port.<p>.check.tcp=false`.
    let port_level = meta
        .get_label(&format!("portolan.port.{port}.check.http"))
        .is_some()
        || meta
            .get_label(&format!("portolan.port.{port}.check.tcp"))
            .is_some();
    let kind_label = |name: &str| {
        if port_level {
            meta.get_label(&format!("portolan.port.{port}.check.{name}"))
        } else {
            meta.get_label(&format!("portolan.check.{name}"))
        }
    };
    let http = kind_label("http");
    let tcp = match kind_label("tcp") {
        Some((src, v)) => match parse_bool(v) {
            Ok(b) => b.then_some(src),
            Err(e) => return Err((src, e)),
        },
        None => None,
    };
    let kind = match (http, tcp) {
        (Some((src, _)), Some(_)) => {
            return Err((src, "set check.http or check.tcp, not both".into()));
        }
        (Some((src, path)), None) => {
            let path = path.trim();
            if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err((src, format!("{path:?} is not a path like /health")));
            }
            CheckKind::Http {
                path: path.to_string(),
            }
        }
        (None, Some(_)) => CheckKind::Tcp,
        (None, None) => return Ok(None),
    };
    let duration = |name: &str, default: Duration| -> Result<Duration, LabelError> {
        match meta.label(Some(port), &format!("check.{name}")) {
            Some((src, v)) => match parse_duration(v) {
                Ok(d) if !d.is_zero() => Ok(d),
                Ok(_) => Err((src, "must be more than 0".into())),
                Err(e) => Err((src, e)),
            },
            None => Ok(default),
        }
    };
    let count = |name: &str, default: u32| -> Result<u32, LabelError> {
        match meta.label(Some(port), &format!("check.{name}")) {
            Some((src, v)) => match v.trim().parse::<u32>() {
                Ok(n) if (1..=100).contains(&n) => Ok(n),
                _ => Err((src, format!("{v:?} is not a count in 1..=100"))),
            },
            None => Ok(default),
        }
    };
    Ok(Some(Check {
        kind,
        interval: duration("interval", DEFAULT_CHECK_INTERVAL)?,
        timeout: duration("timeout", DEFAULT_CHECK_TIMEOUT)?,
        fall: count("fall", DEFAULT_CHECK_FALL)?,
        rise: count("rise", DEFAULT_CHECK_RISE)?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f2a9c1b7d10aaaabbbbccccddddeeeeffff00001111222233334444555566667777";

    fn settings() -> Settings {
        Settings {
            node: "host-a".into(),
            advertise_ip: "10.0.0.5".parse().unwrap(),
            internal: false,
        }
    }

    /// A `docker inspect` document as Engine 20.10 returns it (trimmed).
    fn inspect(
        labels: &[(&str, &str)],
        env: &[&str],
        ports: serde_json::Value,
    ) -> ContainerInspectResponse {
        let labels: serde_json::Map<String, serde_json::Value> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
            .collect();
        serde_json::from_value(serde_json::json!({
            "Id": ID,
            "Name": "/web-1",
            "State": {"Status": "running", "Running": true, "Paused": false, "Restarting": false},
            "Config": {
                "Image": "registry.example.com:5000/team/shop-web:1.2",
                "Labels": labels,
                "Env": env,
                "ExposedPorts": {"8080/tcp": {}},
            },
            "HostConfig": {"NetworkMode": "default"},
            "NetworkSettings": {
                "Ports": ports,
                "Networks": {"bridge": {"IPAddress": "172.17.0.3"}},
            },
        }))
        .unwrap()
    }

    fn one_port() -> serde_json::Value {
        serde_json::json!({"8080/tcp": [{"HostIp": "0.0.0.0", "HostPort": "32768"}]})
    }

    fn regs(c: &ContainerInspectResponse) -> Vec<Registration> {
        registrations(c, &settings()).unwrap_or_else(|w| panic!("warnings: {w:?}"))
    }

    fn warnings(c: &ContainerInspectResponse) -> Vec<Warning> {
        registrations(c, &settings()).expect_err("expected warnings")
    }

    #[test]
    fn default_name_is_the_image_base_name() {
        let r = regs(&inspect(&[], &[], one_port()));
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].service, "shop-web");
        assert_eq!(r[0].instance, "host-a-3f2a9c1b7d10-8080");
        assert_eq!(
            r[0].record.to_json(),
            r#"{"addr":"10.0.0.5:32768","node":"host-a","container":"3f2a9c1b7d10","port":8080,"tags":[],"weight":100}"#
        );
        assert_eq!(r[0].check, None);
        assert_eq!(
            r[0].key("/portolan"),
            "/portolan/services/shop-web/host-a-3f2a9c1b7d10-8080"
        );
    }

    #[test]
    fn image_names() {
        for (image, want) in [
            ("nginx", Some("nginx")),
            ("nginx:1.25", Some("nginx")),
            ("docker.io/library/nginx:1.25", Some("nginx")),
            ("registry:5000/team/web", Some("web")),
            ("registry:5000/team/web:2@sha256:abcd", Some("web")),
            ("web@sha256:abcd", Some("web")),
            ("sha256:8754858957e0aa", None),
            ("8754858957e0", None),
            ("", None),
        ] {
            assert_eq!(image_base_name(image).as_deref(), want, "{image}");
        }
    }

    #[test]
    fn labels_set_name_tags_weight() {
        let c = inspect(
            &[
                ("portolan.service", "shop"),
                ("portolan.tags", "v2, canary,v2"),
                ("portolan.weight", "50"),
            ],
            &[],
            one_port(),
        );
        let r = regs(&c);
        assert_eq!(r[0].service, "shop");
        assert_eq!(r[0].record.tags, vec!["v2", "canary"]);
        assert_eq!(r[0].record.weight, 50);
    }

    #[test]
    fn registrator_env_is_the_fallback() {
        let c = inspect(
            &[],
            &["PATH=/bin", "SERVICE_NAME=legacy", "SERVICE_TAGS=old,x"],
            one_port(),
        );
        let r = regs(&c);
        assert_eq!(r[0].service, "legacy");
        assert_eq!(r[0].record.tags, vec!["old", "x"]);
        // Labels win over env.
        let c = inspect(
            &[("portolan.service", "new")],
            &["SERVICE_NAME=legacy"],
            one_port(),
        );
        assert_eq!(regs(&c)[0].service, "new");
        // Port-specific env wins over the container-wide label.
        let c = inspect(
            &[("portolan.service", "new")],
            &["SERVICE_8080_NAME=perport"],
            one_port(),
        );
        assert_eq!(regs(&c)[0].service, "perport");
    }

    #[test]
    fn several_ports_get_suffixes_unless_named() {
        let ports = serde_json::json!({
            "8080/tcp": [{"HostIp": "0.0.0.0", "HostPort": "32768"}],
            "9090/tcp": [{"HostIp": "0.0.0.0", "HostPort": "32769"}],
            "5353/udp": [{"HostIp": "0.0.0.0", "HostPort": "32770"}],
            "7070/tcp": null,
        });
        let r = regs(&inspect(
            &[("portolan.port.9090.service", "admin")],
            &[],
            ports.clone(),
        ));
        let got: Vec<(&str, &str)> = r
            .iter()
            .map(|r| (r.service.as_str(), r.record.addr.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("shop-web-8080", "10.0.0.5:32768"),
                ("admin", "10.0.0.5:32769")
            ]
        );
        let r = regs(&inspect(&[("portolan.service", "shop")], &[], ports));
        assert_eq!(r[0].service, "shop-8080");
        assert_eq!(r[1].service, "shop-9090");
    }

    #[test]
    fn host_ip_bindings_register_that_ip() {
        let ports = serde_json::json!({"8080/tcp": [{"HostIp": "127.0.0.1", "HostPort": "40001"}]});
        assert_eq!(
            regs(&inspect(&[], &[], ports))[0].record.addr,
            "127.0.0.1:40001"
        );
        // Wildcards win over a specific IP, v4 over v6, whatever the order.
        let ports = serde_json::json!({"8080/tcp": [
            {"HostIp": "::", "HostPort": "40003"},
            {"HostIp": "127.0.0.1", "HostPort": "40001"},
            {"HostIp": "0.0.0.0", "HostPort": "40002"},
        ]});
        assert_eq!(
            regs(&inspect(&[], &[], ports))[0].record.addr,
            "10.0.0.5:40002"
        );
        let ports = serde_json::json!({"8080/tcp": [{"HostIp": "::1", "HostPort": "40001"}]});
        assert_eq!(
            regs(&inspect(&[], &[], ports))[0].record.addr,
            "[::1]:40001"
        );
    }

    #[test]
    fn unpublished_containers_register_nothing() {
        assert!(regs(&inspect(&[], &[], serde_json::json!({"8080/tcp": null}))).is_empty());
        assert!(regs(&inspect(&[], &[], serde_json::json!({}))).is_empty());
    }

    #[test]
    fn internal_registers_container_ip_and_port() {
        let s = Settings {
            internal: true,
            ..settings()
        };
        let r = registrations(
            &inspect(&[], &[], serde_json::json!({"8080/tcp": null})),
            &s,
        )
        .unwrap();
        assert_eq!(r[0].record.addr, "172.17.0.3:8080");
        assert_eq!(r[0].record.port, Some(8080));
    }

    #[test]
    fn host_network_registers_exposed_ports_at_the_advertise_ip() {
        let mut c = inspect(&[], &[], serde_json::json!({}));
        c.host_config.as_mut().unwrap().network_mode = Some("host".into());
        assert_eq!(regs(&c)[0].record.addr, "10.0.0.5:8080");
    }

    #[test]
    fn ignore() {
        assert!(regs(&inspect(&[("portolan.ignore", "true")], &[], one_port())).is_empty());
        assert!(regs(&inspect(&[], &["SERVICE_IGNORE=yes please"], one_port())).is_empty());
        assert!(regs(&inspect(&[], &["SERVICE_8080_IGNORE=1"], one_port())).is_empty());
        assert_eq!(
            regs(&inspect(&[("portolan.ignore", "false")], &[], one_port())).len(),
            1
        );
        assert_eq!(
            regs(&inspect(&[], &["SERVICE_IGNORE=false"], one_port())).len(),
            1
        );
        let w = warnings(&inspect(&[("portolan.ignore", "maybe")], &[], one_port()));
        assert!(w[0].label.contains("portolan.ignore"), "{w:?}");
    }

    #[test]
    fn bad_labels_name_the_container_and_label() {
        for (label, value, needle) in [
            ("portolan.weight", "heavy", "weight"),
            ("portolan.weight", "300", "weight"),
            ("portolan.service", "bad name!", "service name"),
            ("portolan.tags", "ok,not ok", "tag"),
            ("portolan.port.1234.service", "x", "does not publish"),
            ("portolan.port.http.service", "x", "not a port number"),
            ("portolan.port.8080.servcie", "x", "unknown setting"),
            ("portolan.check.htpp", "/", "unknown check setting"),
            ("portolan.check.http", "health", "not a path"),
            ("portolan.check.tcp", "sure", "not true or false"),
        ] {
            let w = warnings(&inspect(&[(label, value)], &[], one_port()));
            let text = w[0].to_string();
            assert!(text.contains("web-1 (3f2a9c1b7d10)"), "{text}");
            assert!(text.contains(label), "{text}");
            assert!(text.contains(needle), "{label}={value}: {text}");
        }
        let w = warnings(&inspect(&[], &["SERVICE_NAME=a/b"], one_port()));
        assert!(w[0].to_string().contains("SERVICE_NAME"), "{w:?}");
    }

    #[test]
    fn other_portolan_labels_are_left_alone() {
        assert_eq!(
            regs(&inspect(
                &[("portolan.test", "run-1"), ("portolan.enable", "true")],
                &[],
                one_port()
            ))
            .len(),
            1
        );
    }

    #[test]
    fn image_without_a_name_needs_a_label() {
        let mut c = inspect(&[], &[], one_port());
        c.config.as_mut().unwrap().image = Some("sha256:8754858957e0".into());
        let w = warnings(&c);
        assert_eq!(w[0].label, "image");
        c.config.as_mut().unwrap().labels =
            Some([("portolan.service".to_string(), "named".to_string())].into());
        assert_eq!(regs(&c)[0].service, "named");
    }

    #[test]
    fn missing_fields_never_panic() {
        let c: ContainerInspectResponse = serde_json::from_str("{}").unwrap();
        assert_eq!(gate(&c), Gate::NotRunning);
        assert!(registrations(&c, &settings()).is_err());
        let c: ContainerInspectResponse =
            serde_json::from_value(serde_json::json!({"Id": ID, "State": {"Running": true}}))
                .unwrap();
        assert_eq!(gate(&c), Gate::Up);
        // No published port: nothing to register, nothing to complain about.
        assert_eq!(registrations(&c, &settings()), Ok(vec![]));
        let c: ContainerInspectResponse = serde_json::from_value(serde_json::json!({
            "Id": ID, "Config": {"Image": "x"},
            "NetworkSettings": {"Ports": {"8080/tcp": [{"HostIp": "0.0.0.0", "HostPort": ""}], "bad": null}}
        }))
        .unwrap();
        assert!(registrations(&c, &settings()).is_err());
    }

    #[test]
    fn checks_from_labels_with_defaults_and_overrides() {
        let r = regs(&inspect(
            &[("portolan.check.http", "/health")],
            &[],
            one_port(),
        ));
        assert_eq!(
            r[0].check,
            Some(Check {
                kind: CheckKind::Http {
                    path: "/health".into()
                },
                interval: DEFAULT_CHECK_INTERVAL,
                timeout: DEFAULT_CHECK_TIMEOUT,
                fall: DEFAULT_CHECK_FALL,
                rise: DEFAULT_CHECK_RISE,
            })
        );
        let r = regs(&inspect(
            &[
                ("portolan.check.tcp", "true"),
                ("portolan.check.interval", "500ms"),
                ("portolan.check.timeout", "0.2"),
                ("portolan.check.fall", "1"),
                ("portolan.port.8080.check.rise", "5"),
            ],
            &[],
            one_port(),
        ));
        let c = r[0].check.clone().unwrap();
        assert_eq!(c.kind, CheckKind::Tcp);
        assert_eq!(c.interval, Duration::from_millis(500));
        assert_eq!(c.timeout, Duration::from_millis(200));
        assert_eq!((c.fall, c.rise), (1, 5));
        // A port can opt out of the container's check.
        let ports = serde_json::json!({
            "8080/tcp": [{"HostIp": "0.0.0.0", "HostPort": "1"}],
            "9090/tcp": [{"HostIp": "0.0.0.0", "HostPort": "2"}],
        });
        let r = regs(&inspect(
            &[
                ("portolan.check.http", "/"),
                ("portolan.port.9090.check.tcp", "false"),
            ],
            &[],
            ports,
        ));
        assert!(r[0].check.is_some());
        assert!(r[1].check.is_none());
        for (label, value) in [
            ("portolan.check.interval", "0s"),
            ("portolan.check.interval", "5 parsecs"),
            ("portolan.check.fall", "0"),
            ("portolan.check.rise", "many"),
        ] {
            let w = warnings(&inspect(
                &[("portolan.check.http", "/"), (label, value)],
                &[],
                one_port(),
            ));
            assert!(w[0].label.contains(label), "{w:?}");
        }
        let w = warnings(&inspect(
            &[("portolan.check.http", "/"), ("portolan.check.tcp", "true")],
            &[],
            one_port(),
        ));
        assert!(w[0].message.contains("not both"));
    }

    #[test]
    fn gates() {
        let mut c = inspect(&[], &[], one_port());
        assert_eq!(gate(&c), Gate::Up);
        let state = c.state.as_mut().unwrap();
        state.paused = Some(true);
        assert_eq!(gate(&c), Gate::Paused);
        let state = c.state.as_mut().unwrap();
        state.paused = Some(false);
        for (status, want) in [
            ("starting", Gate::HealthStarting),
            ("healthy", Gate::Up),
            ("unhealthy", Gate::Unhealthy),
            ("none", Gate::Up),
        ] {
            c.state.as_mut().unwrap().health =
                Some(serde_json::from_value(serde_json::json!({"Status": status})).unwrap());
            assert_eq!(gate(&c), want, "{status}");
        }
        c.state.as_mut().unwrap().running = Some(false);
        assert_eq!(gate(&c), Gate::NotRunning);
        c.state.as_mut().unwrap().restarting = Some(true);
        assert_eq!(gate(&c), Gate::Restarting);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("2h").is_err());
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("").is_err());
    }
}
