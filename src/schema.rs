//! The etcd key/value contract, schema v2 (README.md, "etcd key schema").
//!
//! Everything that reads or writes etcd goes through here, so the rules about names,
//! values and what may reach a rendered HAProxy file live in one place. Pure: no I/O.
//!
//! ```text
//! <prefix>/nodes/<node>/node                       JSON NodeRecord, on the node's lease
//! <prefix>/nodes/<node>/services/<service>/<id>    JSON InstanceRecord, on the node's lease
//! <prefix>/services/<service>/<instance>           written by hand: JSON or bare "host:port"
//! <prefix>/watchers/<name>                         JSON WatcherStatus, on the watcher's lease
//! <prefix>/config/<path>                           raw values, handed to templates as `kv`
//! ```
//!
//! Everything a registrar writes lies under its node's prefix `<prefix>/nodes/<node>/`,
//! so an etcd role with read-write on that one prefix is all a Docker host needs, and
//! its reconcile reads only its own keys (v1 registrars wrote instances under
//! `services/` and the node record at `nodes/<node>`: both are still read). The node
//! an instance belongs to is the one in its key: a record cannot claim another.

use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

pub mod route;
mod status;
pub use route::{Route, Routing};
pub use status::{ApplyPath, ReloadResult, WatcherStatus};

pub const DEFAULT_PREFIX: &str = "/portolan";
/// HAProxy accepts server weights 0..=256.
pub const MAX_WEIGHT: u32 = 256;
pub const DEFAULT_WEIGHT: u32 = 100;

/// Largest instance or node value decoded: a registrar's record is ~200 bytes, and a
/// node that writes etcd's maximum (1.5 MiB) under its prefix must cost neither memory
/// nor a listing. Larger values are refused and named with their size.
pub const MAX_RECORD_BYTES: usize = 64 * 1024;

/// Refuses an instance or node value over [`MAX_RECORD_BYTES`].
pub fn check_record_size(key: &str, value: &[u8]) -> Result<(), SchemaError> {
    if value.len() > MAX_RECORD_BYTES {
        return Err(SchemaError::new(
            key,
            format!(
                "value of {} bytes is over the 64 KiB limit for instance and node records",
                value.len()
            ),
        ));
    }
    Ok(())
}

/// A key or value that breaks the schema. Always names the key and the rule it broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("key {key:?}: {rule}")]
pub struct SchemaError {
    pub key: String,
    pub rule: String,
}

impl SchemaError {
    fn new(key: &str, rule: impl Into<String>) -> Self {
        Self {
            key: key.to_string(),
            rule: rule.into(),
        }
    }
}

/// `[A-Za-z0-9][A-Za-z0-9_.-]{0,127}`: safe as an etcd path segment, an HAProxy
/// backend or server name, and a Host-header label.
pub fn is_valid_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// A service name: a valid name in lower case. Services are routed by host name, and
/// host names are case-insensitive: were `Web` allowed beside `web`, whichever sorts
/// first would capture the other's traffic.
pub fn is_valid_service_name(s: &str) -> bool {
    is_valid_name(s) && !s.bytes().any(|c| c.is_ascii_uppercase())
}

/// Tags end up in templates; keep them to characters that cannot break a config line.
pub fn is_valid_tag(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-' | b':' | b'='))
}

/// Normalises a prefix: leading slash, no trailing slash. `"portolan/"` → `"/portolan"`.
pub fn normalize_prefix(prefix: &str) -> Result<String, String> {
    let trimmed = prefix.trim().trim_end_matches('/');
    let p = if trimmed.starts_with('/') {
        trimmed.to_string()
    } else {
        format!("/{trimmed}")
    };
    if p == "/" || p.is_empty() {
        return Err(format!(
            "prefix {prefix:?} is empty: use something like \"/portolan\""
        ));
    }
    if p.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("prefix {prefix:?} contains whitespace"));
    }
    Ok(p)
}

