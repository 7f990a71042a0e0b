//! The registrar's etcd session: one client (connected once; it reconnects by itself),
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

use etcd_client::{Client, PutOptions, Txn, TxnOp};
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

    /// Connects on first use; the client reconnects by itself after that.
    async fn client(&mut self) -> Result<&mut Client, SessionError> {
        let client = match self.client.take() {
            Some(c) => c,
            None => etcd::connect(&self.etcd).await?,
        };
        Ok(self.client.insert(client))
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
        let client = client.clone();
        tracing::info!(
            lease = l.id,
            reused = l.reused,
            ttl = ttl.as_secs(),
            "etcd: {} lease",
            if l.reused { "reusing live" } else { "granted" }
        );
        let stop = self.shutdown.child_token();
        self.tracker.spawn(lease::keep_alive(
            client,
            l.id,
            ttl,
            self.keeper_tx.clone(),
            stop.clone(),
        ));
        self.keeper_stop = Some(stop);
        self.lease = Some(l.id);
        Ok(l.id)
    }

    /// Every key under this node's prefix (`plan::is_ours`), at one revision. Reads
    /// nothing else: read-write on that prefix is all the registrar's etcd role needs.
    pub(crate) async fn read_back(&mut self) -> Result<ReadBack, SessionError> {
        let prefix = self.etcd.prefix.clone();
        let node = self.node.clone();
        let client = self.client().await?;
        let listing = etcd::list_prefix(client, &schema::node_prefix(&prefix, &node)).await?;
        let mut keys = BTreeMap::new();
        for kv in &listing.kvs {
            let Ok(key) = kv.key_str() else { continue };
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

    /// Writes `ops` in transactions of at most `MAX_TXN_OPS`, puts on `lease`. On
    /// failure the caller must distrust what it believes etcd holds: a later read-back
    /// finds out what actually happened.
    pub(crate) async fn write(&mut self, ops: &[KeyOp], lease: i64) -> Result<(), SessionError> {
        let prefix = self.etcd.prefix.clone();
        let client = self.client().await?;
        for chunk in ops.chunks(plan::MAX_TXN_OPS) {
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
            let resp = etcd::call(client.txn(Txn::new().and_then(txn_ops))).await?;
            let revision = resp.header().map(|h| h.revision()).unwrap_or_default();
            for op in chunk {
                log_op(&prefix, op, revision);
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
            tracing::info!(%service, %instance, %key, revision, value = %v, "registered")
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
