//! The registrar: keeps this node's running containers registered in etcd.
//!
//! ```text
//!  docker task ── Snapshot | Changed | Gone ──┐
//!  probe tasks ── ProbeReport ────────────────┤
//!  keeper task ── KeeperReport ───────────────┼──▶ loop ── plan(desired, actual) ──▶ etcd txns
//!  watch task  ── WatchReport ────────────────┘      (every key on this node's one lease)
//!                                                    └──▶ hooks (one event per instance
//!                                                         written; queued, never awaited)
//! ```
//!
//! The containers come from Docker (`Source::Docker`, what `portolan registrar` runs) or,
//! in the fleet bench's simulated hosts, from a script that sends the same reports
//! (`Source::Scripted`); everything after the docker task is the same code.
//!
//! A container that gets its stop signal is draining (`drain`, `containers`): its
//! instances stay, marked `draining`, until its `die` deletes them or, if it does not
//! exit within its stop timeout, the loop wakes (`Wake::GiveBack`) and puts them back
//! unmarked. Draining is desired state like any other, so a resync keeps it, and a
//! registrar restarted mid-drain finds it in etcd and keeps it.
//!
//! `[[registrar.service]]`s (services of this host that are not containers) are part of
//! the desired set like containers' registrations, probed the same way, on the same
//! lease: they are gone when the registrar's lease is.
//!
//! The loop owns all state; the tasks only report. It is level-triggered: after each
//! batch of reports it recomputes the whole desired key set and applies the difference
//! to what it knows etcd holds (one transaction per batch, so a burst of events costs
//! one round trip). When that knowledge is in doubt (start, Docker or etcd reconnect,
//! lost lease, failed write, every `--resync`), it reads this node's keys back from
//! etcd and reconciles against them instead. Nothing is written when nothing changed.
//!
//! Each turn of the loop waits for one reason to wake (`Wake`), folds in every report
//! already queued, then syncs unless a retry is pending. What a sync does depends on
//! the state:
//!
//! | state | sync | moves to |
//! | --- | --- | --- |
//! | no session (start, lease lost) | connect, take a lease, start its keeper | session without snapshot, or in sync when a snapshot is there |
//! | session without Docker snapshot | nothing: the desired set is unknown, and nothing may be deleted | dirty, when the first snapshot arrives |
//! | dirty | read this node's keys back, write the difference | in sync |
//! | in sync | write the difference between desired and believed (often nothing) | in sync |
//! | retrying | no sync until the backoff timer fires (or the keeper says etcd answers again) | the state it failed in, dirty |
//!
//! Dirty comes from a Docker snapshot (start, reconnect, `--resync`), the resync timer,
//! the keeper's "alive again" after trouble, any failed sync, and the watch on this
//! node's prefix (started after a read-back, from its revision + 1): a key of ours
//! deleted or overwritten behind our back, or the end of that watch. A lost lease (seen by
//! a write or by the keeper) goes back to no session and re-grants at once, unless
//! leases keep vanishing within a TTL: then it is retrying like any failure.
//!
//! A node name belongs to one registrar at a time: every write is a transaction that
//! compares this node's record (on our lease, or absent, or left by a registrar that
//! is gone). When the record is on another registrar's live lease, at start or at any
//! later write, the loop ends and `run` fails saying so, with our own lease revoked:
//! two hosts given one name stop instead of taking turns deleting each other's keys.

mod advertise;
mod announce;
mod containers;
mod docker;
mod drain;
pub(crate) mod lease;
mod metrics;
mod pass;
mod plan;
mod probe;
pub(crate) mod selector;
mod session;
mod watch;

pub use self::docker::DockerReport as ContainerReport;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::containers::Containers;
use self::docker::{DockerReport, DockerSettings};
use self::lease::{KeeperEvent, KeeperReport};
use self::plan::{Actual, KeyOp};
use self::probe::{ProbeReport, Probes};
use self::selector::NodeSettings;
use self::session::{Session, SessionError, V1Cleanup};
use self::watch::{WatchEvent, WatchReport};
use crate::config::RegistrarConfig;
use crate::hook::Hooks;
use crate::schema::{self, NodeRecord};
use crate::sd;

