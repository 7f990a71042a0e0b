//! One pass of the watcher's loop: the latest snapshot, judged (`effective`), rendered
//! and applied by every resource, each outcome reported; then what the pass sums up to
//! goes to the gauges, the status key and the retry timer.

use std::time::Duration;

use super::report::{self, Scene};
use super::{effective, store, Loop};
use crate::hook::WatcherEvent;
use crate::sd;
use tokio::time::Instant;

use crate::backoff::Backoff;

/// When to try again after a transient failure (unreachable master socket, I/O).
pub(super) struct Retry {
    pub(super) at: Option<Instant>,
    backoff: Backoff,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            at: None,
            backoff: Backoff::new(Duration::from_millis(500), Duration::from_secs(30)),
        }
    }
}

/// Tells the status page what one resource's apply did, and the files it compares.
fn feed_apply(
    sink: &super::sink::Sink,
    index: usize,
    r: &super::apply::Resource,
    rendered: String,
    report: &report::Report,
    revision: i64,
    started: std::time::Instant,
) {
    let rendered: std::sync::Arc<str> = rendered.into();
    let file = match r.live() {
        Some(live) if live == rendered.as_bytes() => Some(rendered.clone()),
        Some(live) => Some(String::from_utf8_lossy(live).into()),
        None => None,
    };
    let result = report.counts.apply.unwrap_or("unchanged");
    sink.feed(|f| {
        if let Some(slot) = f.files.get_mut(index) {
            *slot = super::ui::FileFeed {
                dest: r.cfg.dest.clone(),
                admin_socket: r.cfg.haproxy_admin_socket.clone(),
                rendered: Some(rendered),
                file,
            };
        }
        if result != "unchanged" {
            f.applied(super::ui::ApplyRow {
                at: crate::schema::unix_now(),
                revision,
                dest: r.cfg.dest.display().to_string(),
                path: report.path.map(|p| p.as_str()),
                result,
                took_ms: started.elapsed().as_millis() as u64,
                error: report.error.clone(),
            });
        }
    });
}

