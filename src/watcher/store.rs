//! The in-memory mirror of `<prefix>/…` in etcd, and the snapshot templates render from.
//!
//! Pure: no I/O, no clock. The source feeds it a full listing (`Store::reset`) or
//! watch events (`Store::apply`); every key is decoded with the rules of `schema`, and a
//! key that breaks them is left out and reported as a `SchemaError` naming the key and the
//! rule. Nothing that failed validation can reach a rendered file.
//!
//! Invariant: `snapshot()` depends only on the set of valid keys and their values, in
//! sorted order, so equal etcd contents give equal snapshots and byte-identical renders.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::schema::{self, Instance, Key, NodeRecord, SchemaError};

/// One change seen on the watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Change {
    Put { key: String, value: Vec<u8> },
    Delete { key: String },
}

/// What templates see: `services`, `nodes`, `kv`. Serialised into the tera context.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct StoreSnapshot {
    /// Service name → instances sorted by id. A service with no valid instance is absent.
    pub(crate) services: BTreeMap<String, Vec<Instance>>,
    pub(crate) nodes: BTreeMap<String, NodeRecord>,
    /// Raw values under `<prefix>/config/`, by path below it. Not validated: a template
    /// that pastes a `kv` value into a config line owns that decision.
    pub(crate) kv: BTreeMap<String, String>,
}

/// The old name of `StoreSnapshot`, still used by `dev.rs`; remove once it is updated.
pub type Snapshot = StoreSnapshot;

impl StoreSnapshot {
    pub(crate) fn instance_count(&self) -> usize {
        self.services.values().map(Vec::len).sum()
    }
}

/// Decoded state, indexed by etcd key so deletes are cheap.
#[derive(Debug, Clone, Default)]
pub struct Store {
    prefix: String,
    /// service → instance id → instance.
    services: BTreeMap<String, BTreeMap<String, Instance>>,
    nodes: BTreeMap<String, NodeRecord>,
    kv: BTreeMap<String, String>,
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
        *self = Store::new(&self.prefix);
        kvs.into_iter()
            .filter_map(|(k, v)| {
                self.apply(Change::Put {
                    key: k.to_string(),
                    value: v.to_vec(),
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
            Change::Put { key, value } => {
                self.remove(&key);
                match self.decode(&key, &value) {
                    Ok(()) => None,
                    Err(w) => {
                        self.invalid.insert(key, w.rule.clone());
                        Some(w)
                    }
                }
            }
        }
    }

    fn decode(&mut self, key: &str, value: &[u8]) -> Result<(), SchemaError> {
        match schema::parse_key(&self.prefix, key)? {
            Key::Service {
                service,
                instance,
                node,
            } => {
                let inst = schema::decode_owned(key, &service, &instance, node.as_deref(), value)?;
                self.services
                    .entry(service)
                    .or_default()
                    .insert(instance, inst);
            }
            Key::Node { name } => {
                let rec: NodeRecord = serde_json::from_slice(value).map_err(|e| SchemaError {
                    key: key.to_string(),
                    rule: format!("value is not a node record: {e}"),
                })?;
                self.nodes.insert(name, rec);
            }
            // Watchers' own status records are not inputs to rendering.
            Key::Watcher { .. } => {}
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
        // A key that does not parse now never parsed: it cannot be in the maps.
        match schema::parse_key(&self.prefix, key) {
            Ok(Key::Service {
                service, instance, ..
            }) => {
                if let Some(instances) = self.services.get_mut(&service) {
                    instances.remove(&instance);
                    if instances.is_empty() {
                        self.services.remove(&service);
                    }
                }
            }
            Ok(Key::Node { name }) => {
                self.nodes.remove(&name);
            }
            Ok(Key::Config { path }) => {
                self.kv.remove(&path);
            }
            Ok(Key::Watcher { .. }) | Err(_) => {}
        }
    }

    /// Number of keys in etcd that are currently left out.
    pub(crate) fn invalid_count(&self) -> usize {
        self.invalid.len()
    }

    pub fn snapshot(&self) -> StoreSnapshot {
        StoreSnapshot {
            services: self
                .services
                .iter()
                .map(|(s, m)| (s.clone(), m.values().cloned().collect()))
                .collect(),
            nodes: self.nodes.clone(),
            kv: self.kv.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "/portolan";

    fn put(key: &str, value: &str) -> Change {
        Change::Put {
            key: key.into(),
            value: value.as_bytes().to_vec(),
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
}
