//! The watcher: etcd → tera → HAProxy, by the runtime API or a checked, confirmed reload.
//!
//! ```text
//!  source (etcd list+watch) ─latest snapshot─▶ loop ─▶ effective (guard, linger)
//!  template_files (notify) ──"re-read"───────▶  │        │ snapshot to render
//!                                               │        ▼
//!                                               │      render (tera) ─▶ apply: route (pure)
//!                                               │                         ─▶ execute: runtime API,
//!                                               │                            dest, check, reload
//!                                               │      report (pure) ◀─ outcome
//!  deferred checks (off the latency path) ◀─────┤        │
//!                        status key, /metrics, hooks ◀── sink
//! ```
//!
//! This module holds only the loop; one etcd event reaches HAProxy in a straight line:
//! `source` (list + watch, policy applied) → `effective` (held removals, lingering
//! backends) → `render` → `apply` (`route`: which path; the executor carries it out;
//! `Outcome`) → `report` (what is said) → `sink` (log, metrics, hooks, status).
//! `deferred` checks what went runtime first; `drift` is `portolan status`; `oneshot`
//! is `render --once` and `check`.
//!
//! Coalescing (group commit), with `wait.min_ms` = min and `wait.max_ms` = max:
//! - a change that finds the watcher idle — no apply running and no reload finished in
//!   the last `min` — is applied at once: an isolated change costs no waiting, and
//!   neither does a stream of runtime-API changes (a few milliseconds each; what arrives
//!   during one is batched into the next by the snapshot channel itself);
//! - changes that arrive while an apply runs that reloads (or within `min` after it)
//!   are batched: the next apply starts once no change has come for `min`, and no later
//!   than `max` after the apply they arrived during started.
//!
//! A burst therefore costs one apply for its first change and one for the rest, and
//! since applies run one after the other — each reload confirmed before the loop moves
//! on — there is never more than one HAProxy reload in flight, and reloads start at
//! least `min_reload_interval_ms` apart.
//!
//! Signals: SIGHUP re-reads templates and renders; SIGUSR1 confirms a held mass
//! removal. `[[hook]]`s hear the `hook::WatcherEvent`s. The loop ends early only when
//! the etcd source is gone, and `run` then fails, so the service manager restarts the
//! watcher.

mod apply;
pub mod confine;
mod deferred;
mod diff;
pub mod dns_names;
mod drift;
mod effective;
mod guard;
pub mod haproxy;
mod interfaces;
mod linger;
mod metrics;
mod oneshot;
mod pass;
pub mod policy;
pub mod render;
mod report;
mod resolve;
pub mod routes;
mod server_ids;
mod sink;
mod source;
mod status;
pub mod store;
mod template_files;
mod tls;
mod ui;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::WatcherConfig;
use crate::hook::Hooks;
use crate::schema::WatcherStatus;
use crate::sd;
use apply::Resource;
use metrics::Metrics;
use sink::Sink;
use source::{Published, Source};
// `main` calls these by their old paths.
pub use drift::run as status;
pub use oneshot::{check_templates, render_once, Once};

/// How long a template edit may take to settle (editors write, then rename).
pub(super) const TEMPLATE_SETTLE: Duration = Duration::from_millis(10);
/// Bound on the drain of background tasks at shutdown.
const DRAIN: Duration = Duration::from_secs(5);

/// `file` in the state dir, which is created (0700) if missing; None, warned, when it
/// cannot be: the watcher runs without what a restart would have kept.
fn state_file(dir: &std::path::Path, file: &str) -> Option<std::path::PathBuf> {
    match resolve::prepare_state_dir(dir) {
        Ok(()) => Some(dir.join(file)),
        Err(e) => {
            tracing::warn!(
                "cannot create watcher.state_dir {} ({e}): DNS answers will not be kept across restarts; make it a folder the watcher can write",
                dir.display()
            );
            None
        }
    }
}