/// What is wrong with a `[[registrar.service]]` on node `node` (none: it registers),
/// given its settings in label form (`ServiceOptions::labels`). The config's
/// validation, so `portolan check` refuses what the registrar could not register.
pub(crate) fn service_problems(
    labels: &std::collections::HashMap<String, String>,
    port: u16,
    addr: Option<&str>,
    node: &str,
) -> Vec<String> {
    let settings = NodeSettings {
        node: node.to_string(),
        // Only the registration's address depends on it, never its validity.
        advertise_ip: std::net::Ipv4Addr::UNSPECIFIED.into(),
        internal: false,
        advertise_networks: Vec::new(),
    };
    selector::service(labels, port, addr, &settings)
        .err()
        .unwrap_or_default()
}

/// How long a clean stop may wait for tasks to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// The `[[registrar.service]]` sections, as registrations of this node.
fn static_services(cfg: &RegistrarConfig, settings: &NodeSettings) -> Vec<selector::Registration> {
    cfg.services
        .iter()
        .filter_map(|s| {
            selector::service(&s.labels(), s.port, s.addr.as_deref(), settings)
                .map_err(|problems| {
                    // Validated with the config: only a programming error gets here.
                    tracing::warn!(service = %s.name, "[[registrar.service]] not registered: {}", problems.join("; "))
                })
                .ok()
        })
        .collect()
}

/// Where the registrar learns which containers run: the one thing that differs between
/// `portolan registrar` and the fleet bench's simulated hosts (`benches/fleet.rs`). Both
/// feed the same loop, passes, plans and session.
pub enum Source {
    /// The Docker Engine (`docker_host`, `only_label`): what `portolan registrar` runs.
    Docker,
    /// Reports as the Docker task would send them, from a script: a `Snapshot` first,
    /// then events. A resync finds no Docker to ask and only reads etcd back; the
    /// sender dropped ends the registrar as a lost Docker task does.
    Scripted(mpsc::Receiver<ContainerReport>),
}

impl Source {
    /// The reports the loop reads: from a Docker task started here, or the script's.
    fn start(
        self,
        cfg: &RegistrarConfig,
        resync_rx: mpsc::Receiver<()>,
        tracker: &TaskTracker,
        shutdown: &CancellationToken,
    ) -> mpsc::Receiver<ContainerReport> {
        match self {
            Source::Docker => {
                let (docker_tx, docker_rx) = mpsc::channel(256);
                tracker.spawn(docker::run(
                    DockerSettings::of(cfg),
                    docker_tx,
                    resync_rx,
                    shutdown.clone(),
                ));
                docker_rx
            }
            // Nobody asks for a fresh list: `resync_rx` is dropped, the loop's request
            // fails quietly, and the resync reads etcd back all the same.
            Source::Scripted(rx) => rx,
        }
    }
}

/// Runs until `shutdown` is cancelled. Never returns because a stream closed.
pub async fn run(cfg: RegistrarConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    run_from(cfg, Source::Docker, shutdown).await
}

