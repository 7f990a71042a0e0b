//! `portolan ls`: services and instances from etcd, as a table or JSON.
//!
//! One `get --prefix <prefix>/services/[<service>/]` reads the state, then one
//! `LeaseTimeToLive` per distinct lease (one per registrar node in practice). Decoding
//! goes through `schema`, exactly as the watcher does, so `ls` shows what a rendered
//! file would contain; a key the watcher would skip is reported on stderr, naming the
//! key and the rule it broke, and listed under `skipped` in the JSON.
//!
//! There is no AGE column: etcd stores no timestamps (revisions are counters) and the
//! instance record carries none, so any age shown would be invented. The LEASE column
//! shows what etcd does know: the seconds the key has left unless its registrar keeps
//! the lease alive, out of the lease's TTL (`7s/10s`). A live registrar refreshes at a
//! third of the TTL, so a value well below two thirds of the TTL means the host has
//! stopped refreshing; `-` is a key without a lease (written by hand, permanent);
//! `expired` is a key whose lease ran out while `ls` was reading.
//!
//! The JSON document (stable; fields are only ever added):
//!
//! ```json
//! {"prefix": "/portolan", "revision": 42,
//!  "services": {"web": [{"id": "...", "addr": "10.0.0.5:32768", "host": "10.0.0.5",
//!     "port": 32768, "node": "host-a", "container": "3f2a9c1b7d10", "tags": ["v2"],
//!     "weight": 100, "lease": {"id": "694d7f2a3b0c1d05", "ttl": 7, "granted_ttl": 10}}]},
//!  "skipped": [{"key": "...", "reason": "..."}],
//!  "refused": [{"key": "...", "reason": "foreign_id", "rule": "..."}]}
//! ```
//!
//! `refused` lists keys that decode but that the watcher refuses (`watcher::confine`:
//! a node's key naming an id not its own, a server name another key holds, and by the
//! `[watcher]` rules of the config file a node outside a service's globs or its
//! networks): they are judged exactly as the watcher judges them, so no two rows of
//! the table would render as one server. (The address policy, `allowed_networks` and
//! DNS, is the watcher's alone: `ls` does not apply it.)
//!
//! `node` and `container` are `null` for hand-written `host:port` values; `lease` is
//! `null` for keys without one; an expired lease has `"ttl": -1` (etcd's convention).

use std::collections::BTreeMap;

use anyhow::Context;

use crate::config::EtcdConfig;
use crate::etcd;
use crate::schema::{self, Instance, Key, SchemaError};
use crate::watcher::confine::{self, Claim, Confinement, Reason};

mod json;
pub use json::json;

/// One key/value as read from etcd, before decoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawKv {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    /// 0 when the key has no lease.
    pub lease: i64,
}

/// What etcd said about a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    Live { ttl: i64, granted_ttl: i64 },
    Expired,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lease {
    None,
    Live { id: i64, ttl: i64, granted_ttl: i64 },
    Expired { id: i64 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub instance: Instance,
    pub lease: Lease,
}

/// Everything `ls` shows. Services and their instances are sorted by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub prefix: String,
    pub revision: i64,
    pub services: BTreeMap<String, Vec<Entry>>,
    /// Keys the watcher would skip, in key order.
    pub skipped: Vec<SchemaError>,
    /// Valid keys confinement refuses (`watcher::confine`), in key order.
    pub refused: Vec<Refused>,
    /// What the watchers' status records say about contested routes
    /// (`watcher::routes`): `watcher <name>: <sentence>`.
    pub route_conflicts: Vec<String>,
}

/// A key that decodes but is refused: who wrote it may not say what it says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub key: String,
    pub reason: Reason,
    pub rule: String,
}

impl Snapshot {
    pub fn instance_count(&self) -> usize {
        self.services.values().map(Vec::len).sum()
    }
}

/// Where `ls` looks for instances, for messages: hand-written ones under `services/`,
/// registrars' under `nodes/<node>/services/`.
pub fn read_prefix(prefix: &str, service: Option<&str>) -> String {
    match service {
        Some(s) => format!("{prefix}/{{services,nodes/*/services}}/{s}/"),
        None => format!("{prefix}/{{services,nodes/*/services}}/"),
    }
}

