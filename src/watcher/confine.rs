//! Confinement: what a key may say, given who could have written it.
//!
//! On an etcd that enforces its RBAC, a node's credentials write only under
//! `nodes/<node>/`. That alone would still let a node aim the front door at anything:
//! its instances land in any service, under any id, at any address. So every instance
//! key is judged by its owner — the node in its key, or none for a hand-written
//! `services/…` key (operators', and v1 registrars') — before it may be routed:
//!
//! 1. **Identity.** An instance under `nodes/<n>/` is `(n, id)` and its id must start
//!    with `<n>-` (registrar-written ids do: `<n>-<container>-<port>`, `<n>-svc-…`), so a
//!    node cannot use an id that names another node or a hand-written instance.
//! 2. **Services.** `[watcher] services` maps a service to the node-name globs that may
//!    serve it (`web = ["web-*"]`); a service it does not list falls under `"*"`, and
//!    without a `"*"` entry no node may serve it. Default `"*" = ["*"]`.
//! 3. **Hand-written keys** route only with `[watcher] hand_written = true` (the default).
//! 4. **Networks.** `[watcher] node_networks = { "web-*" = ["10.1.0.0/16"] }`: the
//!    instances of a node these globs match must be IP addresses inside the networks of
//!    every glob that matches it (a name is refused: it could resolve anywhere). A node
//!    no glob matches is not constrained.
//! 5. **Server names.** Templates name a server after its id, one backend per service,
//!    so two keys of one service with the same id would render to one server name.
//!    Never merged: the hand-written key keeps the name; between nodes (possible only
//!    when one node's name extends the other's, `web` and `web-1`), the node with the
//!    longer name keeps it: the shorter one may write every id of the longer one's
//!    containers, while its own container ids (`<n>-<12 hex>-<port>`) never start with
//!    the longer name (its `<n>-svc-…` ids can, when the longer name is `<n>-svc…`:
//!    documented, not worth a rule). The other key is refused, naming the key that
//!    holds the name.
//!
//! Pure: `admit` (rules 1–4) and `settle` (rule 5, over one service's keys) read the
//! keys and values and the config, nothing else. The store, `ls` and `status` use the
//! same two, so they agree with the watcher on what is routed.

use std::collections::BTreeMap;
use std::fmt;

use super::policy::{self, Cidr};
use crate::schema::Instance;

/// A node-name pattern: `*` matches any run of characters, `?` one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob(String);

impl Glob {
    /// A glob of name characters (`[A-Za-z0-9_.-]`) and `*`, `?`; else the rule broken.
    pub fn parse(s: &str) -> Result<Glob, String> {
        let ok = |c: u8| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-' | b'*' | b'?');
        if s.is_empty() || s.len() > 128 || !s.bytes().all(ok) {
            return Err(format!(
                "{s:?} is not a node-name glob: use name characters [A-Za-z0-9_.-] with * (any run) and ? (one character)"
            ));
        }
        Ok(Glob(s.to_string()))
    }

    pub fn matches(&self, name: &str) -> bool {
        // The default, on every instance of every snapshot.
        self.0 == "*" || glob_match(self.0.as_bytes(), name.as_bytes())
    }
}

impl fmt::Display for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Iterative wildcard match with one backtrack point: linear in practice.
fn glob_match(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, si));
            pi += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == b'*')
}

/// Why a key is refused; the label of `portolan_watcher_refused_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reason {
    /// An id under `nodes/<n>/` that does not start with `<n>-`.
    ForeignId,
    /// A node outside the service's `[watcher] services` globs.
    Service,
    /// A hand-written key while `hand_written = false`.
    HandWritten,
    /// An address outside the node's `node_networks`.
    NodeNetwork,
    /// Another key of the service holds the server name.
    NameTaken,
}

impl Reason {
    pub const ALL: [Reason; 5] = [
        Reason::ForeignId,
        Reason::Service,
        Reason::HandWritten,
        Reason::NodeNetwork,
        Reason::NameTaken,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Reason::ForeignId => "foreign_id",
            Reason::Service => "service",
            Reason::HandWritten => "hand_written",
            Reason::NodeNetwork => "node_network",
            Reason::NameTaken => "name_taken",
        }
    }
}

/// A refused key: the reason and the rule it broke, in the words of the warning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: Reason,
    pub rule: String,
}

/// Rules 1–4 as configured. `Default` is the default config: every node may serve every
/// service, hand-written keys route, no node networks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confinement {
    /// Service name (or `"*"`) → the globs of the nodes that may serve it.
    services: BTreeMap<String, Vec<Glob>>,
    hand_written: bool,
    node_networks: Vec<(Glob, Vec<Cidr>)>,
}

