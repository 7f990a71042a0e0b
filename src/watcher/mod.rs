//! The watcher: etcd → tera → `check_cmd` → atomic swap → confirmed reload.
//!
//! ```text
//!  source (etcd list+watch) ──watch channel: latest snapshot──▶ loop ──▶ resource.apply()
//!  template_files (notify) ──"re-read"──────────────────────────▶  │      stage, check, swap,
//!                                                                   │      reload (haproxy)
//!                                       status (etcd, own lease) ◀──┴──▶ metrics (/metrics)
//! ```
//!
//! This module holds only the loop. Pieces: `store` (pure snapshot), `source` (etcd),
//! `guard` (pure: holds back a mass removal for `mass_removal.hold_s`, or until SIGUSR1),
//! `linger` (pure: an emptied service keeps its backend for `empty_backend_grace_s`),
//! `policy` (pure: which addresses may be routed) and `resolve` (host names, in the
//! background), `render` (tera), `diff`, `resource` (one `[[template]]`: apply pipeline), `haproxy`
//! (`master` socket: reloads; `runtime_plan` (pure) and `runtime_api` (admin socket):
//! membership changes without a reload), `template_files` (notify), `status`,
//! `metrics`, and `oneshot` (`render --once`, `check`).
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
//! A pass that applied changes runtime first leaves `dest` checked later: the loop
//! starts that check (`resource::DeferredCheck`) `CHECK_QUIET` after the last apply (at
//! the latest `CHECK_LATEST` after the first one it covers), in a
//! task of its own, and hands the verdict back to the resource, which repairs HAProxy
//! should the check refuse what it runs.
//!
//! Signals: SIGHUP re-reads templates and renders; SIGUSR1 confirms a held mass
//! removal. `[[hook]]`s hear `reload`, `runtime`, `reject`, `fail` and `hold`. The
//! loop ends early only when the etcd source is gone, and `run` then fails, so the
//! service manager restarts the watcher.

pub mod confine;
mod diff;
mod guard;
pub mod haproxy;
mod inspect;
mod linger;
mod metrics;
mod oneshot;
pub mod policy;
pub mod render;
mod resolve;
mod resource;
mod source;
mod status;
pub mod store;
mod template_files;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backoff::Backoff;
use crate::config::WatcherConfig;
use crate::hook::{Event, Hooks};
use crate::schema::WatcherStatus;
use crate::sd;
use metrics::Metrics;
// `main` calls these by their old paths.
pub use inspect::run as status;
pub use oneshot::{check_templates, render_once};
use resource::{Chain, Outcome, Resource};
use source::{Published, Source};
use status::{ApplyPath, ReloadResult};

/// How long a template edit may take to settle (editors write, then rename).
const TEMPLATE_SETTLE: Duration = Duration::from_millis(10);
/// Quiet after the last apply before a deferred check starts: a burst of changes costs
/// one check, and no check competes for the CPU with the change right behind another.
const CHECK_QUIET: Duration = Duration::from_millis(250);
/// ...but no later than this after the first change left unchecked, so steady churn
/// cannot put the check off for good.
const CHECK_LATEST: Duration = Duration::from_secs(2);
/// Bound on the drain of background tasks at shutdown.
const DRAIN: Duration = Duration::from_secs(5);

