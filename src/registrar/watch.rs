//! A watch on this node's own prefix, so that a key deleted or overwritten behind the
//! registrar's back (`etcdctl del`, a slip of an operator, another registrar taking
//! the name) is put right within moments rather than at the next `--resync`.
//!
//! It starts at the revision just after a read-back, so no change falls between the
//! two. It reports, never decides: the loop compares each change with what it wrote
//! (`tampered`). When the watch ends (etcd restarted, history compacted, stream
//! closed) the loop reads back and starts another.

use std::collections::BTreeMap;

use etcd_client::{Client, EventType, WatchOptions};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::etcd;

/// One change under the prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Change {
    Put {
        key: String,
        value: String,
        lease: i64,
    },
    Delete {
        key: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum WatchEvent {
    Changed(Vec<Change>),
    /// The watch is over; what happened since is unknown.
    Ended(String),
}

/// Tagged with the watch's number, so a report of a replaced watch can be told apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WatchReport {
    pub(crate) watch: u64,
    pub(crate) event: WatchEvent,
}

/// Watches `prefix` from `revision` until cancelled or the watch ends. Run it as a
/// tracked task.
pub(crate) async fn run(
    mut client: Client,
    prefix: String,
    revision: i64,
    watch: u64,
    reports: mpsc::Sender<WatchReport>,
    stop: CancellationToken,
) {
    let report = |event: WatchEvent| {
        let reports = reports.clone();
        async move {
            let _ = reports.send(WatchReport { watch, event }).await;
        }
    };
    let opts = WatchOptions::new()
        .with_prefix()
        .with_start_revision(revision);
    let opened = tokio::select! {
        _ = stop.cancelled() => return,
        r = etcd::call(client.watch(prefix.as_str(), Some(opts))) => r,
    };
    let mut stream = match opened {
        Ok(s) => s,
        Err(e) => return report(WatchEvent::Ended(e.to_string())).await,
    };
    loop {
        let msg = tokio::select! {
            _ = stop.cancelled() => return,
            m = stream.message() => m,
        };
        let resp = match msg {
            Ok(Some(r)) => r,
            Ok(None) => return report(WatchEvent::Ended("watch stream closed".into())).await,
            Err(e) => return report(WatchEvent::Ended(e.to_string())).await,
        };
        if resp.canceled() {
            let why = match resp.compact_revision() {
                0 => format!("watch cancelled: {}", resp.cancel_reason()),
                c => format!("history compacted up to revision {c}"),
            };
            return report(WatchEvent::Ended(why)).await;
        }
        let changes: Vec<Change> = resp
            .events()
            .iter()
            .filter_map(|ev| {
                let kv = ev.kv()?;
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                Some(match ev.event_type() {
                    EventType::Put => Change::Put {
                        key,
                        value: String::from_utf8_lossy(kv.value()).into_owned(),
                        lease: kv.lease(),
                    },
                    EventType::Delete => Change::Delete { key },
                })
            })
            .collect();
        if !changes.is_empty() {
            report(WatchEvent::Changed(changes)).await;
        }
    }
}

/// The first change that is not one of our own writes: a put on another lease (or of
/// a value we did not write), or the delete of a key we believe is there. Our own
/// deletes are of keys we no longer believe in. A change of ours seen late (after a
/// newer write of the same key) also counts: it costs one read-back, never a wrong
/// key.
pub(crate) fn tampered<'a>(
    changes: &'a [Change],
    believed: &BTreeMap<String, String>,
    lease: Option<i64>,
) -> Option<&'a str> {
    changes.iter().find_map(|c| match c {
        Change::Put {
            key,
            value,
            lease: l,
        } => (Some(*l) != lease || believed.get(key) != Some(value)).then_some(key.as_str()),
        Change::Delete { key } => believed.contains_key(key).then_some(key.as_str()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str, value: &str, lease: i64) -> Change {
        Change::Put {
            key: key.into(),
            value: value.into(),
            lease,
        }
    }

    fn del(key: &str) -> Change {
        Change::Delete { key: key.into() }
    }

    #[test]
    fn our_own_writes_are_not_tampering() {
        let believed: BTreeMap<String, String> = [("a".to_string(), "1".to_string())].into();
        // The put we made, and the delete of a key we dropped.
        assert_eq!(
            tampered(&[put("a", "1", 7), del("gone")], &believed, Some(7)),
            None
        );
    }

    #[test]
    fn a_delete_or_a_foreign_put_of_our_key_is() {
        let believed: BTreeMap<String, String> = [("a".to_string(), "1".to_string())].into();
        assert_eq!(tampered(&[del("a")], &believed, Some(7)), Some("a"));
        assert_eq!(tampered(&[put("a", "1", 9)], &believed, Some(7)), Some("a"));
        assert_eq!(tampered(&[put("a", "2", 7)], &believed, Some(7)), Some("a"));
        // A key we never wrote appearing under our prefix.
        assert_eq!(tampered(&[put("b", "1", 0)], &believed, Some(7)), Some("b"));
        // Without a lease, every put is someone else's.
        assert_eq!(tampered(&[put("a", "1", 7)], &believed, None), Some("a"));
    }
}