impl Loop<'_> {
    /// Renders every resource from the latest snapshot, applies what changed, and says
    /// what happened.
    pub(super) async fn pass(&mut self) {
        let Some(published) = self.snap_rx.borrow_and_update().clone() else {
            return;
        };
        let revision = published.revision;
        let judged = self
            .effective
            .judge(&published.snapshot, std::time::Instant::now());
        self.judged(&judged, revision);
        let snapshot = &*judged.snapshot;
        let fed = self.sink.feeds();
        if fed {
            let files = self.resources.len();
            self.sink.feed(|f| {
                f.revision = revision;
                f.desired = published.snapshot.clone();
                f.rendered = judged.snapshot.clone();
                f.left_out = published.left_out.clone();
                f.files.resize_with(files, Default::default);
            });
        }
        self.pending_since = Some(
            self.pending_since
                .map_or(published.received, |s| s.min(published.received)),
        );
        let started = std::time::Instant::now();
        // Certificates before any render: the files a reload or check loads are in place.
        let synced = self
            .tls
            .sync(
                &published.snapshot.certs,
                &mut self.resources,
                self.cfg.command_timeout,
            )
            .await;
        self.certs_synced(synced, revision);
        let held = self.effective.held();
        let mut pass = report::Pass::new(
            (held > 0)
                .then(|| format!("{held} removed instance(s) held by the mass-removal guard; SIGUSR1 removes them now"))
                .into_iter()
                .collect(),
        );
        for (i, (r, repeats)) in self.resources.iter_mut().zip(&mut self.repeats).enumerate() {
            if let Some(e) = &r.template_error {
                pass.errors.push(e.to_string());
            }
            let rendered = match r.render(snapshot) {
                None => {
                    pass.not_applied(None);
                    continue;
                }
                Some(Ok(text)) => text,
                Some(Err(e)) => {
                    self.sink.metrics.template_errors.inc();
                    tracing::error!("{e}\n{} keeps its last good content", r.cfg.dest.display());
                    pass.not_applied(Some(e.to_string()));
                    continue;
                }
            };
            self.sink.metrics.renders.inc();
            // A route refused to a service is a refusal of what its owner asked for:
            // the `reject` hook hears it once, when it appears.
            for c in r.fresh_route_conflicts() {
                self.sink.hook(
                    WatcherEvent::Reject,
                    format!("route conflict: {c}"),
                    &r.cfg.dest,
                    revision,
                );
            }
            let outcome = r.apply(&rendered, self.cfg.command_timeout).await;
            if matches!(outcome, super::apply::Outcome::Reloaded { .. }) {
                self.tls.reloaded(i);
            }
            let name = r.name();
            let mut report = report::apply(&outcome, &Scene::of(r, &name, snapshot, started));
            repeats.judge(&mut report, rendered.as_bytes());
            self.sink.tell(&report, &r.cfg.dest, revision);
            pass.add(&report);
            if fed {
                feed_apply(&self.sink, i, r, rendered, &report, revision, started);
            }
        }
        self.passed(pass, revision, snapshot, started.elapsed());
    }

    /// Says what the certificate sync did: log, metrics, `reject` hooks, status.
    fn certs_synced(&self, synced: super::tls::Synced, revision: i64) {
        use super::tls::Event;
        let metrics = &self.sink.metrics;
        let dest = |i: usize| {
            self.resources
                .get(i)
                .map(|r| r.cfg.dest.clone())
                .unwrap_or_default()
        };
        for e in &synced.events {
            match e {
                Event::Added(name) | Event::Renewed(name) => {
                    let what = if matches!(e, Event::Added(_)) {
                        "served"
                    } else {
                        "renewed"
                    };
                    tracing::info!(cert = %name, "certificate {name} {what}");
                }
                Event::Removed(name) => {
                    tracing::info!(cert = %name, "certificate {name} no longer served (deleted from etcd, or expired)");
                    metrics.cert_not_after.remove(&vec![("name", name.clone())]);
                }
                Event::Refused {
                    name,
                    refused,
                    kept,
                } => {
                    let kept = if *kept {
                        "its last good version stays served"
                    } else {
                        "nothing is served under that name"
                    };
                    let key = crate::certs::key(&self.cfg.etcd.prefix, name);
                    let summary = format!("certificate {key} refused: {refused}; {kept}");
                    tracing::warn!(key = %key, reason = refused.reason.label(), "{summary}");
                    metrics
                        .cert_rejected
                        .get_or_create(&[("reason", refused.reason.label())])
                        .inc();
                    for r in &self.resources {
                        self.sink.hook(
                            WatcherEvent::Reject,
                            summary.clone(),
                            &r.cfg.dest,
                            revision,
                        );
                    }
                }
            }
        }
        for (i, n) in &synced.runtime {
            tracing::info!(dest = %dest(*i).display(), "certificates applied through the runtime API ({n} change(s)), no reload");
        }
        for (i, why) in &synced.fallback {
            tracing::info!(dest = %dest(*i).display(), "certificates changed and the runtime API cannot apply them ({why}): a checked reload follows");
        }
        if let Some(e) = &synced.error {
            tracing::error!("{e}");
        }
        let served = self.tls.served();
        for (name, at) in &served {
            metrics
                .cert_not_after
                .get_or_create(&vec![("name", name.clone())])
                .set(*at);
        }
        let refused = self.tls.refused();
        self.sink.status(|s| {
            s.certs_served = served;
            s.certs_refused = refused;
        });
    }

    /// Says what the guard and linger made of this snapshot.
    fn judged(&self, judged: &effective::Judged, revision: i64) {
        let grace = self.cfg.empty_backend_grace.as_secs();
        for name in &judged.went_empty {
            tracing::info!(service = %name, "{name} has no instance left: its backend stays, empty (answering 503), for {grace} s (watcher.empty_backend_grace_s), so an instance coming back needs no reload");
        }
        let metrics = &self.sink.metrics;
        metrics
            .empty_backends
            .set(self.effective.lingering() as i64);
        metrics.removals_held.set(self.effective.held() as i64);
        if let Some(h) = &judged.held {
            let summary = report::held(h, &self.cfg.mass_removal, std::time::Instant::now());
            tracing::warn!(revision, "{summary}");
            for r in &self.resources {
                self.sink
                    .hook(WatcherEvent::Hold, summary.clone(), &r.cfg.dest, revision);
            }
        }
    }

    /// After every resource applied: the gauges, the status key, the retry timer, and
    /// the first READY=1.
    fn passed(
        &mut self,
        pass: report::Pass,
        revision: i64,
        snapshot: &store::StoreSnapshot,
        took: Duration,
    ) {
        let held = self.effective.held();
        let held_until = self.effective.hold_over().map(|at| {
            let left = at.saturating_duration_since(std::time::Instant::now());
            crate::schema::unix_now() + left.as_secs()
        });
        let metrics = &self.sink.metrics;
        if pass.reload.is_some() || pass.path.is_some() {
            metrics.last_apply_seconds.set(took.as_secs_f64());
        }
        self.reloaded = pass.reload.is_some();
        metrics.revision.set(revision);
        if pass.all_live {
            metrics.applied_revision.set(revision);
            if let (Some(since), Some(at)) = (self.pending_since.take(), pass.live_at) {
                metrics
                    .event_to_live
                    .observe(at.saturating_duration_since(since).as_secs_f64());
            }
        }
        metrics.services.set(snapshot.services.len() as i64);
        metrics.instances.set(snapshot.instance_count() as i64);
        // Every resource's route conflicts, once each (`portolan status` prints them).
        let conflicts: std::collections::BTreeSet<String> = self
            .resources
            .iter()
            .flat_map(|r| r.route_conflicts())
            .collect();
        self.sink.status(|s| {
            s.route_conflicts = conflicts.into_iter().collect();
            s.revision = revision;
            s.record_apply(
                pass.reload,
                pass.path,
                !pass.errors.is_empty(),
                crate::schema::unix_now(),
            );
            s.last_error = (!pass.errors.is_empty()).then(|| pass.errors.join("\n"));
            s.removals_held = held;
            s.held_until = held_until;
        });
        self.sink.feed(|f| {
            f.held_until = held_until;
            f.errors = pass.errors.clone();
        });
        self.retry.at = if pass.retry {
            let delay = self.retry.backoff.next_delay();
            tracing::info!("retrying the failed apply in {} ms", delay.as_millis());
            Some(Instant::now() + delay)
        } else {
            self.retry.backoff.reset();
            None
        };
        if !self.ready {
            self.ready = true;
            self.sink.metrics.set_ready();
            sd::ready(&format!("rendered etcd revision {revision}"));
        }
    }
}
