//! `portolan ls --json`: the snapshot as one JSON document for scripts (field names
//! are a contract: README, "portolan ls").

use serde::Serialize;

use super::*;

#[derive(Serialize)]
struct JsonDoc<'a> {
    prefix: &'a str,
    revision: i64,
    services: BTreeMap<&'a str, Vec<JsonInstance<'a>>>,
    skipped: Vec<JsonSkipped<'a>>,
    refused: Vec<JsonRefused<'a>>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    route_conflicts: &'a [String],
}

#[derive(Serialize)]
struct JsonRefused<'a> {
    key: &'a str,
    reason: &'static str,
    rule: &'a str,
}

#[derive(Serialize)]
struct JsonInstance<'a> {
    id: &'a str,
    addr: &'a str,
    host: &'a str,
    port: u16,
    node: Option<&'a str>,
    container: Option<&'a str>,
    tags: &'a [String],
    weight: u32,
    lease: Option<JsonLease>,
    /// Present (true) only while the instance drains: older documents stay as they were.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    draining: bool,
    /// Present (false) only for an instance registered not to be routed (`route = false`).
    #[serde(skip_serializing_if = "is_true")]
    route: bool,
}

fn is_true(b: &bool) -> bool {
    *b
}

#[derive(Serialize)]
struct JsonLease {
    id: String,
    ttl: i64,
    granted_ttl: i64,
}

#[derive(Serialize)]
struct JsonSkipped<'a> {
    key: &'a str,
    reason: &'a str,
}

fn non_empty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

/// The JSON document for scripts (see the module doc), pretty-printed. Pure.
pub fn json(snap: &Snapshot) -> String {
    let doc = JsonDoc {
        prefix: &snap.prefix,
        revision: snap.revision,
        services: snap
            .services
            .iter()
            .map(|(name, entries)| {
                let list = entries
                    .iter()
                    .map(|e| {
                        let i = &e.instance;
                        JsonInstance {
                            id: &i.id,
                            addr: &i.addr,
                            host: &i.host,
                            port: i.port,
                            node: non_empty(&i.node),
                            container: non_empty(&i.container),
                            tags: &i.tags,
                            weight: i.weight,
                            draining: i.draining,
                            route: i.route,
                            lease: match e.lease {
                                Lease::None => None,
                                Lease::Live {
                                    id,
                                    ttl,
                                    granted_ttl,
                                } => Some(JsonLease {
                                    id: lease_hex(id),
                                    ttl,
                                    granted_ttl,
                                }),
                                Lease::Expired { id } => Some(JsonLease {
                                    id: lease_hex(id),
                                    ttl: -1,
                                    granted_ttl: 0,
                                }),
                            },
                        }
                    })
                    .collect();
                (name.as_str(), list)
            })
            .collect(),
        skipped: snap
            .skipped
            .iter()
            .map(|s| JsonSkipped {
                key: &s.key,
                reason: &s.rule,
            })
            .collect(),
        refused: snap
            .refused
            .iter()
            .map(|r| JsonRefused {
                key: &r.key,
                reason: r.reason.label(),
                rule: &r.rule,
            })
            .collect(),
        route_conflicts: &snap.route_conflicts,
    };
    let mut text = serde_json::to_string_pretty(&doc).expect("ls document serialises");
    text.push('\n');
    text
}
