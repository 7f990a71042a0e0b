//! Reconciling this node's keys: `desired(...)` is the key set Docker and the probes ask
//! for, `plan(desired, actual)` the puts and deletes that make etcd match it. Pure; the
//! loop applies the ops in transactions.
//!
//! Invariants:
//! - Only keys under this node's prefix are ever in `actual` (`is_ours`): other nodes'
//!   keys and hand-written keys are never touched (the one-time removal of this node's
//!   v1 keys, `is_ours_v1`, is just as narrow).
//! - A key whose value is already right and whose lease is ours is left alone, so a
//!   steady state or a registrar restart writes nothing.

use std::collections::BTreeMap;

use super::probe::Verdict;
use super::selector::Registration;
use crate::schema::{self, InstanceRecord, Key, NodeRecord};

/// etcd's default `--max-txn-ops` is 128; stay well under it.
pub(crate) const MAX_TXN_OPS: usize = 64;

/// A key of this node as read from etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Actual {
    pub(crate) value: String,
    /// 0: no lease.
    pub(crate) lease: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum KeyOp {
    Put { key: String, value: String },
    Delete { key: String },
}

/// The desired key set: this node's key with `node_value`, and one key per registration
/// its probe lets through. `verdict` is the probe's state of a probed instance (None: it
/// has no probe, e.g. not started yet, so no key). A probed instance without a verdict
/// yet keeps its key only if the key is already on our lease (`present`): a restarted
/// registrar must not drop healthy instances while its probes warm up, nor register an
/// instance no probe has seen pass.
pub(crate) fn desired<'a>(
    prefix: &str,
    (node_key, node_value): (&str, &str),
    registrations: impl IntoIterator<Item = &'a Registration>,
    verdict: impl Fn(&str) -> Option<Verdict>,
    present: impl Fn(&str) -> bool,
) -> BTreeMap<String, String> {
    let mut d = BTreeMap::new();
    d.insert(node_key.to_string(), node_value.to_string());
    for r in registrations {
        let key = r.key(prefix);
        let wanted = match (&r.check, verdict(&r.instance)) {
            (None, _) => true,
            (Some(_), Some(Verdict::Up)) => true,
            (Some(_), Some(Verdict::Down)) => false,
            (Some(_), Some(Verdict::Pending)) => present(&key),
            (Some(_), None) => false,
        };
        if wanted {
            d.insert(key, r.record.to_json());
        }
    }
    d
}

/// Puts for what is missing, different or not on `lease`; deletes for what is stale.
/// Sorted by key within each kind: puts first, so a batch never leaves a service
/// emptier than it has to be.
pub(crate) fn plan(
    desired: &BTreeMap<String, String>,
    actual: &BTreeMap<String, Actual>,
    lease: i64,
) -> Vec<KeyOp> {
    let puts = desired
        .iter()
        .filter_map(|(key, value)| match actual.get(key) {
            Some(a) if a.value == *value && a.lease == lease => None,
            _ => Some(KeyOp::Put {
                key: key.clone(),
                value: value.clone(),
            }),
        });
    let deletes = actual
        .keys()
        .filter(|key| !desired.contains_key(*key))
        .map(|key| KeyOp::Delete { key: key.clone() });
    puts.chain(deletes).collect()
}

/// Whether a key read from etcd is this node's: everything under its node prefix is.
/// That prefix is all an etcd role needs to grant a Docker host, and nothing else
/// writes there. The trailing slash of the prefix matters: node `web` must not claim
/// `nodes/web-2/`.
pub(crate) fn is_ours(prefix: &str, node: &str, key: &str) -> bool {
    key.starts_with(&schema::node_prefix(prefix, node))
}

/// Whether a key under `services/` was written by a v1 registrar of this node: an
/// instance exactly `<node>-<12 hex>-<port>` whose value is an instance record naming
/// this node. The exact shape matters: node `web` must not claim
/// `web-2-3f2a9c1b7d10-80`, and a hand-written `host:port` under a lookalike key stays
/// the operator's.
pub(crate) fn is_ours_v1(prefix: &str, node: &str, key: &str, value: &[u8]) -> bool {
    let Ok(Key::Service {
        instance,
        node: None,
        ..
    }) = schema::parse_key(prefix, key)
    else {
        return false;
    };
    let Some(rest) = instance
        .strip_prefix(node)
        .and_then(|r| r.strip_prefix('-'))
    else {
        return false;
    };
    let Some((id, port)) = rest.split_once('-') else {
        return false;
    };
    let shape_ok = id.len() == 12
        && id.bytes().all(|b| b.is_ascii_hexdigit())
        && port.parse::<u16>().is_ok_and(|p| p != 0);
    shape_ok && serde_json::from_slice::<InstanceRecord>(value).is_ok_and(|r| r.node == node)
}

