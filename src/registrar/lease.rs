//! This registrar's one etcd lease: every key it writes hangs on it, so a dead or
//! partitioned host vanishes from etcd after the TTL without anyone deleting anything.
//!
//! The lease id is kept in `<state-dir>/registrar.lease`, so a restarted registrar picks
//! up its live lease and its keys stay exactly as they are (no rewrite, no churn for
//! watchers). The keeper task sends keep-alives at TTL/3 and recreates the keep-alive
//! stream whenever it dies (an etcd restart kills open streams) or goes unanswered for
//! half the TTL; it reports, never decides: the session re-grants when told the lease
//! is lost. `keep_alive` knows only a lease id, a TTL and where etcd is, so any other
//! holder of a lease can run it too.
//!
//! A new stream is opened on every endpoint at once, each member over a client of its
//! own, and the first member to answer carries it; each try is bounded by TTL/3, and
//! tries are at most TTL/3 apart. Through the shared client's balancer a try went to one
//! member, and a member that accepts connections but answers nothing (one restarted
//! while its cluster has no quorum: it serves only once it has published itself through
//! a leader) held it for the whole call timeout, longer than a short TTL: a lease that
//! survived the outage (etcd restarts every lease's TTL when a leader is elected)
//! expired after it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use etcd_client::{Client, LeaseKeepAliveStream, LeaseKeeper};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backoff::{sleep_or_stop, Backoff};
use crate::config::EtcdConfig;
use crate::etcd;

const STATE_FILE: &str = "registrar.lease";

