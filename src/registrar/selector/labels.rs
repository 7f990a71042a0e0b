//! Labels and registrator's `SERVICE_*` environment variables: lookup in the order the
//! parent module documents, and the parsing of every setting they carry.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use super::{
    Check, CheckKind, LabelWarning, DEFAULT_CHECK_FALL, DEFAULT_CHECK_INTERVAL, DEFAULT_CHECK_RISE,
    DEFAULT_CHECK_TIMEOUT,
};
use crate::schema;
use crate::schema::route::{self as rules, Balance, Mode, Sticky};

pub(super) struct Warnings {
    pub(super) container: String,
    pub(super) list: Vec<LabelWarning>,
}

impl Warnings {
    pub(super) fn push(&mut self, label: &str, message: &str) {
        self.list.push(LabelWarning {
            container: self.container.clone(),
            label: label.to_string(),
            message: message.to_string(),
        });
    }
}

pub(super) struct Meta<'a> {
    pub(super) labels: &'a HashMap<String, String>,
    /// Only `SERVICE_*` variables.
    pub(super) env: BTreeMap<&'a str, &'a str>,
    /// The labels are a config file's `[[registrar.service]]` settings in label form
    /// (`check_http` as `portolan.check.http`): messages name them as the file does.
    pub(super) from_file: bool,
}

impl Meta<'_> {
    /// `portolan.port.<p>.<name>`, then `portolan.<name>`. Returns (source, value).
    pub(super) fn label(&self, port: Option<u16>, name: &str) -> Option<(String, &str)> {
        port.and_then(|p| self.get_label(&format!("portolan.port.{p}.{name}")))
            .or_else(|| self.get_label(&format!("portolan.{name}")))
    }

    pub(super) fn get_label(&self, key: &str) -> Option<(String, &str)> {
        self.labels.get(key).map(|v| {
            let source = if self.from_file {
                let setting = match key {
                    "portolan.service" => "name".to_string(),
                    _ => key
                        .strip_prefix("portolan.")
                        .unwrap_or(key)
                        .replace('.', "_"),
                };
                format!("{setting} = {v:?}")
            } else {
                format!("label {key}={v:?}")
            };
            (source, v.as_str())
        })
    }

    fn get_env(&self, key: &str) -> Option<(String, &str)> {
        self.env.get(key).map(|v| (format!("env {key}={v:?}"), *v))
    }

    /// The port-specific label or env variable only.
    pub(super) fn lookup_port_only(&self, port: u16, name: &str) -> Option<(String, &str)> {
        self.get_label(&format!("portolan.port.{port}.{name}"))
            .or_else(|| {
                registrator_env(name).and_then(|e| self.get_env(&format!("SERVICE_{port}_{e}")))
            })
    }

    /// Labels and registrator env, most specific first (see the module docs).
    pub(super) fn lookup(&self, port: Option<u16>, name: &str) -> Option<(String, &str)> {
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
    // Route options (`schema::route`), read by `route` below.
    "hosts",
    "default_host",
    "path",
    "strip_prefix",
    "mode",
    "sni",
    "listen",
    "balance",
    "sticky",
    "check.path",
    "timeout.server",
    "allow",
    "maxconn",
];

/// The container's labels that start with `prefix`, sorted (warnings come in order).
fn labels_under<'m>(meta: &'m Meta, prefix: &str) -> Vec<&'m String> {
    let mut keys: Vec<&String> = meta
        .labels
        .keys()
        .filter(|k| k.starts_with(prefix))
        .collect();
    keys.sort();
    keys
}

