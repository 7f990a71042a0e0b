//! `[[registrar.service]]`: a service of this host that is not a container (a database
//! or cache member that joins and leaves with the host). Its settings come in label
//! form (`ServiceOptions::labels`: `portolan.service`, `portolan.check.http`, …) and
//! are read by the labels' own code, so its rules, messages and defaults are the
//! labels'. Pure.

use std::collections::HashMap;
use std::net::Ipv6Addr;

use super::labels::{check, parse_tags, Meta};
use super::{Check, NodeSettings, Registration};
use crate::schema::{self, InstanceRecord, DEFAULT_WEIGHT, MAX_WEIGHT};

/// The registration a `[[registrar.service]]` asks for, or every problem with it.
/// Its instance is `<node>-svc-<name>-<port>`; its address the `addr` host (default:
/// The registrar's own probe of a `[[service]]`, and the problems of its settings (a
/// tuning key without a probe to tune).
fn probe(
    meta: &Meta,
    labels: &HashMap<String, String>,
    port: u16,
    problems: &mut Vec<String>,
) -> Option<Check> {
    let probe = match check(meta, port) {
        Ok(c) => c,
        Err((src, e)) => {
            problems.push(format!("{src}: {e}"));
            None
        }
    };
    let probe_asked = labels.contains_key("portolan.check.http")
        || labels
            .get("portolan.check.tcp")
            .is_some_and(|v| v == "true");
    for name in ["interval", "timeout", "fall", "rise"] {
        if labels.contains_key(&format!("portolan.check.{name}")) && !probe_asked {
            problems.push(format!(
                "check_{name} is set, but there is no probe to tune: add check_http = \"/path\" or check_tcp = true"
            ));
        }
    }
    probe
}

