//! Who owns which route: the services' route options (`schema::Route`) resolved into
//! the rules the front door renders, one owner per route. Pure.
//!
//! Rules:
//! - A service's options are its oldest instance's (the lowest etcd create revision,
//!   then the lowest id; a draining instance only when every instance drains). An
//!   instance whose options differ is named in `conflicts` (kind `options`) and
//!   routed by the service's options anyway: it is a server of the same backend.
//! - A route is a host + path (HTTP: `<service>.<domain>` unless `default_host` is
//!   false, and each of `hosts`, each with the `path` or none), an SNI name, or a
//!   listen port. Two services claiming one route: the service whose oldest instance
//!   is older keeps it (ties: the lower service name); the other is refused that route
//!   and named (kind `route`), keeping its other routes. A listen port the front door
//!   binds itself, or one the operator did not open for services (`ListenPorts`:
//!   `vars.listen_ports`, none by default), is refused to everyone: a container must not
//!   take port 22, nor a port whose bind would fail every reload.
//! - HTTP rules come in match order: the longest path prefix first, then exact hosts
//!   before wildcards, then longer wildcards first. A path `/api` matches `/api` and
//!   `/api/…`, never `/apix`.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::schema::route::{Mode, Route, Sticky};
use crate::schema::Instance;
use std::sync::Arc;

/// A service's resolved options, as templates see them under `routes.services`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceRoute {
    /// `http` or `tcp`.
    pub mode: &'static str,
    /// Empty unless set (the template's default applies).
    pub balance: &'static str,
    pub sticky: bool,
    /// HTTP check path, or empty.
    pub check_path: String,
    /// `timeout server`, or empty.
    pub timeout_server: String,
    /// Allowed client networks, space-separated for an ACL; empty: everyone.
    pub allow: String,
    /// Per-server maxconn, 0: none.
    pub maxconn: u32,
    /// Path prefix to take off (with `strip_prefix`), or empty.
    pub strip: String,
    /// The listen port it owns (mode tcp), 0: none.
    pub listen: u16,
}

/// One HTTP rule: requests for `host` (exact, or below `suffix` for a wildcard) whose
/// path is `path` or starts with `path/` go to `service`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HttpRule {
    pub host: String,
    /// For `*.example.org`: `.example.org`; empty for an exact host.
    pub suffix: String,
    /// Empty: every path.
    pub path: String,
    pub service: String,
}

/// A TLS server name passed through to `service` (`suffix` as in `HttpRule`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SniRule {
    pub name: String,
    pub suffix: String,
    pub service: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ListenRule {
    pub port: u16,
    pub service: String,
}

/// A claim refused or an instance outvoted.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Conflict {
    /// `route` (another service owns it), `port` (a listen port no service may take)
    /// or `options` (the oldest instance's win).
    pub kind: &'static str,
    pub service: String,
    /// The route (`host a.example.org path /api`, `sni db.example.org`, `listen 5432`)
    /// or the instance whose options lost.
    pub what: String,
    /// The service that keeps the route, or the instance whose options win.
    pub owner: String,
}

impl std::fmt::Display for Conflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            "port" => write!(
                f,
                "service {} is refused {}: {}",
                self.service, self.what, self.owner
            ),
            "options" => write!(
                f,
                "service {}: instance {}'s route options differ from its oldest instance {}'s, which are used",
                self.service, self.what, self.owner
            ),
            _ => write!(
                f,
                "service {} is refused {}: service {} claimed it first (its oldest instance is older)",
                self.service, self.what, self.owner
            ),
        }
    }
}

/// Everything templates need to route, under `routes`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Routes {
    pub services: BTreeMap<String, ServiceRoute>,
    pub http: Vec<HttpRule>,
    pub sni: Vec<SniRule>,
    pub listen: Vec<ListenRule>,
    pub conflicts: Vec<Conflict>,
}

/// The claim key of a route: what two services may not share.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Claim {
    Http { host: String, path: String },
    Sni(String),
    Listen(u16),
}

