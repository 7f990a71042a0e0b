//! The registrar's etcd session: one client (made again after a failed call, so that
//! TLS files replaced on disk are read again; otherwise it reconnects by itself),
//! this node's lease and the keeper task that keeps it alive, and the retry policy
//! after a failure. It reads this node's keys back and writes the planned ops; what to
//! write is the loop's business.
//!
//! A session has a lease or it has none. It loses it when etcd says the lease is gone
//! (a write or the keeper finds out); then it grants a new one at once, unless leases
//! keep vanishing within a TTL, then it backs off like after any failure. While a retry
//! is pending (`retry_at`), the loop does not sync.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::lease::{self, KeeperReport, LeaseError};
use super::plan::{self, Actual, KeyOp};
use crate::backoff::Backoff;
use crate::config::{EtcdConfig, RegistrarConfig};
use crate::etcd;
use crate::schema;

/// Why a sync with etcd did not complete.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SessionError {
    /// Our lease no longer exists: grant a new one and put everything.
    #[error("etcd: lease not found")]
    LeaseLost,
    /// Anything else etcd said: try again after a backoff.
    #[error("{0}")]
    Etcd(#[source] etcd_client::Error),
    /// Taking a lease failed. Never `LeaseLost`: that would only loop back into the
    /// same call.
    #[error("{0}")]
    Lease(#[source] LeaseError),
    /// Another registrar, alive, holds this node's name: stop, never fight over keys.
    #[error("{0}")]
    NodeTaken(Holder),
    /// This node's record is not what our last write left (deleted by hand, say), and
    /// no other registrar holds it: read it back and write it again.
    #[error("this node's record in etcd changed behind the registrar's back; reading it back")]
    Disturbed,
}

/// The registrar that holds this node's name, as its node record tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Holder {
    pub(crate) node: String,
    pub(crate) lease: i64,
    pub(crate) addr: String,
    /// Seconds since it started; None when its record does not say.
    pub(crate) age: Option<u64>,
}

impl Holder {
    fn new(node: &str, lease: i64, value: &[u8], now: u64) -> Holder {
        let record = serde_json::from_slice::<schema::NodeRecord>(value).ok();
        Holder {
            node: node.to_string(),
            lease,
            addr: record
                .as_ref()
                .map_or_else(|| "unknown".to_string(), |r| r.addr.clone()),
            age: record.map(|r| now.saturating_sub(r.started_at)),
        }
    }
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let started = match self.age {
            Some(s) => format!("started {s}s ago"),
            None => "start time unknown".to_string(),
        };
        write!(
            f,
            "node name {:?} is held by another registrar (lease {:x}, advertise {}, {started}): give this host a unique --node",
            self.node, self.lease, self.addr
        )
    }
}

/// What this node's record must be for a write to go through. Every write
/// transaction compares it, so two registrars given one name never take turns
/// overwriting or deleting each other's keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Claim {
    /// On our lease: the record's lease must still be ours.
    Held,
    /// Absent: the write that creates it must find it still absent.
    Absent,
    /// Left by a registrar that is gone (a dead lease, no lease, or our own replaced
    /// lease): the write that takes it over must find exactly that version.
    Stale { mod_revision: i64 },
}

/// The node record as read from etcd.
struct Seen {
    lease: i64,
    mod_revision: i64,
    value: Vec<u8>,
}

impl From<etcd_client::Error> for SessionError {
    fn from(e: etcd_client::Error) -> SessionError {
        if lease::is_lease_not_found(&e) {
            SessionError::LeaseLost
        } else {
            SessionError::Etcd(e)
        }
    }
}

/// How the removal of this node's v1 keys went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum V1Cleanup {
    /// This many keys were deleted (often none).
    Done(usize),
    /// etcd refused to let us read or delete outside our node prefix: under a
    /// least-privilege role the v1 keys are the operator's to remove.
    Refused,
}

fn is_permission_denied(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.message().contains("permission denied"))
}

/// This node's keys as read back from etcd, at one revision.
pub(crate) struct ReadBack {
    pub(crate) revision: i64,
    pub(crate) keys: BTreeMap<String, Actual>,
}