/// Lease ids worth asking etcd about: those of keys that decode.
pub fn leases_to_look_up(prefix: &str, kvs: &[RawKv]) -> Vec<i64> {
    let mut ids: Vec<i64> = kvs
        .iter()
        .filter(|kv| kv.lease != 0 && matches!(decode(prefix, kv), Some(Ok(_))))
        .map(|kv| kv.lease)
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// An instance key decoded, an instance key that breaks the schema, or None for every
/// other key (node records, watchers' status, config).
fn decode(prefix: &str, kv: &RawKv) -> Option<Result<Instance, SchemaError>> {
    let key = String::from_utf8_lossy(&kv.key);
    match schema::parse_key(prefix, &key) {
        Ok(Key::Service {
            service,
            instance,
            node,
        }) => Some(schema::decode_owned(
            &key,
            &service,
            &instance,
            node.as_deref(),
            &kv.value,
        )),
        Ok(_) => None,
        // A broken key is worth a warning where instances live.
        Err(e) => is_instance_path(prefix, &key).then_some(Err(e)),
    }
}

fn is_instance_path(prefix: &str, key: &str) -> bool {
    let Some(rest) = key.strip_prefix(prefix) else {
        return false;
    };
    rest.starts_with("/services/")
        || (rest.starts_with("/nodes/")
            && rest
                .splitn(4, '/')
                .nth(3)
                .is_some_and(|r| r.starts_with("services/")))
}

/// Keeps the keys of `service` only: its instances, and broken keys on its paths.
pub fn only_service(prefix: &str, service: &str, kvs: Vec<RawKv>) -> Vec<RawKv> {
    let path = format!("/services/{service}/");
    kvs.into_iter()
        .filter(|kv| match decode(prefix, kv) {
            Some(Ok(i)) => i.service == service,
            Some(Err(_)) => String::from_utf8_lossy(&kv.key).contains(&path),
            None => false,
        })
        .collect()
}

/// Builds the snapshot from what etcd returned, judged by `confinement` as the watcher
/// judges it. Pure.
pub fn snapshot(
    prefix: &str,
    revision: i64,
    kvs: &[RawKv],
    leases: &BTreeMap<i64, LeaseState>,
    confinement: &Confinement,
) -> Snapshot {
    let mut skipped = Vec::new();
    let mut refused = BTreeMap::new();
    let node_dir = format!("{prefix}/nodes/");
    let decoded: Vec<(String, Instance, i64)> = kvs
        .iter()
        .filter_map(|kv| match decode(prefix, kv)? {
            Ok(i) => Some((String::from_utf8_lossy(&kv.key).into_owned(), i, kv.lease)),
            Err(e) => {
                skipped.push(e);
                None
            }
        })
        .collect();
    // One row per key that would be rendered: judged by its owner, then one key per
    // server name (`confine`), exactly as the watcher's store does.
    let mut by_service: BTreeMap<&str, Vec<Claim<'_, i64>>> = BTreeMap::new();
    for (key, instance, lease) in &decoded {
        let owner = key.starts_with(&node_dir).then_some(instance.node.as_str());
        match confinement.admit(owner, instance) {
            Ok(()) => by_service
                .entry(instance.service.as_str())
                .or_default()
                .push(Claim {
                    key,
                    owner,
                    instance,
                    value: *lease,
                }),
            Err(r) => {
                refused.insert(key.clone(), r);
            }
        }
    }
    let mut services: BTreeMap<String, Vec<Entry>> = BTreeMap::new();
    for (service, claims) in by_service {
        let entries = confine::settle(claims, &mut refused)
            .into_iter()
            .map(|c| Entry {
                instance: c.instance.clone(),
                lease: match (c.value, leases.get(&c.value)) {
                    (0, _) => Lease::None,
                    (id, Some(LeaseState::Live { ttl, granted_ttl })) => Lease::Live {
                        id,
                        ttl: *ttl,
                        granted_ttl: *granted_ttl,
                    },
                    (id, _) => Lease::Expired { id },
                },
            })
            .collect();
        services.insert(service.to_string(), entries);
    }
    skipped.sort_by(|a, b| a.key.cmp(&b.key));
    let route_conflicts = kvs
        .iter()
        .filter_map(|kv| {
            let key = String::from_utf8_lossy(&kv.key);
            let Ok(Key::Watcher { name }) = schema::parse_key(prefix, &key) else {
                return None;
            };
            let w: schema::WatcherStatus = serde_json::from_slice(&kv.value).ok()?;
            Some(
                w.route_conflicts
                    .into_iter()
                    .map(move |c| format!("watcher {name}: {c}")),
            )
        })
        .flatten()
        .collect();
    Snapshot {
        prefix: prefix.to_string(),
        revision,
        services,
        skipped,
        route_conflicts,
        refused: refused
            .into_iter()
            .map(|(key, r)| Refused {
                key,
                reason: r.reason,
                rule: r.rule,
            })
            .collect(),
    }
}

/// etcdctl prints lease ids in hex; so do we, so they can be pasted into
/// `etcdctl lease timetolive`.
fn lease_hex(id: i64) -> String {
    format!("{id:x}")
}

fn lease_cell(lease: &Lease) -> String {
    match lease {
        Lease::None => "-".into(),
        Lease::Live {
            ttl, granted_ttl, ..
        } => format!("{ttl}s/{granted_ttl}s"),
        Lease::Expired { .. } => "expired".into(),
    }
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() {
        "-"
    } else {
        s
    }
}

const HEADER: [&str; 8] = [
    "SERVICE",
    "INSTANCE",
    "ADDR",
    "NODE",
    "CONTAINER",
    "LEASE",
    "WEIGHT",
    "TAGS",
];

/// The human table: one line per instance, columns padded, no trailing spaces. Pure.
pub fn table(snap: &Snapshot) -> String {
    // A STATE column only while something drains: the usual table stays as it was.
    let draining = snap
        .services
        .values()
        .flatten()
        .any(|e| e.instance.draining);
    let mut header: Vec<String> = HEADER.map(String::from).to_vec();
    if draining {
        header.push("STATE".into());
    }
    let mut rows: Vec<Vec<String>> = vec![header];
    for (service, entries) in &snap.services {
        for e in entries {
            let i = &e.instance;
            let container: String = i.container.chars().take(12).collect();
            let mut row = vec![
                service.clone(),
                i.id.clone(),
                i.addr.clone(),
                or_dash(&i.node).to_string(),
                or_dash(&container).to_string(),
                lease_cell(&e.lease),
                i.weight.to_string(),
                or_dash(&i.tags.join(",")).to_string(),
            ];
            if draining {
                row.push(if i.draining { "draining" } else { "up" }.into());
            }
            rows.push(row);
        }
    }
    let mut widths = vec![0usize; rows[0].len()];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (n, (cell, w)) in row.iter().zip(&widths).enumerate() {
            if n > 0 {
                line.push_str("  ");
            }
            line.push_str(cell);
            line.extend(std::iter::repeat_n(' ', w - cell.chars().count()));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// One line per skipped or refused key, for stderr.
pub fn warnings(snap: &Snapshot) -> String {
    let skipped = snap
        .skipped
        .iter()
        .map(|e| format!("warning: skipped {e}\n"));
    let refused = snap
        .refused
        .iter()
        .map(|r| format!("warning: refused key {:?}: {}\n", r.key, r.rule));
    let conflicts = snap
        .route_conflicts
        .iter()
        .map(|c| format!("warning: {c}\n"));
    skipped.chain(refused).chain(conflicts).collect()
}

/// Reads the snapshot from etcd: one `get --prefix`, one `LeaseTimeToLive` per lease.
pub async fn read(
    etcd: &EtcdConfig,
    service: Option<&str>,
    confinement: &Confinement,
) -> anyhow::Result<Snapshot> {
    if let Some(s) = service {
        anyhow::ensure!(
            schema::is_valid_service_name(s),
            "service {s:?}: service names match [a-z0-9][a-z0-9_.-]{{0,127}}"
        );
    }
    let endpoints = etcd.endpoints.join(",");
    let mut client = etcd::connect(etcd)
        .await
        .with_context(|| format!("cannot reach etcd at {endpoints} (--etcd-endpoints URL)"))?;
    let key = format!("{}/", etcd.prefix);
    let listing = etcd::list_prefix(&mut client, &key)
        .await
        .with_context(|| format!("etcd get --prefix {key} at {endpoints} failed"))?;
    let revision = listing.revision;
    let mut listing_too_large = listing.too_large_errors();
    if let Some(s) = service {
        // Only those on the service's paths, as for every other skipped key.
        let keep: Vec<Vec<u8>> = only_service(
            &etcd.prefix,
            s,
            listing_too_large
                .iter()
                .map(|e| RawKv {
                    key: e.key.clone().into_bytes(),
                    value: Vec::new(),
                    lease: 0,
                })
                .collect(),
        )
        .into_iter()
        .map(|kv| kv.key)
        .collect();
        listing_too_large.retain(|e| keep.contains(&e.key.as_bytes().to_vec()));
    }
    let mut kvs: Vec<RawKv> = listing
        .kvs
        .into_iter()
        .map(|kv| RawKv {
            key: kv.key().to_vec(),
            value: kv.value().to_vec(),
            lease: kv.lease(),
        })
        .collect();
    if let Some(s) = service {
        kvs = only_service(&etcd.prefix, s, kvs);
    }
    let mut leases = BTreeMap::new();
    for id in leases_to_look_up(&etcd.prefix, &kvs) {
        // A lease that expired since the listing is no error: etcd 3.4 says "lease not
        // found", later versions answer TTL -1.
        let state = match etcd::call(client.lease_time_to_live(id, None)).await {
            Ok(r) if r.ttl() >= 0 => LeaseState::Live {
                ttl: r.ttl(),
                granted_ttl: r.granted_ttl(),
            },
            Ok(_) => LeaseState::Expired,
            Err(e) if etcd::is_lease_not_found(&e) => LeaseState::Expired,
            Err(e) => {
                return Err(e).with_context(|| format!("etcd lease timetolive {}", lease_hex(id)))
            }
        };
        leases.insert(id, state);
    }
    let mut snap = snapshot(&etcd.prefix, revision, &kvs, &leases, confinement);
    snap.skipped.extend(listing_too_large);
    snap.skipped.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(snap)
}

/// How `ls` prints what it read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
    /// One `host:port` a line, for scripts that bootstrap a cluster from a service:
    /// what serves, or with `all` also draining and expired instances.
    Addrs {
        all: bool,
    },
}

/// One `host:port` a line, services in name order and instances in id order: what
/// serves (neither draining nor on an expired lease; routed or not, since `route =
/// false` services such as a host's etcd peers are what scripts look up), or with
/// `all` every instance.
pub fn addrs(snap: &Snapshot, all: bool) -> String {
    snap.services
        .values()
        .flatten()
        .filter(|e| all || (!e.instance.draining && !matches!(e.lease, Lease::Expired { .. })))
        .map(|e| format!("{}\n", e.instance.addr))
        .collect()
}

pub async fn run(
    etcd: &EtcdConfig,
    confinement: &Confinement,
    service: Option<&str>,
    format: Format,
) -> anyhow::Result<()> {
    let snap = read(etcd, service, confinement).await?;
    eprint!("{}", warnings(&snap));
    if format == Format::Json {
        print!("{}", self::json(&snap));
    } else if let Format::Addrs { all } = format {
        print!("{}", addrs(&snap, all));
    } else {
        print!("{}", table(&snap));
        if snap.instance_count() == 0 {
            eprintln!("no instances under {}", read_prefix(&snap.prefix, service));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "/portolan";

    fn kv(key: &str, value: &str, lease: i64) -> RawKv {
        RawKv {
            key: key.as_bytes().to_vec(),
            value: value.as_bytes().to_vec(),
            lease,
        }
    }

    fn fixture() -> Snapshot {
        let kvs = vec![
            kv(
                "/portolan/services/web/host-b-aaaaaaaaaaaa-8080",
                r#"{"addr":"10.0.0.6:32769","node":"host-b","container":"aaaaaaaaaaaabbbb","port":8080,"tags":["v2","canary"],"weight":50}"#,
                0x1f,
            ),
            kv(
                "/portolan/services/web/host-a-3f2a9c1b7d10-8080",
                r#"{"addr":"10.0.0.5:32768","node":"host-a","container":"3f2a9c1b7d10","port":8080,"tags":["v2"],"weight":100}"#,
                0x2a,
            ),
            kv("/portolan/services/api/manual-1", "10.0.0.9:80", 0),
            kv("/portolan/services/bad name/x", "10.0.0.1:80", 0),
            kv("/portolan/services/web/broken", "10.0.0.9:80 backup", 0),
        ];
        let leases = BTreeMap::from([
            (
                0x2a,
                LeaseState::Live {
                    ttl: 7,
                    granted_ttl: 10,
                },
            ),
            (0x1f, LeaseState::Expired),
        ]);
        snapshot(P, 12, &kvs, &leases, &Confinement::default())
    }

    #[test]
    fn table_is_sorted_aligned_and_marks_missing_values() {
        let expected = "\
SERVICE  INSTANCE                  ADDR            NODE    CONTAINER     LEASE    WEIGHT  TAGS
api      manual-1                  10.0.0.9:80     -       -             -        100     -
web      host-a-3f2a9c1b7d10-8080  10.0.0.5:32768  host-a  3f2a9c1b7d10  7s/10s   100     v2
web      host-b-aaaaaaaaaaaa-8080  10.0.0.6:32769  host-b  aaaaaaaaaaaa  expired  50      v2,canary
";
        assert_eq!(table(&fixture()), expected);
    }

    #[test]
    fn a_draining_instance_adds_a_state_column() {
        let kvs = vec![
            kv(
                "/portolan/nodes/a/services/web/a-1",
                r#"{"addr":"10.0.0.5:80","draining":true}"#,
                0,
            ),
            kv(
                "/portolan/nodes/a/services/web/a-2",
                r#"{"addr":"10.0.0.6:80"}"#,
                0,
            ),
        ];
        let snap = snapshot(P, 1, &kvs, &BTreeMap::new(), &Confinement::default());
        let t = table(&snap);
        assert!(t.lines().next().unwrap().ends_with("TAGS  STATE"), "{t}");
        assert!(
            t.contains("draining") && t.lines().nth(2).unwrap().ends_with("up"),
            "{t}"
        );
        let doc: serde_json::Value = serde_json::from_str(&json(&snap)).unwrap();
        assert_eq!(doc["services"]["web"][0]["draining"], true);
        assert!(doc["services"]["web"][1].get("draining").is_none());
    }

    /// `--addrs` lists what serves: not a draining instance, not one whose lease ran out;
    /// an unrouted one (a host's etcd peers) is what it is for. `--all` lists every one.
    #[test]
    fn addrs_lists_what_serves_and_all_lists_everything() {
        let kvs = vec![
            kv(
                "/portolan/nodes/a/services/etcd/a-svc-etcd-2380",
                r#"{"addr":"10.0.0.1:2380","route":false}"#,
                0,
            ),
            kv(
                "/portolan/nodes/a/services/etcd/a-t2",
                r#"{"addr":"10.0.0.2:2380","draining":true}"#,
                0,
            ),
            kv(
                "/portolan/nodes/a/services/etcd/a-t3",
                r#"{"addr":"10.0.0.3:2380"}"#,
                0x1f,
            ),
            kv(
                "/portolan/nodes/a/services/etcd/a-t4",
                r#"{"addr":"10.0.0.4:2380"}"#,
                0x2a,
            ),
        ];
        let leases = BTreeMap::from([
            (0x1f, LeaseState::Expired),
            (
                0x2a,
                LeaseState::Live {
                    ttl: 7,
                    granted_ttl: 10,
                },
            ),
        ]);
        let snap = snapshot(P, 1, &kvs, &leases, &Confinement::default());
        assert_eq!(addrs(&snap, false), "10.0.0.1:2380\n10.0.0.4:2380\n");
        assert_eq!(
            addrs(&snap, true),
            "10.0.0.1:2380\n10.0.0.2:2380\n10.0.0.3:2380\n10.0.0.4:2380\n"
        );
        let doc: serde_json::Value = serde_json::from_str(&json(&snap)).unwrap();
        assert_eq!(doc["services"]["etcd"][0]["route"], false);
        assert!(doc["services"]["etcd"][1].get("route").is_none());
    }

    #[test]
    fn empty_table_is_just_the_header() {
        let snap = snapshot(P, 1, &[], &BTreeMap::new(), &Confinement::default());
        assert_eq!(
            table(&snap),
            "SERVICE  INSTANCE  ADDR  NODE  CONTAINER  LEASE  WEIGHT  TAGS\n"
        );
        assert_eq!(snap.instance_count(), 0);
    }

    /// The watchers' status records name contested routes: `ls` repeats them on
    /// stderr and in the JSON (absent when there are none).
    #[test]
    fn route_conflicts_the_watchers_found_are_named() {
        let kvs = vec![
            kv("/portolan/services/web/a", "10.0.0.1:80", 0),
            kv(
                "/portolan/watchers/lb",
                r#"{"name":"lb","revision":3,"last_reload_at":null,"last_reload_result":null,"last_error":null,"route_conflicts":["service b is refused host x.example.com: service a claimed it first (its oldest instance is older)"]}"#,
                0,
            ),
        ];
        let snap = snapshot(P, 1, &kvs, &BTreeMap::new(), &Confinement::default());
        assert_eq!(
            warnings(&snap),
            "warning: watcher lb: service b is refused host x.example.com: service a claimed it first (its oldest instance is older)\n"
        );
        let doc: serde_json::Value = serde_json::from_str(&json(&snap)).unwrap();
        assert!(
            doc["route_conflicts"][0]
                .as_str()
                .unwrap()
                .starts_with("watcher lb: service b is refused"),
            "{doc}"
        );
        assert!(!json(&fixture()).contains("route_conflicts"));
    }

    #[test]
    fn invalid_keys_and_values_are_skipped_by_name() {
        let snap = fixture();
        let keys: Vec<&str> = snap.skipped.iter().map(|s| s.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "/portolan/services/bad name/x",
                "/portolan/services/web/broken"
            ]
        );
        let w = warnings(&snap);
        assert_eq!(w.lines().count(), 2);
        assert!(
            w.starts_with(
                "warning: skipped key \"/portolan/services/bad name/x\": service \"bad name\""
            ),
            "{w}"
        );
        assert_eq!(snap.instance_count(), 3);
    }

    #[test]
    fn json_document_is_stable() {
        let v: serde_json::Value = serde_json::from_str(&json(&fixture())).unwrap();
        let expected = serde_json::json!({
            "prefix": "/portolan",
            "revision": 12,
            "services": {
                "api": [{"id": "manual-1", "addr": "10.0.0.9:80", "host": "10.0.0.9", "port": 80,
                         "node": null, "container": null, "tags": [], "weight": 100, "lease": null}],
                "web": [
                    {"id": "host-a-3f2a9c1b7d10-8080", "addr": "10.0.0.5:32768", "host": "10.0.0.5",
                     "port": 32768, "node": "host-a", "container": "3f2a9c1b7d10", "tags": ["v2"],
                     "weight": 100, "lease": {"id": "2a", "ttl": 7, "granted_ttl": 10}},
                    {"id": "host-b-aaaaaaaaaaaa-8080", "addr": "10.0.0.6:32769", "host": "10.0.0.6",
                     "port": 32769, "node": "host-b", "container": "aaaaaaaaaaaabbbb",
                     "tags": ["v2", "canary"], "weight": 50,
                     "lease": {"id": "1f", "ttl": -1, "granted_ttl": 0}}
                ]
            },
            "skipped": [
                {"key": "/portolan/services/bad name/x",
                 "reason": "service \"bad name\": names must match [a-z0-9][a-z0-9_.-]{0,127}: service names are lower case, as host names ignore case (Web would capture web's traffic)"},
                {"key": "/portolan/services/web/broken",
                 "reason": "address \"10.0.0.9:80 backup\": port \"80 backup\" is not a number in 1..65535"}
            ],
            "refused": []
        });
        assert_eq!(v, expected);
        // Field order is part of the contract for people reading it.
        let text = json(&fixture());
        let order = [
            "\"prefix\"",
            "\"revision\"",
            "\"services\"",
            "\"skipped\"",
            "\"refused\"",
        ];
        let pos: Vec<usize> = order.iter().map(|k| text.find(k).unwrap()).collect();
        assert!(pos.windows(2).all(|w| w[0] < w[1]), "{text}");
    }

    #[test]
    fn only_leases_of_valid_keys_are_looked_up() {
        let kvs = vec![
            kv("/portolan/services/web/a", "10.0.0.1:80", 5),
            kv("/portolan/services/web/b", "10.0.0.2:80", 5),
            kv("/portolan/services/web/c", "10.0.0.3:80", 0),
            kv("/portolan/services/web/d", "garbage", 9),
        ];
        assert_eq!(leases_to_look_up(P, &kvs), vec![5]);
    }

    #[test]
    fn one_service_means_its_keys_on_both_paths_and_no_lookalike() {
        let kvs = vec![
            kv("/portolan/services/web/manual", "10.0.0.9:80", 0),
            kv("/portolan/services/web2/manual", "10.0.0.9:80", 0),
            kv(
                "/portolan/nodes/a/services/web/a-1",
                r#"{"addr":"10.0.0.5:80"}"#,
                7,
            ),
            kv("/portolan/nodes/a/services/web/broken", "x", 7),
            kv("/portolan/nodes/a/node", "{}", 7),
        ];
        let keys: Vec<String> = only_service(P, "web", kvs)
            .iter()
            .map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
            .collect();
        assert_eq!(
            keys,
            [
                "/portolan/services/web/manual",
                "/portolan/nodes/a/services/web/a-1",
                "/portolan/nodes/a/services/web/broken"
            ]
        );
    }

    #[test]
    fn a_node_key_never_replaces_a_hand_written_or_another_nodes_instance() {
        let kvs = vec![
            kv("/portolan/services/web/db1", "10.0.0.9:80", 0),
            // web1 claims the operator's id, and web2's: both refused, both named.
            kv(
                "/portolan/nodes/web1/services/web/db1",
                r#"{"addr":"10.6.6.6:80"}"#,
                0,
            ),
            kv(
                "/portolan/nodes/web2/services/web/web2-0123456789ab-80",
                r#"{"addr":"10.0.0.2:80"}"#,
                7,
            ),
            kv(
                "/portolan/nodes/web1/services/web/web2-0123456789ab-80",
                r#"{"addr":"10.6.6.6:80"}"#,
                0,
            ),
            // web-1 extends web's name: its id starts with "web-" too. web-1 keeps it.
            kv(
                "/portolan/nodes/web-1/services/web/web-1-aaaaaaaaaaaa-80",
                r#"{"addr":"10.0.0.3:80"}"#,
                0,
            ),
            kv(
                "/portolan/nodes/web/services/web/web-1-aaaaaaaaaaaa-80",
                r#"{"addr":"10.6.6.6:80"}"#,
                0,
            ),
        ];
        let snap = snapshot(P, 1, &kvs, &BTreeMap::new(), &Confinement::default());
        let rows: Vec<(&str, &str, &str)> = snap.services["web"]
            .iter()
            .map(|e| {
                let i = &e.instance;
                (i.id.as_str(), i.addr.as_str(), i.node.as_str())
            })
            .collect();
        assert_eq!(
            rows,
            [
                ("db1", "10.0.0.9:80", ""),
                ("web-1-aaaaaaaaaaaa-80", "10.0.0.3:80", "web-1"),
                ("web2-0123456789ab-80", "10.0.0.2:80", "web2"),
            ]
        );
        let refused: Vec<(&str, &str)> = snap
            .refused
            .iter()
            .map(|r| (r.key.as_str(), r.reason.label()))
            .collect();
        assert_eq!(
            refused,
            [
                (
                    "/portolan/nodes/web/services/web/web-1-aaaaaaaaaaaa-80",
                    "name_taken"
                ),
                ("/portolan/nodes/web1/services/web/db1", "foreign_id"),
                (
                    "/portolan/nodes/web1/services/web/web2-0123456789ab-80",
                    "foreign_id"
                ),
            ]
        );
        let w = warnings(&snap);
        assert!(
            w.contains(
                "refused key \"/portolan/nodes/web1/services/web/db1\": instance id \"db1\""
            ),
            "{w}"
        );
        let doc: serde_json::Value = serde_json::from_str(&json(&snap)).unwrap();
        assert_eq!(doc["refused"][1]["reason"], "foreign_id");
        assert_eq!(
            doc["refused"][0]["key"],
            "/portolan/nodes/web/services/web/web-1-aaaaaaaaaaaa-80"
        );
    }

    #[test]
    fn a_hand_written_key_keeps_its_server_name_beside_a_registrars_key_of_the_same_id() {
        // A v1 key beside its container's v2 key while the registrar upgrades: one row.
        let kvs = vec![
            kv("/portolan/services/web/a-1", "10.0.0.9:80", 0),
            kv(
                "/portolan/nodes/a/services/web/a-1",
                r#"{"addr":"10.0.0.5:80"}"#,
                0,
            ),
        ];
        let snap = snapshot(P, 1, &kvs, &BTreeMap::new(), &Confinement::default());
        assert_eq!(snap.instance_count(), 1);
        assert_eq!(snap.services["web"][0].instance.addr, "10.0.0.9:80");
        assert_eq!(snap.refused[0].key, "/portolan/nodes/a/services/web/a-1");
        assert_eq!(snap.refused[0].reason, Reason::NameTaken);
    }
}