impl Default for Confinement {
    fn default() -> Self {
        Confinement {
            services: BTreeMap::from([("*".to_string(), vec![Glob("*".into())])]),
            hand_written: true,
            node_networks: Vec::new(),
        }
    }
}

impl Confinement {
    pub fn new(
        services: BTreeMap<String, Vec<Glob>>,
        hand_written: bool,
        node_networks: Vec<(Glob, Vec<Cidr>)>,
    ) -> Confinement {
        Confinement {
            services,
            hand_written,
            node_networks,
        }
    }

    /// Service (or `"*"`) → node globs.
    pub fn services(&self) -> &BTreeMap<String, Vec<Glob>> {
        &self.services
    }

    /// Rules 1–4 for one key: `owner` is the node in the key, None for `services/…`.
    pub fn admit(&self, owner: Option<&str>, inst: &Instance) -> Result<(), Refusal> {
        let Some(node) = owner else {
            return if self.hand_written {
                Ok(())
            } else {
                Err(Refusal {
                    reason: Reason::HandWritten,
                    rule: "hand-written instance keys are off ([watcher] hand_written = false): only nodes' keys route".into(),
                })
            };
        };
        let owned = inst
            .id
            .strip_prefix(node)
            .is_some_and(|rest| rest.starts_with('-'));
        if !owned {
            return Err(Refusal {
                reason: Reason::ForeignId,
                rule: format!(
                    "instance id {:?} under nodes/{node}/ does not start with \"{node}-\": a node names only its own instances",
                    inst.id
                ),
            });
        }
        let (entry, globs) = match self.services.get_key_value(&inst.service) {
            Some(e) => e,
            None => match self.services.get_key_value("*") {
                Some(e) => e,
                None => {
                    return Err(Refusal {
                        reason: Reason::Service,
                        rule: format!(
                            "service {:?} is not in [watcher] services (and there is no \"*\" entry): no node may serve it",
                            inst.service
                        ),
                    })
                }
            },
        };
        if !globs.iter().any(|g| g.matches(node)) {
            return Err(Refusal {
                reason: Reason::Service,
                rule: format!(
                    "node {node:?} may not serve service {:?}: [watcher] services {entry:?} = [{}]",
                    inst.service,
                    list(globs, true)
                ),
            });
        }
        let nets: Vec<&Cidr> = self
            .node_networks
            .iter()
            .filter(|(g, _)| g.matches(node))
            .flat_map(|(_, nets)| nets)
            .collect();
        if nets.is_empty() {
            return Ok(());
        }
        let within = |what: String| {
            Refusal {
            reason: Reason::NodeNetwork,
            rule: format!(
                "{what}: node {node:?}'s instances must be IP addresses in its [watcher] node_networks ({})",
                list(&nets, false)
            ),
        }
        };
        match policy::literal(&inst.host) {
            None => Err(within(format!("host {:?} is a name", inst.host))),
            Some(ip) if nets.iter().any(|n| n.contains(ip)) => Ok(()),
            Some(ip) => Err(within(format!("{ip} is outside them"))),
        }
    }
}

