//! etcd → `Store` → published snapshot.
//!
//! One session: connect, list the prefix at revision R (`etcd::list_prefix`, paged at
//! that one revision by count and by bytes), `watch --prefix` from R+1 — no gap, no
//! polling. No value a node can write breaks either: instance and node values over
//! 64 KiB are left out and named (`schema::MAX_RECORD_BYTES`). Anything that
//! ends the watch (etcd restarted: the stream dies; compaction or cancellation: etcd
//! says so) ends the session, and the next one starts with a full re-list after a
//! backoff. A re-list *replaces* the store, so an etcd that came back
//! empty (new cluster id, or a revision lower than the last one seen) is taken as the
//! new truth, and the change is logged.
//!
//! While etcd is unreachable nothing is published: the last snapshot stays, so the live
//! config is never rendered from a store that merely could not be read.
//!
//! Every snapshot passes the routing policy first: confinement (`confine`: who may say
//! what — a node's key that names another's id, serves a service the node may not, or
//! points outside the node's networks is refused, and counted in
//! `portolan_watcher_refused_total{reason}`), then the address (`policy`). A key left
//! out gets a warning naming it the first time (and whenever the reason changes). Host
//! names are judged by what `resolve` last found for them; a new answer re-publishes.
//! This host's own addresses (`interfaces`) are listed at every session start and every
//! `interfaces::REFRESH`; a change re-publishes.
//!
//! The snapshot travels on a `tokio::sync::watch` channel: it holds the latest value and
//! a "changed" flag, which is exactly the state the loop's group commit needs — however
//! many batches arrive during an apply, the next apply sees one change, the latest.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{EventType, WatchOptions};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use std::collections::{BTreeMap, BTreeSet};

use super::confine::Refusal;
use super::dns_names;
use super::interfaces;
use super::metrics::Metrics;
use super::policy::{self, Policy, Resolution, Verdict};
use super::resolve::Resolver;
use super::store::{Change, Store, StoreSnapshot};
use crate::backoff::{sleep_or_stop, Backoff};
use crate::config::EtcdConfig;
use crate::etcd;
use crate::schema::SchemaError;

/// What the loop renders from.
#[derive(Debug, Clone)]
pub(crate) struct Published {
    pub(crate) snapshot: Arc<StoreSnapshot>,
    /// etcd revision the snapshot reflects.
    pub(crate) revision: i64,
    /// When the change that made this snapshot arrived (`event_to_live_seconds`).
    pub(crate) received: std::time::Instant,
    /// Keys left out of `snapshot` and why: the schema's rule, or the routing policy's
    /// (the status page shows them).
    pub(crate) left_out: Arc<BTreeMap<String, String>>,
}

/// Why a name still waiting for its first DNS answer is left out, as the page says it.
const RESOLVING: &str = "waiting for the first DNS answer for its host name";

/// Why a session ended. All of them lead to a re-list.
#[derive(Debug, thiserror::Error)]
enum SessionEnd {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error(
        "etcd cancelled the watch at revision {revision} (compacted up to {compact}): re-listing"
    )]
    Compacted { revision: i64, compact: i64 },
    #[error("etcd cancelled the watch ({0}): re-listing")]
    Cancelled(String),
    #[error("etcd closed the watch stream: re-listing")]
    StreamClosed,
    #[error("etcd cluster id changed under a live watch: re-listing")]
    ClusterChanged,
}

pub(crate) struct Source {
    cfg: EtcdConfig,
    tx: watch::Sender<Option<Published>>,
    metrics: Arc<Metrics>,
    store: Store,
    policy: Policy,
    resolver: Resolver,
    /// Bumped by the resolver when an answer changed.
    resolved: watch::Receiver<u64>,
    /// Instance keys the policy leaves out, with the reason: warned once each.
    denied: BTreeMap<String, String>,
    /// (cluster id, revision) of the last listing or event, to notice a replaced etcd.
    seen: Option<(u64, i64)>,
}

impl Source {
    pub(crate) fn new(
        cfg: EtcdConfig,
        policy: Policy,
        (resolver, resolved): (Resolver, watch::Receiver<u64>),
        tx: watch::Sender<Option<Published>>,
        metrics: Arc<Metrics>,
    ) -> Source {
        let store = Store::new(&cfg.prefix);
        Source {
            cfg,
            tx,
            metrics,
            store,
            policy,
            resolver,
            resolved,
            denied: BTreeMap::new(),
            seen: None,
        }
    }

