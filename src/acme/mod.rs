//! ACME for the fleet: one watcher at a time orders the certificates the services
//! need and writes them to `<prefix>/certs/<name>`, where every front door's
//! certificate store (`certs`) picks them up.
//!
//! ```text
//!  services ─▶ want (which names; which due; backoff; pure) ─▶ order (ACME I/O)
//!                      ▲                                         │ challenges/<token>
//!   certs/<name> ──────┘          election (acme/lock) ──────────┤ orders/<name>, account
//!                                                                ▼
//!  every watcher: challenge (watch of acme/challenges/) ─▶ /.well-known/acme-challenge/
//! ```
//!
//! - `want`: wanted certificates (`<service>.<domain>`, `[acme] domains`), which are
//!   due (missing, not covering, in the renewal window), retry backoff. Pure.
//! - `record`: the etcd keys and JSON records (the certificate record is the contract
//!   with the store). Pure.
//! - `election`: the lease-bound lock; its create revision fences every write.
//! - `order`: account and order, resumed from etcd after a restart or a change of
//!   issuer; `http`: instant-acme over the reqwest client.
//! - `challenge`: the HTTP-01 answers every watcher serves.

pub mod challenge;
mod election;
mod http;
mod order;
pub mod record;
pub mod want;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use etcd_client::TxnOp;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use challenge::Answers;

use crate::config::{AcmeConfig, EtcdConfig};
use crate::hook::{Event, Hooks, WatcherEvent};
use order::Progress as _;
use want::{Failures, Reason, Wanted};

/// Longest the issuer goes without looking at the store again (a record deleted by
/// hand, a renewal window opening).
const RESCAN: Duration = Duration::from_secs(60);
/// Pause after an etcd or account error before the issuer tries again.
const TROUBLE: Duration = Duration::from_secs(2);

/// What the issuer needs from the watcher.
pub struct Issuer {
    pub cfg: AcmeConfig,
    pub etcd: EtcdConfig,
    /// The watcher's name: the lock's value.
    pub name: String,
    /// `domain` of the template vars: services want `<service>.<domain>`.
    pub domain: Option<String>,
    pub hooks: Hooks,
    pub orders: Family<[(&'static str, &'static str); 1], Counter>,
    pub answers: Answers,
}

impl order::Progress for Issuer {
    fn order(&self, result: &'static str) {
        self.orders.get_or_create(&[("result", result)]).inc();
    }
}

/// Runs the challenge watch and the campaign until `shutdown`. `services` is the
/// routed services' names, as the watcher's store has them.
pub async fn run(
    issuer: Issuer,
    mut services: watch::Receiver<BTreeSet<String>>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    for r in ["created", "resumed", "valid", "failed"] {
        drop(issuer.orders.get_or_create(&[("result", r)]));
    }
    tracker.spawn(challenge::watch(
        issuer.etcd.clone(),
        issuer.answers.clone(),
        shutdown.clone(),
    ));
    let mut failures = BTreeMap::new();
    loop {
        let mut client = match crate::etcd::connect(&issuer.etcd).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("acme: cannot reach etcd ({e}); trying again");
                if !crate::backoff::sleep_or_stop(TROUBLE, &shutdown).await {
                    return;
                }
                continue;
            }
        };
        let lock = record::lock_key(&issuer.etcd.prefix);
        let held = match election::acquire(
            &mut client,
            &issuer.etcd,
            &lock,
            &issuer.name,
            issuer.cfg.lock_ttl,
            &tracker,
            &shutdown,
        )
        .await
        {
            Ok(Some(h)) => h,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!("acme: campaigning for {lock}: {e}; trying again");
                if !crate::backoff::sleep_or_stop(TROUBLE, &shutdown).await {
                    return;
                }
                continue;
            }
        };
        tracing::info!(lock = %lock, "acme: this watcher is the fleet's issuer");
        tokio::select! {
            _ = held.lost.cancelled() => {}
            r = issue(&issuer, &mut client, &held, &mut services, &mut failures) => {
                if let Err(e) = r {
                    tracing::warn!("acme: {e}; stepping down and campaigning again");
                }
            }
        }
        if shutdown.is_cancelled() {
            held.release(&mut client).await;
            tracing::info!("acme: released the issuer's lock");
            return;
        }
        held.release(&mut client).await;
        if !crate::backoff::sleep_or_stop(TROUBLE, &shutdown).await {
            return;
        }
    }
}

