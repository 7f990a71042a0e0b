//! `<prefix>/watchers/<name>`: the watcher's status record (`schema::WatcherStatus`) on
//! its own lease, so a dead watcher's record disappears by itself within `STATUS_TTL`.
//!
//! Own etcd session, separate from the source: a lost lease or a slow put never delays
//! a render. The latest status comes in on a `watch` channel and is (re)written on
//! every change and after every reconnect; a clean stop revokes the lease.

use std::convert::Infallible;
use std::time::Duration;

use etcd_client::{Client, PutOptions};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::backoff::{sleep_or_stop, Backoff};
use crate::config::EtcdConfig;
use crate::etcd;
use crate::schema::{self, WatcherStatus};

pub(crate) const STATUS_TTL: Duration = Duration::from_secs(10);

/// The end of a mass-removal hold that the record of `name` (left by an earlier run of
/// this watcher, not yet expired) announces, if any. Best effort: no answer within a
/// couple of seconds is no hold.
pub(crate) async fn held_until(cfg: &EtcdConfig, name: &str) -> Option<std::time::SystemTime> {
    let key = schema::watcher_key(&cfg.prefix, name);
    let read = async {
        let mut client = etcd::connect(cfg).await.ok()?;
        let resp = etcd::call(client.get(key.as_str(), None)).await.ok()?;
        let status: WatcherStatus = serde_json::from_slice(resp.kvs().first()?.value()).ok()?;
        status.held_until
    };
    let secs = tokio::time::timeout(Duration::from_secs(2), read)
        .await
        .ok()??;
    Some(std::time::UNIX_EPOCH + Duration::from_secs(secs))
}

pub(crate) async fn run(
    cfg: EtcdConfig,
    name: String,
    mut rx: watch::Receiver<WatcherStatus>,
    shutdown: CancellationToken,
) {
    let key = schema::watcher_key(&cfg.prefix, &name);
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        let mut lease = None;
        let err = tokio::select! {
            _ = shutdown.cancelled() => None,
            e = keep_fresh(&cfg, &key, &mut rx, &mut lease, &mut backoff) => match e {
                Ok(never) => match never {},
                Err(e) => Some(e),
            },
        };
        let Some(err) = err else {
            if let Some((mut client, id)) = lease {
                let _ = etcd::call(client.lease_revoke(id)).await;
            }
            return;
        };
        let delay = backoff.next_delay();
        tracing::debug!(key = %key, "status record: {err}; retrying in {delay:?}");
        if !sleep_or_stop(delay, &shutdown).await {
            return;
        }
    }
}

/// Grants a lease, writes the status, keeps both fresh. Returns only on error.
async fn keep_fresh(
    cfg: &EtcdConfig,
    key: &str,
    rx: &mut watch::Receiver<WatcherStatus>,
    lease: &mut Option<(Client, i64)>,
    backoff: &mut Backoff,
) -> Result<Infallible, etcd_client::Error> {
    let mut client = etcd::connect(cfg).await?;
    let id = etcd::call(client.lease_grant(STATUS_TTL.as_secs() as i64, None))
        .await?
        .id();
    *lease = Some((client.clone(), id));
    let (mut keeper, mut responses) = etcd::call(client.lease_keep_alive(id)).await?;
    let mut tick = tokio::time::interval(STATUS_TTL / 3);
    let mut dirty = true;
    loop {
        if dirty {
            let value =
                serde_json::to_string(&*rx.borrow_and_update()).unwrap_or_else(|_| "{}".into());
            etcd::call(client.put(key, value, Some(PutOptions::new().with_lease(id)))).await?;
            backoff.reset();
        }
        tokio::select! {
            r = rx.changed() => {
                if r.is_err() {
                    // The loop is gone; keep the lease until shutdown revokes it.
                    std::future::pending::<()>().await;
                }
                dirty = true;
            }
            _ = tick.tick() => {
                dirty = false;
                etcd::call(keeper.keep_alive()).await?;
                match etcd::call(responses.message()).await? {
                    Some(r) if r.ttl() > 0 => {}
                    _ => {
                        return Err(etcd_client::Error::LeaseKeepAliveError(
                            "the status lease expired; granting a new one".into(),
                        ))
                    }
                }
            }
        }
    }
}