/// Runs until `shutdown` is cancelled.
pub async fn run(cfg: WatcherConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let tracker = TaskTracker::new();
    let tasks = shutdown.child_token();
    let hooks = Hooks::start(&cfg.hooks, &tracker, &tasks);
    metrics.export_hooks(hooks.stats.clone());

    let mut resources = Vec::new();
    for t in &cfg.templates {
        let mut r = Resource::new(t.clone());
        r.min_reload_interval = cfg.min_reload_interval;
        match resource::clean_stale_staging(&t.dest).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                dest = %t.dest.display(),
                "removed {n} staging file(s) left by an interrupted run"
            ),
            Err(e) => tracing::warn!(dest = %t.dest.display(), "cannot clean staging files: {e}"),
        }
        r.read_live()
            .await
            .with_context(|| format!("cannot read {}", t.dest.display()))?;
        if let Err(e) = r.load_template().await {
            metrics.template_errors.inc();
            tracing::error!("{e}\nfix the template: it is re-read as soon as it changes");
        }
        resources.push(r);
    }

    let (tpl_tx, tpl_rx) = mpsc::channel(1);
    let srcs: Vec<_> = cfg.templates.iter().map(|t| t.src.clone()).collect();
    let _template_files = template_files::watch(&srcs, tpl_tx)
        .context("cannot watch the template folders for edits (inotify limits?)")?;

    if let Some(addr) = cfg.listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} for /metrics (watcher.listen)"))?;
        tracker.spawn(crate::endpoint::serve(
            listener,
            metrics.clone(),
            tracker.clone(),
            tasks.clone(),
        ));
    }

    let (snap_tx, snap_rx) = watch::channel(None);
    let (resolver, resolved) = resolve::Resolver::new();
    tracker.spawn(resolver.clone().run(tasks.clone()));
    let source = tracker.spawn(
        Source::new(
            cfg.etcd.clone(),
            cfg.policy.clone(),
            (resolver, resolved),
            snap_tx,
            metrics.clone(),
        )
        .run(tasks.clone()),
    );

    let (status_tx, status_rx) = watch::channel(WatcherStatus {
        name: cfg.name.clone(),
        ..Default::default()
    });
    tracker.spawn(status::run(
        cfg.etcd.clone(),
        cfg.name.clone(),
        status_rx,
        tasks.clone(),
    ));

    tracing::info!(
        watcher = %cfg.name,
        prefix = %cfg.etcd.prefix,
        templates = resources.len(),
        "watcher started"
    );
    let (checks_tx, checks_rx) = mpsc::channel(resources.len().max(1));
    let mut lp = Loop {
        cfg: &cfg,
        checking: vec![false; resources.len()],
        check_at: None,
        unchecked_since: None,
        checks_tx,
        checks_rx,
        resources,
        snap_rx,
        tpl_rx,
        status_tx,
        metrics,
        hooks,
        guard: guard::Guard::new(
            cfg.mass_removal.share,
            cfg.mass_removal.min,
            cfg.mass_removal.hold,
        ),
        linger: linger::Linger::new(cfg.empty_backend_grace),
        rendered: None,
        reloaded: false,
        ready: false,
        pending_since: None,
        retry_at: None,
        retry_backoff: Backoff::new(Duration::from_millis(500), Duration::from_secs(30)),
    };
    lp.run(&shutdown).await;
    // The loop returns before shutdown only when the etcd source is gone (it ends on
    // shutdown alone, so it panicked): without it nothing would ever change again.
    let source_end = if shutdown.is_cancelled() {
        None
    } else {
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
    };

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

struct Loop<'a> {
    cfg: &'a WatcherConfig,
    resources: Vec<Resource>,
    /// Deferred checks (see `resource`): one in flight per resource at most, results
    /// back by index.
    checking: Vec<bool>,
    /// When to start the deferred checks (`CHECK_QUIET` after the last apply).
    check_at: Option<Instant>,
    /// The first apply since the deferred checks last started.
    unchecked_since: Option<Instant>,
    checks_tx: mpsc::Sender<CheckDone>,
    checks_rx: mpsc::Receiver<CheckDone>,
    snap_rx: watch::Receiver<Option<Published>>,
    tpl_rx: mpsc::Receiver<()>,
    status_tx: watch::Sender<WatcherStatus>,
    metrics: Arc<Metrics>,
    hooks: Hooks,
    guard: guard::Guard,
    /// Keeps emptied services' backends for `empty_backend_grace_s`.
    linger: linger::Linger,
    /// The snapshot the last pass rendered (held removals included): what the guard
    /// judges the next batch against.
    rendered: Option<Arc<store::StoreSnapshot>>,
    /// The last pass reloaded (or tried to): changes right behind it are batched.
    reloaded: bool,
    ready: bool,
    /// Arrival of the oldest etcd change HAProxy does not run yet (as far as the loop
    /// saw it: changes that replace each other during one pass count from the last).
    pending_since: Option<std::time::Instant>,
    /// When to try again after a transient failure (unreachable master socket, I/O).
    retry_at: Option<Instant>,
    retry_backoff: Backoff,
}

/// A deferred check's verdict: resource index, the bytes checked, the result.
type CheckDone = (usize, Arc<[u8]>, resource::CommandResult);