/// The issuer's work while it holds the lock: returns only on an error (the caller
/// steps down; the lock's loss ends it from outside).
async fn issue(
    issuer: &Issuer,
    client: &mut etcd_client::Client,
    held: &election::Held,
    services: &mut watch::Receiver<BTreeSet<String>>,
    failures: &mut BTreeMap<String, Failures>,
) -> anyhow::Result<()> {
    let prefix = issuer.etcd.prefix.clone();
    let account = order::account(&issuer.cfg, client, held, &prefix)
        .await
        .map_err(|e| anyhow::anyhow!("the ACME account at {}: {e}", issuer.cfg.directory))?;
    loop {
        let names = services.borrow_and_update().clone();
        let wanted = want::wanted(
            names.iter().map(String::as_str),
            issuer.domain.as_deref(),
            &issuer.cfg.domains,
        );
        let stored = order::stored_certs(client, &prefix).await?;
        let existing: BTreeMap<_, _> = stored
            .iter()
            .map(|(n, v)| (n.clone(), record::existing(v)))
            .collect();
        let now = SystemTime::now();
        let plan = want::plan(&wanted, &existing, failures, issuer.cfg.renew_before, now);
        for name in &plan.imported {
            tracing::debug!(cert = %name, "acme: an imported certificate holds this name: left to its operator");
        }
        for (w, reason) in &plan.due {
            one(issuer, &account, client, held, w, *reason, failures).await?;
        }
        let wait = plan
            .next
            .and_then(|t| t.duration_since(SystemTime::now()).ok())
            .unwrap_or(RESCAN)
            .min(RESCAN);
        if !plan.due.is_empty() {
            // Look again at once: a failure's backoff or a renewal may be next.
            continue;
        }
        tokio::select! {
            r = services.changed() => if r.is_err() { std::future::pending::<()>().await },
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Orders one certificate and writes its record; a failure is counted, backed off
/// and told. Errs only when this watcher is no longer the issuer.
async fn one(
    issuer: &Issuer,
    account: &instant_acme::Account,
    client: &mut etcd_client::Client,
    held: &election::Held,
    w: &Wanted,
    reason: Reason,
    failures: &mut BTreeMap<String, Failures>,
) -> anyhow::Result<()> {
    let prefix = &issuer.etcd.prefix;
    tracing::info!(cert = %w.name, domains = ?w.domains, reason = reason.as_str(), "acme: ordering a certificate");
    let session = order::Session {
        cfg: &issuer.cfg,
        account,
        held,
        prefix,
        answers: &issuer.answers,
        progress: issuer,
    };
    let got = order::obtain(&session, client, w).await;
    let result = match got {
        Ok(o) => match record::issued(&o.chain, &o.key, SystemTime::now()) {
            Ok(rec) => {
                let value = serde_json::to_string(&rec)?;
                let ok = held
                    .write(
                        client,
                        vec![
                            TxnOp::put(record::cert_key(prefix, &w.name), value, None),
                            TxnOp::delete(record::order_key(prefix, &w.name), None),
                        ],
                    )
                    .await?;
                if !ok {
                    anyhow::bail!("lost the issuer's lock before writing {}", w.name);
                }
                Ok((rec, o.resumed))
            }
            Err(e) => Err(order::Failure::Other(format!(
                "the CA's certificate does not parse: {e}"
            ))),
        },
        Err(order::Failure::NotIssuer) => anyhow::bail!("lost the issuer's lock"),
        Err(e) => Err(e),
    };
    match result {
        Ok((rec, resumed)) => {
            failures.remove(&w.name);
            issuer.order("valid");
            written(issuer, w, reason, &rec, resumed);
        }
        Err(e) => {
            let f = want::failed(
                failures.get(&w.name).copied(),
                e.rate_limited(),
                issuer.cfg.retry_min,
                SystemTime::now(),
            );
            failures.insert(w.name.clone(), f);
            issuer.order("failed");
            failed(issuer, w, f, &e);
        }
    }
    Ok(())
}

/// Tells of a certificate written: the log and the `cert_issued`/`cert_renewed` hook.
fn written(issuer: &Issuer, w: &Wanted, reason: Reason, rec: &record::CertRecord, resumed: bool) {
    let kind = if reason.replaces() {
        WatcherEvent::CertRenewed
    } else {
        WatcherEvent::CertIssued
    };
    tracing::info!(cert = %w.name, not_after = %rec.not_after, resumed, "acme: certificate written to etcd");
    issuer.hooks.emit(
        Event::new(
            kind,
            format!(
                "certificate {} for {} until {}",
                w.name,
                w.domains.join(", "),
                rec.not_after
            ),
        )
        .with("name", w.name.as_str())
        .with("domains", w.domains.clone())
        .with("not_after", rec.not_after.as_str())
        .with("reason", reason.as_str())
        .with("watcher", issuer.name.as_str()),
    );
}

/// Tells of a failed order: the log and the `cert_failed` hook, with the next try.
fn failed(issuer: &Issuer, w: &Wanted, f: Failures, e: &order::Failure) {
    let retry = record::rfc3339(f.retry_at);
    tracing::warn!(cert = %w.name, failures = f.count, retry_at = %retry, "acme: order failed: {e}");
    issuer.hooks.emit(
        Event::new(
            WatcherEvent::CertFailed,
            format!(
                "certificate {} for {}: {e}; next try at {retry}",
                w.name,
                w.domains.join(", ")
            ),
        )
        .with("name", w.name.as_str())
        .with("domains", w.domains.clone())
        .with("error", e.to_string())
        .with("failures", f.count)
        .with("retry_at", retry.as_str())
        .with("watcher", issuer.name.as_str()),
    );
}