/// The node record to write: the one already in etcd when it is on our lease and says
/// the same (its `started_at` is older, not wrong), so a restart rewrites nothing.
pub(crate) fn node_value(want: &NodeRecord, actual: Option<&Actual>, lease: i64) -> String {
    if let Some(a) = actual.filter(|a| a.lease == lease) {
        if let Ok(have) = serde_json::from_str::<NodeRecord>(&a.value) {
            if have.name == want.name && have.addr == want.addr && have.version == want.version {
                return a.value.clone();
            }
        }
    }
    serde_json::to_string(want).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::selector::{Check, CheckKind};
    use super::*;

    const L: i64 = 7;

    fn map(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn actual(kv: &[(&str, &str, i64)]) -> BTreeMap<String, Actual> {
        kv.iter()
            .map(|(k, v, l)| {
                (
                    k.to_string(),
                    Actual {
                        value: v.to_string(),
                        lease: *l,
                    },
                )
            })
            .collect()
    }

    /// A registration of instance `name`, probed or not.
    fn reg(name: &str, probed: bool) -> Registration {
        Registration {
            service: "api".into(),
            instance: name.into(),
            record: InstanceRecord {
                addr: "10.0.0.5:1".into(),
                node: "web".into(),
                container: "3f2a9c1b7d10".into(),
                port: Some(80),
                tags: vec![],
                weight: schema::DEFAULT_WEIGHT,
                draining: false,
                route: schema::Routing::default(),
            },
            check: probed.then(|| Check {
                kind: CheckKind::Tcp,
                interval: Duration::from_secs(5),
                timeout: Duration::from_secs(2),
                fall: 3,
                rise: 2,
            }),
        }
    }

    /// The instance names `desired` keeps for `regs`, the node key aside.
    fn kept(regs: &[Registration], verdicts: &[(&str, Verdict)], present: &[&str]) -> Vec<String> {
        let verdicts: BTreeMap<&str, Verdict> = verdicts.iter().copied().collect();
        let d = desired(
            "/p",
            ("/p/nodes/web/node", "{}"),
            regs,
            |i| verdicts.get(i).copied(),
            |key| present.iter().any(|i| key.ends_with(&format!("/{i}"))),
        );
        assert_eq!(d.get("/p/nodes/web/node").map(String::as_str), Some("{}"));
        d.keys()
            .filter_map(|k| k.strip_prefix("/p/nodes/web/services/api/"))
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn an_unprobed_instance_is_always_wanted() {
        assert_eq!(kept(&[reg("a", false)], &[], &[]), vec!["a"]);
    }

    #[test]
    fn a_probe_verdict_decides() {
        let regs = [reg("up", true), reg("down", true)];
        let verdicts = [("up", Verdict::Up), ("down", Verdict::Down)];
        assert_eq!(kept(&regs, &verdicts, &[]), vec!["up"]);
        // A key already on our lease goes once the probe says down.
        assert_eq!(kept(&regs, &verdicts, &["up", "down"]), vec!["up"]);
    }

    #[test]
    fn a_warming_up_probe_keeps_only_a_key_already_on_our_lease() {
        let regs = [reg("had", true), reg("new", true)];
        let verdicts = [("had", Verdict::Pending), ("new", Verdict::Pending)];
        assert_eq!(kept(&regs, &verdicts, &["had"]), vec!["had"]);
        assert!(kept(&regs, &verdicts, &[]).is_empty());
    }

    #[test]
    fn a_probed_instance_without_a_probe_gets_no_key() {
        assert!(kept(&[reg("a", true)], &[], &["a"]).is_empty());
    }

    #[test]
    fn a_draining_instance_keeps_its_key_with_the_flag_and_is_put_once() {
        let mut r = reg("a", false);
        r.record.draining = true;
        let d = desired("/p", ("/p/nodes/web/node", "{}"), [&r], |_| None, |_| false);
        let key = "/p/nodes/web/services/api/a";
        assert!(d[key].contains(r#""draining":true"#), "{}", d[key]);
        let before = actual(&[(key, &reg("a", false).record.to_json(), L)]);
        let ops = plan(&d, &before, L);
        assert!(
            ops.iter()
                .any(|op| matches!(op, KeyOp::Put { key: k, .. } if k == key)),
            "{ops:?}"
        );
        let after = actual(&[("/p/nodes/web/node", "{}", L), (key, &d[key], L)]);
        assert!(plan(&d, &after, L).is_empty(), "a resync rewrites nothing");
    }

    #[test]
    fn steady_state_is_no_ops() {
        let d = map(&[("a", "1"), ("b", "2")]);
        assert!(plan(&d, &actual(&[("a", "1", L), ("b", "2", L)]), L).is_empty());
        assert!(plan(&BTreeMap::new(), &BTreeMap::new(), L).is_empty());
    }

    #[test]
    fn puts_missing_changed_and_foreign_lease_deletes_stale() {
        let d = map(&[("a", "1"), ("b", "2"), ("c", "3"), ("d", "4")]);
        let a = actual(&[
            ("b", "old", L),
            ("c", "3", 99),
            ("d", "4", L),
            ("e", "5", L),
            ("f", "6", 0),
        ]);
        assert_eq!(
            plan(&d, &a, L),
            vec![
                KeyOp::Put {
                    key: "a".into(),
                    value: "1".into()
                },
                KeyOp::Put {
                    key: "b".into(),
                    value: "2".into()
                },
                KeyOp::Put {
                    key: "c".into(),
                    value: "3".into()
                },
                KeyOp::Delete { key: "e".into() },
                KeyOp::Delete { key: "f".into() },
            ]
        );
    }

    #[test]
    fn lost_lease_puts_everything() {
        let d = map(&[("a", "1"), ("b", "2")]);
        let a = actual(&[("a", "1", L), ("b", "2", L)]);
        assert_eq!(plan(&d, &a, L + 1).len(), 2);
    }

    #[test]
    fn everything_under_our_node_prefix_is_ours_and_nothing_else() {
        let p = "/portolan";
        for key in [
            "/portolan/nodes/web/node",
            "/portolan/nodes/web/services/api/web-3f2a9c1b7d10-80",
            "/portolan/nodes/web/services/api/anything",
            "/portolan/nodes/web/leftover",
        ] {
            assert!(is_ours(p, "web", key), "{key}");
        }
        for key in [
            // Another node, even one whose name extends ours.
            "/portolan/nodes/web-2/node",
            "/portolan/nodes/web-2/services/api/web-3f2a9c1b7d10-80",
            // v1's node record is not under the prefix: only the migration deletes it.
            "/portolan/nodes/web",
            "/portolan/services/api/web-3f2a9c1b7d10-80",
            "/portolan/watchers/web",
            "/other/nodes/web/node",
        ] {
            assert!(!is_ours(p, "web", key), "{key}");
        }
    }

    #[test]
    fn v1_ownership() {
        let p = "/portolan";
        let rec = |node: &str| {
            format!(
                r#"{{"addr":"10.0.0.5:1","node":"{node}","container":"3f2a9c1b7d10","port":80}}"#
            )
        };
        let ours = rec("web");
        assert!(is_ours_v1(
            p,
            "web",
            "/portolan/services/api/web-3f2a9c1b7d10-80",
            ours.as_bytes()
        ));
        // Another node, even one whose name extends ours.
        assert!(!is_ours_v1(
            p,
            "web",
            "/portolan/services/api/web-2-3f2a9c1b7d10-80",
            rec("web-2").as_bytes()
        ));
        assert!(!is_ours_v1(
            p,
            "web",
            "/portolan/services/api/web-3f2a9c1b7d10-80",
            rec("other").as_bytes()
        ));
        // Hand-written values and lookalike keys.
        for (key, value) in [
            (
                "/portolan/services/api/web-3f2a9c1b7d10-80",
                &b"10.0.0.9:80"[..],
            ),
            ("/portolan/services/api/web-manual-1", ours.as_bytes()),
            (
                "/portolan/services/api/web-3f2a9c1b7d1x-80",
                ours.as_bytes(),
            ),
            ("/portolan/services/api/web-3f2a9c1b7d10-0", ours.as_bytes()),
            ("/other/services/api/web-3f2a9c1b7d10-80", ours.as_bytes()),
            // v2 keys are not the migration's business.
            (
                "/portolan/nodes/web/services/api/web-3f2a9c1b7d10-80",
                ours.as_bytes(),
            ),
            ("/portolan/nodes/web", b"{}"),
        ] {
            assert!(!is_ours_v1(p, "web", key, value), "{key}");
        }
    }

    #[test]
    fn node_record_survives_a_restart() {
        let want = NodeRecord {
            name: "web".into(),
            addr: "10.0.0.5".into(),
            version: "0.1.0".into(),
            started_at: 200,
        };
        let older = NodeRecord {
            started_at: 100,
            ..want.clone()
        };
        let older_json = serde_json::to_string(&older).unwrap();
        let have = Actual {
            value: older_json.clone(),
            lease: L,
        };
        assert_eq!(node_value(&want, Some(&have), L), older_json);
        // Another lease, another address or nothing at all: write ours.
        let want_json = serde_json::to_string(&want).unwrap();
        assert_eq!(node_value(&want, Some(&have), L + 1), want_json);
        let moved = Actual {
            value: serde_json::to_string(&NodeRecord {
                addr: "10.0.0.6".into(),
                ..older
            })
            .unwrap(),
            lease: L,
        };
        assert_eq!(node_value(&want, Some(&moved), L), want_json);
        assert_eq!(node_value(&want, None, L), want_json);
    }
}