/// Hand-written instances, and v1 registrars' ones.
pub fn services_prefix(prefix: &str) -> String {
    format!("{prefix}/services/")
}
/// A hand-written instance key.
pub fn service_key(prefix: &str, service: &str, instance: &str) -> String {
    format!("{prefix}/services/{service}/{instance}")
}
/// Every key of one node: the one prefix its etcd role may write.
pub fn node_prefix(prefix: &str, node: &str) -> String {
    format!("{prefix}/nodes/{node}/")
}
/// The node record.
pub fn node_key(prefix: &str, node: &str) -> String {
    format!("{prefix}/nodes/{node}/node")
}
/// One of a node's instances.
pub fn node_service_key(prefix: &str, node: &str, service: &str, instance: &str) -> String {
    format!("{prefix}/nodes/{node}/services/{service}/{instance}")
}
pub fn watcher_key(prefix: &str, name: &str) -> String {
    format!("{prefix}/watchers/{name}")
}

/// `<node>-<container id, 12 hex>-<container port>`: stable across registrar restarts.
pub fn instance_id(node: &str, container_id: &str, port: u16) -> String {
    format!("{node}-{}-{port}", short_id(container_id))
}

/// A container id as Docker prints it and as instance records carry it: 12 hex digits.
pub fn short_id(container_id: &str) -> &str {
    container_id.get(..12).unwrap_or(container_id)
}

/// Seconds since the Unix epoch, as records carry times (`started_at`, reload times).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What a key under the prefix is, by its path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    /// An instance: `services/<service>/<instance>` (hand-written, or a v1 registrar's),
    /// or `nodes/<node>/services/<service>/<instance>` (a registrar's), with `node` set.
    Service {
        service: String,
        instance: String,
        node: Option<String>,
    },
    /// A node record: `nodes/<node>/node`, or a v1 registrar's `nodes/<node>`.
    Node {
        name: String,
    },
    Watcher {
        name: String,
    },
    /// Path below `<prefix>/config/`, unvalidated: templates decide what it means.
    Config {
        path: String,
    },
    /// A certificate: `certs/<name>` (`crate::certs`; the name is checked there, where a
    /// bad one is refused and named like a bad certificate).
    Cert {
        name: String,
    },
    /// The ACME issuer's own state (`acme/…`): not an input to rendering.
    Acme,
}

/// Classifies a full etcd key. Keys outside the prefix or of unknown shape are errors.
pub fn parse_key(prefix: &str, key: &str) -> Result<Key, SchemaError> {
    let rest = key
        .strip_prefix(prefix)
        .and_then(|r| r.strip_prefix('/'))
        .ok_or_else(|| SchemaError::new(key, format!("not under prefix {prefix:?}")))?;
    let (kind, tail) = rest.split_once('/').unwrap_or((rest, ""));
    let name_rule = "names must match [A-Za-z0-9][A-Za-z0-9_.-]{0,127}";
    let service_rule = "names must match [a-z0-9][a-z0-9_.-]{0,127}: service names are lower case, as host names ignore case (Web would capture web's traffic)";
    let check = |ok: bool, what: &str, name: &str, rule: &str| {
        ok.then(|| name.to_string())
            .ok_or_else(|| SchemaError::new(key, format!("{what} {name:?}: {rule}")))
    };
    let valid_service = |service: &str| {
        check(
            is_valid_service_name(service),
            "service",
            service,
            service_rule,
        )
    };
    let valid = |what: &str, name: &str| check(is_valid_name(name), what, name, name_rule);
    match kind {
        "services" => {
            let mut parts = tail.split('/');
            let (Some(service), Some(instance), None) = (parts.next(), parts.next(), parts.next())
            else {
                return Err(SchemaError::new(
                    key,
                    "service keys are <prefix>/services/<service>/<instance>",
                ));
            };
            Ok(Key::Service {
                service: valid_service(service)?,
                instance: valid("instance", instance)?,
                node: None,
            })
        }
        "nodes" => {
            let parts: Vec<&str> = tail.split('/').collect();
            match parts.as_slice() {
                [name] => Ok(Key::Node {
                    name: valid("nodes name", name)?,
                }),
                [name, "node"] => Ok(Key::Node {
                    name: valid("nodes name", name)?,
                }),
                [name, "services", service, instance] => Ok(Key::Service {
                    node: Some(valid("nodes name", name)?),
                    service: valid_service(service)?,
                    instance: valid("instance", instance)?,
                }),
                _ => Err(SchemaError::new(
                    key,
                    "node keys are <prefix>/nodes/<node>/node or <prefix>/nodes/<node>/services/<service>/<instance>",
                )),
            }
        }
        "watchers" => Ok(Key::Watcher {
            name: valid("watchers name", tail)?,
        }),
        "config" if !tail.is_empty() => Ok(Key::Config {
            path: tail.to_string(),
        }),
        "certs" if !tail.is_empty() => Ok(Key::Cert {
            name: tail.to_string(),
        }),
        "acme" if !tail.is_empty() => Ok(Key::Acme),
        _ => Err(SchemaError::new(
            key,
            "unknown key kind: expected services/, nodes/, watchers/, config/, certs/ or acme/",
        )),
    }
}