pub(crate) struct Session {
    etcd: EtcdConfig,
    node: String,
    node_key: String,
    claim: Claim,
    /// The state file's lease when it was replaced for a new TTL (`lease::Granted`).
    replaced_lease: Option<i64>,
    ttl: Duration,
    state_dir: PathBuf,
    client: Option<Client>,
    lease: Option<i64>,
    keeper_stop: Option<CancellationToken>,
    /// While set, etcd is being retried after a failure: no syncs before then.
    retry_at: Option<Instant>,
    backoff: Backoff,
    last_lease_loss: Option<Instant>,
    /// A failure has been logged as a warning; the next success says it is over.
    trouble: bool,
    tracker: TaskTracker,
    keeper_tx: mpsc::Sender<KeeperReport>,
    shutdown: CancellationToken,
}

impl Session {
    pub(crate) fn new(
        cfg: &RegistrarConfig,
        tracker: TaskTracker,
        keeper_tx: mpsc::Sender<KeeperReport>,
        shutdown: CancellationToken,
    ) -> Session {
        Session {
            etcd: cfg.etcd.clone(),
            node: cfg.node.clone(),
            node_key: schema::node_key(&cfg.etcd.prefix, &cfg.node),
            claim: Claim::Absent,
            replaced_lease: None,
            ttl: cfg.ttl,
            state_dir: cfg.state_dir.clone(),
            client: None,
            lease: None,
            keeper_stop: None,
            retry_at: None,
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(5)),
            last_lease_loss: None,
            trouble: false,
            tracker,
            keeper_tx,
            shutdown,
        }
    }

    pub(crate) fn lease(&self) -> Option<i64> {
        self.lease
    }

    /// When the pending retry is due; None: a sync may run now.
    pub(crate) fn retry_at(&self) -> Option<Instant> {
        self.retry_at
    }

    /// Drops a pending retry: the timer fired, or etcd is known to answer again.
    pub(crate) fn retry_now(&mut self) {
        self.retry_at = None;
    }

    /// Connects on first use and after a failed call (`failed`), so TLS files replaced
    /// on disk are read again: the client's own reconnects keep the files it was made
    /// with. (The keeper has clients of its own, one per member: `lease::keep_alive`.)
    async fn client(&mut self) -> Result<&mut Client, SessionError> {
        let client = match self.client.take() {
            Some(c) => c,
            None => etcd::connect(&self.etcd).await?,
        };
        Ok(self.client.insert(client))
    }

    /// Starts the keeper of `lease`, stopping the one before.
    fn start_keeper(&mut self, lease: i64) {
        if let Some(stop) = self.keeper_stop.take() {
            stop.cancel();
        }
        let stop = self.shutdown.child_token();
        self.tracker.spawn(lease::keep_alive(
            self.etcd.clone(),
            lease,
            self.ttl,
            self.keeper_tx.clone(),
            stop.clone(),
        ));
        self.keeper_stop = Some(stop);
    }

    /// A client for a watch: the session's own connection.
    pub(crate) async fn watch_client(&mut self) -> Result<Client, SessionError> {
        Ok(self.client().await?.clone())
    }

    /// Takes a lease, the one in the state file if it is alive, else a new one, and
    /// starts its keeper. Returns the lease id.
    pub(crate) async fn open(&mut self) -> Result<i64, SessionError> {
        let ttl = self.ttl;
        let state_dir = self.state_dir.clone();
        let client = self.client().await?;
        let l = lease::acquire(client, ttl, &state_dir)
            .await
            .map_err(SessionError::Lease)?;
        tracing::info!(
            lease = l.id,
            reused = l.reused,
            ttl = ttl.as_secs(),
            "etcd: {} lease",
            if l.reused { "reusing live" } else { "granted" }
        );
        self.start_keeper(l.id);
        self.lease = Some(l.id);
        self.replaced_lease = l.replaced;
        // Before anything is written: a registrar that started second with a name
        // already in use must leave etcd as it found it.
        let node_key = self.node_key.clone();
        let client = self.client().await?;
        let resp = etcd::call(client.get(node_key.as_str(), None)).await?;
        let seen = resp.kvs().first().map(|kv| Seen {
            lease: kv.lease(),
            mod_revision: kv.mod_revision(),
            value: kv.value().to_vec(),
        });
        self.claim = self.claim_of(seen, l.id).await?;
        Ok(l.id)
    }

    /// Whether we may write this node's keys, judging by its record: on our lease,
    /// absent, or left by a registrar whose lease is gone. A record on another live
    /// lease is `NodeTaken`.
    async fn claim_of(&mut self, seen: Option<Seen>, lease: i64) -> Result<Claim, SessionError> {
        let Some(seen) = seen else {
            return Ok(Claim::Absent);
        };
        if seen.lease == lease {
            return Ok(Claim::Held);
        }
        let stale = Claim::Stale {
            mod_revision: seen.mod_revision,
        };
        if seen.lease == 0 || Some(seen.lease) == self.replaced_lease {
            return Ok(stale);
        }
        let client = self.client().await?;
        match etcd::call(client.lease_time_to_live(seen.lease, None)).await {
            Ok(r) if r.ttl() > 0 => Err(SessionError::NodeTaken(Holder::new(
                &self.node,
                seen.lease,
                &seen.value,
                schema::unix_now(),
            ))),
            Ok(_) => Ok(stale),
            Err(e) if etcd::is_lease_not_found(&e) => Ok(stale),
            Err(e) => Err(SessionError::Etcd(e)),
        }
    }

    /// Every key under this node's prefix (`plan::is_ours`), at one revision. Reads
    /// nothing else: read-write on that prefix is all the registrar's etcd role needs.
    /// `NodeTaken` when the node record is on another registrar's live lease.
    pub(crate) async fn read_back(&mut self, lease: i64) -> Result<ReadBack, SessionError> {
        let prefix = self.etcd.prefix.clone();
        let node = self.node.clone();
        let client = self.client().await?;
        let listing = etcd::list_prefix(client, &schema::node_prefix(&prefix, &node)).await?;
        let mut keys = BTreeMap::new();
        let mut seen = None;
        for kv in &listing.kvs {
            let Ok(key) = kv.key_str() else { continue };
            if key == self.node_key {
                seen = Some(Seen {
                    lease: kv.lease(),
                    mod_revision: kv.mod_revision(),
                    value: kv.value().to_vec(),
                });
            }
            if plan::is_ours(&prefix, &node, key) {
                keys.insert(
                    key.to_string(),
                    Actual {
                        value: String::from_utf8_lossy(kv.value()).into_owned(),
                        lease: kv.lease(),
                    },
                );
            }
        }
        self.claim = self.claim_of(seen, lease).await?;
        Ok(ReadBack {
            revision: listing.revision,
            keys,
        })
    }

    /// Deletes what a v1 registrar of this node left behind: its instances under
    /// `services/` (`plan::is_ours_v1`) and its node record at `nodes/<node>`. On a
    /// reused lease they would otherwise live as long as this registrar does. Needs
    /// read access to all of `services/`, which a least-privilege role refuses
    /// (`V1Cleanup::Refused`).
    pub(crate) async fn remove_v1_keys(&mut self) -> Result<V1Cleanup, SessionError> {
        let prefix = self.etcd.prefix.clone();
        let node = self.node.clone();
        // v1's node record: the v2 node prefix without its slash.
        let v1_node_key = format!("{prefix}/nodes/{node}");
        let client = self.client().await?;
        let found = async {
            let listing = etcd::list_prefix(client, &schema::services_prefix(&prefix)).await?;
            let node_kv = etcd::call(client.get(v1_node_key.as_str(), None)).await?;
            Ok::<_, etcd_client::Error>((listing, node_kv))
        }
        .await;
        let (listing, node_kv) = match found {
            Ok(f) => f,
            Err(e) if is_permission_denied(&e) => return Ok(V1Cleanup::Refused),
            Err(e) => return Err(e.into()),
        };
        let mut stale: Vec<KeyOp> = listing
            .kvs
            .iter()
            .filter_map(|kv| kv.key_str().ok().map(|k| (k, kv.value())))
            .filter(|(key, value)| plan::is_ours_v1(&prefix, &node, key, value))
            .map(|(key, _)| KeyOp::Delete {
                key: key.to_string(),
            })
            .collect();
        if !node_kv.kvs().is_empty() {
            stale.push(KeyOp::Delete { key: v1_node_key });
        }
        for chunk in stale.chunks(plan::MAX_TXN_OPS) {
            let ops: Vec<TxnOp> = chunk
                .iter()
                .filter_map(|op| match op {
                    KeyOp::Delete { key } => Some(TxnOp::delete(key.as_str(), None)),
                    KeyOp::Put { .. } => None,
                })
                .collect();
            match etcd::call(client.txn(Txn::new().and_then(ops))).await {
                Ok(resp) => {
                    let revision = resp.header().map(|h| h.revision()).unwrap_or_default();
                    for op in chunk {
                        log_op(&prefix, op, revision);
                    }
                }
                Err(e) if is_permission_denied(&e) => return Ok(V1Cleanup::Refused),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(V1Cleanup::Done(stale.len()))
    }

    /// Writes `ops` in transactions of at most `MAX_TXN_OPS`, puts on `lease`, each
    /// transaction guarded by the node record's claim (`Claim`); `written` hears of
    /// each op once its transaction went through. On failure the caller must distrust
    /// what it believes etcd holds: a later read-back finds out what actually happened.
    pub(crate) async fn write(
        &mut self,
        ops: &[KeyOp],
        lease: i64,
        mut written: impl FnMut(&KeyOp),
    ) -> Result<(), SessionError> {
        let prefix = self.etcd.prefix.clone();
        let node_key = self.node_key.clone();
        let node = self.node.clone();
        for chunk in ops.chunks(plan::MAX_TXN_OPS) {
            let guard = match self.claim {
                Claim::Held => Compare::lease(node_key.as_str(), CompareOp::Equal, lease),
                Claim::Absent => Compare::create_revision(node_key.as_str(), CompareOp::Equal, 0),
                Claim::Stale { mod_revision } => {
                    Compare::mod_revision(node_key.as_str(), CompareOp::Equal, mod_revision)
                }
            };
            let txn_ops: Vec<TxnOp> = chunk
                .iter()
                .map(|op| match op {
                    KeyOp::Put { key, value } => TxnOp::put(
                        key.as_str(),
                        value.as_str(),
                        Some(PutOptions::new().with_lease(lease)),
                    ),
                    KeyOp::Delete { key } => TxnOp::delete(key.as_str(), None),
                })
                .collect();
            let txn = Txn::new()
                .when([guard])
                .and_then(txn_ops)
                .or_else([TxnOp::get(node_key.as_str(), None)]);
            let client = self.client().await?;
            let resp = etcd::call(client.txn(txn)).await?;
            if !resp.succeeded() {
                let found = resp.op_responses().into_iter().find_map(|op| match op {
                    TxnOpResponse::Get(get) => get.kvs().first().cloned(),
                    _ => None,
                });
                // A record that exists on a lease is alive: etcd deletes a lease's
                // keys with it. Another lease than ours: someone took the name (our
                // old lease was lost, so its keys are gone).
                return Err(match found {
                    Some(kv) if kv.lease() != 0 && kv.lease() != lease => SessionError::NodeTaken(
                        Holder::new(&node, kv.lease(), kv.value(), schema::unix_now()),
                    ),
                    _ => SessionError::Disturbed,
                });
            }
            let revision = resp.header().map(|h| h.revision()).unwrap_or_default();
            for op in chunk {
                if matches!(op, KeyOp::Put { key, .. } if *key == node_key) {
                    self.claim = Claim::Held;
                }
                log_op(&prefix, op, revision);
                written(op);
            }
        }
        Ok(())
    }

    /// A sync went through: the backoff starts over.
    pub(crate) fn succeeded(&mut self) {
        if self.trouble {
            tracing::info!("etcd: writes work again");
            self.trouble = false;
        }
        self.backoff.reset();
    }

    /// A sync failed for a reason other than a lost lease: retry after a backoff. Logs
    /// the first failure of a spell as a warning, the rest at debug.
    pub(crate) fn failed(&mut self, e: &SessionError) {
        if matches!(
            e,
            SessionError::Etcd(_) | SessionError::Lease(LeaseError::Etcd(_))
        ) {
            // The next attempt connects afresh, reading the TLS files again.
            self.client = None;
        }
        let delay = self.backoff.next_delay();
        if !self.trouble {
            tracing::warn!(error = %e, "etcd: cannot sync; retrying with backoff");
            self.trouble = true;
        } else {
            tracing::debug!(error = %e, retry_in = ?delay, "etcd still failing");
        }
        self.retry_at = Some(Instant::now() + delay);
    }

    /// The lease is gone: stop its keeper and grant a new one at the next sync, at once
    /// unless leases keep vanishing, then back off like any failure.
    pub(crate) fn lease_lost(&mut self) {
        if let Some(id) = self.lease.take() {
            tracing::warn!(
                lease = id,
                "etcd: lease is gone (expired during an outage, or etcd lost its data); granting a new one and registering everything again"
            );
        }
        if let Some(stop) = self.keeper_stop.take() {
            stop.cancel();
        }
        let now = Instant::now();
        let recent = self
            .last_lease_loss
            .is_some_and(|t| now.duration_since(t) < self.ttl);
        self.last_lease_loss = Some(now);
        self.retry_at = recent.then(|| now + self.backoff.next_delay());
    }

    /// Ends the session after losing the node's name to another registrar: revokes our
    /// lease, which takes only our own keys with it (the other's hang on its lease).
    pub(crate) async fn abandon(&mut self) {
        if let Some(stop) = self.keeper_stop.take() {
            stop.cancel();
        }
        if let (Some(lease), Some(client)) = (self.lease.take(), &mut self.client) {
            match etcd::call(client.lease_revoke(lease)).await {
                Ok(_) => {
                    lease::forget(&self.state_dir);
                    tracing::info!(
                        lease,
                        "lease revoked: nothing of this registrar is left in etcd"
                    );
                }
                Err(e) => {
                    tracing::warn!(lease, error = %e, "could not revoke the lease: its keys expire after the TTL")
                }
            }
        }
    }

    /// Ends the session at shutdown: revokes the lease when `deregister` (this node's
    /// keys go at once), else leaves the keys to the TTL.
    pub(crate) async fn close(&mut self, deregister: bool) {
        if let Some(stop) = self.keeper_stop.take() {
            stop.cancel();
        }
        match (deregister, self.lease, &mut self.client) {
            (true, Some(lease), Some(client)) => {
                match etcd::call(client.lease_revoke(lease)).await {
                    Ok(_) => {
                        lease::forget(&self.state_dir);
                        tracing::info!(lease, node = %self.node, "stopped; lease revoked, this node's keys are gone");
                    }
                    Err(e) => tracing::warn!(
                        lease,
                        error = %e,
                        "stopped, but could not revoke the lease: this node's keys expire after the TTL"
                    ),
                }
            }
            _ => tracing::info!(
                node = %self.node,
                ttl = self.ttl.as_secs(),
                "stopped; keys stay until the lease TTL runs out, so a restart causes no churn"
            ),
        }
    }
}

fn log_op(prefix: &str, op: &KeyOp, revision: i64) {
    let (key, value) = match op {
        KeyOp::Put { key, value } => (key, Some(value)),
        KeyOp::Delete { key } => (key, None),
    };
    match (schema::parse_key(prefix, key), value) {
        (
            Ok(schema::Key::Service {
                service, instance, ..
            }),
            Some(v),
        ) => {
            if v.contains(r#""draining":true"#) {
                tracing::info!(%service, %instance, %key, revision, value = %v, "draining")
            } else {
                tracing::info!(%service, %instance, %key, revision, value = %v, "registered")
            }
        }
        (
            Ok(schema::Key::Service {
                service, instance, ..
            }),
            None,
        ) => {
            tracing::info!(%service, %instance, %key, revision, "deregistered")
        }
        (_, Some(_)) => tracing::debug!(%key, revision, "node key written"),
        (_, None) => tracing::debug!(%key, revision, "deleted"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_holder_message_says_who_holds_the_name_and_what_to_do() {
        let record = br#"{"name":"web","addr":"10.0.0.5","version":"0.1.0","started_at":100}"#;
        assert_eq!(
            Holder::new("web", 0x6a3f, record, 142).to_string(),
            r#"node name "web" is held by another registrar (lease 6a3f, advertise 10.0.0.5, started 42s ago): give this host a unique --node"#
        );
        let text = Holder::new("web", 1, b"not json", 142).to_string();
        assert!(
            text.contains("advertise unknown, start time unknown"),
            "{text}"
        );
    }
}