/// `run` with the containers from `source`.
pub async fn run_from(
    cfg: RegistrarConfig,
    source: Source,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.state_dir).with_context(|| {
        format!(
            "cannot create the state dir {} (set --state-dir to a writable folder)",
            cfg.state_dir.display()
        )
    })?;
    let advertise_ip = match cfg.advertise_ip {
        Some(ip) => ip,
        None => advertise::detect(&cfg.etcd.endpoints).await?,
    };
    let tracker = TaskTracker::new();
    let hooks = Hooks::start(&cfg.hooks, &tracker, &shutdown);
    let metrics = Arc::new(metrics::Metrics::new());
    metrics.export_hooks(hooks.stats.clone());
    if let Some(addr) = cfg.listen {
        crate::endpoint::start(addr, "--listen", metrics.clone(), &tracker, &shutdown).await?;
    }
    tracker.spawn(crate::etcd::advisory::watch(
        cfg.etcd.clone(),
        metrics.etcd_rbac_bypassable.clone(),
        shutdown.clone(),
    ));
    let (resync_tx, resync_rx) = mpsc::channel(1);
    let (probe_tx, probe_rx) = mpsc::channel(256);
    let (keeper_tx, keeper_rx) = mpsc::channel(16);
    let (watch_tx, watch_rx) = mpsc::channel(64);
    let docker_rx = source.start(&cfg, resync_rx, &tracker, &shutdown);
    tracing::info!(
        node = %cfg.node,
        advertise_ip = %advertise_ip,
        prefix = %cfg.etcd.prefix,
        ttl = cfg.ttl.as_secs(),
        only_label = cfg.only_label.as_deref().unwrap_or("-"),
        "registrar starting"
    );
    let settings = NodeSettings {
        node: cfg.node.clone(),
        advertise_ip,
        internal: cfg.internal,
        advertise_networks: cfg.advertise_networks.clone(),
    };
    let services = static_services(&cfg, &settings);
    let node_want = NodeRecord {
        name: cfg.node.clone(),
        addr: advertise_ip.to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        started_at: schema::unix_now(),
    };
    let mut registrar = Registrar {
        node_key: schema::node_key(&cfg.etcd.prefix, &cfg.node),
        node_want,
        node_value: None,
        containers: Containers::new(settings),
        probes: Probes::new(tracker.clone(), probe_tx, shutdown.clone()),
        services,
        believed: BTreeMap::new(),
        dirty: true,
        docker_synced: false,
        session: Session::new(&cfg, tracker.clone(), keeper_tx, shutdown.clone()),
        ready: false,
        v1_cleaned: false,
        hooks,
        metrics,
        pending_event: None,
        docker_gone: false,
        taken: None,
        lease_regranted: false,
        watch_tx,
        watch: None,
        watches: 0,
        shutdown: shutdown.clone(),
        tracker,
        cfg,
    };
    let inbox = Inbox {
        docker: docker_rx,
        probes: probe_rx,
        keeper: keeper_rx,
        watch: watch_rx,
        resync: resync_tx,
    };
    registrar.run_loop(inbox, &shutdown).await;
    registrar.stop().await;
    match registrar.taken {
        // main reports it: the one place this error is handled.
        Some(holder) => Err(anyhow::anyhow!(holder)),
        None if registrar.docker_gone => Err(anyhow::anyhow!(
            "the Docker task ended: stopped so that this node's keys expire with the lease instead of going stale (systemd's Restart=on-failure starts a fresh registrar)"
        )),
        None => Ok(()),
    }
}

/// The reports the loop reads, and the way to ask Docker for a fresh snapshot.
struct Inbox {
    docker: mpsc::Receiver<DockerReport>,
    probes: mpsc::Receiver<ProbeReport>,
    keeper: mpsc::Receiver<KeeperReport>,
    watch: mpsc::Receiver<WatchReport>,
    resync: mpsc::Sender<()>,
}

/// Why the loop woke.
enum Wake {
    Keeper(KeeperReport),
    Docker(DockerReport),
    Probe(ProbeReport),
    /// A change under this node's prefix, or the end of that watch.
    Watch(WatchReport),
    /// `--resync`: a fresh Docker list and a fresh read of etcd heal a missed event and
    /// keys changed behind our back.
    Resync,
    /// The backoff after a failed sync is over.
    Retry,
    /// A draining container's stop timeout (and margin) is over and it still runs.
    GiveBack,
    /// The Docker task ended (it only does on shutdown, or by a bug): without it our
    /// lease would keep stale keys alive for ever, so the registrar stops and fails.
    DockerGone,
}