enum Wake {
    Store,
    /// A deferred check of a file applied runtime first finished.
    Checked(CheckDone),
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

impl Loop<'_> {
    async fn run(&mut self, shutdown: &CancellationToken) {
        let mut watchdog = sd::Watchdog::new();
        let mut hangup = match signal(SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!("cannot listen for SIGHUP ({e}); reload by editing a template");
                None
            }
        };
        let mut confirm = match signal(SignalKind::user_defined1()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(
                    "cannot listen for SIGUSR1 ({e}); held removals wait out their hold"
                );
                None
            }
        };
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
                _ = crate::backoff::sleep_until(self.retry_at), if self.retry_at.is_some() => Wake::Retry,
                Some(()) = recv(&mut hangup) => Wake::Hangup,
                _ = crate::backoff::sleep_until(self.guard.deadline().map(Instant::from_std)), if self.guard.deadline().is_some() => Wake::HoldOver,
                Some(()) = recv(&mut confirm) => Wake::Confirm,
                _ = crate::backoff::sleep_until(self.linger.deadline().map(Instant::from_std)), if self.linger.deadline().is_some() => Wake::GraceOver,
                Some(done) = self.checks_rx.recv() => Wake::Checked(done),
                _ = crate::backoff::sleep_until(self.check_at), if self.check_at.is_some() => {
                    self.check_at = None;
                    self.unchecked_since = None;
                    self.start_checks();
                    continue;
                }
                _ = watchdog.tick() => continue,
            };
            match wake {
                Wake::Templates => {
                    if !self.reload_templates().await {
                        continue;
                    }
                }
                Wake::Retry => self.retry_at = None,
                Wake::Hangup => {
                    tracing::info!("SIGHUP: re-reading templates and rendering");
                    self.reload_templates().await;
                }
                Wake::HoldOver => {
                    tracing::warn!(
                        "the hold of {} removed instance(s) is over: removing them now",
                        self.guard.held()
                    );
                }
                Wake::Confirm => {
                    let n = self.guard.release();
                    tracing::warn!("SIGUSR1: the operator confirmed the removal of {n} held instance(s): removing them now");
                }
                Wake::GraceOver => {}
                Wake::Checked(done) => {
                    if !self.deferred_checked(done).await {
                        continue;
                    }
                }
                Wake::Store => {}
            }
            if self.snap_rx.borrow().is_none() {
                // Never listed etcd yet: rendering now would render an empty store.
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
            let now = Instant::now();
            let since = *self.unchecked_since.get_or_insert(now);
            self.check_at = Some((now + CHECK_QUIET).min(since + CHECK_LATEST));
        }
    }

    /// Starts the deferred check of every resource whose `dest` holds bytes applied
    /// runtime first and not checked yet (none already running for it).
    fn start_checks(&mut self) {
        for (i, r) in self.resources.iter().enumerate() {
            if self.checking[i] {
                continue;
            }
            let Some(check) = r.pending_check(self.cfg.command_timeout) else {
                continue;
            };
            self.checking[i] = true;
            let tx = self.checks_tx.clone();
            tokio::spawn(async move {
                let result = check.run().await;
                let _ = tx.send((i, check.bytes, result)).await;
            });
        }
    }

    /// Takes a deferred check's verdict. True when HAProxy had to be put back onto the
    /// last checked file: the loop then renders again, which checks first from now on.
    async fn deferred_checked(&mut self, (i, bytes, result): CheckDone) -> bool {
        self.checking[i] = false;
        self.metrics
            .deferred_checks
            .get_or_create(&metrics::result(if result.success {
                "ok"
            } else {
                "failed"
            }))
            .inc();
        let timeout = self.cfg.command_timeout;
        let r = &mut self.resources[i];
        let dest = r.cfg.dest.clone();
        let Some(repair) = r.deferred_checked(bytes, &result, timeout).await else {
            if !result.success {
                tracing::warn!(dest = %dest.display(), "check_cmd rejected a file applied through the runtime API and replaced since ({}); the newer file is checked next", result.status);
            }
            self.start_checks();
            return false;
        };
        self.metrics.check_failures.inc();
        let what = match &repair {
            Outcome::Reloaded { .. } => {
                "HAProxy was reloaded onto the last checked file".to_string()
            }
            Outcome::Failed { error, .. } => format!(
                "putting the last checked file back failed too: {}",
                Chain(error)
            ),
            _ => "no checked file to go back to".to_string(),
        };
        let summary = format!(
            "HAProxy ran a file that check_cmd rejects ({}): it was applied through the runtime API, checked afterwards, and the file and HAProxy disagreed; {what}, and every change is checked before it is applied until a file passes",
            result.status
        );
        tracing::error!(dest = %dest.display(), "{summary}. Check output:\n{}", result.output);
        emit(
            &self.hooks,
            &self.cfg.name,
            "reject",
            summary.clone(),
            &dest,
            self.metrics.revision.get(),
        );
        self.status_tx.send_modify(|s| {
            s.last_error = Some(summary);
            s.last_reload_at = Some(crate::schema::unix_now());
            s.last_reload_result = Some(
                match repair {
                    Outcome::Reloaded { .. } => ReloadResult::Ok,
                    _ => ReloadResult::Failed,
                }
                .as_str()
                .to_string(),
            );
        });
        true
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

    /// Re-reads every template after an edit. True when one of them changed.
    async fn reload_templates(&mut self) -> bool {
        tokio::time::sleep(TEMPLATE_SETTLE).await;
        while self.tpl_rx.try_recv().is_ok() {}
        let mut changed = false;
        for r in &mut self.resources {
            match r.load_template().await {
                Ok(true) => {
                    tracing::info!(template = %r.name(), "template changed, re-rendering");
                    changed = true;
                }
                Ok(false) => {}
                Err(e) => {
                    self.metrics.template_errors.inc();
                    tracing::error!(
                        "{e}\n{} keeps its last good content until the template is fixed",
                        r.cfg.dest.display()
                    );
                    self.status_tx
                        .send_modify(|s| s.last_error = Some(e.to_string()));
                }
            }
        }
        changed
    }

    /// Renders every resource from the latest snapshot and applies what changed.
    async fn pass(&mut self) {
        let Some(published) = self.snap_rx.borrow_and_update().clone() else {
            return;
        };
        let now = std::time::Instant::now();
        let (mut effective, held) =
            self.guard
                .filter(self.rendered.as_deref(), &published.snapshot, now);
        for name in self
            .linger
            .keep(self.rendered.as_deref(), &mut effective, now)
        {
            tracing::info!(
                service = %name,
                "{name} has no instance left: its backend stays, empty (answering 503), for {} s (watcher.empty_backend_grace_s), so an instance coming back needs no reload",
                self.cfg.empty_backend_grace.as_secs()
            );
        }
        self.metrics.empty_backends.set(self.linger.count() as i64);
        let snapshot = &*self.rendered.insert(Arc::new(effective)).clone();
        let revision = published.revision;
        self.metrics.removals_held.set(self.guard.held() as i64);
        if let Some(h) = &held {
            let secs = h
                .until
                .saturating_duration_since(std::time::Instant::now())
                .as_secs();
            let summary = format!(
                "holding back the removal of {} of {} live instances ({:.0}%, more than the {:.0}% mass_removal share): they stay in the config for {secs} s — HAProxy's health checks keep dead ones out of rotation — then go; send SIGUSR1 to the watcher to remove them now",
                h.count,
                h.live,
                h.percent(),
                self.cfg.mass_removal.share * 100.0
            );
            tracing::warn!(revision, "{summary}");
            for r in &self.resources {
                emit(
                    &self.hooks,
                    &self.cfg.name,
                    "hold",
                    summary.clone(),
                    &r.cfg.dest,
                    revision,
                );
            }
        }
        self.pending_since = Some(
            self.pending_since
                .map_or(published.received, |s| s.min(published.received)),
        );
        let started = Instant::now();
        let timeout = self.cfg.command_timeout;
        let mut errors: Vec<String> = Vec::new();
        if self.guard.held() > 0 {
            errors.push(format!(
                "{} removed instance(s) held by the mass-removal guard; SIGUSR1 removes them now",
                self.guard.held()
            ));
        }
        // Every resource runs what this snapshot says (or had nothing to change).
        let mut all_live = true;
        // When the last resource began to run it.
        let mut live_at: Option<std::time::Instant> = None;
        let mut reload: Option<ReloadResult> = None;
        let mut path: Option<ApplyPath> = None;
        let mut retry = false;
        for r in &mut self.resources {
            if let Some(e) = &r.template_error {
                errors.push(e.to_string());
            }
            let rendered = match r.render(snapshot) {
                None => {
                    all_live = false;
                    continue;
                }
                Some(Ok(text)) => text,
                Some(Err(e)) => {
                    self.metrics.template_errors.inc();
                    tracing::error!("{e}\n{} keeps its last good content", r.cfg.dest.display());
                    errors.push(e.to_string());
                    all_live = false;
                    continue;
                }
            };
            self.metrics.renders.inc();
            let outcome = r.apply(&rendered, timeout).await;
            self.metrics
                .applies
                .get_or_create(&metrics::result(outcome.label()))
                .inc();
            let dest = r.cfg.dest.clone();
            let label = match &outcome {
                Outcome::Unchanged => Some("noop"),
                Outcome::Runtime { applied } => {
                    let at = applied.done_at.unwrap_or_else(std::time::Instant::now);
                    live_at = live_at.max(Some(at));
                    Some("dynamic")
                }
                Outcome::Reloaded { took, .. } => {
                    self.metrics.reload_duration.observe(took.as_secs_f64());
                    live_at = Some(std::time::Instant::now());
                    Some("full")
                }
                Outcome::Written => {
                    live_at = Some(std::time::Instant::now());
                    Some("full")
                }
                Outcome::Rejected { .. } | Outcome::Failed { .. } => {
                    all_live = false;
                    None
                }
            };
            if let Some(l) = label {
                self.metrics
                    .updates
                    .get_or_create(&metrics::status(l))
                    .inc();
            }
            match outcome {
                Outcome::Unchanged => {}
                Outcome::Written => {
                    tracing::info!(dest = %r.cfg.dest.display(), revision = published.revision, "written (no reload configured)");
                }
                Outcome::Runtime { applied } => {
                    self.metrics
                        .runtime_updates
                        .get_or_create(&metrics::result("ok"))
                        .inc();
                    path = path.or(Some(ApplyPath::Runtime));
                    tracing::info!(
                        dest = %r.cfg.dest.display(),
                        revision = published.revision,
                        services = snapshot.services.len(),
                        instances = snapshot.instance_count(),
                        "applied through the runtime API, no reload ({applied}) in {} ms, {:.2} ms of it in the runtime API",
                        started.elapsed().as_millis(),
                        applied.took.as_secs_f64() * 1000.0
                    );
                    emit(
                        &self.hooks,
                        &self.cfg.name,
                        "runtime",
                        applied.to_string(),
                        &dest,
                        revision,
                    );
                }
                Outcome::Reloaded { fallback, took: _ } => {
                    self.metrics
                        .reloads
                        .get_or_create(&metrics::result("ok"))
                        .inc();
                    reload = reload.or(Some(ReloadResult::Ok));
                    path = Some(ApplyPath::Reload);
                    if let Some(why) = fallback {
                        self.metrics
                            .runtime_updates
                            .get_or_create(&metrics::result("fallback"))
                            .inc();
                        tracing::warn!(
                            dest = %r.cfg.dest.display(),
                            "runtime API failed, reloaded instead: {}",
                            Chain(&why)
                        );
                    }
                    tracing::info!(
                        dest = %r.cfg.dest.display(),
                        revision = published.revision,
                        services = snapshot.services.len(),
                        instances = snapshot.instance_count(),
                        "reloaded in {} ms",
                        started.elapsed().as_millis()
                    );
                    emit(
                        &self.hooks,
                        &self.cfg.name,
                        "reload",
                        format!(
                            "reloaded {} in {} ms ({} services, {} instances)",
                            dest.display(),
                            started.elapsed().as_millis(),
                            snapshot.services.len(),
                            snapshot.instance_count()
                        ),
                        &dest,
                        revision,
                    );
                }
                Outcome::Rejected { check, diff } => {
                    self.metrics.check_failures.inc();
                    tracing::error!(
                        template = %r.name(),
                        dest = %r.cfg.dest.display(),
                        "check_cmd rejected the new file ({}); {} keeps its last good content. Check output:\n{}\nDiff (first lines):\n{}",
                        check.status,
                        r.cfg.dest.display(),
                        check.output,
                        diff,
                    );
                    reload = Some(ReloadResult::Rejected);
                    // The check may fail for a reason outside the file (a missing
                    // certificate, a port in use): checked again on the backoff timer.
                    retry = true;
                    let first = first_error_line(&check.output).to_string();
                    emit(
                        &self.hooks,
                        &self.cfg.name,
                        "reject",
                        if first.is_empty() {
                            format!("check_cmd rejected the new file ({})", check.status)
                        } else {
                            first
                        },
                        &dest,
                        revision,
                    );
                    errors.push(format!(
                        "check_cmd rejected the new {}: {}",
                        r.cfg.dest.display(),
                        check.output.lines().take(5).collect::<Vec<_>>().join(" | ")
                    ));
                }
                Outcome::Failed { error, fallback } => {
                    self.metrics
                        .reloads
                        .get_or_create(&metrics::result("failed"))
                        .inc();
                    reload = Some(ReloadResult::Failed);
                    // Transient or not, try again on the backoff timer: HAProxy may
                    // take the file once whatever it lacked (a port, a certificate) is there.
                    retry = true;
                    let error = resource::failure_report(&error, fallback.as_ref());
                    tracing::error!(dest = %r.cfg.dest.display(), "{error}; the last good file is back in place");
                    emit(
                        &self.hooks,
                        &self.cfg.name,
                        "fail",
                        error.clone(),
                        &dest,
                        revision,
                    );
                    errors.push(error);
                }
            }
        }
        let elapsed = started.elapsed();
        if reload.is_some() || path.is_some() {
            self.metrics.last_apply_seconds.set(elapsed.as_secs_f64());
        }
        self.reloaded = reload.is_some();
        self.metrics.revision.set(published.revision);
        if all_live {
            self.metrics.applied_revision.set(published.revision);
            if let (Some(since), Some(at)) = (self.pending_since.take(), live_at) {
                self.metrics
                    .event_to_live
                    .observe(at.saturating_duration_since(since).as_secs_f64());
            }
        }
        self.metrics.services.set(snapshot.services.len() as i64);
        self.metrics.instances.set(snapshot.instance_count() as i64);
        self.status_tx.send_modify(|s| {
            s.revision = published.revision;
            if let Some(result) = reload {
                s.last_reload_at = Some(crate::schema::unix_now());
                s.last_reload_result = Some(result.as_str().to_string());
            }
            if let Some(p) = path {
                s.last_apply_path = Some(p.as_str().to_string());
            }
            s.last_error = (!errors.is_empty()).then(|| errors.join("\n"));
        });
        self.retry_at = if retry {
            let delay = self.retry_backoff.next_delay();
            tracing::info!("retrying the failed apply in {} ms", delay.as_millis());
            Some(Instant::now() + delay)
        } else {
            self.retry_backoff.reset();
            None
        };
        if !self.ready {
            self.ready = true;
            self.metrics.set_ready();
            sd::ready(&format!("rendered etcd revision {}", published.revision));
        }
    }
}