    /// Runs sessions until `shutdown`, with backoff between them.
    pub(crate) async fn run(mut self, shutdown: CancellationToken) {
        // Short cap: the watcher is the thing that should notice a recovered etcd first.
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(3));
        loop {
            let end = tokio::select! {
                _ = shutdown.cancelled() => return,
                end = self.session(&mut backoff) => end,
            };
            self.metrics.set_etcd_connected(false);
            let delay = backoff.next_delay();
            tracing::warn!(
                "{end}; keeping the last good config live, retrying in {} ms",
                delay.as_millis()
            );
            if !sleep_or_stop(delay, &shutdown).await {
                return;
            }
        }
    }

    /// One list + watch. Only returns when it ends.
    /// Takes a full listing into the store (a re-list replaces everything), says what
    /// it noticed of the cluster, and publishes. Returns (cluster id, revision).
    fn listed(&mut self, listing: &etcd::Listing, dir: &str) -> (u64, i64) {
        let (cluster, revision) = (listing.cluster_id, listing.revision);
        match self.seen {
            Some((c, _)) if c != cluster => tracing::warn!(
                revision,
                "etcd cluster id changed ({c:x} → {cluster:x}): etcd was replaced, resyncing everything from the new cluster"
            ),
            Some((_, r)) if revision < r => tracing::warn!(
                revision,
                "etcd revision went backwards ({r} → {revision}): etcd was restored or replaced, resyncing everything"
            ),
            _ => {}
        }
        let keys: Vec<(String, &[u8], i64)> = listing
            .kvs
            .iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(kv.key()).into_owned(),
                    kv.value(),
                    kv.create_revision(),
                )
            })
            .collect();
        warn_all(
            &self
                .store
                .reset_created(keys.iter().map(|(k, v, c)| (k.as_str(), *v, *c))),
        );
        let too_large = listing.too_large_errors();
        warn_all(&too_large);
        for e in too_large {
            self.store.refuse(e);
        }
        self.seen = Some((cluster, revision));
        self.metrics.resyncs.inc();
        self.metrics.set_etcd_connected(true);
        self.publish(revision);
        tracing::info!(
            revision,
            keys = listing.kvs.len(),
            "listed {dir}; watching from revision {}",
            revision + 1
        );
        (cluster, revision)
    }

    async fn session(&mut self, backoff: &mut Backoff) -> SessionEnd {
        let mut client = match etcd::connect(&self.cfg).await {
            Ok(c) => c,
            Err(e) => return e.into(),
        };
        self.refresh_interfaces();
        let dir = format!("{}/", self.cfg.prefix);
        let listing = match etcd::list_prefix(&mut client, &dir).await {
            Ok(l) => l,
            Err(e) => return e.into(),
        };
        let (cluster, revision) = self.listed(&listing, &dir);

        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision + 1);
        // A watch response holds up to 1,000 revisions' events while it catches up:
        // decoded up to the same limit as the listing's pages.
        let mut watch = client
            .watch_client()
            .max_decoding_message_size(etcd::MAX_MESSAGE);
        let mut stream = match etcd::call(watch.watch(dir, Some(opts))).await {
            Ok(s) => s,
            Err(e) => return e.into(),
        };
        let mut interfaces_due = tokio::time::interval(interfaces::REFRESH);
        interfaces_due.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let message = tokio::select! {
                m = stream.message() => m,
                _ = interfaces_due.tick() => {
                    if self.refresh_interfaces() {
                        let rev = self.seen.map(|s| s.1).unwrap_or(revision);
                        self.publish(rev);
                    }
                    continue;
                }
                r = self.resolved.changed() => {
                    if r.is_ok() {
                        let rev = self.seen.map(|s| s.1).unwrap_or(revision);
                        self.publish(rev);
                    }
                    continue;
                }
            };
            let resp = match message {
                Ok(Some(r)) => r,
                Ok(None) => return SessionEnd::StreamClosed,
                Err(e) => return e.into(),
            };
            if resp.canceled() {
                let rev = self.seen.map(|s| s.1).unwrap_or(revision);
                return if resp.compact_revision() > 0 {
                    SessionEnd::Compacted {
                        revision: rev,
                        compact: resp.compact_revision(),
                    }
                } else {
                    SessionEnd::Cancelled(resp.cancel_reason().to_string())
                };
            }
            let Some(header) = resp.header() else {
                continue;
            };
            if header.cluster_id() != cluster {
                return SessionEnd::ClusterChanged;
            }
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                let change = match ev.event_type() {
                    EventType::Put => Change::Put {
                        key,
                        value: kv.value().to_vec(),
                        created: kv.create_revision(),
                    },
                    EventType::Delete => Change::Delete { key },
                };
                if let Some(w) = self.store.apply(change) {
                    warn_all(&[w]);
                }
            }
            self.seen = Some((cluster, header.revision()));
            self.publish(header.revision());
            // A watch that delivers is a healthy connection.
            backoff.reset();
        }
    }

    /// Lists this host's addresses into the policy; true when they changed. A failed
    /// listing keeps the last one (warned: it is not expected to fail).
    fn refresh_interfaces(&mut self) -> bool {
        match interfaces::list() {
            Ok(addrs) => {
                let changed = self.policy.set_host_addresses(addrs);
                if changed {
                    tracing::debug!(
                        "this host's addresses changed; the routing policy refuses the new set"
                    );
                }
                changed
            }
            Err(e) => {
                tracing::warn!("cannot list this host's addresses (getifaddrs: {e}): the routing policy keeps the last list");
                false
            }
        }
    }

    /// Publishes the store, less what the policy refuses, if that snapshot changed;
    /// otherwise only records the revision, without waking the loop.
    fn publish(&mut self, revision: i64) {
        let (snapshot, denied) =
            admitted(&self.store, &self.policy, |name| self.resolver.lookup(name));
        let names = denied.names;
        self.resolver.retain(&names);
        for (key, rule) in &denied.keys {
            if self.denied.get(key) != Some(rule) && !rule.is_empty() {
                match denied.refused.get(key) {
                    Some(r) => {
                        tracing::warn!(key = %key, reason = r.reason.label(), "refused: {rule}");
                        self.metrics.refused(r.reason);
                    }
                    None => tracing::warn!(key = %key, "left out of the rendered config: {rule}"),
                }
            }
        }
        self.denied = denied.keys;
        self.metrics
            .invalid_keys
            .set((self.store.invalid_count() + self.denied.len()) as i64);
        let mut left_out = self.store.left_out().clone();
        for (key, rule) in &self.denied {
            let why = if rule.is_empty() { RESOLVING } else { rule };
            left_out.insert(key.clone(), why.to_string());
        }
        self.tx.send_if_modified(|cur| match cur {
            Some(p) if *p.snapshot == snapshot => {
                p.revision = revision;
                // A key left out (or back in) changes no render, but the status page
                // shows it: wake the loop, whose pass finds the files unchanged.
                let changed = *p.left_out != left_out;
                if changed {
                    p.left_out = Arc::new(left_out);
                }
                changed
            }
            _ => {
                *cur = Some(Published {
                    snapshot: Arc::new(snapshot),
                    revision,
                    received: std::time::Instant::now(),
                    left_out: Arc::new(left_out),
                });
                true
            }
        });
    }
}