/// A reachable `host:port`. The host is an IP address or a DNS name; nothing else gets
/// through, so an address can be pasted into an HAProxy `server` line verbatim.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Addr {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl Addr {
    pub fn parse(s: &str) -> Result<Addr, String> {
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (h, p) = rest
                .split_once("]:")
                .ok_or_else(|| format!("address {s:?}: expected [ipv6]:port"))?;
            h.parse::<std::net::Ipv6Addr>()
                .map_err(|_| format!("address {s:?}: {h:?} is not an IPv6 address"))?;
            (h, p)
        } else {
            let (h, p) = s
                .rsplit_once(':')
                .ok_or_else(|| format!("address {s:?}: expected host:port"))?;
            let ok_host = h.parse::<IpAddr>().is_ok()
                || (!h.is_empty()
                    && h.len() <= 253
                    && !h.starts_with(['-', '.'])
                    && h.bytes()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.')));
            if !ok_host || h.contains(':') {
                return Err(format!(
                    "address {s:?}: host {h:?} is not an IP address or DNS name"
                ));
            }
            (h, p)
        };
        let port: u16 =
            port.parse().ok().filter(|p| *p != 0).ok_or_else(|| {
                format!("address {s:?}: port {port:?} is not a number in 1..65535")
            })?;
        Ok(Addr {
            host: host.to_string(),
            port,
        })
    }
}

/// The JSON value of a service key, as the registrar writes it. One line, so that
/// `etcdctl get --prefix` stays readable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceRecord {
    pub addr: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub container: String,
    /// The container's own port (the published one is in `addr`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Going away: its container got its stop signal. Watchers take it out of rotation
    /// (in-flight requests finish) until the registrar deletes the key on exit, or
    /// clears this if the container does not exit after all. Written only when true,
    /// so records of older registrars and hand-written ones read as not draining.
    #[serde(default, skip_serializing_if = "is_false")]
    pub draining: bool,
    /// Routed through the front door: false for a service that is registered only to
    /// be found (`portolan ls --addrs`), such as a host's etcd peers, or the route
    /// options (`route::Route`: extra hosts, a path, TCP/SNI, per-service options) as an
    /// object. Written only when not plain routing; watchers leave `false` instances out
    /// of `services` in the template context. (An older watcher refuses the unknown
    /// field or the object, so it routes nothing either.)
    #[serde(default, skip_serializing_if = "Routing::is_plain")]
    pub route: Routing,
}

fn default_weight() -> u32 {
    DEFAULT_WEIGHT
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl Default for InstanceRecord {
    fn default() -> Self {
        InstanceRecord {
            addr: String::new(),
            node: String::new(),
            container: String::new(),
            port: None,
            tags: Vec::new(),
            weight: DEFAULT_WEIGHT,
            draining: false,
            route: Routing::default(),
        }
    }
}

impl InstanceRecord {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("instance record serialises")
    }
}

/// A decoded, validated instance: what templates and the runtime API see.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Instance {
    pub id: String,
    pub service: String,
    pub addr: String,
    pub host: String,
    pub port: u16,
    pub node: String,
    pub container: String,
    pub tags: Vec<String>,
    pub weight: u32,
    /// Out of rotation for new requests; see [`InstanceRecord::draining`].
    pub draining: bool,
    /// Empty as decoded. In the watcher's snapshot an instance whose address is a DNS
    /// name becomes one entry per address the routing policy approved: `host` and
    /// `addr` are that IP, `host_name` the name, `id` a server name of its own
    /// (`watcher::dns_names`).
    pub host_name: String,
    /// Routed through the front door; see [`InstanceRecord::route`].
    pub route: bool,
    /// Its route options, validated (`route::Route`); None when it has none. Templates
    /// see them resolved per service (`watcher::routes`), not per instance.
    #[serde(skip)]
    pub routing: Option<std::sync::Arc<Route>>,
    /// The etcd revision its key was created at (0 when unknown): the older instance
    /// of two is the one with the lower, which decides who owns a contested route.
    #[serde(skip)]
    pub created: i64,
}

