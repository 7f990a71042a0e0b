//! One issuer at a time: `<prefix>/acme/lock` is created if absent, on a lease of
//! `lock_ttl_s`, holding the winner's watcher name. The others watch the key and try
//! again when it goes (the holder stopped and revoked its lease, or died and its lease
//! expired). The key's create revision is the holder's fencing token: every write of
//! the issuer is a transaction that compares it, so an issuer that lost the lock
//! without knowing yet (a long GC pause, a partition) writes nothing.

use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, EventType, PutOptions, Txn, TxnOp, WatchOptions};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::etcd;
use crate::registrar::lease::{keep_alive, KeeperEvent};

/// The lock, held.
pub struct Held {
    pub lease: i64,
    /// Create revision of the lock key: compared by every write.
    pub revision: i64,
    pub key: String,
    /// Cancelled when the lease is lost (or at shutdown).
    pub lost: CancellationToken,
}

impl Held {
    /// `ops` as one transaction that applies only while this issuer holds the lock.
    /// False: it does not any more.
    pub async fn write(
        &self,
        client: &mut Client,
        ops: Vec<TxnOp>,
    ) -> Result<bool, etcd_client::Error> {
        let txn = Txn::new()
            .when(vec![Compare::create_revision(
                self.key.clone(),
                CompareOp::Equal,
                self.revision,
            )])
            .and_then(ops);
        let r = etcd::call(client.txn(txn)).await?;
        if !r.succeeded() {
            self.lost.cancel();
        }
        Ok(r.succeeded())
    }

    /// Gives the lock up at once (shutdown): the next issuer need not wait for the TTL.
    pub async fn release(&self, client: &mut Client) {
        self.lost.cancel();
        if let Err(e) = etcd::call(client.lease_revoke(self.lease)).await {
            tracing::debug!("acme: revoking the lock's lease: {e}");
        }
    }
}

/// Campaigns until this watcher holds the lock (Some) or `shutdown` (None). Spawns the
/// lease's keep-alive on `tracker`.
pub async fn acquire(
    client: &mut Client,
    etcd_cfg: &crate::config::EtcdConfig,
    key: &str,
    name: &str,
    ttl: Duration,
    tracker: &tokio_util::task::TaskTracker,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<Held>> {
    loop {
        if shutdown.is_cancelled() {
            return Ok(None);
        }
        let lease = etcd::call(client.lease_grant(ttl.as_secs() as i64, None))
            .await?
            .id();
        let txn = Txn::new()
            .when(vec![Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then(vec![TxnOp::put(
                key,
                name,
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else(vec![TxnOp::get(key, None)]);
        let r = etcd::call(client.txn(txn)).await?;
        let rev = r.header().map_or(0, |h| h.revision());
        if r.succeeded() {
            let lost = shutdown.child_token();
            let (tx, mut rx) = mpsc::channel(4);
            tracker.spawn(keep_alive(etcd_cfg.clone(), lease, ttl, tx, lost.clone()));
            let watch_lost = lost.clone();
            tracker.spawn(async move {
                while let Some(r) = rx.recv().await {
                    match r.event {
                        KeeperEvent::Lost => {
                            tracing::warn!(
                                "acme: the issuer's lease on the lock expired: stepping down"
                            );
                            watch_lost.cancel();
                            return;
                        }
                        KeeperEvent::Trouble(t) => {
                            tracing::warn!("acme: keeping the lock's lease alive: {t}")
                        }
                        KeeperEvent::Alive => {}
                    }
                }
            });
            return Ok(Some(Held {
                lease,
                revision: rev,
                key: key.to_string(),
                lost,
            }));
        }
        // Someone else holds it: our lease is not needed.
        let _ = etcd::call(client.lease_revoke(lease)).await;
        let holder = r
            .op_responses()
            .into_iter()
            .find_map(|op| match op {
                etcd_client::TxnOpResponse::Get(g) => g
                    .kvs()
                    .first()
                    .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
                _ => None,
            })
            .unwrap_or_default();
        tracing::info!(holder = %holder, "acme: another watcher issues; waiting for its lock to go");
        wait_gone(client, key, rev, ttl, shutdown).await;
    }
}

/// Returns once `key` is deleted after `rev` (or, as a safety net, after a while, to
/// campaign again: a watch that broke silently must not stall the fleet's issuing).
async fn wait_gone(
    client: &mut Client,
    key: &str,
    rev: i64,
    ttl: Duration,
    shutdown: &CancellationToken,
) {
    let recheck = (ttl * 4).max(Duration::from_secs(10));
    let watched = async {
        let Ok(mut stream) = client
            .watch(key, Some(WatchOptions::new().with_start_revision(rev + 1)))
            .await
        else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            return;
        };
        while let Ok(Some(resp)) = stream.message().await {
            if resp.canceled() {
                return;
            }
            if resp
                .events()
                .iter()
                .any(|e| e.event_type() == EventType::Delete)
            {
                return;
            }
        }
    };
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = watched => {}
        _ = tokio::time::sleep(recheck) => {}
    }
}