/// the advertise IP) and `port`; it has no container.
pub(crate) fn service(
    labels: &HashMap<String, String>,
    port: u16,
    addr: Option<&str>,
    settings: &NodeSettings,
) -> Result<Registration, Vec<String>> {
    let mut problems = Vec::new();
    let meta = Meta {
        labels,
        env: Default::default(),
        from_file: true,
    };
    let name = meta.get_label("portolan.service").map_or("", |(_, v)| v);
    if !schema::is_valid_service_name(name) {
        problems.push(format!(
            "name {name:?} must match [a-z0-9][a-z0-9_.-]{{0,127}} (service names are lower case)"
        ));
    }
    if port == 0 {
        problems.push("port = 0: must be a port in 1..=65535".into());
    }
    let host = addr.map_or_else(|| settings.advertise_ip.to_string(), str::to_string);
    let addr = if host.parse::<Ipv6Addr>().is_ok() {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    if port != 0 {
        if let Err(e) = schema::Addr::parse(&addr) {
            problems.push(format!("addr = {host:?}: {e} (an IP address or DNS name)"));
        }
    }
    let tags = match meta.get_label("portolan.tags") {
        Some((src, v)) => parse_tags(v).unwrap_or_else(|e| {
            problems.push(format!("{src}: {e}"));
            Vec::new()
        }),
        None => Vec::new(),
    };
    let weight = match meta.get_label("portolan.weight") {
        Some((src, v)) => match v.parse::<u32>() {
            Ok(n) if n <= MAX_WEIGHT => n,
            _ => {
                problems.push(format!("{src}: is not a number in 0..={MAX_WEIGHT}"));
                DEFAULT_WEIGHT
            }
        },
        None => DEFAULT_WEIGHT,
    };
    let probe = probe(&meta, labels, port, &mut problems);
    // Not routed unless asked: such a service is registered to be found.
    let route = match meta.get_label("portolan.route") {
        None => false,
        Some((_, "true")) => true,
        Some((_, "false")) => false,
        Some((_, v)) => {
            problems.push(format!("route = {v:?}: expected true or false"));
            false
        }
    };
    let route = match super::labels::route(&meta, None) {
        Ok(options) if route => schema::Routing::Routed(options),
        Ok(options) if options.is_empty() => schema::Routing::Unrouted,
        Ok(_) => {
            problems.push(
                "route options (hosts, path, mode, …) are set but route is not true: add route = true"
                    .to_string(),
            );
            schema::Routing::Unrouted
        }
        Err((src, e)) => {
            problems.push(format!("{src}: {e}"));
            schema::Routing::Unrouted
        }
    };
    let instance = format!("{}-svc-{name}-{port}", settings.node);
    if problems.is_empty() && !schema::is_valid_name(&instance) {
        problems.push(format!(
            "instance id {instance:?} (<node>-svc-<name>-<port>) is longer than 128 characters: use a shorter name"
        ));
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(Registration {
        service: name.to_string(),
        instance,
        record: InstanceRecord {
            addr,
            node: settings.node.clone(),
            container: String::new(),
            port: None,
            tags,
            weight,
            draining: false,
            route,
        },
        check: probe,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::fixtures::settings;
    use super::super::{Check, CheckKind};
    use super::*;

    /// A `[[registrar.service]]` as `ServiceOptions::labels` puts it.
    #[derive(Default)]
    struct ServiceOptions {
        name: String,
        port: u16,
        addr: Option<String>,
        tags: Vec<String>,
        weight: Option<u32>,
        check_http: Option<String>,
        check_tcp: Option<bool>,
        check_interval: Option<String>,
        check_fall: Option<u32>,
        check_rise: Option<u32>,
    }

    fn db() -> ServiceOptions {
        ServiceOptions {
            name: "db".into(),
            port: 5432,
            ..Default::default()
        }
    }

    fn service(s: &ServiceOptions, settings: &NodeSettings) -> Result<Registration, Vec<String>> {
        let mut labels = HashMap::new();
        labels.insert("portolan.service".to_string(), s.name.clone());
        if !s.tags.is_empty() {
            labels.insert("portolan.tags".into(), s.tags.join(","));
        }
        let mut put = |k: &str, v: Option<String>| {
            if let Some(v) = v {
                labels.insert(k.to_string(), v);
            }
        };
        put("portolan.weight", s.weight.map(|n| n.to_string()));
        put("portolan.check.http", s.check_http.clone());
        put("portolan.check.tcp", s.check_tcp.map(|b| b.to_string()));
        put("portolan.check.interval", s.check_interval.clone());
        put("portolan.check.fall", s.check_fall.map(|n| n.to_string()));
        put("portolan.check.rise", s.check_rise.map(|n| n.to_string()));
        super::service(&labels, s.port, s.addr.as_deref(), settings)
    }

    #[test]
    fn a_bare_service_is_always_registered_at_the_advertise_ip() {
        let r = service(&db(), &settings()).unwrap();
        assert_eq!(r.service, "db");
        assert_eq!(r.instance, "host-a-svc-db-5432");
        assert_eq!(
            r.record.to_json(),
            r#"{"addr":"10.0.0.5:5432","node":"host-a","tags":[],"weight":100,"route":false}"#
        );
        assert_eq!(r.check, None);
        assert_eq!(
            r.key("/p"),
            "/p/nodes/host-a/services/db/host-a-svc-db-5432"
        );
    }

    #[test]
    fn address_tags_weight_and_a_probe_with_the_labels_defaults() {
        let s = ServiceOptions {
            addr: Some("::1".into()),
            tags: vec!["primary".into(), "primary".into(), "v15".into()],
            weight: Some(10),
            check_tcp: Some(true),
            ..db()
        };
        let r = service(&s, &settings()).unwrap();
        assert_eq!(r.record.addr, "[::1]:5432");
        assert_eq!(r.record.tags, ["primary", "v15"]);
        assert_eq!(r.record.weight, 10);
        assert_eq!(
            r.check,
            Some(Check {
                kind: CheckKind::Tcp,
                interval: Duration::from_secs(5),
                timeout: Duration::from_secs(2),
                fall: 3,
                rise: 2,
            })
        );
        let s = ServiceOptions {
            addr: Some("cache.internal".into()),
            check_http: Some("/health".into()),
            check_interval: Some("500ms".into()),
            check_fall: Some(1),
            ..db()
        };
        let r = service(&s, &settings()).unwrap();
        assert_eq!(r.record.addr, "cache.internal:5432");
        let c = r.check.unwrap();
        assert_eq!(
            c.kind,
            CheckKind::Http {
                path: "/health".into()
            }
        );
        assert_eq!((c.interval, c.fall), (Duration::from_millis(500), 1));
    }

    #[test]
    fn every_problem_is_named_as_the_file_writes_it() {
        let s = ServiceOptions {
            name: "DB".into(),
            port: 0,
            tags: vec!["a b".into()],
            weight: Some(1000),
            check_http: Some("health".into()),
            ..Default::default()
        };
        let all = service(&s, &settings()).unwrap_err().join("\n");
        for needle in [
            "name \"DB\"",
            "port = 0",
            "tag \"a b\"",
            "weight = \"1000\": is not a number",
            "check_http = \"health\": \"health\" is not a path like /health",
        ] {
            assert!(all.contains(needle), "{needle}: {all}");
        }
        let s = ServiceOptions {
            check_http: Some("/".into()),
            check_tcp: Some(true),
            check_interval: Some("5 parsecs".into()),
            ..db()
        };
        let all = service(&s, &settings()).unwrap_err().join("\n");
        assert!(all.contains("not both"), "{all}");
        let s = ServiceOptions {
            check_rise: Some(0),
            check_tcp: Some(true),
            ..db()
        };
        let all = service(&s, &settings()).unwrap_err().join("\n");
        assert!(
            all.contains("check_rise = \"0\": \"0\" is not a count in 1..=100"),
            "{all}"
        );
        let s = ServiceOptions {
            check_interval: Some("1s".into()),
            ..db()
        };
        let all = service(&s, &settings()).unwrap_err().join("\n");
        assert!(all.contains("no probe to tune"), "{all}");
        let s = ServiceOptions {
            addr: Some("bad host!".into()),
            ..db()
        };
        assert!(service(&s, &settings()).unwrap_err()[0].starts_with("addr = \"bad host!\""));
    }
}
