//! The registrar: keeps this node's running containers registered in etcd.
//!
//! ```text
//!  docker task ── Snapshot | Changed | Gone ──┐
//!  probe tasks ── ProbeReport ────────────────┼──▶ loop ── plan(desired, actual) ──▶ etcd txns
//!  keeper task ── KeeperReport ───────────────┘      (every key on this node's one lease)
//! ```
//!
//! The loop owns all state; the tasks only report. It is level-triggered: after each
//! batch of reports it recomputes the whole desired key set and applies the difference
//! to what it knows etcd holds (one transaction per batch, so a burst of events costs
//! one round trip). When that knowledge is in doubt (start, Docker or etcd reconnect,
//! lost lease, failed write, every `--resync`), it reads this node's keys back from
//! etcd and reconciles against them instead. Nothing is written when nothing changed.

mod docker;
pub(crate) mod lease;
mod plan;
mod probe;
mod selector;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use bollard::models::ContainerInspectResponse;
use etcd_client::{Client, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::docker::{DockerReport, DockerSettings};
use self::lease::{KeeperEvent, KeeperReport};
use self::plan::{Actual, Op};
use self::probe::ProbeReport;
use self::selector::{Check, Gate, NodeSettings, Registration};
use crate::backoff::Backoff;
use crate::config::RegistrarConfig;
use crate::schema::{self, NodeRecord};
use crate::{etcd, sd};

/// How long a clean stop may wait for tasks to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs until `shutdown` is cancelled. Never returns because a stream closed.
pub async fn run(cfg: RegistrarConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.state_dir).with_context(|| {
        format!(
            "cannot create the state dir {} (set --state-dir to a writable folder)",
            cfg.state_dir.display()
        )
    })?;
    let advertise_ip = match cfg.advertise_ip {
        Some(ip) => ip,
        None => detect_advertise_ip(&cfg.etcd.endpoints).await?,
    };
    let tracker = TaskTracker::new();
    let (docker_tx, docker_rx) = mpsc::channel(256);
    let (resync_tx, resync_rx) = mpsc::channel(1);
    let (probe_tx, probe_rx) = mpsc::channel(256);
    let (keeper_tx, keeper_rx) = mpsc::channel(16);
    let docker_settings = DockerSettings {
        host: cfg.docker_host.clone(),
        api_version: cfg.docker_api_version.clone(),
        only_label: cfg.only_label.clone(),
    };
    tracker.spawn(docker::run(
        docker_settings,
        docker_tx,
        resync_rx,
        shutdown.clone(),
    ));
    tracing::info!(
        node = %cfg.node,
        advertise_ip = %advertise_ip,
        prefix = %cfg.etcd.prefix,
        ttl = cfg.ttl.as_secs(),
        only_label = cfg.only_label.as_deref().unwrap_or("-"),
        "registrar starting"
    );
    let mut registrar = Registrar::new(cfg, advertise_ip, tracker, probe_tx, keeper_tx, shutdown);
    registrar
        .run_loop(docker_rx, probe_rx, keeper_rx, resync_tx)
        .await;
    registrar.stop().await;
    Ok(())
}

/// The local address the kernel would use to reach the first etcd endpoint: on a
/// multi-homed host that is the interface facing the cluster. A UDP connect sends
/// nothing.
async fn detect_advertise_ip(endpoints: &[String]) -> anyhow::Result<IpAddr> {
    let first = endpoints
        .first()
        .context("no etcd endpoint to detect the advertise IP from: set --advertise-ip")?;
    let authority = first
        .split_once("://")
        .map_or(first.as_str(), |(_, rest)| rest)
        .split('/')
        .next()
        .unwrap_or_default();
    let target = if authority.contains(':') && !authority.ends_with(']') {
        authority.to_string()
    } else {
        format!("{authority}:2379")
    };
    let detect = async {
        let addr = tokio::net::lookup_host(&target)
            .await?
            .next()
            .ok_or_else(|| std::io::Error::other("no address"))?;
        let bind = if addr.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        };
        let socket = tokio::net::UdpSocket::bind(bind).await?;
        socket.connect(addr).await?;
        Ok::<_, std::io::Error>(socket.local_addr()?.ip())
    };
    let ip = detect.await.with_context(|| {
        format!("cannot detect the advertise IP from etcd endpoint {first}: set --advertise-ip")
    })?;
    if ip.is_loopback() {
        tracing::warn!(
            advertise_ip = %ip,
            "advertise IP detected as loopback because etcd is local; other hosts cannot reach it (set --advertise-ip)"
        );
    }
    Ok(ip)
}

