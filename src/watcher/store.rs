//! The in-memory mirror of `<prefix>/…` in etcd, and the snapshot templates render from.
//!
//! Pure: no I/O, no clock. The source feeds it a full listing (`Store::reset`) or
//! watch events (`Store::apply`); every key is decoded with the rules of `schema` (node
//! records with the stricter rules of `check_node` too), and a key that breaks them is
//! left out and reported as a `SchemaError` naming the key and the rule. Nothing that
//! failed validation can reach a rendered file.
//!
//! Everything is indexed by etcd key, because one (service, instance id) can live under
//! two keys at once — a hand-written `services/web/x` beside a node's
//! `nodes/n/services/web/x`, or the v1 and v2 keys of one container while its registrar
//! is upgraded — and deleting one key must never remove the other's instance. An
//! instance under `nodes/<n>/` is `(n, id)`: the snapshot judges each key by its owner
//! and never lets one key take another's server name (`confine`: the hand-written key
//! keeps it, the other is refused and named). Node records: `nodes/<n>/node` wins over
//! v1 `nodes/<n>`.
//!
//! Invariant: `snapshot()` depends only on the set of valid keys and their values, in
//! sorted order, so equal etcd contents give equal snapshots and byte-identical renders.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use serde::Serialize;

use super::confine::{self, Claim, Confinement, Refusal};
use crate::schema::{self, Instance, Key, NodeRecord, SchemaError};

/// One change seen on the watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Change {
    /// `created`: the key's etcd create revision (0 when unknown), which orders
    /// instances by age (`Instance::created`).
    Put {
        key: String,
        value: Vec<u8>,
        created: i64,
    },
    Delete {
        key: String,
    },
}

/// What templates see: `services`, `nodes`, `kv`. Serialised into the tera context.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct StoreSnapshot {
    /// Service name → instances sorted by id. A service with no valid instance is absent
    /// (in the watcher: empty, while its backend lingers, see `linger`).
    /// Instances are shared with the store (and between snapshots): a snapshot costs a
    /// pointer per instance, not a copy.
    pub(crate) services: BTreeMap<String, Vec<Arc<Instance>>>,
    pub(crate) nodes: BTreeMap<String, NodeRecord>,
    /// Raw values under `<prefix>/config/`, by path below it. Not validated here: a
    /// template pastes one into a config line only through the `haproxy_arg` filter.
    pub(crate) kv: BTreeMap<String, String>,
    /// Raw values under `<prefix>/certs/`, by name, judged by `watcher::tls` (which
    /// keeps serving the last good one of a name whose new value it refuses). Never
    /// serialised: they hold private keys, and snapshots reach the status page.
    #[serde(skip)]
    pub(crate) certs: BTreeMap<String, Arc<[u8]>>,
}

impl StoreSnapshot {
    pub(crate) fn instance_count(&self) -> usize {
        self.services.values().map(Vec::len).sum()
    }
}

/// An instance and whether its key lies under a node's prefix (`nodes/<n>/services/…`).
#[derive(Debug, Clone)]
struct Stored {
    node_scoped: bool,
    instance: Arc<Instance>,
}

/// Decoded state, indexed by etcd key (see the module docs for why).
#[derive(Debug, Clone, Default)]
pub struct Store {
    prefix: String,
    /// etcd key → instance.
    instances: BTreeMap<String, Stored>,
    /// etcd key → (v2 key, node name, record).
    nodes: BTreeMap<String, (bool, String, NodeRecord)>,
    kv: BTreeMap<String, String>,
    certs: BTreeMap<String, Arc<[u8]>>,
    /// Keys currently in etcd that were left out, with the rule they broke.
    invalid: BTreeMap<String, String>,
}

impl Store {
    pub fn new(prefix: &str) -> Store {
        Store {
            prefix: prefix.to_string(),
            ..Default::default()
        }
    }

