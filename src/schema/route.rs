//! Route options of an instance: where the front door sends traffic to its service
//! beyond `Host: <service>.<domain>`, and per-service HAProxy options. Pure.
//!
//! One type for every source: the registrar builds it from `portolan.*` labels or a
//! `[[registrar.service]]` section, a hand-written record carries it as the JSON object
//! `"route": {...}`, and the watcher validates it again on decode (a record is
//! untrusted). Every value that reaches a config line passes [`Route::validate`],
//! whose rules leave no room for a newline, `#`, space, quote, backslash or `%[`: host
//! names are `[a-z0-9.-]` labels, paths `[A-Za-z0-9/._~-]`, networks are parsed and
//! printed back, the rest are enums and numbers.
//!
//! The watcher refuses a whole record whose route breaks a rule (named with the key
//! and the field), rather than routing it without that field: dropping `allow` would
//! open a service to everyone, dropping `path` would move it to another URL.

use serde::{Deserialize, Serialize};

/// `portolan.mode`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Http,
    /// TLS passthrough by SNI on the shared HTTPS port, or a plain TCP listener.
    Tcp,
}

/// `portolan.balance`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Balance {
    Roundrobin,
    Leastconn,
    Source,
    Uri,
}

impl Balance {
    pub fn as_str(self) -> &'static str {
        match self {
            Balance::Roundrobin => "roundrobin",
            Balance::Leastconn => "leastconn",
            Balance::Source => "source",
            Balance::Uri => "uri",
        }
    }
}

/// `portolan.sticky`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Sticky {
    /// An HAProxy-inserted cookie naming the server (`dynamic-cookie-key`, so servers
    /// added at run time get one too).
    Cookie,
}

/// The route object of an instance record. Every field optional; absent when empty.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Extra host names, exact or `*.example.org` (any name below it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// False: no `<service>.<domain>` route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_host: Option<bool>,
    /// A path prefix, `/api`: `/api` and `/api/…`, not `/apix`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The prefix is taken off before the request reaches the service.
    #[serde(default, skip_serializing_if = "is_false")]
    pub strip_prefix: bool,
    #[serde(default, skip_serializing_if = "is_http")]
    pub mode: Mode,
    /// TLS server names routed to it unterminated on the shared HTTPS port (mode tcp).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sni: Vec<String>,
    /// A TCP port of its own on the front door (mode tcp).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balance: Option<Balance>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky: Option<Sticky>,
    /// HAProxy's own HTTP check of every server: `GET <path>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check_path: Option<String>,
    /// `timeout server`, `30s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_server: Option<String>,
    /// Client networks allowed; everyone else gets 403 (HTTP) or is refused (TCP).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    /// At most this many connections per server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maxconn: Option<u32>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_http(m: &Mode) -> bool {
    *m == Mode::Http
}

/// Longest path prefix.
pub const MAX_PATH: usize = 128;
/// Most host names, SNI names or networks in one list.
pub const MAX_LIST: usize = 32;
/// Highest `maxconn`.
pub const MAX_MAXCONN: u32 = 1_000_000;

impl Route {
    pub fn is_empty(&self) -> bool {
        *self == Route::default()
    }

    /// Whether `<service>.<domain>` routes to it (HTTP mode, not turned off).
    pub fn default_host(&self) -> bool {
        self.mode == Mode::Http && self.default_host != Some(false)
    }