/// Runs until `shutdown` is cancelled.
pub async fn run(cfg: WatcherConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let tracker = TaskTracker::new();
    let tasks = shutdown.child_token();
    let hooks = Hooks::start(&cfg.hooks, &tracker, &tasks);
    metrics.export_hooks(hooks.stats.clone());
    let resources = open_resources(&cfg, &metrics).await?;

    let (tpl_tx, tpl_rx) = mpsc::channel(1);
    let srcs: Vec<_> = cfg.templates.iter().map(|t| t.src.clone()).collect();
    let _template_files = template_files::watch(&srcs, tpl_tx)
        .context("cannot watch the template folders for edits (inotify limits?)")?;

    let answers = cfg.acme.as_ref().map(|_| crate::acme::Answers::default());
    let feed = match cfg.listen {
        Some(addr) => {
            ui::serve::start(addr, &cfg, &metrics, &tracker, &tasks, answers.clone()).await?
        }
        None => None,
    };

    tracker.spawn(crate::etcd::advisory::watch(
        cfg.etcd.clone(),
        metrics.etcd_rbac_bypassable.clone(),
        tasks.clone(),
    ));
    let (snap_tx, snap_rx) = watch::channel(None);
    let (resolver, resolved) = resolve::Resolver::new(resolve::Settings {
        refresh: cfg.dns_refresh,
        stale: cfg.dns_stale,
        file: state_file(&cfg.state_dir, resolve::ANSWERS_FILE),
    });
    tracker.spawn(resolver.clone().run(tasks.clone()));
    let source = Source::new(
        cfg.etcd.clone(),
        cfg.policy.clone(),
        (resolver, resolved),
        snap_tx,
        metrics.clone(),
    );
    let source = tracker.spawn(source.run(tasks.clone()));
    if let (Some(acme), Some(answers)) = (&cfg.acme, answers) {
        start_acme(
            &cfg,
            acme,
            answers,
            &metrics,
            &hooks,
            snap_rx.clone(),
            &tracker,
            &tasks,
        );
    }

    // Read before this run's status record replaces the last run's.
    let held_until = status::held_until(&cfg.etcd, &cfg.name).await;
    let (status_tx, status_rx) = watch::channel(WatcherStatus {
        name: cfg.name.clone(),
        ..Default::default()
    });
    let status = status::run(cfg.etcd.clone(), cfg.name.clone(), status_rx, tasks.clone());
    tracker.spawn(status);

    tracing::info!(watcher = %cfg.name, prefix = %cfg.etcd.prefix, templates = resources.len(), "watcher started");
    let effective = effective_at_start(&cfg, &resources, held_until);
    let tls = tls::Tls::open(&cfg.certs_dir, resources.len());
    let mut lp = Loop {
        cfg: &cfg,
        tls,
        repeats: resources.iter().map(|_| Default::default()).collect(),
        resources,
        deferred: deferred::Deferred::default(),
        snap_rx,
        tpl_rx,
        sink: Sink::new(cfg.name.clone(), metrics, hooks, status_tx, feed),
        effective,
        retry: pass::Retry::default(),
        reloaded: false,
        ready: false,
        pending_since: None,
    };
    lp.run(&shutdown).await;
    let source_end = source::ended(source, &shutdown).await;

    sd::stopping();
    tasks.cancel();
    tracker.close();
    if tokio::time::timeout(DRAIN, tracker.wait()).await.is_err() {
        tracing::warn!("background tasks did not stop within {DRAIN:?}");
    }
    if let Some(why) = source_end {
        anyhow::bail!(
            "the etcd source task {why}; exiting non-zero so the service manager (Restart=on-failure) starts a fresh watcher"
        );
    }
    tracing::info!("watcher stopped");
    Ok(())
}

/// The guard and linger seeded from the file HAProxy runs, and a mass removal the last
/// run held still held until the time it would have ended.
fn effective_at_start(
    cfg: &WatcherConfig,
    resources: &[Resource],
    held_until: Option<std::time::SystemTime>,
) -> effective::Effective {
    let mut effective = effective::Effective::new(cfg, resources.first().and_then(Resource::live));
    if let Some(until) = held_until {
        let left = until
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default();
        tracing::warn!("a mass removal was held when this watcher last stopped: if the first render holds it again, the hold ends in {} s, as it would have", left.as_secs());
        effective.resume_hold(std::time::Instant::now() + left);
    }
    effective
}