    /// Replaces everything with a full listing. Returns the warnings for invalid keys.
    pub fn reset<'a>(
        &mut self,
        kvs: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    ) -> Vec<SchemaError> {
        self.reset_created(kvs.into_iter().map(|(k, v)| (k, v, 0)))
    }

    /// `reset` with each key's etcd create revision (`Change::Put::created`).
    pub fn reset_created<'a>(
        &mut self,
        kvs: impl IntoIterator<Item = (&'a str, &'a [u8], i64)>,
    ) -> Vec<SchemaError> {
        *self = Store::new(&self.prefix);
        kvs.into_iter()
            .filter_map(|(k, v, created)| {
                self.apply(Change::Put {
                    key: k.to_string(),
                    value: v.to_vec(),
                    created,
                })
            })
            .collect()
    }

    /// Applies one watch event. Returns a warning when a put carried an invalid key or value;
    /// the key is then left out (and an earlier valid value for it is dropped, since etcd no
    /// longer holds it).
    pub(crate) fn apply(&mut self, change: Change) -> Option<SchemaError> {
        match change {
            Change::Delete { key } => {
                self.remove(&key);
                None
            }
            Change::Put {
                key,
                value,
                created,
            } => {
                self.remove(&key);
                match self.decode(&key, &value, created) {
                    Ok(()) => None,
                    Err(w) => {
                        self.invalid.insert(key, w.rule.clone());
                        Some(w)
                    }
                }
            }
        }
    }

    /// Records a key the listing could not even read (`etcd::Listing::too_large`):
    /// left out and counted like any invalid key, until etcd deletes or replaces it.
    pub(crate) fn refuse(&mut self, e: SchemaError) {
        self.remove(&e.key);
        self.invalid.insert(e.key, e.rule);
    }

    fn decode(&mut self, key: &str, value: &[u8], created: i64) -> Result<(), SchemaError> {
        match schema::parse_key(&self.prefix, key)? {
            Key::Service {
                service,
                instance,
                node,
            } => {
                let mut inst =
                    schema::decode_owned(key, &service, &instance, node.as_deref(), value)?;
                inst.created = created;
                self.instances.insert(
                    key.to_string(),
                    Stored {
                        node_scoped: node.is_some(),
                        instance: Arc::new(inst),
                    },
                );
            }
            Key::Node { name } => {
                schema::check_record_size(key, value)?;
                let rec: NodeRecord = serde_json::from_slice(value).map_err(|e| SchemaError {
                    key: key.to_string(),
                    rule: format!("value is not a node record: {e}"),
                })?;
                check_node(&name, &rec).map_err(|rule| SchemaError {
                    key: key.to_string(),
                    rule,
                })?;
                let v2 = key == schema::node_key(&self.prefix, &name);
                self.nodes.insert(key.to_string(), (v2, name, rec));
            }
            // Watchers' own status records and the issuer's state are not inputs to
            // rendering.
            Key::Watcher { .. } | Key::Acme => {}
            Key::Cert { name } => {
                self.certs.insert(name, value.into());
            }
            Key::Config { path } => {
                let text = String::from_utf8(value.to_vec()).map_err(|_| SchemaError {
                    key: key.to_string(),
                    rule: "config values must be UTF-8".into(),
                })?;
                self.kv.insert(path, text);
            }
        }
        Ok(())
    }

    fn remove(&mut self, key: &str) {
        self.invalid.remove(key);
        self.instances.remove(key);
        self.nodes.remove(key);
        match schema::parse_key(&self.prefix, key) {
            Ok(Key::Config { path }) => {
                self.kv.remove(&path);
            }
            Ok(Key::Cert { name }) => {
                self.certs.remove(&name);
            }
            _ => {}
        }
    }

    /// The keys in etcd left out now, with the rule each broke (the status page).
    pub(crate) fn left_out(&self) -> &BTreeMap<String, String> {
        &self.invalid
    }

    /// Number of keys in etcd that are currently left out.
    pub(crate) fn invalid_count(&self) -> usize {
        self.invalid.len()
    }

    /// The snapshot under the default confinement, every address routed (benches,
    /// golden files).
    pub fn snapshot(&self) -> StoreSnapshot {
        self.snapshot_where(&Confinement::default(), |_, _| true, &mut BTreeMap::new())
    }

    /// The snapshot of what the policy admits. Every instance key is judged by its owner
    /// (`confine::Confinement::admit`); the admitted keys of each service claim their
    /// server names (`confine::settle`); only then is each holder's address asked to
    /// `route` (the address policy), so a key whose address is refused still holds its
    /// name and no other key takes its place. Keys refused by confinement go to
    /// `refused`, with the rule.
    pub(crate) fn snapshot_where(
        &self,
        confinement: &Confinement,
        mut route: impl FnMut(&str, &Instance) -> bool,
        refused: &mut BTreeMap<String, Refusal>,
    ) -> StoreSnapshot {
        // Grouped by service first and each group settled on its own: this runs on
        // every change over every instance, and many small sorts stay in cache where
        // one big one does not (`cargo bench --bench heap`: 77 → 36 ms at 100,000
        // instances).
        let mut by_service: HashMap<&str, Vec<Claim<'_, &Arc<Instance>>>> = HashMap::new();
        for (key, stored) in &self.instances {
            let owner = stored.node_scoped.then_some(stored.instance.node.as_str());
            match confinement.admit(owner, &stored.instance) {
                Ok(()) => by_service
                    .entry(stored.instance.service.as_str())
                    .or_default()
                    .push(Claim {
                        key,
                        owner,
                        instance: &stored.instance,
                        value: &stored.instance,
                    }),
                Err(r) => {
                    refused.insert(key.clone(), r);
                }
            }
        }
        let mut services: BTreeMap<String, Vec<Arc<Instance>>> = BTreeMap::new();
        for (service, claims) in by_service {
            let routed: Vec<Arc<Instance>> = confine::settle(claims, refused)
                .into_iter()
                .filter(|c| route(c.key, c.instance))
                .map(|c| c.value.clone())
                .collect();
            if !routed.is_empty() {
                services.insert(service.to_string(), routed);
            }
        }
        let mut nodes: BTreeMap<String, (bool, NodeRecord)> = BTreeMap::new();
        for (v2, name, rec) in self.nodes.values() {
            nodes
                .entry(name.clone())
                .and_modify(|cur| {
                    if *v2 && !cur.0 {
                        *cur = (*v2, rec.clone());
                    }
                })
                .or_insert((*v2, rec.clone()));
        }
        StoreSnapshot {
            services,
            nodes: nodes.into_iter().map(|(n, (_, r))| (n, r)).collect(),
            kv: self.kv.clone(),
            certs: self.certs.clone(),
        }
    }
}