impl Claim {
    fn describe(&self) -> String {
        match self {
            Claim::Http { host, path } if path.is_empty() => format!("host {host}"),
            Claim::Http { host, path } => format!("host {host} path {path}"),
            Claim::Sni(n) => format!("sni {n}"),
            Claim::Listen(p) => format!("listen {p}"),
        }
    }
}

/// Which ports services may listen on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListenPorts {
    /// Ports the front door binds itself.
    pub reserved: Vec<u16>,
    /// Inclusive ranges the operator opened (`vars.listen_ports`); empty: none.
    pub open: Vec<(u16, u16)>,
}

impl ListenPorts {
    /// Why `port` may not be taken, if it may not.
    fn refuses(&self, port: u16) -> Option<&'static str> {
        if self.reserved.contains(&port) {
            Some("the front door binds it itself")
        } else if !self.open.iter().any(|(lo, hi)| (*lo..=*hi).contains(&port)) {
            Some("it is not in [template.vars] listen_ports")
        } else {
            None
        }
    }
}

/// Resolves `services` (routed instances by service, each list sorted by id) for
/// `domain`; `ports`: where listen routes may go.
pub fn resolve<'a>(
    services: impl IntoIterator<Item = (&'a str, &'a [Arc<Instance>])>,
    domain: &str,
    ports: &ListenPorts,
) -> Routes {
    let empty = Route::default();
    let mut routes = Routes::default();
    // (age, name, options) per service, oldest first.
    let mut by_age: Vec<((i64, bool), &str, &Route)> = Vec::new();
    for (name, list) in services {
        let live = |i: &&Arc<Instance>| !i.draining;
        let oldest = list
            .iter()
            .filter(live)
            .min_by(|a, b| (a.created, &a.id).cmp(&(b.created, &b.id)))
            .or_else(|| {
                list.iter()
                    .min_by(|a, b| (a.created, &a.id).cmp(&(b.created, &b.id)))
            });
        let (age, options) = match oldest {
            Some(i) => ((i.created, false), i.routing.as_deref().unwrap_or(&empty)),
            // An emptied service kept by linger: its backend with a default route.
            None => ((i64::MAX, true), &empty),
        };
        if let Some(o) = oldest {
            for i in list {
                if i.routing.as_deref().unwrap_or(&empty) != options {
                    routes.conflicts.push(Conflict {
                        kind: "options",
                        service: name.to_string(),
                        what: i.id.clone(),
                        owner: o.id.clone(),
                    });
                }
            }
        }
        routes
            .services
            .insert(name.to_string(), service_route(options));
        by_age.push((age, name, options));
    }
    let owners = award(by_age, domain, ports, &mut routes.conflicts);
    lay_out(owners, &mut routes);
    routes.conflicts.sort();
    routes
}

/// Each claim to the oldest service making it (`by_age`: age, name, options); the
/// younger claimants, and listen ports the template keeps, go to `conflicts`.
fn award<'a>(
    mut by_age: Vec<((i64, bool), &'a str, &Route)>,
    domain: &str,
    ports: &ListenPorts,
    conflicts: &mut Vec<Conflict>,
) -> BTreeMap<Claim, &'a str> {
    by_age.sort();
    let mut owners: BTreeMap<Claim, &str> = BTreeMap::new();
    for (_, name, options) in by_age {
        for claim in claims(name, options, domain) {
            if let Claim::Listen(p) = claim {
                if let Some(why) = ports.refuses(p) {
                    conflicts.push(Conflict {
                        kind: "port",
                        service: name.to_string(),
                        what: claim.describe(),
                        owner: why.into(),
                    });
                    continue;
                }
            }
            match owners.get(&claim) {
                Some(owner) if *owner != name => conflicts.push(Conflict {
                    kind: "route",
                    service: name.to_string(),
                    what: claim.describe(),
                    owner: owner.to_string(),
                }),
                Some(_) => {}
                None => {
                    owners.insert(claim, name);
                }
            }
        }
    }
    owners
}