struct ProbeSlot {
    addr: String,
    check: Check,
    generation: u64,
    /// None until the first verdict.
    up: Option<bool>,
    stop: CancellationToken,
}

/// Why a sync with etcd did not complete.
enum Failure {
    /// Our lease no longer exists: grant a new one and put everything.
    LeaseLost,
    /// Anything else: try again after a backoff.
    Retry(String),
}

impl From<etcd_client::Error> for Failure {
    fn from(e: etcd_client::Error) -> Failure {
        if lease::is_lease_not_found(&e) {
            Failure::LeaseLost
        } else {
            Failure::Retry(e.to_string())
        }
    }
}

struct Registrar {
    cfg: RegistrarConfig,
    settings: NodeSettings,
    node_key: String,
    node_want: NodeRecord,
    /// The node record as written (or found) under this lease.
    node_value: Option<String>,
    /// Registrable containers (running, healthy, valid labels) → what they register.
    containers: BTreeMap<String, Vec<Registration>>,
    /// Container id → the warnings last logged for it, so a resync does not repeat them.
    warned: BTreeMap<String, String>,
    /// Instance → its probe.
    probes: BTreeMap<String, ProbeSlot>,
    probe_generation: u64,
    /// What etcd holds for this node under our lease, as far as we know. Trusted only
    /// while `dirty` is false.
    believed: BTreeMap<String, String>,
    dirty: bool,
    /// A Docker snapshot has arrived: before that, the desired set is unknown and
    /// nothing may be deleted.
    docker_synced: bool,
    client: Option<Client>,
    lease: Option<i64>,
    keeper_stop: Option<CancellationToken>,
    /// While set, etcd is being retried after a failure: no syncs before then.
    retry_at: Option<Instant>,
    backoff: Backoff,
    last_lease_loss: Option<Instant>,
    etcd_trouble: bool,
    ready: bool,
    tracker: TaskTracker,
    probe_tx: mpsc::Sender<ProbeReport>,
    keeper_tx: mpsc::Sender<KeeperReport>,
    shutdown: CancellationToken,
}

impl Registrar {
    fn new(
        cfg: RegistrarConfig,
        advertise_ip: IpAddr,
        tracker: TaskTracker,
        probe_tx: mpsc::Sender<ProbeReport>,
        keeper_tx: mpsc::Sender<KeeperReport>,
        shutdown: CancellationToken,
    ) -> Registrar {
        let started_at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        Registrar {
            settings: NodeSettings {
                node: cfg.node.clone(),
                advertise_ip,
                internal: cfg.internal,
            },
            node_key: schema::node_key(&cfg.etcd.prefix, &cfg.node),
            node_want: NodeRecord {
                name: cfg.node.clone(),
                addr: advertise_ip.to_string(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                started_at,
            },
            node_value: None,
            containers: BTreeMap::new(),
            warned: BTreeMap::new(),
            probes: BTreeMap::new(),
            probe_generation: 0,
            believed: BTreeMap::new(),
            dirty: true,
            docker_synced: false,
            client: None,
            lease: None,
            keeper_stop: None,
            retry_at: None,
            last_lease_loss: None,
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(5)),
            etcd_trouble: false,
            ready: false,
            tracker,
            probe_tx,
            keeper_tx,
            shutdown,
            cfg,
        }
    }