    /// Checks every rule; Err names the field (`route.hosts`) and the rule broken.
    pub fn validate(&self) -> Result<(), String> {
        let list = |field: &str, items: &[String]| {
            if items.len() > MAX_LIST {
                return Err(format!("route.{field}: more than {MAX_LIST} entries"));
            }
            Ok(())
        };
        list("hosts", &self.hosts)?;
        list("sni", &self.sni)?;
        list("allow", &self.allow)?;
        for h in &self.hosts {
            check_host(h, true).map_err(|e| format!("route.hosts: {e}"))?;
        }
        for h in &self.sni {
            check_host(h, true).map_err(|e| format!("route.sni: {e}"))?;
        }
        if let Some(p) = &self.path {
            check_path(p).map_err(|e| format!("route.path: {e}"))?;
        }
        if let Some(p) = &self.check_path {
            check_path(p).map_err(|e| format!("route.check_path: {e}"))?;
        }
        if let Some(t) = &self.timeout_server {
            check_timeout(t).map_err(|e| format!("route.timeout_server: {e}"))?;
        }
        for a in &self.allow {
            check_network(a).map_err(|e| format!("route.allow: {e}"))?;
        }
        if let Some(m) = self.maxconn {
            if m == 0 || m > MAX_MAXCONN {
                return Err(format!(
                    "route.maxconn: {m} is not a number in 1..={MAX_MAXCONN}"
                ));
            }
        }
        if self.listen == Some(0) {
            return Err("route.listen: 0 is not a port".into());
        }
        if self.strip_prefix && self.path.is_none() {
            return Err("route.strip_prefix: there is no route.path to strip".into());
        }
        match self.mode {
            Mode::Http => {
                if !self.sni.is_empty() || self.listen.is_some() {
                    return Err(
                        "route.sni and route.listen are TCP routes: set mode = tcp (portolan.mode=tcp)"
                            .into(),
                    );
                }
            }
            Mode::Tcp => {
                let http_only = [
                    ("hosts", !self.hosts.is_empty()),
                    ("default_host", self.default_host == Some(true)),
                    ("path", self.path.is_some()),
                    ("strip_prefix", self.strip_prefix),
                    ("sticky", self.sticky.is_some()),
                    ("check_path", self.check_path.is_some()),
                    ("balance = uri", self.balance == Some(Balance::Uri)),
                ];
                if let Some((field, _)) = http_only.iter().find(|(_, set)| *set) {
                    return Err(format!(
                        "route.{field} is an HTTP setting; a mode = tcp service is routed by route.sni or route.listen"
                    ));
                }
                match (self.sni.is_empty(), self.listen) {
                    (true, None) => {
                        return Err(
                            "mode = tcp needs route.sni (TLS passthrough on the HTTPS port) or route.listen (a port of its own)"
                                .into(),
                        )
                    }
                    (false, Some(_)) => {
                        return Err("route.sni and route.listen: set one, not both".into())
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }
}

/// A host name, lower case, `[a-z0-9-]` labels of 1..=63 joined by dots; with
/// `wildcard`, `*.` in front of at least two labels.
pub fn check_host(h: &str, wildcard: bool) -> Result<(), String> {
    let name = match h.strip_prefix("*.") {
        Some(rest) if wildcard => {
            if !rest.contains('.') {
                return Err(format!(
                    "{h:?}: a wildcard covers names below a domain of two labels or more (*.example.org)"
                ));
            }
            rest
        }
        _ => h,
    };
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
    };
    if h.len() > 253 || !name.split('.').all(label_ok) {
        return Err(format!(
            "{h:?} is not a lower-case host name ([a-z0-9-] labels joined by dots{})",
            if wildcard { ", or *.<domain>" } else { "" }
        ));
    }
    Ok(())
}

/// A path prefix: `/` then `[A-Za-z0-9/._~-]`, no `//`, no `.`/`..` segment, no
/// trailing `/`, at most [`MAX_PATH`] bytes. `/` alone is every path: leave it out.
pub fn check_path(p: &str) -> Result<(), String> {
    if p == "/" {
        return Err("\"/\" is every path: leave the setting out".into());
    }
    let chars_ok = p
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'/' | b'.' | b'_' | b'~' | b'-'));
    if !p.starts_with('/') || !chars_ok || p.len() > MAX_PATH {
        return Err(format!(
            "{p:?} is not a path like /api ([A-Za-z0-9/._~-], starting with /, at most {MAX_PATH} bytes)"
        ));
    }
    if p.ends_with('/') || p.contains("//") || p.split('/').any(|s| s == "." || s == "..") {
        return Err(format!(
            "{p:?}: no trailing /, no // and no . or .. segments (write /api, which also matches /api/...)"
        ));
    }
    Ok(())
}

/// `30s`, `500ms`, `2m`, `1h`, or bare milliseconds as HAProxy reads them; 1 ms to 24 h.
pub fn check_timeout(t: &str) -> Result<(), String> {
    let digits = t.bytes().take_while(u8::is_ascii_digit).count();
    let (num, unit) = t.split_at(digits);
    let ms_per = match unit {
        "" | "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => 0,
    };
    let n: u64 = if digits == 0 || digits > 9 || ms_per == 0 {
        0
    } else {
        num.parse().unwrap_or(0)
    };
    if n == 0 || n * ms_per > 86_400_000 {
        return Err(format!(
            "{t:?} is not a duration like 30s, 500ms, 2m or 1h (1ms to 24h)"
        ));
    }
    Ok(())
}

/// A network as `crate::watcher::policy::Cidr` reads it, written the way it prints
/// (`10.0.0.0/8`), so the rendered text is the one parsed.
pub fn check_network(a: &str) -> Result<(), String> {
    let cidr: crate::watcher::policy::Cidr = a.parse()?;
    if cidr.to_string() != a {
        return Err(format!("{a:?}: write it as {cidr}"));
    }
    Ok(())
}

/// The route of a record: `"route": false` (registered to be found, never routed),
/// absent or `true` (routed, no options), or an object (routed with these options).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Routing {
    Unrouted,
    Routed(Route),
}