pub(super) fn check_port_labels<T>(meta: &Meta, ports: &BTreeMap<u16, T>, w: &mut Warnings) {
    let keys = labels_under(meta, "portolan.port.");
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

pub(super) fn check_container_labels(meta: &Meta, w: &mut Warnings) {
    let keys = labels_under(meta, "portolan.check.");
    for key in keys {
        let setting = &key["portolan.".len()..];
        if !PORT_SETTINGS.contains(&setting) {
            w.push(
                &format!("label {key}"),
                "unknown check setting; known: http, tcp, interval, timeout, fall, rise, path",
            );
        }
    }
}

/// `registry.example.com:5000/team/web:1.2@sha256:…` → `web`. None for an image given
/// by id, which has no name to offer.
pub(super) fn image_base_name(image: &str) -> Option<String> {
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
pub(super) fn parse_ignore(source: &str, v: &str) -> Result<bool, String> {
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

pub(super) fn parse_tags(v: &str) -> Result<Vec<String>, String> {
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
fn parse_duration(v: &str) -> Result<Duration, String> {
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

/// The route options of container port `port` (or of a `[[registrar.service]]`), from
/// `portolan.hosts`, `portolan.path`, … (`portolan.port.<p>.<x>` first). Each value is
/// parsed and checked by the rules a watcher applies again to the record
/// (`schema::Route::validate`); Err names the label at fault.
pub(super) fn route(meta: &Meta, port: Option<u16>) -> Result<schema::Route, LabelError> {
    let mut route = schema::Route::default();
    let mut first: Option<String> = None;
    for (name, set) in ROUTE_LABELS {
        if let Some((src, v)) = meta.label(port, name) {
            first.get_or_insert_with(|| src.clone());
            set(&mut route, v).map_err(|e| (src, e))?;
        }
    }
    // The rules between fields (mode = tcp needs sni or listen, …), on the first label.
    route
        .validate()
        .map_err(|e| (first.unwrap_or_else(|| "route labels".to_string()), e))?;
    Ok(route)
}

/// How one route label's value sets its field of the route.
type RouteSetter = fn(&mut schema::Route, &str) -> Result<(), String>;

/// The route labels (`portolan.<name>`), in the order they are read: the first one
/// present names the labels when a rule between fields fails.
const ROUTE_LABELS: &[(&str, RouteSetter)] = &[
    ("hosts", |r, v| {
        r.hosts = label_list(v, |h| rules::check_host(h, true))?;
        Ok(())
    }),
    ("default_host", |r, v| {
        r.default_host = Some(parse_bool(v)?);
        Ok(())
    }),
    ("path", |r, v| {
        r.path = Some(checked(v, rules::check_path)?);
        Ok(())
    }),
    ("strip_prefix", |r, v| {
        r.strip_prefix = parse_bool(v)?;
        Ok(())
    }),
    ("mode", |r, v| {
        r.mode = match v.trim() {
            "http" => Mode::Http,
            "tcp" => Mode::Tcp,
            _ => return Err(format!("{v:?} is not a mode: http or tcp")),
        };
        Ok(())
    }),
    ("sni", |r, v| {
        r.sni = label_list(v, |h| rules::check_host(h, true))?;
        Ok(())
    }),
    ("listen", |r, v| {
        let port = v.trim().parse::<u16>().ok().filter(|p| *p != 0);
        r.listen = Some(port.ok_or_else(|| format!("{v:?} is not a port in 1..=65535"))?);
        Ok(())
    }),
    ("balance", |r, v| {
        r.balance = Some(match v.trim() {
            "roundrobin" => Balance::Roundrobin,
            "leastconn" => Balance::Leastconn,
            "source" => Balance::Source,
            "uri" => Balance::Uri,
            _ => {
                return Err(format!(
                    "{v:?} is not a balance: roundrobin, leastconn, source or uri"
                ))
            }
        });
        Ok(())
    }),
    ("sticky", |r, v| {
        r.sticky = match v.trim() {
            "cookie" => Some(Sticky::Cookie),
            "" | "false" | "none" => None,
            _ => return Err(format!("{v:?} is not a stickiness: cookie")),
        };
        Ok(())
    }),
    ("check.path", |r, v| {
        r.check_path = Some(checked(v, rules::check_path)?);
        Ok(())
    }),
    ("timeout.server", |r, v| {
        r.timeout_server = Some(checked(v, rules::check_timeout)?);
        Ok(())
    }),
    ("allow", |r, v| {
        r.allow = label_list(v, rules::check_network)?;
        Ok(())
    }),
    ("maxconn", |r, v| {
        let n = v.trim().parse::<u32>().ok();
        let n = n.filter(|n| (1..=rules::MAX_MAXCONN).contains(n));
        r.maxconn =
            Some(n.ok_or_else(|| format!("{v:?} is not a number in 1..={}", rules::MAX_MAXCONN))?);
        Ok(())
    }),
];

/// A comma-separated label value: each item trimmed, lower case, checked, once.
fn label_list(v: &str, check: impl Fn(&str) -> Result<(), String>) -> Result<Vec<String>, String> {
    let mut out: Vec<String> = Vec::new();
    for item in v.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let item = item.to_ascii_lowercase();
        check(&item)?;
        if !out.contains(&item) {
            out.push(item);
        }
    }
    Ok(out)
}

/// A single label value, trimmed, that `check` accepts.
fn checked(v: &str, check: fn(&str) -> Result<(), String>) -> Result<String, String> {
    let v = v.trim();
    check(v)?;
    Ok(v.to_string())
}

pub(super) fn check(meta: &Meta, port: u16) -> Result<Option<Check>, LabelError> {
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
    use super::super::fixtures::*;
    use super::super::*;
    use super::*;

    /// Every route label reaches the record's route object, lists trimmed, lowered
    /// and without repeats; the record round-trips through the watcher's decode.
    #[test]
    fn route_labels_become_the_records_route() {
        let c = inspect(
            &[
                (
                    "portolan.hosts",
                    "Example.com, www.example.com,*.example.org,example.com",
                ),
                ("portolan.default_host", "false"),
                ("portolan.path", "/api"),
                ("portolan.strip_prefix", "true"),
                ("portolan.balance", "leastconn"),
                ("portolan.sticky", "cookie"),
                ("portolan.check.path", "/healthz"),
                ("portolan.timeout.server", "45s"),
                ("portolan.allow", "10.0.0.0/8, 192.168.0.0/16"),
                ("portolan.maxconn", "200"),
            ],
            &[],
            one_port(),
        );
        let r = &regs(&c)[0];
        let json = r.record.to_json();
        assert!(
            json.ends_with(r#""route":{"hosts":["example.com","www.example.com","*.example.org"],"default_host":false,"path":"/api","strip_prefix":true,"balance":"leastconn","sticky":"cookie","check_path":"/healthz","timeout_server":"45s","allow":["10.0.0.0/8","192.168.0.0/16"],"maxconn":200}}"#),
            "{json}"
        );
        let back = schema::decode_instance("k", "shop-web", "x", json.as_bytes()).unwrap();
        assert_eq!(back.routing.as_deref().unwrap().maxconn, Some(200));
        // No route label: the record is as before (no "route" field).
        assert!(!regs(&inspect(&[], &[], one_port()))[0]
            .record
            .to_json()
            .contains("route"));
        // TCP, per port.
        let c = inspect(
            &[
                ("portolan.mode", "tcp"),
                ("portolan.port.8080.listen", "5432"),
            ],
            &[],
            one_port(),
        );
        let route = regs(&c)[0].record.route.options().unwrap().clone();
        assert_eq!(
            (route.mode, route.listen),
            (schema::route::Mode::Tcp, Some(5432))
        );
    }

    /// A bad route label is a warning naming it, and the container is not registered
    /// (as for any bad label): injection attempts included.
    #[test]
    fn a_bad_route_label_is_named_and_the_container_left_out() {
        for (label, value, says) in [
            ("portolan.path", "/api\n    bind :9999", "not a path"),
            ("portolan.path", "/a b", "not a path"),
            ("portolan.hosts", "a.example.com#x", "host name"),
            ("portolan.hosts", "a.example.com\"", "host name"),
            ("portolan.sni", "db.example.com", "mode = tcp"),
            ("portolan.allow", "10.0.0.0/8 || 0.0.0.0/0", "prefix length"),
            (
                "portolan.timeout.server",
                "30s\n  timeout client 1",
                "duration",
            ),
            ("portolan.balance", "first", "not a balance"),
            ("portolan.sticky", "ip", "not a stickiness"),
            ("portolan.maxconn", "0", "1..=1000000"),
            ("portolan.mode", "udp", "not a mode"),
            ("portolan.listen", "80 ssl", "not a port"),
            ("portolan.check.path", "/h%[env(X)]", "not a path"),
            ("portolan.strip_prefix", "true", "no route.path"),
        ] {
            let w = warnings(&inspect(&[(label, value)], &[], one_port()));
            assert_eq!(w.len(), 1, "{label}={value:?}: {w:?}");
            assert!(w[0].label.contains(label), "{w:?}");
            assert!(w[0].message.contains(says), "{label}={value:?}: {w:?}");
        }
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
    fn service_names_are_lower_cased_wherever_they_come_from() {
        let mut c = inspect(&[], &[], one_port());
        c.config.as_mut().unwrap().image = Some("registry:5000/team/MyApp:1.2".into());
        assert_eq!(regs(&c)[0].service, "myapp");
        for (labels, env, want) in [
            (&[("portolan.service", "Shop")][..], &[][..], "shop"),
            (&[], &["SERVICE_NAME=Legacy"], "legacy"),
            (&[("portolan.port.8080.service", "ADMIN")], &[], "admin"),
            (&[("com.docker.compose.service", "Api")], &[], "api"),
        ] {
            assert_eq!(regs(&inspect(labels, env, one_port()))[0].service, want);
        }
        // Still invalid once lowered: a warning naming the label, as before.
        let w = warnings(&inspect(
            &[("portolan.service", "Bad Name")],
            &[],
            one_port(),
        ));
        assert!(w[0].label.contains("portolan.service"), "{w:?}");
        assert!(w[0].message.contains("\"bad name\""), "{w:?}");
    }

    #[test]
    fn compose_service_is_the_default_name_before_the_image() {
        let compose = ("com.docker.compose.service", "api");
        assert_eq!(
            regs(&inspect(&[compose], &[], one_port()))[0].service,
            "api"
        );
        // Set by hand, the name wins over Compose's.
        assert_eq!(
            regs(&inspect(
                &[compose, ("portolan.service", "shop")],
                &[],
                one_port()
            ))[0]
                .service,
            "shop"
        );
        assert_eq!(
            regs(&inspect(&[compose], &["SERVICE_NAME=legacy"], one_port()))[0].service,
            "legacy"
        );
        // Several ports get suffixes like any container-wide name.
        let ports = serde_json::json!({
            "8080/tcp": [{"HostIp": "0.0.0.0", "HostPort": "1"}],
            "9090/tcp": [{"HostIp": "0.0.0.0", "HostPort": "2"}],
        });
        let r = regs(&inspect(&[compose], &[], ports));
        let names: Vec<&str> = r.iter().map(|r| r.service.as_str()).collect();
        assert_eq!(names, vec!["api-8080", "api-9090"]);
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