/// Decodes the value of a hand-written `<prefix>/services/<service>/<instance>`: a JSON
/// record or a bare `host:port`. See [`decode_owned`].
pub fn decode_instance(
    key: &str,
    service: &str,
    instance: &str,
    value: &[u8],
) -> Result<Instance, SchemaError> {
    decode_owned(key, service, instance, None, value)
}

/// Decodes an instance value. `owner` is the node whose prefix the key lies under (None
/// for `services/`): the instance belongs to that node whatever its record says, and a
/// record naming another node is refused. Anything that could smuggle text into a
/// config file (newlines, spaces, odd characters) is rejected with the rule it broke.
pub fn decode_owned(
    key: &str,
    service: &str,
    instance: &str,
    owner: Option<&str>,
    value: &[u8],
) -> Result<Instance, SchemaError> {
    check_record_size(key, value)?;
    let text =
        std::str::from_utf8(value).map_err(|_| SchemaError::new(key, "value is not UTF-8"))?;
    let text = text.trim();
    let record = if text.starts_with('{') {
        serde_json::from_str::<InstanceRecord>(text).map_err(|e| {
            SchemaError::new(key, format!("value is not a valid instance record: {e}"))
        })?
    } else {
        InstanceRecord {
            addr: text.to_string(),
            ..Default::default()
        }
    };
    let mut record = record;
    if let Some(owner) = owner {
        if !record.node.is_empty() && record.node != owner {
            return Err(SchemaError::new(
                key,
                format!(
                    "the record names node {:?} but the key lies under node {owner:?}",
                    record.node
                ),
            ));
        }
        record.node = owner.to_string();
    }
    let addr = Addr::parse(&record.addr).map_err(|e| SchemaError::new(key, e))?;
    if !record.node.is_empty() && !is_valid_name(&record.node) {
        return Err(SchemaError::new(
            key,
            format!("node {:?} is not a valid name", record.node),
        ));
    }
    if !record.container.is_empty()
        && (record.container.len() > 64 || !record.container.bytes().all(|c| c.is_ascii_hexdigit()))
    {
        return Err(SchemaError::new(
            key,
            format!("container {:?} is not a hex container id", record.container),
        ));
    }
    if let Some(bad) = record.tags.iter().find(|t| !is_valid_tag(t)) {
        return Err(SchemaError::new(
            key,
            format!("tag {bad:?}: tags must match [A-Za-z0-9_.:=-]{{1,64}}"),
        ));
    }
    if let Routing::Routed(r) = &record.route {
        r.validate().map_err(|e| SchemaError::new(key, e))?;
    }
    if record.weight > MAX_WEIGHT {
        return Err(SchemaError::new(
            key,
            format!("weight {} is out of range 0..={MAX_WEIGHT}", record.weight),
        ));
    }
    Ok(Instance {
        id: instance.to_string(),
        service: service.to_string(),
        addr: addr.to_string(),
        host: addr.host,
        port: addr.port,
        node: record.node,
        container: record.container,
        tags: record.tags,
        weight: record.weight,
        draining: record.draining,
        host_name: String::new(),
        route: record.route.is_routed(),
        routing: record
            .route
            .options()
            .filter(|r| !r.is_empty())
            .cloned()
            .map(std::sync::Arc::new),
        created: 0,
    })
}

