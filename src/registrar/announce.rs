//! What the team hears: one hook event per instance write that changed what etcd
//! says about it. Pure; the loop emits what this returns (`hook::Hooks::emit`, which
//! never waits).
//!
//! | write | before | event |
//! | --- | --- | --- |
//! | put, not draining | absent, other value, or draining | `register` |
//! | put, draining | anything else | `drain` |
//! | delete | an instance record | `deregister` |
//!
//! A put of the value etcd already had (only the lease changes, after a restart that
//! lost its state file) says nothing new, so it is no event. After a lost lease every
//! instance is written again: those `register`s are folded into one `reregister`
//! ([`reregistered`]), so a hook hears one event per host, not one per instance.

use super::plan::KeyOp;
use crate::hook::{Event, RegistrarEvent};
use crate::schema::{self, InstanceRecord};

/// The event for one op that went through; `before` is the key's value before it.
pub(crate) fn event(prefix: &str, node: &str, op: &KeyOp, before: Option<&str>) -> Option<Event> {
    let key = match op {
        KeyOp::Put { key, .. } | KeyOp::Delete { key } => key,
    };
    let Ok(schema::Key::Service {
        service, instance, ..
    }) = schema::parse_key(prefix, key)
    else {
        return None;
    };
    let (name, value) = match op {
        KeyOp::Put { value, .. } if before == Some(value.as_str()) => return None,
        KeyOp::Put { value, .. } => {
            let record = serde_json::from_str::<InstanceRecord>(value).ok()?;
            (
                if record.draining {
                    RegistrarEvent::Drain
                } else {
                    RegistrarEvent::Register
                },
                value.as_str(),
            )
        }
        KeyOp::Delete { .. } => (RegistrarEvent::Deregister, before?),
    };
    let record = serde_json::from_str::<InstanceRecord>(value).unwrap_or_default();
    let was_draining = before
        .and_then(|b| serde_json::from_str::<InstanceRecord>(b).ok())
        .is_some_and(|r| r.draining);
    let what = match name {
        RegistrarEvent::Drain => "draining: its container is stopping",
        RegistrarEvent::Register if was_draining => {
            "registered again: its container did not exit within its stop timeout"
        }
        RegistrarEvent::Register => "registered",
        RegistrarEvent::Deregister => "deregistered",
        // Made by `reregistered` only.
        RegistrarEvent::Reregister => "registered again",
    };
    let summary = format!("{service}/{instance} at {} on {node} {what}", record.addr);
    Some(
        Event::new(name, summary)
            .with("service", service)
            .with("instance", instance)
            .with("node", node)
            .with("addr", record.addr.clone())
            .with("container", record.container),
    )
}

/// The one event for the `register`s of a rewrite after a lost lease: how many, and
/// each instance's service, id and address. None when there were none.
pub(crate) fn reregistered(node: &str, registers: &[Event]) -> Option<Event> {
    if registers.is_empty() {
        return None;
    }
    let field = |e: &Event, k: &str| e.fields.get(k).cloned().unwrap_or_default();
    let instances: Vec<serde_json::Value> = registers
        .iter()
        .map(|e| {
            serde_json::json!({
                "service": field(e, "service"),
                "instance": field(e, "instance"),
                "addr": field(e, "addr"),
            })
        })
        .collect();
    let n = registers.len();
    let summary = format!(
        "{n} instance{} on {node} registered again after its lease was lost",
        if n == 1 { "" } else { "s" }
    );
    Some(
        Event::new(RegistrarEvent::Reregister, summary)
            .with("node", node)
            .with("count", n)
            .with("instances", instances),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "/p/nodes/web/services/api/web-3f2a9c1b7d10-80";
    const UP: &str = r#"{"addr":"10.0.0.5:1","node":"web","container":"3f2a9c1b7d10","port":80,"tags":[],"weight":100}"#;
    const DRAINING: &str = r#"{"addr":"10.0.0.5:1","node":"web","container":"3f2a9c1b7d10","port":80,"tags":[],"weight":100,"draining":true}"#;

    fn put(value: &str) -> KeyOp {
        KeyOp::Put {
            key: KEY.into(),
            value: value.into(),
        }
    }

    fn name(op: &KeyOp, before: Option<&str>) -> Option<&'static str> {
        event("/p", "web", op, before).map(|e| e.kind.as_str())
    }

    #[test]
    fn a_new_instance_is_registered_with_every_field() {
        let e = event("/p", "web", &put(UP), None).unwrap();
        assert_eq!(e.kind.as_str(), "register");
        assert_eq!(e.fields["service"], "api");
        assert_eq!(e.fields["instance"], "web-3f2a9c1b7d10-80");
        assert_eq!(e.fields["node"], "web");
        assert_eq!(e.fields["addr"], "10.0.0.5:1");
        assert_eq!(e.fields["container"], "3f2a9c1b7d10");
        assert_eq!(
            e.summary,
            "api/web-3f2a9c1b7d10-80 at 10.0.0.5:1 on web registered"
        );
    }

    #[test]
    fn drain_give_back_and_deregister() {
        assert_eq!(name(&put(DRAINING), Some(UP)), Some("drain"));
        let back = event("/p", "web", &put(UP), Some(DRAINING)).unwrap();
        assert_eq!(back.kind.as_str(), "register");
        assert!(back.summary.contains("did not exit"), "{}", back.summary);
        let del = KeyOp::Delete { key: KEY.into() };
        let e = event("/p", "web", &del, Some(DRAINING)).unwrap();
        assert_eq!(e.kind.as_str(), "deregister");
        assert_eq!(e.fields["addr"], "10.0.0.5:1");
        // Nothing known about a deleted key: nothing to say.
        assert_eq!(name(&del, None), None);
    }

    #[test]
    fn registers_after_a_lost_lease_fold_into_one_reregister() {
        let registers: Vec<Event> = ["web-3f2a9c1b7d10-80", "web-aaaaaaaaaaaa-80"]
            .iter()
            .map(|id| {
                let op = KeyOp::Put {
                    key: format!("/p/nodes/web/services/api/{id}"),
                    value: UP.into(),
                };
                event("/p", "web", &op, None).unwrap()
            })
            .collect();
        let e = reregistered("web", &registers).unwrap();
        assert_eq!(e.kind.as_str(), "reregister");
        assert_eq!(e.fields["count"], 2);
        assert_eq!(e.fields["node"], "web");
        assert_eq!(e.fields["instances"][1]["instance"], "web-aaaaaaaaaaaa-80");
        assert_eq!(e.fields["instances"][0]["addr"], "10.0.0.5:1");
        assert_eq!(
            e.summary,
            "2 instances on web registered again after its lease was lost"
        );
        assert!(reregistered("web", &[]).is_none());
    }

    #[test]
    fn the_same_value_again_and_the_node_key_are_no_events() {
        assert_eq!(name(&put(UP), Some(UP)), None);
        let node = KeyOp::Put {
            key: "/p/nodes/web/node".into(),
            value: "{}".into(),
        };
        assert_eq!(name(&node, None), None);
    }
}