/// `"a", "b"` (globs) or `a, b` (networks), for rules.
fn list<T: fmt::Display>(items: &[T], quoted: bool) -> String {
    items
        .iter()
        .map(|i| {
            if quoted {
                format!("\"{i}\"")
            } else {
                i.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// One key's claim on a server name, with whatever the caller carries along.
pub struct Claim<'a, T> {
    pub key: &'a str,
    pub owner: Option<&'a str>,
    pub instance: &'a Instance,
    pub value: T,
}

/// Rule 5 over the admitted keys of one service: the claims that keep their server
/// name, sorted by id; every other one goes to `refused`, naming the holder.
pub fn settle<'a, T>(
    mut claims: Vec<Claim<'a, T>>,
    refused: &mut BTreeMap<String, Refusal>,
) -> Vec<Claim<'a, T>> {
    // By id alone (the hot path: ids are distinct but for an attack or an upgrade);
    // within one id the holder is the hand-written key, then the longest node name,
    // then the lowest key (unreachable: two keys of one node and service with one id
    // are one key), so the answer never depends on the order keys arrived in.
    claims.sort_unstable_by(|a, b| a.instance.id.cmp(&b.instance.id));
    let rank = |c: &Claim<'a, T>| {
        let owner = match c.owner {
            None => (0, 0),
            Some(n) => (1, usize::MAX - n.len()),
        };
        (owner, c.key)
    };
    let mut kept: Vec<Claim<'a, T>> = Vec::with_capacity(claims.len());
    let mut rest = claims.into_iter().peekable();
    while let Some(first) = rest.next() {
        if rest
            .peek()
            .is_none_or(|c| c.instance.id != first.instance.id)
        {
            kept.push(first);
            continue;
        }
        let mut same = vec![first];
        while let Some(c) = rest.next_if(|c| c.instance.id == same[0].instance.id) {
            same.push(c);
        }
        same.sort_by(|a, b| rank(a).cmp(&rank(b)));
        let mut same = same.into_iter();
        let holder = same.next().expect("a run has a first claim");
        for c in same {
            refused.insert(
                c.key.to_string(),
                Refusal {
                    reason: Reason::NameTaken,
                    rule: format!(
                        "server name {:?} in service {:?} is held by {}: two keys never merge into one server",
                        c.instance.id, c.instance.service, holder.key
                    ),
                },
            );
        }
        kept.push(holder);
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::decode_owned;

    fn inst(service: &str, id: &str, node: Option<&str>, addr: &str) -> Instance {
        decode_owned("k", service, id, node, addr.as_bytes()).unwrap()
    }

    fn globs(list: &[&str]) -> Vec<Glob> {
        list.iter().map(|g| Glob::parse(g).unwrap()).collect()
    }

    fn reason(r: Result<(), Refusal>) -> Option<Reason> {
        r.err().map(|r| r.reason)
    }

    #[test]
    fn globs_match_whole_names() {
        let g = |p: &str, n: &str| Glob::parse(p).unwrap().matches(n);
        assert!(g("*", "anything") && g("web-*", "web-1") && g("web-*", "web-"));
        assert!(!g("web-*", "web1") && !g("web-*", "xweb-1"));
        assert!(g("web-?", "web-1") && !g("web-?", "web-12"));
        assert!(g("*-db-*", "eu-db-3") && !g("*-db-*", "eu-db3"));
        assert!(g("a*b*c", "aXbYbZc") && !g("a*b*c", "aXbYbZ"));
        assert!(g("web1", "web1") && !g("web1", "web10"));
        for bad in ["", "web-[0-9]", "web 1", "web/1", "wéb"] {
            assert!(Glob::parse(bad).unwrap_err().contains(&format!("{bad:?}")));
        }
    }

    #[test]
    fn a_node_names_only_ids_that_start_with_its_name_and_a_dash() {
        let c = Confinement::default();
        let ok = inst("web", "web1-0123456789ab-80", Some("web1"), "10.0.0.1:80");
        assert_eq!(c.admit(Some("web1"), &ok), Ok(()));
        for id in ["db1", "web2-0123456789ab-80", "web1", "web10-x", "web1x-1"] {
            let i = inst("web", id, Some("web1"), "10.0.0.1:80");
            let r = c.admit(Some("web1"), &i).unwrap_err();
            assert_eq!(r.reason, Reason::ForeignId, "{id}");
            let rule = &r.rule;
            assert!(rule.contains("\"web1-\"") && rule.contains(id), "{rule}");
        }
        // Hand-written keys name whatever the operator likes.
        let hand = inst("web", "web2-0123456789ab-80", None, "10.0.0.1:80");
        assert_eq!(c.admit(None, &hand), Ok(()));
    }

    #[test]
    fn the_service_allow_list_names_the_node_the_service_and_the_entry() {
        let c = Confinement::new(
            BTreeMap::from([
                ("pay".into(), globs(&["pay-*"])),
                ("ops".into(), vec![]),
                ("*".into(), globs(&["web-*", "pay-*"])),
            ]),
            true,
            vec![],
        );
        let admit = |service: &str, node: &str| {
            let i = inst(service, &format!("{node}-1"), Some(node), "10.0.0.1:80");
            c.admit(Some(node), &i)
        };
        assert_eq!(admit("pay", "pay-1"), Ok(()));
        let r = admit("pay", "web-1").unwrap_err();
        assert_eq!(r.reason, Reason::Service);
        let rule = &r.rule;
        assert!(
            rule.contains("\"web-1\"") && rule.contains("\"pay\" = [\"pay-*\"]"),
            "{rule}"
        );
        // An empty list: only hand-written keys serve it.
        assert_eq!(reason(admit("ops", "web-1")), Some(Reason::Service));
        assert_eq!(
            c.admit(None, &inst("ops", "x", None, "10.0.0.1:80")),
            Ok(())
        );
        // Unlisted services fall under "*".
        assert_eq!(admit("web", "web-1"), Ok(()));
        assert_eq!(reason(admit("web", "db-1")), Some(Reason::Service));
        // Without "*", an unlisted service has no node that may serve it.
        let strict = Confinement::new(
            BTreeMap::from([("pay".into(), globs(&["pay-*"]))]),
            true,
            vec![],
        );
        let i = inst("web", "web-1-1", Some("web-1"), "10.0.0.1:80");
        let r = strict.admit(Some("web-1"), &i).unwrap_err();
        assert!(r.rule.contains("no \"*\" entry"), "{}", r.rule);
    }

    #[test]
    fn hand_written_false_refuses_every_key_under_services() {
        let c = Confinement::new(Confinement::default().services, false, vec![]);
        let hand = inst("web", "manual-1", None, "10.0.0.1:80");
        assert_eq!(reason(c.admit(None, &hand)), Some(Reason::HandWritten));
        let node = inst("web", "n-1", Some("n"), "10.0.0.1:80");
        assert_eq!(c.admit(Some("n"), &node), Ok(()));
    }

    #[test]
    fn a_nodes_instances_live_in_the_networks_of_every_glob_that_matches_it() {
        let nets = |l: &[&str]| l.iter().map(|n| n.parse().unwrap()).collect::<Vec<Cidr>>();
        let c = Confinement::new(
            Confinement::default().services,
            true,
            vec![
                (Glob::parse("web-*").unwrap(), nets(&["10.1.0.0/16"])),
                (Glob::parse("web-eu-*").unwrap(), nets(&["10.2.0.0/16"])),
            ],
        );
        let admit = |node: &str, addr: &str| {
            c.admit(
                Some(node),
                &inst("web", &format!("{node}-1"), Some(node), addr),
            )
        };
        assert_eq!(admit("web-1", "10.1.2.3:80"), Ok(()));
        assert_eq!(admit("web-eu-1", "10.2.2.3:80"), Ok(()));
        assert_eq!(admit("web-eu-1", "10.1.2.3:80"), Ok(()));
        let r = admit("web-1", "10.2.0.1:80").unwrap_err();
        assert_eq!(r.reason, Reason::NodeNetwork);
        let rule = &r.rule;
        assert!(
            rule.contains("10.2.0.1") && rule.contains("10.1.0.0/16"),
            "{rule}"
        );
        // As HAProxy reads it: 10.258 is 10.0.1.2, outside 10.1.0.0/16.
        assert_eq!(
            reason(admit("web-1", "10.258:80")),
            Some(Reason::NodeNetwork)
        );
        assert_eq!(
            reason(admit("web-1", "app.internal:80")),
            Some(Reason::NodeNetwork)
        );
        // A node no glob matches, and hand-written keys, are not bound by it.
        assert_eq!(admit("db-1", "192.168.0.1:80"), Ok(()));
        assert_eq!(
            c.admit(None, &inst("web", "m", None, "192.168.0.1:80")),
            Ok(())
        );
    }

    fn claims<'a>(list: &'a [(&'a str, Option<&'a str>, Instance)]) -> Vec<Claim<'a, ()>> {
        list.iter()
            .map(|(key, owner, instance)| Claim {
                key,
                owner: *owner,
                instance,
                value: (),
            })
            .collect()
    }

    #[test]
    fn one_server_name_is_kept_by_the_hand_written_key_then_the_longest_node_name() {
        let list = [
            (
                "nodes/web/services/s/web-1-x",
                Some("web"),
                inst("s", "web-1-x", Some("web"), "10.0.0.1:80"),
            ),
            (
                "nodes/web-1/services/s/web-1-x",
                Some("web-1"),
                inst("s", "web-1-x", Some("web-1"), "10.0.0.2:80"),
            ),
            (
                "services/s/web-1-y",
                None,
                inst("s", "web-1-y", None, "10.0.0.3:80"),
            ),
            (
                "nodes/web-1/services/s/web-1-y",
                Some("web-1"),
                inst("s", "web-1-y", Some("web-1"), "10.0.0.4:80"),
            ),
            ("services/s/z", None, inst("s", "z", None, "10.0.0.5:80")),
        ];
        // The answer does not depend on the order keys arrive in.
        for reversed in [false, true] {
            let mut c = claims(&list);
            if reversed {
                c.reverse();
            }
            let mut refused = BTreeMap::new();
            let kept: Vec<_> = settle(c, &mut refused)
                .iter()
                .map(|c| (c.instance.id.clone(), c.instance.addr.clone()))
                .collect();
            assert_eq!(
                kept,
                [
                    ("web-1-x".to_string(), "10.0.0.2:80".to_string()),
                    ("web-1-y".into(), "10.0.0.3:80".into()),
                    ("z".into(), "10.0.0.5:80".into()),
                ]
            );
            assert_eq!(
                refused.keys().collect::<Vec<_>>(),
                [
                    "nodes/web-1/services/s/web-1-y",
                    "nodes/web/services/s/web-1-x"
                ]
            );
            let r = &refused["nodes/web/services/s/web-1-x"];
            assert_eq!(r.reason, Reason::NameTaken);
            let rule = &r.rule;
            assert!(
                rule.contains("held by nodes/web-1/services/s/web-1-x"),
                "{rule}"
            );
        }
    }
}