struct Registrar {
    cfg: RegistrarConfig,
    node_key: String,
    node_want: NodeRecord,
    /// The node record as written (or found) under this lease.
    node_value: Option<String>,
    containers: Containers,
    probes: Probes,
    /// `[[registrar.service]]`s: registered like containers, for as long as we run.
    services: Vec<selector::Registration>,
    /// What etcd holds for this node under our lease, as far as we know. Trusted only
    /// while `dirty` is false.
    believed: BTreeMap<String, String>,
    dirty: bool,
    /// A Docker snapshot has arrived: before that, the desired set is unknown and
    /// nothing may be deleted.
    docker_synced: bool,
    session: Session,
    /// READY=1 has been sent (after the first reconcile).
    ready: bool,
    /// This node's v1 keys are gone, or etcd will not let us look (`remove_v1_keys`).
    v1_cleaned: bool,
    /// Hears of every instance written (`events`); never waits.
    hooks: Hooks,
    metrics: Arc<metrics::Metrics>,
    /// The earliest Docker event (Docker's clock) not yet followed by an etcd write:
    /// the next write measures event → etcd from it.
    pending_event: Option<std::time::SystemTime>,
    /// The Docker task is gone: `run` fails, so systemd restarts the registrar.
    docker_gone: bool,
    /// Another registrar holds this node's name: the loop ends, `run` fails.
    taken: Option<session::Holder>,
    /// The lease was lost: the next reconcile writes every instance again, and tells
    /// the hooks once (`reregister`).
    lease_regranted: bool,
    watch_tx: mpsc::Sender<WatchReport>,
    /// The running watch on this node's prefix: its number, and how to stop it.
    watch: Option<(u64, CancellationToken)>,
    /// Watches started so far: numbers them.
    watches: u64,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl Registrar {
    async fn run_loop(&mut self, mut inbox: Inbox, shutdown: &CancellationToken) {
        let mut resync =
            tokio::time::interval_at(Instant::now() + self.cfg.resync, self.cfg.resync);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut watchdog = sd::Watchdog::new();
        // The services' probes warm up while Docker answers.
        self.probes.sync(&self.services);
        // Open the session (and keep a reused lease alive) before Docker answers.
        if !self.sync_if_due(&mut watchdog, shutdown).await {
            return;
        }
        loop {
            let retry_at = self.session.retry_at();
            let give_back_at = self.containers.next_give_back();
            let wake = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                Some(r) = inbox.keeper.recv() => Wake::Keeper(r),
                r = inbox.docker.recv() => match r {
                    Some(r) => Wake::Docker(r),
                    None => Wake::DockerGone,
                },
                Some(r) = inbox.probes.recv() => Wake::Probe(r),
                Some(r) = inbox.watch.recv() => Wake::Watch(r),
                _ = resync.tick() => Wake::Resync,
                _ = crate::backoff::sleep_until(retry_at), if retry_at.is_some() => Wake::Retry,
                _ = crate::backoff::sleep_until(give_back_at), if give_back_at.is_some() => Wake::GiveBack,
                // Nothing changed: the sync would have nothing to do.
                _ = watchdog.tick() => continue,
            };
            match wake {
                Wake::Keeper(r) => self.on_keeper(r),
                Wake::Docker(r) => self.on_docker(r),
                Wake::Probe(r) => self.probes.apply(r),
                Wake::Watch(r) => self.on_watch(r),
                Wake::Resync => {
                    let _ = inbox.resync.try_send(());
                    self.dirty = true;
                }
                Wake::Retry => self.session.retry_now(),
                Wake::GiveBack => {
                    self.containers.give_back(Instant::now());
                }
                Wake::DockerGone => {
                    if !shutdown.is_cancelled() {
                        self.docker_gone = true;
                    }
                    return;
                }
            }
            // Fold everything already queued into this batch: one write for a burst.
            while let Ok(r) = inbox.keeper.try_recv() {
                self.on_keeper(r);
            }
            while let Ok(r) = inbox.docker.try_recv() {
                self.on_docker(r);
            }
            while let Ok(r) = inbox.probes.try_recv() {
                self.probes.apply(r);
            }
            while let Ok(r) = inbox.watch.try_recv() {
                self.on_watch(r);
            }
            if !self.sync_if_due(&mut watchdog, shutdown).await {
                return;
            }
        }
    }