/// The awarded claims as the template's rules, in match order: longest path first,
/// exact hosts before wildcards, longer wildcard suffixes first.
fn lay_out(owners: BTreeMap<Claim, &str>, routes: &mut Routes) {
    for (claim, service) in owners {
        let service = service.to_string();
        match claim {
            Claim::Http { host, path } => routes.http.push(HttpRule {
                suffix: wildcard_suffix(&host),
                host,
                path,
                service,
            }),
            Claim::Sni(name) => routes.sni.push(SniRule {
                suffix: wildcard_suffix(&name),
                name,
                service,
            }),
            Claim::Listen(port) => {
                if let Some(s) = routes.services.get_mut(&service) {
                    s.listen = port;
                }
                routes.listen.push(ListenRule { port, service })
            }
        }
    }
    routes.http.sort_by(|a, b| {
        b.path
            .len()
            .cmp(&a.path.len())
            .then(a.suffix.is_empty().cmp(&b.suffix.is_empty()).reverse())
            // Among wildcards the longer suffix first; exact hosts never overlap.
            .then(b.suffix.len().cmp(&a.suffix.len()))
            .then(a.host.cmp(&b.host))
            .then(a.path.cmp(&b.path))
    });
    routes.sni.sort_by(|a, b| {
        (a.suffix.is_empty().cmp(&b.suffix.is_empty()).reverse())
            .then(b.suffix.len().cmp(&a.suffix.len()))
            .then(a.name.cmp(&b.name))
    });
}

fn wildcard_suffix(host: &str) -> String {
    host.strip_prefix('*')
        .map(str::to_string)
        .unwrap_or_default()
}

fn claims(name: &str, r: &Route, domain: &str) -> Vec<Claim> {
    match r.mode {
        Mode::Tcp => r
            .sni
            .iter()
            .map(|n| Claim::Sni(n.clone()))
            .chain(r.listen.map(Claim::Listen))
            .collect(),
        Mode::Http => {
            let path = r.path.clone().unwrap_or_default();
            let default = r
                .default_host()
                .then(|| format!("{name}.{domain}").to_ascii_lowercase());
            default
                .into_iter()
                .chain(r.hosts.iter().cloned())
                .map(|host| Claim::Http {
                    host,
                    path: path.clone(),
                })
                .collect()
        }
    }
}