/// The line of a check's output that says what is wrong: HAProxy prints notices
/// (its version, its path) before its first `[ALERT]`.
fn first_error_line(output: &str) -> &str {
    let mut lines = output.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines.clone().next().unwrap_or("");
    lines
        .find(|l| l.contains("[ALERT]") || l.to_ascii_lowercase().contains("error"))
        .unwrap_or(first)
}

/// One hook event with the fields every watcher event carries.
fn emit(
    hooks: &Hooks,
    watcher: &str,
    name: &'static str,
    summary: String,
    dest: &std::path::Path,
    revision: i64,
) {
    hooks.emit(
        Event::new(name, summary)
            .with("watcher", watcher)
            .with("revision", revision)
            .with("dest", dest.display().to_string()),
    );
}

async fn recv(sig: &mut Option<Signal>) -> Option<()> {
    match sig {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reject_is_summed_up_by_the_first_alert() {
        let out = "[NOTICE]   (1) : haproxy version is 2.6.12\n[NOTICE]   (1) : path to executable is /usr/sbin/haproxy\n[ALERT]    (1) : config : parsing [x.cfg:8] : balance only supports 'roundrobin'\n[ALERT]    (1) : config : Fatal errors found in configuration.";
        assert_eq!(
            first_error_line(out),
            "[ALERT]    (1) : config : parsing [x.cfg:8] : balance only supports 'roundrobin'"
        );
        assert_eq!(first_error_line("\nmissing ok\n"), "missing ok");
        assert_eq!(first_error_line(""), "");
    }
}