    /// Syncs unless a retry is pending. A sync that finds the lease gone goes again at
    /// once with a new one (`Session::lease_lost` backs off if that keeps happening).
    /// False on shutdown, and when another registrar holds this node's name.
    async fn sync_if_due(
        &mut self,
        watchdog: &mut sd::Watchdog,
        shutdown: &CancellationToken,
    ) -> bool {
        while self.session.retry_at().is_none() {
            let had_lease = self.session.lease().is_some();
            // Connect, lease and reconcile can take a while against a struggling etcd;
            // every call on that path is time-limited, so keep the watchdog fed
            // meanwhile.
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = self.sync() => {}
                _ = watchdog.feed() => {}
            }
            if self.taken.is_some() {
                return false;
            }
            if !(had_lease && self.session.lease().is_none()) {
                break;
            }
        }
        true
    }

    fn on_docker(&mut self, report: DockerReport) {
        if let DockerReport::Event { at, .. } = &report {
            self.pending_event.get_or_insert(*at);
        }
        if self.containers.apply(report, Instant::now()) {
            self.docker_synced = true;
            self.dirty = true;
        }
        self.probes
            .sync(self.containers.registrations().chain(&self.services));
    }

    fn on_keeper(&mut self, r: KeeperReport) {
        if self.session.lease() != Some(r.lease) {
            return;
        }
        match r.event {
            KeeperEvent::Trouble(e) => {
                tracing::warn!(lease = r.lease, error = %e, "etcd: lease keep-alive failing; retrying")
            }
            KeeperEvent::Alive => {
                tracing::info!(lease = r.lease, "etcd: keep-alive restored; reconciling");
                self.dirty = true;
                self.session.retry_now();
            }
            KeeperEvent::Lost => self.lease_lost(),
        }
    }

    fn on_watch(&mut self, r: WatchReport) {
        if self.watch.as_ref().map(|(n, _)| *n) != Some(r.watch) {
            return;
        }
        match r.event {
            WatchEvent::Changed(changes) => {
                if self.dirty {
                    return;
                }
                if let Some(key) = watch::tampered(&changes, &self.believed, self.session.lease()) {
                    tracing::info!(%key, "a key of this node changed behind the registrar's back; writing it again");
                    self.dirty = true;
                }
            }
            WatchEvent::Ended(why) => {
                tracing::debug!(reason = %why, "watch on this node's keys ended; reading them back");
                self.stop_watch();
                self.dirty = true;
            }
        }
    }

    /// Watches this node's prefix from `revision` unless a watch runs already (it has
    /// seen everything since an earlier read-back).
    async fn start_watch(&mut self, revision: i64) -> Result<(), SessionError> {
        if self.watch.is_some() {
            return Ok(());
        }
        let client = self.session.watch_client().await?;
        self.watches += 1;
        let stop = self.shutdown.child_token();
        self.tracker.spawn(watch::run(
            client,
            schema::node_prefix(&self.cfg.etcd.prefix, &self.cfg.node),
            revision,
            self.watches,
            self.watch_tx.clone(),
            stop.clone(),
        ));
        self.watch = Some((self.watches, stop));
        Ok(())
    }

    fn stop_watch(&mut self) {
        if let Some((_, stop)) = self.watch.take() {
            stop.cancel();
        }
    }

    fn lease_lost(&mut self) {
        self.session.lease_lost();
        self.lease_regranted = true;
        self.node_value = None;
        self.dirty = true;
    }

    async fn stop(&mut self) {
        sd::stopping();
        self.probes.stop();
        self.stop_watch();
        if self.taken.is_some() {
            self.session.abandon().await;
        } else {
            self.session.close(self.cfg.deregister_on_exit).await;
        }
        self.tracker.close();
        if tokio::time::timeout(DRAIN_TIMEOUT, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("some registrar tasks did not stop within {DRAIN_TIMEOUT:?}");
        }
    }
}