    async fn run_loop(
        &mut self,
        mut docker_rx: mpsc::Receiver<DockerReport>,
        mut probe_rx: mpsc::Receiver<ProbeReport>,
        mut keeper_rx: mpsc::Receiver<KeeperReport>,
        resync_tx: mpsc::Sender<()>,
    ) {
        let shutdown = self.shutdown.clone();
        let mut resync =
            tokio::time::interval_at(Instant::now() + self.cfg.resync, self.cfg.resync);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut watchdog = sd::Watchdog::new();
        loop {
            // Open the session (and keep a reused lease alive) before Docker answers.
            // A sync that finds the lease gone goes again at once with a new one
            // (`lease_lost` backs off if that keeps happening).
            while self.retry_at.is_none() {
                let had_lease = self.lease.is_some();
                // Connect, lease and reconcile can take a while against a struggling
                // etcd; every call on that path is time-limited, so keep the watchdog
                // fed meanwhile.
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = self.sync() => {}
                    _ = watchdog.feed() => {}
                }
                if !(had_lease && self.lease.is_none()) {
                    break;
                }
            }
            let retry_at = self.retry_at;
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                Some(r) = keeper_rx.recv() => self.on_keeper(r),
                Some(r) = docker_rx.recv() => self.on_docker(r),
                Some(r) = probe_rx.recv() => self.on_probe(r),
                _ = resync.tick() => {
                    // A fresh Docker list and a fresh read of etcd: heals a missed
                    // event and keys changed behind our back.
                    let _ = resync_tx.try_send(());
                    self.dirty = true;
                }
                _ = crate::backoff::sleep_until(retry_at), if retry_at.is_some() => self.retry_at = None,
                _ = watchdog.tick() => {}
            }
            // Fold everything already queued into this batch: one write for a burst.
            while let Ok(r) = keeper_rx.try_recv() {
                self.on_keeper(r);
            }
            while let Ok(r) = docker_rx.try_recv() {
                self.on_docker(r);
            }
            while let Ok(r) = probe_rx.try_recv() {
                self.on_probe(r);
            }
        }
    }

    // ---------- reports ----------

    fn on_docker(&mut self, report: DockerReport) {
        match report {
            DockerReport::Snapshot(list) => {
                let mut next = BTreeMap::new();
                for c in &list {
                    if let Some((id, regs)) = self.evaluate(c) {
                        next.insert(id, regs);
                    }
                }
                let seen: std::collections::BTreeSet<&str> =
                    list.iter().filter_map(|c| c.id.as_deref()).collect();
                self.warned.retain(|id, _| seen.contains(id.as_str()));
                self.containers = next;
                self.docker_synced = true;
                self.dirty = true;
            }
            DockerReport::Changed(c) => {
                let Some(id) = c.id.clone() else { return };
                match self.evaluate(&c) {
                    Some((id, regs)) => {
                        self.containers.insert(id, regs);
                    }
                    None => {
                        self.containers.remove(&id);
                    }
                }
            }
            DockerReport::Gone { id, action } => {
                if self.containers.remove(&id).is_some() {
                    tracing::debug!(container = %schema::short_id(&id), action = %action, "container going away");
                }
                self.warned.remove(&id);
            }
        }
        self.sync_probes();
    }

    /// The container's registrations if it may be registered now; logs why not once.
    fn evaluate(&mut self, c: &ContainerInspectResponse) -> Option<(String, Vec<Registration>)> {
        let id = c.id.clone()?;
        let gate = selector::gate(c);
        if gate != Gate::Up {
            tracing::debug!(container = %selector::display_name(c), gate = ?gate, "not registrable now");
            return None;
        }
        match selector::registrations(c, &self.settings) {
            Ok(regs) => {
                self.warned.remove(&id);
                Some((id, regs))
            }
            Err(warnings) => {
                let text: Vec<String> = warnings.iter().map(|w| w.to_string()).collect();
                let text = text.join("; ");
                if self.warned.get(&id) != Some(&text) {
                    for w in &warnings {
                        tracing::warn!(
                            container = %w.container,
                            label = %w.label,
                            "{w}; the container is not registered until this is fixed"
                        );
                    }
                    self.warned.insert(id, text);
                }
                None
            }
        }
    }

    /// One probe per instance that asks for one; probes of instances gone or changed stop.
    fn sync_probes(&mut self) {
        let wanted: BTreeMap<&str, (&str, &Check)> = self
            .containers
            .values()
            .flatten()
            .filter_map(|r| {
                r.check
                    .as_ref()
                    .map(|c| (r.instance.as_str(), (r.record.addr.as_str(), c)))
            })
            .collect();
        self.probes.retain(|instance, slot| {
            let keep = wanted
                .get(instance.as_str())
                .is_some_and(|(addr, check)| slot.addr == *addr && slot.check == **check);
            if !keep {
                slot.stop.cancel();
            }
            keep
        });
        for (instance, (addr, check)) in wanted {
            if self.probes.contains_key(instance) {
                continue;
            }
            self.probe_generation += 1;
            let stop = self.shutdown.child_token();
            self.tracker.spawn(probe::run(
                instance.to_string(),
                self.probe_generation,
                addr.to_string(),
                check.clone(),
                self.probe_tx.clone(),
                stop.clone(),
            ));
            self.probes.insert(
                instance.to_string(),
                ProbeSlot {
                    addr: addr.to_string(),
                    check: check.clone(),
                    generation: self.probe_generation,
                    up: None,
                    stop,
                },
            );
        }
    }

    fn on_probe(&mut self, r: ProbeReport) {
        let Some(slot) = self.probes.get_mut(&r.instance) else {
            return;
        };
        if slot.generation != r.generation {
            return;
        }
        let before = slot.up.replace(r.up);
        if r.up {
            tracing::info!(instance = %r.instance, addr = %slot.addr, "probe passes");
        } else if before.is_none() {
            // Still starting, or down since before a registrar restart: any key it has
            // from then goes.
            tracing::info!(
                instance = %r.instance,
                addr = %slot.addr,
                error = r.error.as_deref().unwrap_or("-"),
                "probe has not passed yet; not registered"
            );
        } else {
            tracing::warn!(
                instance = %r.instance,
                addr = %slot.addr,
                error = r.error.as_deref().unwrap_or("-"),
                "probe fails; deregistering"
            );
        }
    }

    fn on_keeper(&mut self, r: KeeperReport) {
        if self.lease != Some(r.lease) {
            return;
        }
        match r.event {
            KeeperEvent::Trouble(e) => {
                tracing::warn!(lease = r.lease, error = %e, "etcd: lease keep-alive failing; retrying")
            }
            KeeperEvent::Alive => {
                tracing::info!(lease = r.lease, "etcd: keep-alive restored; reconciling");
                self.dirty = true;
                self.retry_at = None;
            }
            KeeperEvent::Lost => self.lease_lost(),
        }
    }

    fn lease_lost(&mut self) {
        if let Some(id) = self.lease.take() {
            tracing::warn!(
                lease = id,
                "etcd: lease is gone (expired during an outage, or etcd lost its data); granting a new one and registering everything again"
            );
        }
        if let Some(stop) = self.keeper_stop.take() {
            stop.cancel();
        }
        self.node_value = None;
        self.dirty = true;
        // Re-grant at once, unless leases keep vanishing: then back off like any failure.
        let now = Instant::now();
        let recent = self
            .last_lease_loss
            .is_some_and(|t| now.duration_since(t) < self.cfg.ttl);
        self.last_lease_loss = Some(now);
        self.retry_at = recent.then(|| now + self.backoff.next_delay());
    }

    // ---------- etcd ----------

    /// The desired key set. A probed instance without a verdict yet keeps its key if
    /// it has one (`present`): a restarted registrar must not drop healthy instances
    /// while its probes warm up.
    fn desired(&self, present: impl Fn(&str) -> bool) -> BTreeMap<String, String> {
        let prefix = &self.cfg.etcd.prefix;
        let mut d = BTreeMap::new();
        let node_value = self
            .node_value
            .clone()
            .unwrap_or_else(|| serde_json::to_string(&self.node_want).unwrap_or_default());
        d.insert(self.node_key.clone(), node_value);
        for r in self.containers.values().flatten() {
            let key = r.key(prefix);
            let wanted = match (&r.check, self.probes.get(&r.instance)) {
                (None, _) => true,
                (Some(_), Some(slot)) => match slot.up {
                    Some(up) => up,
                    None => present(&key),
                },
                (Some(_), None) => false,
            };
            if wanted {
                d.insert(key, r.record.to_json());
            }
        }
        d
    }

    /// Brings etcd in line, or schedules a retry.
    async fn sync(&mut self) {
        let result = self.try_sync().await;
        match result {
            Ok(()) => {
                if self.etcd_trouble {
                    tracing::info!("etcd: writes work again");
                    self.etcd_trouble = false;
                }
                self.backoff.reset();
            }
            Err(Failure::LeaseLost) => self.lease_lost(),
            Err(Failure::Retry(e)) => {
                self.dirty = true;
                let delay = self.backoff.next_delay();
                if !self.etcd_trouble {
                    tracing::warn!(error = %e, "etcd: cannot sync; retrying with backoff");
                    self.etcd_trouble = true;
                } else {
                    tracing::debug!(error = %e, retry_in = ?delay, "etcd still failing");
                }
                self.retry_at = Some(Instant::now() + delay);
            }
        }
    }

    async fn try_sync(&mut self) -> Result<(), Failure> {
        let lease = match self.lease {
            Some(l) => l,
            None => self.open_session().await?,
        };
        if !self.docker_synced {
            return Ok(());
        }
        if self.dirty {
            self.reconcile(lease).await
        } else {
            self.apply_changes(lease).await
        }
    }

    /// Connects (once; the client reconnects by itself) and takes a lease: the one in
    /// the state file if it is alive, else a new one.
    async fn open_session(&mut self) -> Result<i64, Failure> {
        let client = match &mut self.client {
            Some(c) => c,
            None => self.client.insert(etcd::connect(&self.cfg.etcd).await?),
        };
        let l = lease::acquire(client, self.cfg.ttl, &self.cfg.state_dir)
            .await
            // Never LeaseLost from here: that would only loop back into this call.
            .map_err(|e| Failure::Retry(e.to_string()))?;
        tracing::info!(
            lease = l.id,
            reused = l.reused,
            ttl = self.cfg.ttl.as_secs(),
            "etcd: {} lease",
            if l.reused { "reusing live" } else { "granted" }
        );
        let stop = self.shutdown.child_token();
        self.tracker.spawn(lease::keep_alive(
            client.clone(),
            l.id,
            self.cfg.ttl,
            self.keeper_tx.clone(),
            stop.clone(),
        ));
        self.keeper_stop = Some(stop);
        self.lease = Some(l.id);
        self.node_value = None;
        self.dirty = true;
        Ok(l.id)
    }

    /// Reads this node's keys back and makes them match.
    async fn reconcile(&mut self, lease: i64) -> Result<(), Failure> {
        let prefix = self.cfg.etcd.prefix.clone();
        let client = self
            .client
            .as_mut()
            .ok_or(Failure::Retry("no etcd client".into()))?;
        let read = Txn::new().and_then(vec![
            TxnOp::get(
                schema::services_prefix(&prefix),
                Some(GetOptions::new().with_prefix()),
            ),
            TxnOp::get(self.node_key.clone(), None),
        ]);
        let resp = etcd::call(client.txn(read)).await?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or_default();
        let mut actual = BTreeMap::new();
        for op in resp.op_responses() {
            let TxnOpResponse::Get(get) = op else {
                continue;
            };
            for kv in get.kvs() {
                let Ok(key) = kv.key_str() else { continue };
                if plan::is_ours(&prefix, &self.cfg.node, key, kv.value()) {
                    actual.insert(
                        key.to_string(),
                        Actual {
                            value: String::from_utf8_lossy(kv.value()).into_owned(),
                            lease: kv.lease(),
                        },
                    );
                }
            }
        }
        self.node_value = Some(plan::node_value(
            &self.node_want,
            actual.get(&self.node_key),
            lease,
        ));
        let desired = self.desired(|key| actual.get(key).is_some_and(|a| a.lease == lease));
        let ops = plan::plan(&desired, &actual, lease);
        let wrote = !ops.is_empty();
        self.apply(&ops, lease).await?;
        self.believed = desired;
        self.dirty = false;
        if wrote {
            tracing::info!(
                revision,
                instances = self.believed.len() - 1,
                changes = ops.len(),
                "reconciled"
            );
        } else {
            tracing::debug!(
                revision,
                instances = self.believed.len() - 1,
                "reconciled: etcd already matches"
            );
        }
        if !self.ready {
            self.ready = true;
            let status = format!("{} instances registered", self.believed.len() - 1);
            tracing::info!(node = %self.cfg.node, "registrar ready: {status}");
            sd::ready(&status);
        }
        Ok(())
    }

    /// Applies the difference between the desired set and what etcd is known to hold.
    async fn apply_changes(&mut self, lease: i64) -> Result<(), Failure> {
        let desired = self.desired(|key| self.believed.contains_key(key));
        let actual: BTreeMap<String, Actual> = self
            .believed
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    Actual {
                        value: v.clone(),
                        lease,
                    },
                )
            })
            .collect();
        let ops = plan::plan(&desired, &actual, lease);
        if ops.is_empty() {
            return Ok(());
        }
        self.apply(&ops, lease).await?;
        self.believed = desired;
        Ok(())
    }

    /// Writes `ops` in transactions of at most `MAX_TXN_OPS`. On failure the caller
    /// marks the state dirty: a later reconcile reads back what actually happened.
    async fn apply(&mut self, ops: &[Op], lease: i64) -> Result<(), Failure> {
        let prefix = self.cfg.etcd.prefix.clone();
        let client = self
            .client
            .as_mut()
            .ok_or(Failure::Retry("no etcd client".into()))?;
        for chunk in ops.chunks(plan::MAX_TXN_OPS) {
            let txn_ops: Vec<TxnOp> = chunk
                .iter()
                .map(|op| match op {
                    Op::Put { key, value } => TxnOp::put(
                        key.as_str(),
                        value.as_str(),
                        Some(PutOptions::new().with_lease(lease)),
                    ),
                    Op::Delete { key } => TxnOp::delete(key.as_str(), None),
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

    // ---------- stop ----------

    async fn stop(&mut self) {
        sd::stopping();
        for slot in self.probes.values() {
            slot.stop.cancel();
        }
        if let Some(stop) = self.keeper_stop.take() {
            stop.cancel();
        }
        match (self.cfg.deregister_on_exit, self.lease, &mut self.client) {
            (true, Some(lease), Some(client)) => {
                match etcd::call(client.lease_revoke(lease)).await {
                    Ok(_) => {
                        lease::forget(&self.cfg.state_dir);
                        tracing::info!(lease, node = %self.cfg.node, "stopped; lease revoked, this node's keys are gone");
                    }
                    Err(e) => tracing::warn!(
                        lease,
                        error = %e,
                        "stopped, but could not revoke the lease: this node's keys expire after the TTL"
                    ),
                }
            }
            _ => tracing::info!(
                node = %self.cfg.node,
                ttl = self.cfg.ttl.as_secs(),
                "stopped; keys stay until the lease TTL runs out, so a restart causes no churn"
            ),
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

fn log_op(prefix: &str, op: &Op, revision: i64) {
    let (key, value) = match op {
        Op::Put { key, value } => (key, Some(value)),
        Op::Delete { key } => (key, None),
    };
    match (schema::parse_key(prefix, key), value) {
        (Ok(schema::Key::Service { service, instance }), Some(v)) => {
            tracing::info!(%service, %instance, %key, revision, value = %v, "registered")
        }
        (Ok(schema::Key::Service { service, instance }), None) => {
            tracing::info!(%service, %instance, %key, revision, "deregistered")
        }
        (_, Some(_)) => tracing::debug!(%key, revision, "node key written"),
        (_, None) => tracing::debug!(%key, revision, "deleted"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn advertise_ip_is_the_address_facing_etcd() {
        let ip = detect_advertise_ip(&["http://127.0.0.1:2379".into()])
            .await
            .unwrap();
        assert_eq!(ip, "127.0.0.1".parse::<IpAddr>().unwrap());
        let ip = detect_advertise_ip(&["127.0.0.1".into()]).await.unwrap();
        assert!(ip.is_loopback());
        assert!(detect_advertise_ip(&[]).await.is_err());
    }
}