/// What `admitted` left out: key → rule (empty while a name's first lookup runs), the
/// keys confinement refused among them (with the reason, for
/// `portolan_watcher_refused_total`), and every host name the routed candidates use.
pub(crate) struct LeftOut {
    pub(crate) keys: BTreeMap<String, String>,
    pub(crate) refused: BTreeMap<String, Refusal>,
    pub(crate) names: BTreeSet<String>,
}

/// The snapshot of the instances `policy` admits: confinement first (who may say
/// what), then the address, host names judged by `lookup` (asked once a name, so what
/// is rendered is what was judged), each DNS-named instance rendered at the addresses
/// it was approved for (`dns_names::expand`).
pub(crate) fn admitted(
    store: &Store,
    policy: &Policy,
    lookup: impl Fn(&str) -> Resolution,
) -> (StoreSnapshot, LeftOut) {
    let mut out = LeftOut {
        keys: BTreeMap::new(),
        refused: BTreeMap::new(),
        names: BTreeSet::new(),
    };
    let mut answers: BTreeMap<String, Resolution> = BTreeMap::new();
    let mut approved: BTreeMap<String, Vec<std::net::IpAddr>> = BTreeMap::new();
    // (service, id) → key, for naming a DNS-named instance `expand` leaves out.
    let mut named_keys: BTreeMap<(String, String), String> = BTreeMap::new();
    let mut refused = BTreeMap::new();
    let snapshot = store.snapshot_where(
        policy.confinement(),
        |key, inst| {
            let resolution = if policy::literal(&inst.host).is_some() {
                Resolution::Pending
            } else {
                out.names.insert(inst.host.clone());
                answers
                    .entry(inst.host.clone())
                    .or_insert_with(|| lookup(&inst.host))
                    .clone()
            };
            let rule = match policy::check(&inst.host, &resolution, policy) {
                Verdict::Allowed => {
                    if let Resolution::Resolved(ips) = resolution {
                        approved.insert(inst.host.clone(), ips);
                        named_keys.insert((inst.service.clone(), inst.id.clone()), key.to_string());
                    }
                    return true;
                }
                Verdict::Denied(rule) | Verdict::Unresolved(rule) => rule,
                Verdict::Pending => String::new(),
            };
            out.keys.insert(key.to_string(), rule);
            false
        },
        &mut refused,
    );
    for (key, r) in &refused {
        out.keys.insert(key.clone(), r.rule.clone());
    }
    out.refused = refused;
    let (snapshot, left_out) = dns_names::expand(snapshot, &approved);
    for (service, id, rule) in left_out {
        let key = named_keys.remove(&(service, id)).unwrap_or_default();
        out.keys.insert(key, rule);
    }
    (snapshot, out)
}

fn warn_all(warnings: &[SchemaError]) {
    for w in warnings {
        tracing::warn!(key = %w.key, "left out of the rendered config: {}", w.rule);
    }
}
/// Why the source task ended, when it ended before shutdown (it ends on shutdown alone,
/// so it panicked): without it nothing would ever change again.
pub(crate) async fn ended(
    source: tokio::task::JoinHandle<()>,
    shutdown: &CancellationToken,
) -> Option<String> {
    if shutdown.is_cancelled() {
        return None;
    }
    Some(match source.await {
        Err(e) if e.is_panic() => {
            let p = e.into_panic();
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            format!("panicked: {msg}")
        }
        _ => "stopped".to_string(),
    })
}