/// The ACME issuer (`[acme]`), fed the routed services' names from the store.
#[allow(clippy::too_many_arguments)]
fn start_acme(
    cfg: &WatcherConfig,
    acme: &crate::config::AcmeConfig,
    answers: crate::acme::Answers,
    metrics: &Metrics,
    hooks: &Hooks,
    mut snap_rx: watch::Receiver<Option<Published>>,
    tracker: &TaskTracker,
    tasks: &CancellationToken,
) {
    let (names_tx, names_rx) = watch::channel(std::collections::BTreeSet::new());
    tracker.spawn(async move {
        while snap_rx.changed().await.is_ok() {
            let names: std::collections::BTreeSet<String> = match &*snap_rx.borrow_and_update() {
                Some(p) => p.snapshot.services.keys().cloned().collect(),
                None => continue,
            };
            names_tx.send_if_modified(|old| {
                let changed = *old != names;
                *old = names;
                changed
            });
        }
    });
    let domain = cfg
        .templates
        .iter()
        .find_map(|t| t.vars.get("domain").and_then(|d| d.as_str()))
        .map(str::to_string);
    let issuer = crate::acme::Issuer {
        cfg: acme.clone(),
        etcd: cfg.etcd.clone(),
        name: cfg.name.clone(),
        domain,
        hooks: hooks.clone(),
        orders: metrics.acme_orders.clone(),
        answers,
    };
    tracker.spawn(crate::acme::run(
        issuer,
        names_rx,
        tracker.clone(),
        tasks.clone(),
    ));
}

/// Every `[[template]]`, with what its `dest` holds now and its template compiled (a
/// broken template is an error in the log, and is re-read as soon as it changes).
async fn open_resources(cfg: &WatcherConfig, metrics: &Metrics) -> anyhow::Result<Vec<Resource>> {
    let mut resources = Vec::new();
    for t in &cfg.templates {
        let mut r = Resource::open(t.clone(), cfg.min_reload_interval)
            .await
            .with_context(|| format!("cannot read {}", t.dest.display()))?;
        match r.clean_stale_staging().await {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(dest = %t.dest.display(), "removed {n} staging file(s) left by an interrupted run")
            }
            Err(e) => tracing::warn!(dest = %t.dest.display(), "cannot clean staging files: {e}"),
        }
        if let Err(e) = r.load_template().await {
            metrics.template_errors.inc();
            tracing::error!("{e}\nfix the template: it is re-read as soon as it changes");
        }
        resources.push(r);
    }
    Ok(resources)
}

struct Loop<'a> {
    cfg: &'a WatcherConfig,
    /// The certificates served, and what each HAProxy runs of them.
    tls: tls::Tls,
    resources: Vec<Resource>,
    /// Per resource: the refusal whose hook went out last (sent once per file).
    repeats: Vec<report::Repeats>,
    deferred: deferred::Deferred,
    snap_rx: watch::Receiver<Option<Published>>,
    tpl_rx: mpsc::Receiver<()>,
    sink: Sink,
    effective: effective::Effective,
    retry: pass::Retry,
    /// The last pass reloaded (or tried to): changes right behind it are batched.
    reloaded: bool,
    ready: bool,
    /// Arrival of the oldest etcd change HAProxy does not run yet (as far as the loop
    /// saw it: changes that replace each other during one pass count from the last).
    pending_since: Option<std::time::Instant>,
}

/// Why the loop woke up.
enum Wake {
    Store,
    /// A deferred check of a file applied runtime first finished.
    Checked(deferred::Done),
    Templates,
    Retry,
    /// SIGHUP (`systemctl reload`): re-read templates and render, even if nothing
    /// changed — e.g. to retry a check that failed for a reason outside the file.
    Hangup,
    /// A held mass removal is due.
    HoldOver,
    /// An emptied service's grace is over: its backend goes.
    GraceOver,
    /// SIGUSR1: the operator confirms a held mass removal.
    Confirm,
}

fn listen(kind: SignalKind, name: &str, otherwise: &str) -> Option<Signal> {
    signal(kind)
        .inspect_err(|e| tracing::warn!("cannot listen for {name} ({e}); {otherwise}"))
        .ok()
}