/// A node record reaches templates, so its fields must be safe inside a config line:
/// `name` is the key's node (a record cannot speak for another node), `addr` an IP
/// address or DNS name, `version` a short token. Returns the rule broken.
fn check_node(key_node: &str, rec: &NodeRecord) -> Result<(), String> {
    if rec.name != key_node {
        return Err(format!(
            "the record names node {:?} but the key is node {key_node:?}",
            rec.name
        ));
    }
    if !is_host(&rec.addr) {
        return Err(format!(
            "addr {:?} is not an IP address or DNS name",
            rec.addr
        ));
    }
    let token = |c: u8| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b'_' | b'+' | b'~');
    if rec.version.len() > 64 || !rec.version.bytes().all(token) {
        return Err(format!(
            "version {:?} must match [A-Za-z0-9._+~-]{{0,64}}",
            rec.version
        ));
    }
    Ok(())
}

/// An IP address, or a DNS name as `schema::Addr` accepts one as a host.
fn is_host(s: &str) -> bool {
    s.parse::<IpAddr>().is_ok()
        || (!s.is_empty()
            && s.len() <= 253
            && !s.starts_with(['-', '.'])
            && s.bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.')))
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "/portolan";

    fn put(key: &str, value: &str) -> Change {
        Change::Put {
            key: key.into(),
            value: value.as_bytes().to_vec(),
            created: 0,
        }
    }

    #[test]
    fn instances_sorted_by_id_and_services_by_name() {
        let mut s = Store::new(P);
        assert!(s
            .apply(put("/portolan/services/web/b", "10.0.0.2:80"))
            .is_none());
        assert!(s
            .apply(put("/portolan/services/web/a", "10.0.0.1:80"))
            .is_none());
        assert!(s
            .apply(put("/portolan/services/api/x", "10.0.0.3:80"))
            .is_none());
        let snap = s.snapshot();
        assert_eq!(snap.services.keys().collect::<Vec<_>>(), ["api", "web"]);
        let ids: Vec<_> = snap.services["web"].iter().map(|i| i.id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        assert_eq!(snap.instance_count(), 3);
    }

    #[test]
    fn delete_removes_and_empty_service_vanishes() {
        let mut s = Store::new(P);
        s.apply(put("/portolan/services/web/a", "10.0.0.1:80"));
        s.apply(Change::Delete {
            key: "/portolan/services/web/a".into(),
        });
        assert!(s.snapshot().services.is_empty());
        // Deleting something never seen, or an invalid key, is harmless.
        s.apply(Change::Delete {
            key: "/portolan/services/we b/a".into(),
        });
        assert_eq!(s.snapshot(), StoreSnapshot::default());
    }

    #[test]
    fn invalid_keys_and_values_are_left_out_with_a_named_rule() {
        let mut s = Store::new(P);
        for (k, v) in [
            ("/portolan/services/web bind/a", "10.0.0.1:80"),
            ("/portolan/services/web/a", "10.0.0.1:80\n  bind :9999"),
            ("/portolan/services/web/b", "10.0.0.1:80 backup"),
            (
                "/portolan/services/web/c",
                r#"{"addr":"1.2.3.4:80","tags":["x y"]}"#,
            ),
            ("/portolan/nodes/n1", "not json"),
            ("/portolan/bogus/x", "1"),
        ] {
            let w = s.apply(put(k, v)).expect("a warning");
            assert_eq!(w.key, k);
            assert!(!w.rule.is_empty());
        }
        assert!(s.snapshot().services.is_empty());
        assert_eq!(s.invalid_count(), 6);
    }

    #[test]
    fn certificates_are_kept_raw_by_name_and_never_serialised() {
        let mut s = Store::new(P);
        let secret = r#"{"key":"-----BEGIN PRIVATE KEY----- secret"}"#;
        assert!(s.apply(put("/portolan/certs/web", secret)).is_none());
        assert!(s.apply(put("/portolan/acme/account", "k")).is_none());
        let snap = s.snapshot();
        assert_eq!(&*snap.certs["web"], secret.as_bytes());
        // Snapshots reach the status page (/api/status): no key may, in any spelling.
        let json = serde_json::to_value(&snap).unwrap();
        assert!(json.get("certs").is_none(), "{json}");
        assert!(!json.to_string().contains("PRIVATE KEY"), "{json}");
        s.apply(Change::Delete {
            key: "/portolan/certs/web".into(),
        });
        assert!(s.snapshot().certs.is_empty());
        assert_eq!(s.invalid_count(), 0);
    }

    #[test]
    fn a_valid_key_overwritten_by_an_invalid_value_disappears() {
        let mut s = Store::new(P);
        s.apply(put("/portolan/services/web/a", "10.0.0.1:80"));
        assert!(s.apply(put("/portolan/services/web/a", "nope")).is_some());
        assert!(s.snapshot().services.is_empty());
        assert_eq!(s.invalid_count(), 1);
        s.apply(put("/portolan/services/web/a", "10.0.0.1:81"));
        assert_eq!(s.invalid_count(), 0);
        assert_eq!(s.snapshot().services["web"][0].port, 81);
    }

    #[test]
    fn reset_replaces_everything_and_ignores_watcher_status() {
        let mut s = Store::new(P);
        s.apply(put("/portolan/services/old/a", "10.0.0.1:80"));
        let warnings = s.reset([
            ("/portolan/services/web/a", &b"10.0.0.1:80"[..]),
            ("/portolan/config/domain", b"example.org"),
            ("/portolan/watchers/lb-1", b"{}"),
            ("/portolan/services/web/bad", b"x"),
        ]);
        assert_eq!(warnings.len(), 1);
        let snap = s.snapshot();
        assert_eq!(snap.services.keys().collect::<Vec<_>>(), ["web"]);
        assert_eq!(snap.kv["domain"], "example.org");
    }

    #[test]
    fn nodes_decode() {
        let mut s = Store::new(P);
        let rec = r#"{"name":"h1","addr":"10.0.0.1","version":"0.1.0","started_at":1}"#;
        assert!(s.apply(put("/portolan/nodes/h1", rec)).is_none());
        assert_eq!(s.snapshot().nodes["h1"].addr, "10.0.0.1");
    }

    fn node(name: &str, addr: &str) -> String {
        format!(r#"{{"name":"{name}","addr":"{addr}","version":"0.2.0","started_at":1}}"#)
    }

    #[test]
    fn deleting_one_of_a_v1_and_a_v2_key_of_one_id_keeps_the_other() {
        let v1 = "/portolan/services/web/h1-abc-80";
        let v2 = "/portolan/nodes/h1/services/web/h1-abc-80";
        // (key deleted, address left, node left)
        for (deleted, addr, node) in [(v1, "10.0.0.2:80", "h1"), (v2, "10.0.0.1:80", "")] {
            let mut s = Store::new(P);
            s.apply(put(v1, "10.0.0.1:80"));
            s.apply(put(v2, r#"{"addr":"10.0.0.2:80"}"#));
            s.apply(Change::Delete {
                key: deleted.into(),
            });
            let snap = s.snapshot();
            assert_eq!(snap.services["web"].len(), 1, "{deleted}");
            assert_eq!(snap.services["web"][0].addr, addr, "{deleted}");
            assert_eq!(snap.services["web"][0].node, node, "{deleted}");
        }
    }

    fn routed(snap: &StoreSnapshot, service: &str) -> Vec<(String, String)> {
        snap.services[service]
            .iter()
            .map(|i| (i.id.clone(), i.addr.clone()))
            .collect()
    }

    #[test]
    fn a_node_key_never_shadows_a_hand_written_instance_or_another_nodes() {
        let mut s = Store::new(P);
        s.apply(put("/portolan/services/web/db1", "10.0.0.1:80"));
        s.apply(put(
            "/portolan/nodes/web2/services/pay/web2-0123456789ab-8080",
            r#"{"addr":"10.0.0.2:80"}"#,
        ));
        // web1, writing only under its own prefix, claims both ids.
        s.apply(put(
            "/portolan/nodes/web1/services/web/db1",
            r#"{"addr":"10.6.6.6:80"}"#,
        ));
        s.apply(put(
            "/portolan/nodes/web1/services/pay/web2-0123456789ab-8080",
            r#"{"addr":"10.6.6.6:80"}"#,
        ));
        let mut refused = BTreeMap::new();
        let snap = s.snapshot_where(&Confinement::default(), |_, _| true, &mut refused);
        assert_eq!(routed(&snap, "web"), [("db1".into(), "10.0.0.1:80".into())]);
        assert_eq!(
            routed(&snap, "pay"),
            [("web2-0123456789ab-8080".into(), "10.0.0.2:80".into())]
        );
        assert_eq!(
            refused.keys().collect::<Vec<_>>(),
            [
                "/portolan/nodes/web1/services/pay/web2-0123456789ab-8080",
                "/portolan/nodes/web1/services/web/db1"
            ]
        );
        assert!(refused
            .values()
            .all(|r| r.reason == confine::Reason::ForeignId));
    }

    #[test]
    fn two_keys_of_one_server_name_never_merge_whatever_order_they_arrive_in() {
        let keys = [
            ("/portolan/services/web/web1-x", "10.0.0.1:80"),
            (
                "/portolan/nodes/web1/services/web/web1-x",
                r#"{"addr":"10.0.0.2:80"}"#,
            ),
            (
                "/portolan/nodes/web-1/services/web/web-1-y",
                r#"{"addr":"10.0.0.3:80"}"#,
            ),
            (
                "/portolan/nodes/web/services/web/web-1-y",
                r#"{"addr":"10.0.0.4:80"}"#,
            ),
        ];
        for order in [[0, 1, 2, 3], [3, 2, 1, 0]] {
            let mut s = Store::new(P);
            for i in order {
                s.apply(put(keys[i].0, keys[i].1));
            }
            let mut refused = BTreeMap::new();
            let snap = s.snapshot_where(&Confinement::default(), |_, _| true, &mut refused);
            assert_eq!(
                routed(&snap, "web"),
                [
                    ("web-1-y".into(), "10.0.0.3:80".into()),
                    ("web1-x".into(), "10.0.0.1:80".into())
                ]
            );
            let r = &refused["/portolan/nodes/web1/services/web/web1-x"];
            assert_eq!(r.reason, confine::Reason::NameTaken);
            let rule = &r.rule;
            assert!(
                rule.contains("held by /portolan/services/web/web1-x"),
                "{rule}"
            );
            assert!(refused.contains_key("/portolan/nodes/web/services/web/web-1-y"));
        }
    }

    #[test]
    fn a_key_whose_address_is_refused_still_holds_its_server_name() {
        let mut s = Store::new(P);
        s.apply(put("/portolan/services/web/n-x", "127.0.0.1:80"));
        s.apply(put(
            "/portolan/nodes/n/services/web/n-x",
            r#"{"addr":"10.0.0.1:80"}"#,
        ));
        let mut asked = Vec::new();
        let mut refused = BTreeMap::new();
        let snap = s.snapshot_where(
            &Confinement::default(),
            |k, i| {
                asked.push(k.to_string());
                i.host != "127.0.0.1"
            },
            &mut refused,
        );
        // The node's key does not step in for the operator's while it is refused.
        assert_eq!(asked, ["/portolan/services/web/n-x"]);
        assert!(snap.services.is_empty());
        assert!(refused.contains_key("/portolan/nodes/n/services/web/n-x"));
    }

    #[test]
    fn the_v2_node_record_wins_and_deleting_the_v1_one_keeps_it() {
        let mut s = Store::new(P);
        assert!(s
            .apply(put("/portolan/nodes/h1/node", &node("h1", "10.0.0.2")))
            .is_none());
        assert!(s
            .apply(put("/portolan/nodes/h1", &node("h1", "10.0.0.1")))
            .is_none());
        assert_eq!(s.snapshot().nodes["h1"].addr, "10.0.0.2");
        s.apply(Change::Delete {
            key: "/portolan/nodes/h1".into(),
        });
        assert_eq!(s.snapshot().nodes["h1"].addr, "10.0.0.2");
        // A node named "node" in v1 (`nodes/node`) is not mistaken for a v2 key.
        assert!(s
            .apply(put("/portolan/nodes/node", &node("node", "10.0.0.3")))
            .is_none());
        assert!(s
            .apply(put("/portolan/nodes/node/node", &node("node", "10.0.0.4")))
            .is_none());
        assert_eq!(s.snapshot().nodes["node"].addr, "10.0.0.4");
    }

    #[test]
    fn node_records_that_could_break_a_config_line_are_left_out() {
        let mut s = Store::new(P);
        for (key, value) in [
            ("/portolan/nodes/h1/node", node("h2", "10.0.0.1")),
            (
                "/portolan/nodes/h1/node",
                node("h1", "10.0.0.1\n    bind :9999"),
            ),
            ("/portolan/nodes/h1/node", node("h1", "10.0.0.1 backup")),
            ("/portolan/nodes/h1/node", node("h1", "")),
            (
                "/portolan/nodes/h1/node",
                r#"{"name":"h1","addr":"10.0.0.1","version":"1 #x","started_at":1}"#.into(),
            ),
            (
                "/portolan/nodes/h1",
                r#"{"name":"h1","addr":"10.0.0.1","version":"1\u0007","started_at":1}"#.into(),
            ),
        ] {
            let w = s.apply(put(key, &value)).expect("a warning");
            assert_eq!(w.key, key);
            assert!(!w.rule.is_empty());
        }
        assert!(s.snapshot().nodes.is_empty());
        assert!(s
            .apply(put(
                "/portolan/nodes/h1/node",
                &node("h1", "lb.example.org")
            ))
            .is_none());
        assert!(s
            .apply(put("/portolan/nodes/h2/node", &node("h2", "fd00::1")))
            .is_none());
        assert_eq!(s.snapshot().nodes.len(), 2);
    }
}