#[derive(Debug, thiserror::Error)]
pub(crate) enum LeaseError {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("cannot write the lease state file {path}: {source} (is --state-dir writable?)")]
    State {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A lease this registrar may hang its keys on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Granted {
    pub(crate) id: i64,
    /// Picked up from the state file, still alive: etcd may already hold our keys.
    pub(crate) reused: bool,
    /// The state file's lease, alive but replaced because its TTL differs from
    /// `--ttl`: keys on it are still ours, and move to the new lease.
    pub(crate) replaced: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct State {
    lease_id: i64,
}

fn state_path(state_dir: &Path) -> PathBuf {
    state_dir.join(STATE_FILE)
}

/// The lease id in a state file's text; None for anything unreadable (a fresh grant is
/// the safe answer to a damaged file).
fn parse_state(text: &str) -> Option<i64> {
    serde_json::from_str::<State>(text)
        .ok()
        .map(|s| s.lease_id)
        .filter(|id| *id != 0)
}

fn render_state(lease_id: i64) -> String {
    serde_json::to_string(&State { lease_id }).unwrap_or_default() + "\n"
}

/// Writes the state file atomically (temp file, fsync, rename, fsync of the folder), so
/// a crash mid-write never leaves a half-written id behind, and a power loss after it
/// returns never brings the old id back (the rename lives in the folder's entry).
fn write_state(path: &Path, lease_id: i64) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(render_state(lease_id).as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()
}

/// Removes the state file after a revoke; a missing file is fine.
pub(crate) fn forget(state_dir: &Path) {
    let _ = std::fs::remove_file(state_path(state_dir));
}

/// Reuses the lease named in the state file if it is still alive with the same TTL,
/// otherwise grants a new one and records it.
pub(crate) async fn acquire(
    client: &mut Client,
    ttl: Duration,
    state_dir: &Path,
) -> Result<Granted, LeaseError> {
    let path = state_path(state_dir);
    let ttl_secs = ttl.as_secs() as i64;
    let previous = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| parse_state(&t));
    let mut replaced = None;
    if let Some(id) = previous {
        // etcd 3.4 answers a TimeToLive of a dead lease with "lease not found" rather
        // than TTL -1: both mean grant a new one.
        match etcd::call(client.lease_time_to_live(id, None)).await {
            Ok(r) if r.ttl() > 0 && r.granted_ttl() == ttl_secs => {
                return Ok(Granted {
                    id,
                    reused: true,
                    replaced: None,
                });
            }
            Ok(r) if r.ttl() > 0 => {
                // The TTL changed: a new lease carries it; the old one expires by itself
                // once every key has moved over.
                tracing::info!(
                    lease = id,
                    granted_ttl = r.granted_ttl(),
                    "lease TTL differs from --ttl; granting a new lease"
                );
                replaced = Some(id);
            }
            Ok(_) => {}
            Err(e) if is_lease_not_found(&e) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let r = etcd::call(client.lease_grant(ttl_secs, None)).await?;
    write_state(&path, r.id()).map_err(|source| LeaseError::State { path, source })?;
    Ok(Granted {
        id: r.id(),
        reused: false,
        replaced,
    })
}

/// Whether an etcd error says our lease no longer exists (expired or revoked, or the
/// cluster was replaced by an empty one).
pub(crate) fn is_lease_not_found(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::LeaseKeepAliveError(m) => m.contains("not found"),
        etcd_client::Error::GRpcStatus(s) => s.message().contains("lease not found"),
        _ => false,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum KeeperEvent {
    /// Keep-alives are failing; the lease may still be alive.
    Trouble(Trouble),
    /// Keep-alives work again after trouble: etcd may have restarted, reconcile.
    Alive,
    /// The lease is gone: grant a new one and put everything again.
    Lost,
}

/// Why keep-alives fail (etcd's own errors as text: they are neither `Clone` nor `Eq`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Trouble {
    #[error("cannot open the keep-alive stream: {0}")]
    Open(String),
    #[error("no keep-alive answer for half the TTL")]
    Silent,
    #[error("the keep-alive stream closed")]
    Closed,
    #[error("keep-alive failed: {0}")]
    Failed(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KeeperReport {
    pub(crate) lease: i64,
    pub(crate) event: KeeperEvent,
}

/// The one endpoint `endpoint` of `cfg`, as a config of its own.
fn single(cfg: &EtcdConfig, endpoint: &str) -> EtcdConfig {
    EtcdConfig {
        endpoints: vec![endpoint.to_string()],
        ..cfg.clone()
    }
}

/// One client per endpoint, so that a keep-alive stream can be opened on every member
/// at once. A member's client is kept while it works (reusing its connection, which
/// matters on a lossy link) and made again after a failed or unanswered try (a
/// connection that may be dead is dropped, and TLS files are read again).
struct Members {
    cfg: EtcdConfig,
    clients: Vec<Option<Client>>,
}

impl Members {
    fn new(cfg: EtcdConfig) -> Members {
        let clients = vec![None; cfg.endpoints.len()];
        Members { cfg, clients }
    }

    /// Opens a keep-alive stream of `lease` on every endpoint at once, each try bounded
    /// by `limit`; the first member that answers wins. `Lost` as soon as one says the
    /// lease is gone.
    async fn open(
        &mut self,
        lease: i64,
        limit: Duration,
    ) -> Result<(LeaseKeeper, LeaseKeepAliveStream), Opened> {
        use futures_util::stream::{FuturesUnordered, StreamExt};
        let mut tries: FuturesUnordered<_> = self
            .cfg
            .endpoints
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let one = single(&self.cfg, e);
                let known = self.clients[i].clone();
                async move {
                    let attempt = async {
                        let mut client = match known {
                            Some(c) => c,
                            None => etcd::connect(&one).await?,
                        };
                        let opened = client.lease_keep_alive(lease).await?;
                        Ok::<_, etcd_client::Error>((client, opened))
                    };
                    let r = match tokio::time::timeout(limit, attempt).await {
                        Ok(r) => r.map_err(|e| (e.to_string(), is_lease_not_found(&e))),
                        Err(_) => Err((format!("{e}: no answer within {limit:?}"), false)),
                    };
                    (i, r)
                }
            })
            .collect();
        let mut errors = Vec::new();
        while let Some((i, r)) = tries.next().await {
            match r {
                Ok((client, opened)) => {
                    self.clients[i] = Some(client);
                    return Ok(opened);
                }
                Err((_, true)) => return Err(Opened::Lost),
                Err((e, false)) => {
                    self.clients[i] = None;
                    errors.push(e);
                }
            }
        }
        Err(Opened::Failed(errors.join("; ")))
    }
}

enum Opened {
    Lost,
    Failed(String),
}

/// Keeps `lease` alive until cancelled or lost, reporting on `reports` (tagged with the
/// lease id, so a report about a replaced lease can be told apart). Run it as a tracked
/// task. Knows nothing of what hangs on the lease: any holder of a lease can use it.
pub(crate) async fn keep_alive(
    cfg: EtcdConfig,
    lease: i64,
    ttl: Duration,
    reports: mpsc::Sender<KeeperReport>,
    shutdown: CancellationToken,
) {
    let period = ttl / 3;
    // Tries at most a period apart, each bounded by a period: a keep-alive goes out
    // within TTL/3 of etcd answering again.
    let limit = period.min(etcd::CALL_TIMEOUT);
    let silence = ttl / 2;
    let mut backoff = Backoff::new(Duration::from_millis(100), period);
    let mut healthy = true;
    let mut members = Members::new(cfg);
    let report = |event: KeeperEvent| {
        let reports = reports.clone();
        async move {
            let _ = reports.send(KeeperReport { lease, event }).await;
        }
    };
    loop {
        let opened = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = members.open(lease, limit) => r,
        };
        let (mut keeper, mut stream) = match opened {
            Ok(o) => o,
            Err(Opened::Lost) => {
                report(KeeperEvent::Lost).await;
                return;
            }
            Err(Opened::Failed(e)) => {
                if healthy {
                    healthy = false;
                    report(KeeperEvent::Trouble(Trouble::Open(e))).await;
                }
                if !sleep_or_stop(backoff.next_delay(), &shutdown).await {
                    return;
                }
                continue;
            }
        };
        if !healthy {
            healthy = true;
            report(KeeperEvent::Alive).await;
        }
        backoff.reset();
        // Opening the stream was a keep-alive, answered.
        let mut last_ack = Instant::now();
        let mut tick = tokio::time::interval_at(Instant::now() + period, period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let trouble = loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                // Half a TTL without an answer (retransmissions on a lossy link fit
                // in that): the other half is left to open the stream on a member
                // that answers, a try taking at most a third.
                _ = tokio::time::sleep_until(last_ack + silence) => break Trouble::Silent,
                _ = tick.tick() => {
                    if let Err(e) = keeper.keep_alive().await {
                        break Trouble::Failed(e.to_string());
                    }
                }
                msg = stream.message() => match msg {
                    Ok(Some(r)) if r.ttl() <= 0 => {
                        report(KeeperEvent::Lost).await;
                        return;
                    }
                    Ok(Some(_)) => last_ack = Instant::now(),
                    Ok(None) => break Trouble::Closed,
                    Err(e) => break Trouble::Failed(e.to_string()),
                },
            }
        };
        let silent = trouble == Trouble::Silent;
        if healthy {
            healthy = false;
            report(KeeperEvent::Trouble(trouble)).await;
        }
        // A silent member: try again at once (elsewhere); a failure: after a backoff.
        if !silent && !sleep_or_stop(backoff.next_delay(), &shutdown).await {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trip() {
        assert_eq!(parse_state(&render_state(7587884)), Some(7587884));
        assert_eq!(parse_state(""), None);
        assert_eq!(parse_state("garbage"), None);
        assert_eq!(parse_state(r#"{"lease_id":0}"#), None);
    }

    #[test]
    fn state_file_is_written_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = state_path(dir.path());
        write_state(&path, 42).unwrap();
        write_state(&path, 43).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(parse_state(&text), Some(43));
        assert!(!path.with_extension("tmp").exists());
        forget(dir.path());
        assert!(!path.exists());
    }

    #[test]
    fn lease_not_found_errors() {
        assert!(is_lease_not_found(
            &etcd_client::Error::LeaseKeepAliveError("lease not found".into())
        ));
        assert!(!is_lease_not_found(&etcd_client::Error::IoError(
            std::io::Error::other("connection refused")
        )));
    }
}