async fn recv(sig: &mut Option<Signal>) -> Option<()> {
    match sig {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

fn at(t: Option<std::time::Instant>) -> Option<Instant> {
    t.map(Instant::from_std)
}

impl Loop<'_> {
    async fn run(&mut self, shutdown: &CancellationToken) {
        let mut watchdog = sd::Watchdog::new();
        let mut hangup = listen(
            SignalKind::hangup(),
            "SIGHUP",
            "reload by editing a template",
        );
        let mut confirm = listen(
            SignalKind::user_defined1(),
            "SIGUSR1",
            "held removals wait out their hold",
        );
        let mut last_apply: Option<(Instant, Instant)> = None; // (started, ended)
        loop {
            let wake = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                r = self.snap_rx.changed() => match r {
                    Ok(()) => { self.note_change(); Wake::Store }
                    Err(_) => return,
                },
                Some(()) = self.tpl_rx.recv() => Wake::Templates,
                _ = crate::backoff::sleep_until(self.retry.at), if self.retry.at.is_some() => Wake::Retry,
                Some(()) = recv(&mut hangup) => Wake::Hangup,
                _ = crate::backoff::sleep_until(at(self.effective.hold_over())), if self.effective.hold_over().is_some() => Wake::HoldOver,
                Some(()) = recv(&mut confirm) => Wake::Confirm,
                _ = crate::backoff::sleep_until(at(self.effective.grace_over())), if self.effective.grace_over().is_some() => Wake::GraceOver,
                w = self.deferred.next() => match w {
                    deferred::Wake::Done(done) => Wake::Checked(done),
                    deferred::Wake::Due => {
                        self.deferred.start(&self.resources, self.cfg.command_timeout);
                        continue;
                    }
                },
                _ = watchdog.tick() => continue,
            };
            if !self.woke(wake).await || self.snap_rx.borrow().is_none() {
                // Nothing to render for; or etcd never listed yet, and rendering now
                // would render an empty store.
                continue;
            }
            if let Some((started, ended)) = last_apply {
                if self.reloaded && ended.elapsed() < self.cfg.wait_min {
                    let deadline = started + self.cfg.wait_max;
                    if !self.gather(deadline, shutdown).await {
                        return;
                    }
                }
            }
            let started = Instant::now();
            // Keep systemd's watchdog fed while a pass runs: a pass may take several
            // `command_timeout`s (check, runtime API, reload per resource), longer than
            // `WatchdogSec`. It cannot hang for good, as every step of it is bounded.
            {
                let pass = self.pass();
                tokio::pin!(pass);
                tokio::select! {
                    () = &mut pass => {}
                    _ = watchdog.feed() => {}
                }
            }
            last_apply = Some((started, Instant::now()));
            self.deferred.applied(Instant::now());
        }
    }

    /// Acts on a wake-up. True when a pass should follow.
    async fn woke(&mut self, wake: Wake) -> bool {
        match wake {
            Wake::Store | Wake::GraceOver => true,
            Wake::Templates => self.reload_templates().await,
            Wake::Retry => {
                self.retry.at = None;
                true
            }
            Wake::Hangup => {
                tracing::info!("SIGHUP: re-reading templates and rendering");
                self.reload_templates().await;
                true
            }
            Wake::HoldOver => {
                tracing::warn!(
                    "the hold of {} removed instance(s) is over: removing them now",
                    self.effective.held()
                );
                true
            }
            Wake::Confirm => {
                let n = self.effective.release();
                tracing::warn!("SIGUSR1: the operator confirmed the removal of {n} held instance(s): removing them now");
                true
            }
            Wake::Checked(done) => self.deferred_checked(done).await,
        }
    }

    /// Waits for `wait_min` of quiet, or until `deadline`. False on shutdown.
    async fn gather(&mut self, deadline: Instant, shutdown: &CancellationToken) -> bool {
        loop {
            let quiet_until = (Instant::now() + self.cfg.wait_min).min(deadline);
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return false,
                r = self.snap_rx.changed() => {
                    if r.is_err() { return false }
                    self.note_change();
                }
                Some(()) = self.tpl_rx.recv() => { self.reload_templates().await; }
                _ = tokio::time::sleep_until(quiet_until) => return true,
            }
            if Instant::now() >= deadline {
                return true;
            }
        }
    }

    /// Remembers when the change now in the channel arrived, if it is the oldest pending.
    fn note_change(&mut self) {
        if let Some(p) = self.snap_rx.borrow().as_ref() {
            self.pending_since = Some(self.pending_since.map_or(p.received, |s| s.min(p.received)));
        }
    }
}