impl Default for Routing {
    fn default() -> Self {
        Routing::Routed(Route::default())
    }
}

impl Routing {
    pub fn is_routed(&self) -> bool {
        matches!(self, Routing::Routed(_))
    }

    /// Routed with no option: the field is left out of the record.
    pub fn is_plain(&self) -> bool {
        matches!(self, Routing::Routed(r) if r.is_empty())
    }

    pub fn options(&self) -> Option<&Route> {
        match self {
            Routing::Routed(r) => Some(r),
            Routing::Unrouted => None,
        }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum RoutingRepr {
    Flag(bool),
    Options(Route),
}

impl Serialize for Routing {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Routing::Unrouted => RoutingRepr::Flag(false).serialize(s),
            Routing::Routed(r) if r.is_empty() => RoutingRepr::Flag(true).serialize(s),
            Routing::Routed(r) => r.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Routing {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Untagged errors say only "did not match any variant": the object's own error
        // (an unknown field, a bad enum value) is worth more, so it is tried as a value.
        let v = serde_json::Value::deserialize(d)?;
        match v {
            serde_json::Value::Bool(true) => Ok(Routing::default()),
            serde_json::Value::Bool(false) => Ok(Routing::Unrouted),
            v @ serde_json::Value::Object(_) => serde_json::from_value(v)
                .map(Routing::Routed)
                .map_err(|e| serde::de::Error::custom(format!("route: {e}"))),
            _ => Err(serde::de::Error::custom(
                "route: expected true, false or an object of route options",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(json: &str) -> Result<Route, String> {
        let r: Route = serde_json::from_str(json).map_err(|e| e.to_string())?;
        r.validate()?;
        Ok(r)
    }

    /// The attack first: a value that would end the config line, start a comment or
    /// a second argument, or smuggle a sample expression, in every field that reaches
    /// a config line. Each is refused, naming the field.
    #[test]
    fn no_field_can_carry_a_newline_a_comment_a_space_or_a_quote() {
        let payloads = [
            "x\n    bind :9999",
            "x#c",
            "a b",
            "\"q\"",
            "'q'",
            "a\\b",
            "%[env(ETCD_PASSWORD)]",
            "x\r",
            "x\t",
            "${HOME}",
        ];
        for p in payloads {
            for (field, json) in [
                (
                    "hosts",
                    serde_json::json!({ "hosts": [format!("a{p}.example.com")] }),
                ),
                ("hosts", serde_json::json!({ "hosts": [p] })),
                ("path", serde_json::json!({ "path": format!("/api{p}") })),
                (
                    "check_path",
                    serde_json::json!({ "check_path": format!("/h{p}") }),
                ),
                (
                    "timeout_server",
                    serde_json::json!({ "timeout_server": format!("30s{p}") }),
                ),
                (
                    "allow",
                    serde_json::json!({ "allow": [format!("10.0.0.0/8{p}")] }),
                ),
                (
                    "sni",
                    serde_json::json!({ "mode": "tcp", "sni": [format!("db{p}.example.com")] }),
                ),
            ] {
                let err = route(&json.to_string()).unwrap_err();
                assert!(
                    err.contains(&format!("route.{field}")),
                    "{p:?} in {field}: {err}"
                );
            }
            for (field, json) in [
                (
                    "balance",
                    serde_json::json!({ "balance": format!("roundrobin{p}") }),
                ),
                (
                    "sticky",
                    serde_json::json!({ "sticky": format!("cookie{p}") }),
                ),
                ("mode", serde_json::json!({ "mode": format!("tcp{p}") })),
            ] {
                assert!(route(&json.to_string()).is_err(), "{p:?} in {field}");
            }
        }
        // Numbers only where numbers go.
        assert!(route(r#"{"maxconn": "10\n bind :1"}"#).is_err());
        assert!(route(r#"{"mode":"tcp","listen": "5432 ssl"}"#).is_err());
    }

    #[test]
    fn every_field_round_trips_and_empty_ones_are_left_out() {
        let full = r#"{"hosts":["example.com","*.example.org"],"default_host":false,"path":"/api","strip_prefix":true,"balance":"leastconn","sticky":"cookie","check_path":"/healthz","timeout_server":"30s","allow":["10.0.0.0/8","fd00::/8"],"maxconn":50}"#;
        let r = route(full).unwrap();
        assert_eq!(serde_json::to_string(&r).unwrap(), full);
        assert_eq!(serde_json::to_string(&Route::default()).unwrap(), "{}");
        let tcp = route(r#"{"mode":"tcp","sni":["db.example.com"]}"#).unwrap();
        assert_eq!(tcp.mode, Mode::Tcp);
        assert!(!tcp.default_host());
        route(r#"{"mode":"tcp","listen":5432,"balance":"source"}"#).unwrap();
    }

    #[test]
    fn values_that_parse_but_mean_nothing_are_refused_and_named() {
        for (json, says) in [
            (r#"{"hosts":["Example.com"]}"#, "route.hosts"),
            (r#"{"hosts":["*"]}"#, "route.hosts"),
            (r#"{"hosts":["*.org"]}"#, "two labels"),
            (r#"{"hosts":["a..b"]}"#, "route.hosts"),
            (r#"{"hosts":["-a.b"]}"#, "route.hosts"),
            (r#"{"path":"api"}"#, "route.path"),
            (r#"{"path":"/"}"#, "every path"),
            (r#"{"path":"/api/"}"#, "trailing"),
            (r#"{"path":"/a/../b"}"#, ".."),
            (r#"{"strip_prefix":true}"#, "route.strip_prefix"),
            (r#"{"timeout_server":"0s"}"#, "route.timeout_server"),
            (r#"{"timeout_server":"25h"}"#, "route.timeout_server"),
            (r#"{"timeout_server":"1d"}"#, "route.timeout_server"),
            (r#"{"allow":["10.0.0.1/8"]}"#, "host bits"),
            (r#"{"allow":["10.0.0.0/08"]}"#, "write it as 10.0.0.0/8"),
            (r#"{"maxconn":0}"#, "route.maxconn"),
            (r#"{"sni":["db.example.com"]}"#, "mode = tcp"),
            (r#"{"listen":5432}"#, "mode = tcp"),
            (r#"{"mode":"tcp"}"#, "needs route.sni"),
            (r#"{"mode":"tcp","listen":0}"#, "not a port"),
            (
                r#"{"mode":"tcp","sni":["a.example.com"],"listen":1}"#,
                "not both",
            ),
            (
                r#"{"mode":"tcp","listen":1,"path":"/x"}"#,
                "route.path is an HTTP setting",
            ),
            (
                r#"{"mode":"tcp","listen":1,"sticky":"cookie"}"#,
                "route.sticky",
            ),
        ] {
            let err = route(json).unwrap_err();
            assert!(err.contains(says), "{json}: {err}");
        }
        let err = route(r#"{"hostz":["a.b"]}"#).unwrap_err();
        assert!(err.contains("hostz"), "{err}");
    }

    #[test]
    fn the_route_field_is_false_true_or_options() {
        let plain: Routing = serde_json::from_str("true").unwrap();
        assert!(plain.is_plain() && plain.is_routed());
        let off: Routing = serde_json::from_str("false").unwrap();
        assert_eq!(off, Routing::Unrouted);
        assert_eq!(serde_json::to_string(&off).unwrap(), "false");
        let on: Routing = serde_json::from_str(r#"{"path":"/api"}"#).unwrap();
        assert_eq!(on.options().unwrap().path.as_deref(), Some("/api"));
        assert_eq!(serde_json::to_string(&on).unwrap(), r#"{"path":"/api"}"#);
        let err = serde_json::from_str::<Routing>(r#"{"balance":"random"}"#).unwrap_err();
        assert!(
            err.to_string().contains("route: unknown variant `random`"),
            "{err}"
        );
        assert!(serde_json::from_str::<Routing>("\"yes\"").is_err());
    }
}