/// The value of `<prefix>/nodes/<node>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: String,
    pub addr: String,
    pub version: String,
    /// RFC 3339 / seconds since the epoch, as written by the registrar.
    pub started_at: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn as_str_is_the_records_spelling() {
        use ReloadResult as R;
        for r in [R::Ok, R::Rejected, R::Failed, R::Other] {
            assert_eq!(
                serde_json::to_string(&r).unwrap(),
                format!("\"{}\"", r.as_str())
            );
        }
        for p in [ApplyPath::Runtime, ApplyPath::Reload, ApplyPath::Other] {
            assert_eq!(
                serde_json::to_string(&p).unwrap(),
                format!("\"{}\"", p.as_str())
            );
        }
    }

    #[test]
    fn a_status_record_spells_its_results_as_readers_match_them() {
        let s = WatcherStatus {
            last_reload_result: Some(ReloadResult::Rejected),
            last_apply_path: Some(ApplyPath::Runtime),
            ..Default::default()
        };
        let json = serde_json::to_string(&s).unwrap();
        assert!(
            json.contains(r#""last_reload_result":"rejected""#),
            "{json}"
        );
        assert!(json.contains(r#""last_apply_path":"runtime""#), "{json}");
        let newer: WatcherStatus = serde_json::from_str(
            r#"{"name":"lb","revision":1,"last_reload_at":null,"last_reload_result":"someday","last_apply_path":"warp","last_error":null}"#,
        )
        .unwrap();
        assert_eq!(newer.last_reload_result, Some(ReloadResult::Other));
        assert_eq!(newer.last_apply_path, Some(ApplyPath::Other));
    }

    #[test]
    fn names() {
        assert!(is_valid_name("web"));
        assert!(is_valid_name("a.b_c-1"));
        assert!(is_valid_name(&"a".repeat(128)));
        assert!(!is_valid_name(&"a".repeat(129)));
        assert!(!is_valid_name(""));
        assert!(!is_valid_name("-web"));
        assert!(!is_valid_name("web app"));
        assert!(!is_valid_name("web\nbind"));
        assert!(!is_valid_name("wéb"));
    }

    #[test]
    fn prefixes() {
        assert_eq!(normalize_prefix("/portolan/").unwrap(), "/portolan");
        assert_eq!(normalize_prefix("portolan").unwrap(), "/portolan");
        assert!(normalize_prefix("/").is_err());
        assert!(normalize_prefix("/a b").is_err());
    }

    #[test]
    fn keys() {
        let p = "/portolan";
        assert_eq!(
            parse_key(p, "/portolan/services/web/a-1").unwrap(),
            Key::Service {
                service: "web".into(),
                instance: "a-1".into(),
                node: None,
            }
        );
        assert_eq!(
            parse_key(p, "/portolan/nodes/host-a").unwrap(),
            Key::Node {
                name: "host-a".into()
            }
        );
        assert_eq!(
            parse_key(p, "/portolan/config/domain").unwrap(),
            Key::Config {
                path: "domain".into()
            }
        );
        // The certificate store's and the ACME issuer's keys: known, not rendered.
        assert_eq!(
            parse_key(p, "/portolan/certs/web.example.com").unwrap(),
            Key::Cert {
                name: "web.example.com".into()
            }
        );
        for key in ["/portolan/acme/lock", "/portolan/acme/challenges/tok"] {
            assert_eq!(parse_key(p, key).unwrap(), Key::Acme);
        }
        for bad in [
            "/portolan/certs",
            "/portolan/acme/",
            "/portolan/services/web",
            "/portolan/services/web/a/b",
            "/portolan/services/we b/a",
            "/portolan/services/web/a\nbind :80",
            "/portolanx/services/web/a",
            "/portolan/other/x",
        ] {
            let err = parse_key(p, bad).unwrap_err();
            assert_eq!(err.key, bad);
        }
    }

    #[test]
    fn instance_ids() {
        assert_eq!(
            instance_id("host-a", "3f2a9c1b7d10aaaabbbbcccc", 8080),
            "host-a-3f2a9c1b7d10-8080"
        );
        assert!(is_valid_name(&instance_id("h", "3f2a9c1b7d10", 1)));
    }

    #[test]
    fn decode_record_and_bare() {
        let rec = br#"{"addr":"10.0.0.5:32768","node":"host-a","container":"3f2a9c1b7d10","port":8080,"tags":["v2"],"weight":100}"#;
        let i = decode_instance("k", "web", "i1", rec).unwrap();
        assert_eq!(i.addr, "10.0.0.5:32768");
        assert_eq!(i.host, "10.0.0.5");
        assert_eq!(i.port, 32768);
        assert_eq!(i.tags, vec!["v2"]);
        let bare = decode_instance("k", "web", "i2", b"10.0.0.9:80\n").unwrap();
        assert_eq!(bare.addr, "10.0.0.9:80");
        assert_eq!(bare.weight, DEFAULT_WEIGHT);
        let v6 = decode_instance("k", "web", "i3", b"[::1]:80").unwrap();
        assert_eq!(v6.addr, "[::1]:80");
        let dns = decode_instance("k", "web", "i4", b"app.internal:8080").unwrap();
        assert_eq!(dns.host, "app.internal");
    }

    #[test]
    fn a_value_over_64_kib_is_refused_naming_its_size() {
        // A bare address padded with blanks: valid at the limit, refused past it.
        let pad = |n: usize| format!("1.2.3.4:80{}", " ".repeat(n - 10));
        let at_limit = pad(MAX_RECORD_BYTES);
        assert!(decode_instance("k", "web", "a", at_limit.as_bytes()).is_ok());
        let over = pad(MAX_RECORD_BYTES + 1);
        let e = decode_instance("k", "web", "a", over.as_bytes()).unwrap_err();
        assert_eq!(e.key, "k");
        assert_eq!(
            e.rule,
            "value of 65537 bytes is over the 64 KiB limit for instance and node records"
        );
    }

    #[test]
    fn decode_rejects_injection_and_garbage() {
        for bad in [
            &b"10.0.0.9:80\n  bind :9999"[..],
            b"10.0.0.9:80 check",
            b"10.0.0.9",
            b"10.0.0.9:0",
            b"10.0.0.9:70000",
            b":80",
            b"",
            b"\xff\xfe",
            br#"{"addr":"1.2.3.4:80","tags":["a b"]}"#,
            br#"{"addr":"1.2.3.4:80","weight":1000}"#,
            br#"{"addr":"1.2.3.4:80","node":"x\ny"}"#,
            br#"{"addr":"1.2.3.4:80","extra":1}"#,
            br#"{"addr":"1.2.3.4:80 backup"}"#,
        ] {
            let err = decode_instance("/p/services/web/x", "web", "x", bad).unwrap_err();
            assert_eq!(err.key, "/p/services/web/x");
            assert!(!err.rule.is_empty());
        }
    }

    #[test]
    fn record_round_trips_as_one_line() {
        let r = InstanceRecord {
            addr: "127.0.0.1:1".into(),
            node: "n".into(),
            container: "abc".into(),
            port: Some(80),
            tags: vec![],
            weight: 100,
            draining: false,
            route: Routing::default(),
        };
        let json = r.to_json();
        assert!(!json.contains('\n'));
        assert_eq!(serde_json::from_str::<InstanceRecord>(&json).unwrap(), r);
    }

    /// A hand-written record is untrusted: a route field that breaks a rule refuses
    /// the whole record, naming the key and the field (kept without it, an `allow`
    /// dropped would open the service to everyone).
    #[test]
    fn a_record_with_a_bad_route_field_is_refused_whole_and_named() {
        let ok = decode_instance(
            "/p/services/web/x",
            "web",
            "x",
            br#"{"addr":"1.2.3.4:80","route":{"path":"/api","allow":["10.0.0.0/8"]}}"#,
        )
        .unwrap();
        let r = ok.routing.as_deref().unwrap();
        assert_eq!(r.path.as_deref(), Some("/api"));
        assert!(ok.route);
        for (bad, field) in [
            (
                &br#"{"addr":"1.2.3.4:80","route":{"path":"/api\n    bind :9999"}}"#[..],
                "route.path",
            ),
            (
                br#"{"addr":"1.2.3.4:80","route":{"allow":["10.0.0.0/8 #"]}}"#,
                "route.allow",
            ),
            (
                br#"{"addr":"1.2.3.4:80","route":{"balance":"first"}}"#,
                "route: unknown variant",
            ),
        ] {
            let err = decode_instance("/p/services/web/x", "web", "x", bad).unwrap_err();
            assert_eq!(err.key, "/p/services/web/x");
            assert!(err.rule.contains(field), "{}", err.rule);
        }
        // `route: false` and `route: true` read as before.
        let off =
            decode_instance("k", "web", "x", br#"{"addr":"1.2.3.4:80","route":false}"#).unwrap();
        assert!(!off.route && off.routing.is_none());
        let on =
            decode_instance("k", "web", "x", br#"{"addr":"1.2.3.4:80","route":true}"#).unwrap();
        assert!(on.route && on.routing.is_none());
    }
}