fn service_route(r: &Route) -> ServiceRoute {
    ServiceRoute {
        mode: match r.mode {
            Mode::Http => "http",
            Mode::Tcp => "tcp",
        },
        balance: r.balance.map_or("", |b| b.as_str()),
        sticky: r.sticky == Some(Sticky::Cookie),
        check_path: r.check_path.clone().unwrap_or_default(),
        timeout_server: r.timeout_server.clone().unwrap_or_default(),
        allow: r.allow.join(" "),
        maxconn: r.maxconn.unwrap_or(0),
        strip: if r.strip_prefix {
            r.path.clone().unwrap_or_default()
        } else {
            String::new()
        },
        listen: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::decode_instance;

    /// (service, instance, created, route JSON or "").
    fn services(list: &[(&str, &str, i64, &str)]) -> BTreeMap<String, Vec<Arc<Instance>>> {
        let mut out: BTreeMap<String, Vec<Arc<Instance>>> = BTreeMap::new();
        for (svc, id, created, route) in list {
            let json = if route.is_empty() {
                r#"{"addr":"10.0.0.1:80"}"#.to_string()
            } else {
                format!(r#"{{"addr":"10.0.0.1:80","route":{route}}}"#)
            };
            let mut i = decode_instance("k", svc, id, json.as_bytes()).unwrap();
            i.created = *created;
            out.entry(svc.to_string()).or_default().push(Arc::new(i));
        }
        for l in out.values_mut() {
            l.sort_by(|a, b| a.id.cmp(&b.id));
        }
        out
    }

    const NONE: ListenPorts = ListenPorts {
        reserved: Vec::new(),
        open: Vec::new(),
    };

    fn iter(
        s: &BTreeMap<String, Vec<Arc<Instance>>>,
    ) -> impl Iterator<Item = (&str, &[Arc<Instance>])> {
        s.iter().map(|(k, v)| (k.as_str(), v.as_slice()))
    }

    fn http(r: &Routes) -> Vec<String> {
        r.http
            .iter()
            .map(|h| format!("{}{} -> {}", h.host, h.path, h.service))
            .collect()
    }

    #[test]
    fn a_plain_service_gets_its_default_host_and_nothing_else() {
        let r = resolve(
            iter(&services(&[("web", "a", 1, "")])),
            "example.com",
            &NONE,
        );
        assert_eq!(http(&r), ["web.example.com -> web"]);
        assert_eq!(r.services["web"].balance, "", "the template's default");
        assert!(r.conflicts.is_empty() && r.sni.is_empty() && r.listen.is_empty());
    }

    #[test]
    fn longest_prefix_first_then_exact_hosts_then_longer_wildcards() {
        let s = services(&[
            ("api", "a", 1, r#"{"hosts":["example.com"],"path":"/api"}"#),
            (
                "v2",
                "b",
                2,
                r#"{"hosts":["example.com"],"path":"/api/v2","default_host":false}"#,
            ),
            (
                "site",
                "c",
                3,
                r#"{"hosts":["example.com","*.example.com","*.a.example.com"]}"#,
            ),
        ]);
        let r = resolve(iter(&s), "d", &NONE);
        assert_eq!(
            http(&r),
            [
                "example.com/api/v2 -> v2",
                "api.d/api -> api",
                "example.com/api -> api",
                "example.com -> site",
                "site.d -> site",
                "*.a.example.com -> site",
                "*.example.com -> site",
            ]
        );
        assert_eq!(r.http[5].suffix, ".a.example.com");
    }

    #[test]
    fn the_service_with_the_older_oldest_instance_keeps_a_contested_route() {
        // b's oldest instance (created 5) is older than a's (created 9).
        let s = services(&[
            ("a", "a1", 9, r#"{"hosts":["shop.example.com"]}"#),
            (
                "b",
                "b1",
                12,
                r#"{"hosts":["shop.example.com"],"path":"/x"}"#,
            ),
            (
                "b",
                "b2",
                5,
                r#"{"hosts":["shop.example.com"],"path":"/x"}"#,
            ),
            ("c", "c1", 7, r#"{"hosts":["shop.example.com"]}"#),
        ]);
        let r = resolve(iter(&s), "d", &NONE);
        assert!(
            http(&r).contains(&"shop.example.com -> c".to_string()),
            "{:?}",
            http(&r)
        );
        // A different path is a different route: b keeps /x.
        assert!(http(&r).contains(&"shop.example.com/x -> b".to_string()));
        assert_eq!(
            r.conflicts,
            [Conflict {
                kind: "route",
                service: "a".into(),
                what: "host shop.example.com".into(),
                owner: "c".into()
            }]
        );
        // a keeps its other routes.
        assert!(http(&r).contains(&"a.d -> a".to_string()));
        assert!(r.conflicts[0]
            .to_string()
            .contains("service a is refused host shop.example.com: service c"));
    }

    #[test]
    fn a_listed_service_name_cannot_take_another_services_default_host() {
        let s = services(&[
            ("web", "w", 10, ""),
            ("evil", "e", 20, r#"{"hosts":["web.example.com"]}"#),
        ]);
        let r = resolve(iter(&s), "example.com", &NONE);
        assert_eq!(
            http(&r),
            ["evil.example.com -> evil", "web.example.com -> web"]
        );
        assert_eq!(r.conflicts[0].service, "evil");
    }

    #[test]
    fn sni_and_listen_routes_have_one_owner_and_reserved_ports_none() {
        let s = services(&[
            (
                "db",
                "d",
                1,
                r#"{"mode":"tcp","sni":["db.example.com","*.db.example.com"]}"#,
            ),
            ("db2", "d2", 2, r#"{"mode":"tcp","sni":["db.example.com"]}"#),
            ("pg", "p", 3, r#"{"mode":"tcp","listen":5432}"#),
            ("pg2", "p2", 4, r#"{"mode":"tcp","listen":5432}"#),
            ("grab", "g", 0, r#"{"mode":"tcp","listen":80}"#),
        ]);
        let ports = ListenPorts {
            reserved: vec![80, 443],
            open: vec![(1, 10_000)],
        };
        let r = resolve(iter(&s), "d", &ports);
        let sni: Vec<_> = r
            .sni
            .iter()
            .map(|s| (s.name.as_str(), s.service.as_str()))
            .collect();
        assert_eq!(sni, [("db.example.com", "db"), ("*.db.example.com", "db")]);
        assert_eq!(
            r.listen,
            [ListenRule {
                port: 5432,
                service: "pg".into()
            }]
        );
        let lost: Vec<_> = r
            .conflicts
            .iter()
            .map(|c| (c.service.as_str(), c.what.as_str()))
            .collect();
        assert_eq!(
            lost,
            [
                ("grab", "listen 80"),
                ("db2", "sni db.example.com"),
                ("pg2", "listen 5432")
            ]
        );
        assert_eq!(
            r.conflicts[0].to_string(),
            "service grab is refused listen 80: the front door binds it itself"
        );
        // A port the operator did not open is nobody's: not even the first to ask.
        let only = ListenPorts {
            reserved: Vec::new(),
            open: vec![(6000, 6100)],
        };
        let closed = resolve(iter(&s), "d", &only);
        assert!(closed.listen.is_empty());
        assert!(closed.conflicts.iter().any(|c| c.to_string()
            == "service pg is refused listen 5432: it is not in [template.vars] listen_ports"));
        assert!(
            resolve(iter(&s), "d", &NONE).listen.is_empty(),
            "none open by default"
        );
        // TCP services have no Host route.
        assert!(r.http.is_empty());
        assert_eq!(
            (r.services["pg"].mode, r.services["pg"].listen),
            ("tcp", 5432)
        );
        assert_eq!(r.services["pg2"].listen, 0, "refused its port");
    }

    #[test]
    fn instances_that_disagree_take_the_oldest_instances_options_and_are_named() {
        let s = services(&[
            ("web", "new", 30, r#"{"balance":"leastconn"}"#),
            (
                "web",
                "old",
                10,
                r#"{"balance":"source","allow":["10.0.0.0/8"]}"#,
            ),
            (
                "web",
                "same",
                20,
                r#"{"balance":"source","allow":["10.0.0.0/8"]}"#,
            ),
        ]);
        let r = resolve(iter(&s), "d", &NONE);
        assert_eq!(r.services["web"].balance, "source");
        assert_eq!(r.services["web"].allow, "10.0.0.0/8");
        assert_eq!(
            r.conflicts,
            [Conflict {
                kind: "options",
                service: "web".into(),
                what: "new".into(),
                owner: "old".into()
            }]
        );
    }

    #[test]
    fn a_draining_instance_decides_only_when_every_instance_drains() {
        let mut s = services(&[
            ("web", "old", 1, r#"{"balance":"source"}"#),
            ("web", "young", 2, r#"{"balance":"leastconn"}"#),
        ]);
        let mut old = (*s["web"][0]).clone();
        old.draining = true;
        s.get_mut("web").unwrap()[0] = Arc::new(old);
        assert_eq!(
            resolve(iter(&s), "d", &NONE).services["web"].balance,
            "leastconn"
        );
    }

    #[test]
    fn strip_and_per_service_options_reach_the_service_route() {
        let s = services(&[(
            "api",
            "a",
            1,
            r#"{"path":"/api","strip_prefix":true,"sticky":"cookie","check_path":"/healthz","timeout_server":"5s","maxconn":7,"allow":["10.0.0.0/8","fd00::/8"]}"#,
        )]);
        let r = resolve(iter(&s), "d", &NONE);
        let a = &r.services["api"];
        assert_eq!(
            (
                a.strip.as_str(),
                a.sticky,
                a.check_path.as_str(),
                a.timeout_server.as_str(),
                a.maxconn,
                a.allow.as_str()
            ),
            ("/api", true, "/healthz", "5s", 7, "10.0.0.0/8 fd00::/8")
        );
        // An emptied service (kept by linger) still has its default route.
        let mut e = BTreeMap::new();
        e.insert("gone".to_string(), Vec::new());
        assert_eq!(http(&resolve(iter(&e), "d", &NONE)), ["gone.d -> gone"]);
    }
}
