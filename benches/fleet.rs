//! `cargo bench --bench fleet`: a simulated fleet against real etcd and real HAProxy.
//!
//! N hosts (default 1,000; `--hosts N`), each a real registrar session in this process
//! (`portolan::registrar::run_from`: its own etcd client, lease, keep-alive, node record
//! and writes, the code `portolan registrar` runs) with `--instances-per-host` (50)
//! containers from a scripted source instead of Docker; a 3-member etcd cluster on
//! 127.0.0.1; two `portolan watcher` processes, each with its own HAProxy (runtime API
//! on). Watcher A has the default mass-removal guard, watcher B a strict one (share 6 %,
//! hold 20 s), so the 10 % loss shows both decisions.
//!
//! Scenarios, in order: start from empty; at rest; steady churn (1 % of the instances
//! per minute, a container replaced = `die` + `start`); one host lost (its registrar
//! stops without revoking its lease: keep-alives stop, the lease expires) and back; 10 %
//! of the hosts lost at once and back; the etcd leader restarted under churn. After each
//! one the bench waits until etcd holds exactly what the running hosts register and both
//! HAProxies run exactly what etcd holds (`show servers state`, every server), and
//! counts what is missing or extra as changes lost.
//!
//! Change → routed: from the scripted `start` event to the new server ready in
//! `show servers state <backend>` of each HAProxy (polled every 5 ms, at most 4 changes
//! followed at once; the others are made but not timed).
//!
//! `--quick`: 20 hosts, short windows and a faster churn (20 %/min) so the latency
//! rows have samples. Writes `docs/fleet.{txt,json,svg}` unless `--no-docs`.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "shared/machine.rs"]
mod machine;
use machine::machine;

#[path = "fleet/cluster.rs"]
mod cluster;
#[path = "fleet/door.rs"]
mod door;
#[path = "fleet/host.rs"]
mod host;
#[path = "fleet/observe.rs"]
mod observe;
#[path = "fleet/svg.rs"]
mod svg;

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use portolan::config::EtcdConfig;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use cluster::Cluster;
use door::Door;
use host::{Host, Server};
use observe::{Member, Writes};

#[derive(Debug, Clone)]
struct Args {
    hosts: usize,
    per_host: usize,
    quick: bool,
    churn_per_min: f64,
    churn_secs: u64,
    rest_secs: u64,
    ttl: Duration,
    docs: bool,
}

impl Args {
    fn parse() -> Option<Args> {
        let args: Vec<String> = std::env::args().collect();
        if !args.iter().any(|a| a == "--bench") {
            return None;
        }
        let quick = args.iter().any(|a| a == "--quick");
        let value = |flag: &str| -> Option<String> {
            args.iter()
                .position(|a| a == flag)
                .and_then(|i| args.get(i + 1).cloned())
                .or_else(|| {
                    args.iter()
                        .find_map(|a| a.strip_prefix(&format!("{flag}=")).map(str::to_string))
                })
        };
        let num = |flag: &str, default: f64| -> f64 {
            match value(flag) {
                Some(v) => v
                    .parse()
                    .unwrap_or_else(|_| panic!("{flag} {v:?}: expected a number")),
                None => default,
            }
        };
        let a = Args {
            hosts: num("--hosts", if quick { 20.0 } else { 1000.0 }) as usize,
            per_host: num("--instances-per-host", 50.0) as usize,
            quick,
            churn_per_min: num("--churn-per-min", if quick { 20.0 } else { 1.0 }),
            churn_secs: num("--churn-secs", if quick { 15.0 } else { 60.0 }) as u64,
            rest_secs: num("--rest-secs", if quick { 5.0 } else { 20.0 }) as u64,
            ttl: Duration::from_secs(num("--ttl", 10.0) as u64),
            docs: !args.iter().any(|a| a == "--no-docs"),
        };
        assert!(
            (10..=60_000).contains(&a.hosts),
            "--hosts {}: between 10 and 60000 (one 127.x address each, 10 % of them lost at once)",
            a.hosts
        );
        assert!(
            (1..=1000).contains(&a.per_host),
            "--instances-per-host {}: between 1 and 1000",
            a.per_host
        );
        Some(a)
    }

    fn instances(&self) -> usize {
        self.hosts * self.per_host
    }

    /// 50 instances per service, as many services as that makes.
    fn services(&self) -> usize {
        (self.instances() / 50).max(1)
    }
}

/// How one scenario went.
#[derive(Debug, Default)]
struct Scenario {
    name: String,
    secs: f64,
    /// Writes per second under the prefix, as the bench's watch saw them.
    watch_writes: f64,
    /// Puts + deletes per second applied, from etcd's `/metrics` (the busiest member).
    etcd_writes: f64,
    txns: f64,
    /// Lease renewals per second, etcd's `etcd_debugging_lease_renewed_total`.
    keepalives: f64,
    /// Changes the script made (replacements).
    scripted: usize,
    /// Per door: change → routed.
    latency: Vec<Vec<Duration>>,
    /// Change → its put seen by the bench's watch (registrar + etcd's share).
    to_etcd: Vec<Duration>,
    /// Replacements made but not timed (4 followed at once).
    untimed: usize,
    /// From the scenario's end: etcd holds what the running hosts register.
    etcd_settled: Option<Duration>,
    /// From the scenario's end: each door runs what etcd holds.
    agreed: Vec<Option<Duration>>,
    lost: usize,
    leases: usize,
    db_mb: f64,
    db_in_use_mb: f64,
    keys: f64,
    /// Per door: (RSS, peak RSS) of the watcher in MB.
    rss: Vec<(f64, f64)>,
    notes: Vec<String>,
}

/// Rates over a window.
struct Window {
    at: Instant,
    writes: u64,
    members: Vec<Member>,
}

struct World {
    args: Args,
    /// The registrars' state dirs and log: removed with the world.
    _dir: tempfile::TempDir,
    cluster: Cluster,
    doors: Vec<Door>,
    hosts: Vec<Host>,
    etcd: EtcdConfig,
    client: etcd_client::Client,
    writes: Arc<Writes>,
    epoch: Instant,
    stop: CancellationToken,
    /// (seconds since start, door, ms): every change → routed sample, for the picture.
    samples: Vec<(f64, usize, f64)>,
    /// (seconds since start, scenario): where each one began.
    marks: Vec<(f64, String)>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// (p50, p99, max) in ms.
fn pcts(samples: &[Duration]) -> (f64, f64, f64) {
    let mut v: Vec<f64> = samples.iter().copied().map(ms).collect();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let at = |p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize];
    (at(0.5), at(0.99), v[v.len() - 1])
}

impl World {
    async fn start(args: Args) -> World {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = std::fs::File::create(dir.path().join("registrars.log")).expect("log");
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
            .with_writer(std::sync::Mutex::new(log))
            .with_ansi(false)
            .try_init();
        let cluster = Cluster::start().await;
        let prefix = common::unique_prefix("fleet");
        let mut etcd = EtcdConfig::local(&cluster.endpoints()[0], &prefix);
        etcd.endpoints = cluster.endpoints();
        let epoch = Instant::now();
        let stop = CancellationToken::new();
        let writes = Arc::new(Writes::default());
        writes.spawn(
            cluster.endpoints(),
            format!("{prefix}/"),
            epoch,
            stop.clone(),
        );
        let doors = vec![
            Door::start("fleet-a", &cluster.endpoints(), &prefix, "").await,
            Door::start(
                "fleet-b",
                &cluster.endpoints(),
                &prefix,
                "share = 0.06, hold_s = 20",
            )
            .await,
        ];
        eprintln!(
            "logs: {} (registrars), {} (etcd), {} and {} (watchers, HAProxy)",
            dir.path().display(),
            cluster.dir.path().display(),
            doors[0].dir.path().display(),
            doors[1].dir.path().display()
        );
        let client = etcd_client::Client::connect(cluster.endpoints(), None)
            .await
            .expect("connect to the fleet's etcd");
        let hosts = (0..args.hosts)
            .map(|i| Host::new(i, args.per_host, args.services(), dir.path()))
            .collect();
        World {
            args,
            _dir: dir,
            cluster,
            doors,
            hosts,
            etcd,
            client,
            writes,
            epoch,
            stop,
            samples: Vec::new(),
            marks: Vec::new(),
        }
    }

    fn now_s(&self) -> f64 {
        self.epoch.elapsed().as_secs_f64()
    }

    async fn members(&self) -> Vec<Member> {
        self.cluster
            .metrics()
            .await
            .iter()
            .map(|t| Member::of(t))
            .collect()
    }

    async fn window(&self) -> Window {
        Window {
            at: Instant::now(),
            writes: self.writes.total(),
            members: self.members().await,
        }
    }

    /// Fills the rates of `s` from `w` to now, and the lease count, db size and RSS.
    async fn close(&mut self, s: &mut Scenario, w: &Window) {
        let dt = w.at.elapsed().as_secs_f64().max(0.001);
        let now = self.members().await;
        let delta = |f: fn(&Member) -> f64| -> Vec<f64> {
            w.members
                .iter()
                .zip(&now)
                .filter(|(a, b)| a.up && b.up)
                .map(|(a, b)| (f(b) - f(a)).max(0.0) / dt)
                .collect()
        };
        let max = |v: Vec<f64>| v.into_iter().fold(0.0, f64::max);
        s.secs = dt;
        s.watch_writes = (self.writes.total() - w.writes) as f64 / dt;
        s.etcd_writes = max(delta(|m| m.puts + m.deletes));
        s.txns = max(delta(|m| m.txns));
        s.keepalives = delta(|m| m.renewed).into_iter().sum();
        s.db_mb = now.iter().map(|m| m.db_bytes).fold(0.0, f64::max) / 1e6;
        s.db_in_use_mb = now.iter().map(|m| m.db_in_use).fold(0.0, f64::max) / 1e6;
        s.keys = now.iter().map(|m| m.keys).fold(0.0, f64::max);
        s.leases = match self.client.leases().await {
            Ok(r) => r.leases().len(),
            Err(_) => 0,
        };
        s.rss = self
            .doors
            .iter()
            .map(|d| observe::rss_mb(d.watcher_pid()))
            .collect();
        let failed: Vec<&str> = self
            .hosts
            .iter()
            .filter(|h| h.failed())
            .map(|h| h.node.as_str())
            .collect();
        if !failed.is_empty() {
            s.notes.push(format!(
                "registrars that ended by themselves: {}",
                failed.join(", ")
            ));
        }
    }

    /// Waits (up to `limit`) until etcd holds what the running hosts register and each
    /// door runs what etcd holds; counts what differs at the end as changes lost.
    async fn agree(&mut self, s: &mut Scenario, limit: Duration) {
        let start = Instant::now();
        let want = host::expected(&self.hosts);
        let prefix = self.etcd.prefix.clone();
        let mut settled = None;
        let mut agreed: Vec<Option<Duration>> = vec![None; self.doors.len()];
        let mut in_etcd = BTreeSet::new();
        let mut last: Vec<BTreeSet<Server>> = vec![BTreeSet::new(); self.doors.len()];
        while start.elapsed() < limit {
            if let Some((found, _)) = observe::etcd_servers(&mut self.client, &prefix).await {
                in_etcd = found;
            }
            if settled.is_none() && in_etcd == want {
                settled = Some(start.elapsed());
            }
            // Compared with etcd even before etcd settles, so that what is lost
            // between etcd and a door is counted apart from what etcd lacks.
            for (i, d) in self.doors.iter().enumerate() {
                if agreed[i].is_some() {
                    continue;
                }
                if let Some(running) = d.servers(None).await {
                    if settled.is_some() && running == in_etcd {
                        agreed[i] = Some(start.elapsed());
                    }
                    last[i] = running;
                }
            }
            if settled.is_some() && agreed.iter().all(Option::is_some) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let mut lost = want.symmetric_difference(&in_etcd).count();
        for (i, a) in agreed.iter().enumerate() {
            if a.is_none() {
                lost += in_etcd.symmetric_difference(&last[i]).count();
            }
        }
        if settled.is_none() {
            s.notes.push(format!(
                "etcd did not settle within {limit:?}: {} expected instances missing, {} extra",
                want.difference(&in_etcd).count(),
                in_etcd.difference(&want).count()
            ));
        }
        s.etcd_settled = settled;
        s.agreed = agreed;
        s.lost = lost;
    }

    /// Replaces `churn_per_min` % of the instances per minute for `secs`; see `churn`.
    async fn churn(&mut self, s: &mut Scenario, secs: u64) {
        let socks: Vec<std::path::PathBuf> =
            self.doors.iter().map(|d| d.admin_sock.clone()).collect();
        let names: Vec<String> = self.doors.iter().map(|d| d.name.clone()).collect();
        let eyes = Eyes {
            socks,
            names,
            writes: self.writes.clone(),
            epoch: self.epoch,
        };
        let samples = churn(&mut self.hosts, &eyes, &self.args, s, secs).await;
        self.samples.extend(samples);
    }
}

/// What a churn follows its changes with: each door's admin socket and name, the
/// bench's watch, and the clock of the picture.
struct Eyes {
    socks: Vec<std::path::PathBuf>,
    names: Vec<String>,
    writes: Arc<Writes>,
    epoch: Instant,
}

/// Replaces `churn_per_min` % of the instances per minute for `secs`, following up to 4
/// changes at once to each door; the latencies go into `s`, and are returned as
/// (seconds since `epoch`, door, ms) for the picture.
async fn churn(
    hosts: &mut [Host],
    eyes: &Eyes,
    args: &Args,
    s: &mut Scenario,
    secs: u64,
) -> Vec<(f64, usize, f64)> {
    let Eyes {
        socks,
        names,
        writes,
        epoch,
    } = eyes;
    let per_sec = args.instances() as f64 * args.churn_per_min / 100.0 / 60.0;
    let period = Duration::from_secs_f64(1.0 / per_sec.max(0.01));
    let end = Instant::now() + Duration::from_secs(secs);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let slots = Arc::new(tokio::sync::Semaphore::new(4));
    let socks: Arc<Vec<std::path::PathBuf>> = Arc::new(socks.clone());
    let mut follow = tokio::task::JoinSet::new();
    let bound = (secs as f64 * per_sec) as usize + 2;
    for _ in 0..bound {
        tick.tick().await;
        if Instant::now() >= end {
            break;
        }
        let running: Vec<usize> = (0..hosts.len()).filter(|i| hosts[*i].running()).collect();
        if running.is_empty() {
            break;
        }
        let h = running[fastrand::usize(..running.len())];
        let t0 = Instant::now();
        let at = epoch.elapsed().as_secs_f64();
        let permit = slots.clone().try_acquire_owned().ok();
        let timed = permit.is_some();
        let Some(server) = hosts[h].replace(|server| {
            if timed {
                writes.expect(&server.1);
            }
        }) else {
            continue;
        };
        s.scripted += 1;
        let Some(permit) = permit else {
            s.untimed += 1;
            continue;
        };
        let socks = socks.clone();
        let writes = writes.clone();
        follow.spawn(async move {
            let _permit = permit;
            let routed = follow_change(&socks, &server, t0).await;
            let in_etcd = writes
                .arrived(&server.1)
                .map(|t| t.saturating_duration_since(t0));
            (at, routed, in_etcd)
        });
    }
    let mut latency = vec![Vec::new(); socks.len()];
    let mut samples = Vec::new();
    while let Some(r) = follow.join_next().await {
        let Ok((at, per_door, in_etcd)) = r else {
            continue;
        };
        s.to_etcd.extend(in_etcd);
        for (i, d) in per_door.into_iter().enumerate() {
            match d {
                Some(d) => {
                    latency[i].push(d);
                    samples.push((at, i, ms(d)));
                }
                None => s
                    .notes
                    .push(format!("{} did not route a change within 30 s", names[i])),
            }
        }
    }
    s.latency = latency;
    samples
}

/// Polls each door's backend every 5 ms (30 s at most) until `server` is ready there.
async fn follow_change(
    socks: &[std::path::PathBuf],
    server: &Server,
    t0: Instant,
) -> Vec<Option<Duration>> {
    let mut out: Vec<Option<Duration>> = vec![None; socks.len()];
    let limit = Duration::from_secs(30);
    while t0.elapsed() < limit && out.iter().any(Option::is_none) {
        for (i, sock) in socks.iter().enumerate() {
            if out[i].is_some() {
                continue;
            }
            if let Some(running) = door::servers_at(sock, Some(&server.0)).await {
                if running.contains(server) {
                    out[i] = Some(t0.elapsed());
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    out
}

fn new_scenario(w: &mut World, name: &str) -> Scenario {
    eprintln!("[{:7.1} s] {name}", w.now_s());
    w.marks.push((w.now_s(), name.to_string()));
    Scenario {
        name: name.to_string(),
        ..Default::default()
    }
}

async fn start_from_empty(w: &mut World) -> Scenario {
    let mut s = new_scenario(w, "start from empty");
    let win = w.window().await;
    let etcd = w.etcd.clone();
    let ttl = w.args.ttl;
    for h in &mut w.hosts {
        h.start(&etcd, ttl);
    }
    let limit = Duration::from_secs(if w.args.quick { 120 } else { 900 });
    w.agree(&mut s, limit).await;
    w.close(&mut s, &win).await;
    let reloads: Vec<String> = {
        let mut v = Vec::new();
        for d in &w.doors {
            v.push(format!("{} {}", d.name, d.haproxy.reloads().await));
        }
        v
    };
    s.notes
        .push(format!("HAProxy reloads so far: {}", reloads.join(", ")));
    s
}

async fn at_rest(w: &mut World) -> Scenario {
    let mut s = new_scenario(w, "at rest");
    let win = w.window().await;
    tokio::time::sleep(Duration::from_secs(w.args.rest_secs)).await;
    w.close(&mut s, &win).await;
    s.agreed = vec![Some(Duration::ZERO); w.doors.len()];
    s.etcd_settled = Some(Duration::ZERO);
    s
}

async fn steady_churn(w: &mut World) -> Scenario {
    let name = format!("churn {} %/min", w.args.churn_per_min);
    let mut s = new_scenario(w, &name);
    let win = w.window().await;
    let secs = w.args.churn_secs;
    w.churn(&mut s, secs).await;
    w.close(&mut s, &win).await;
    w.agree(&mut s, Duration::from_secs(120)).await;
    s
}

/// Loses `which` hosts at once, then waits for etcd and both doors; samples each
/// door's `portolan_watcher_removals_held` meanwhile (the guard's decision).
async fn lose(w: &mut World, name: &str, which: std::ops::Range<usize>) -> Scenario {
    let mut s = new_scenario(w, name);
    let win = w.window().await;
    let held_at: Vec<u16> = w.doors.iter().map(|d| d.metrics_port).collect();
    let sampling = CancellationToken::new();
    let sampler = {
        let stop = sampling.clone();
        tokio::spawn(async move {
            let mut max = vec![0.0f64; held_at.len()];
            for _ in 0..2400 {
                for (i, port) in held_at.iter().enumerate() {
                    if let Some(text) =
                        observe::http10_get(&format!("127.0.0.1:{port}"), "/metrics").await
                    {
                        if let Some(v) = observe::sample(&text, "portolan_watcher_removals_held") {
                            max[i] = max[i].max(v);
                        }
                    }
                }
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                }
            }
            max
        })
    };
    let held_before: Vec<usize> = w
        .doors
        .iter()
        .map(|d| d.log_text().matches("holding back the removal").count())
        .collect();
    futures_util::future::join_all(w.hosts[which.clone()].iter_mut().map(Host::lose)).await;
    let lost_instances = which.len() * w.args.per_host;
    let limit = w.args.ttl * 3 + Duration::from_secs(90);
    w.agree(&mut s, limit).await;
    sampling.cancel();
    let max_held = sampler.await.unwrap_or_default();
    w.close(&mut s, &win).await;
    for (i, d) in w.doors.iter().enumerate() {
        let said = d.log_text().matches("holding back the removal").count() - held_before[i];
        let decision = if max_held.get(i).copied().unwrap_or(0.0) > 0.0 || said > 0 {
            format!(
                "held (up to {} instances held; \"holding back the removal\" logged {said}×), then released",
                max_held.get(i).copied().unwrap_or(0.0)
            )
        } else {
            "released at once (nothing held)".to_string()
        };
        s.notes.push(format!(
            "guard of {} on losing {} hosts = {lost_instances} instances ({:.1} %): {decision}",
            d.name,
            which.len(),
            100.0 * lost_instances as f64 / w.args.instances() as f64
        ));
    }
    s
}

async fn back(w: &mut World, name: &str, which: std::ops::Range<usize>) -> Scenario {
    let mut s = new_scenario(w, name);
    let win = w.window().await;
    let etcd = w.etcd.clone();
    let ttl = w.args.ttl;
    for h in &mut w.hosts[which] {
        h.start(&etcd, ttl);
    }
    w.agree(&mut s, Duration::from_secs(180)).await;
    w.close(&mut s, &win).await;
    s
}

async fn member_restart(w: &mut World) -> Scenario {
    let mut s = new_scenario(w, "etcd leader restarted under churn");
    let win = w.window().await;
    let secs = w.args.churn_secs.max(30);
    let leader = w.cluster.leader().await.unwrap_or(0);
    let name = w.cluster.members[leader].name.clone();
    let eyes = Eyes {
        socks: w.doors.iter().map(|d| d.admin_sock.clone()).collect(),
        names: w.doors.iter().map(|d| d.name.clone()).collect(),
        writes: w.writes.clone(),
        epoch: w.epoch,
    };
    let World {
        cluster,
        hosts,
        args,
        ..
    } = &mut *w;
    // Churn and the restart at once: the leader killed after a quarter of the window,
    // down for 5 s, then started again on its data.
    let restart = async {
        tokio::time::sleep(Duration::from_secs(secs / 4)).await;
        let t = Instant::now();
        let elected = cluster.restart(leader, Duration::from_secs(5)).await;
        (t.elapsed(), elected)
    };
    let (samples, (took, elected)) = tokio::join!(churn(hosts, &eyes, args, &mut s, secs), restart);
    w.samples.extend(samples);
    s.notes.push(format!(
        "leader {name} killed (SIGKILL) {} s into the churn, started again 5 s later; all three agreed on a leader {} after the kill",
        secs / 4,
        match elected {
            Some(e) => format!("{:.1} s after its restart ({:.1} s)", e.as_secs_f64(), took.as_secs_f64()),
            None => "never (60 s)".to_string(),
        }
    ));
    w.close(&mut s, &win).await;
    w.agree(&mut s, Duration::from_secs(120)).await;
    s
}

fn report(w: &World, scenarios: &[Scenario], when: &str, on: &str) -> String {
    let mut out = String::new();
    let a = &w.args;
    let _ = writeln!(out, "Portolan fleet, {when}, {on}");
    let _ = writeln!(
        out,
        "{} hosts × {} instances = {} instances over {} services; each host a registrar session of its own (lease, TTL {} s, keep-alive every TTL/3) in one process; 3-member etcd on 127.0.0.1; 2 watchers each with its own HAProxy (runtime API on; A: default guard, B: mass_removal share 0.06, hold_s 20). Change → routed: scripted `start` → server ready in `show servers state <backend>` (5 ms polls). A shared machine (6 engineers on 2 cores): figures are as measured there.\n",
        a.hosts,
        a.per_host,
        a.instances(),
        a.services(),
        a.ttl.as_secs()
    );
    let opt =
        |d: Option<Duration>| d.map_or("never".to_string(), |d| format!("{:.1}", d.as_secs_f64()));
    let lat = |v: &[Duration]| {
        if v.is_empty() {
            "-".to_string()
        } else {
            let (p50, p99, _) = pcts(v);
            format!("{p50:.0}/{p99:.0} (n={})", v.len())
        }
    };
    let _ = writeln!(
        out,
        "{:<36} {:>6} {:>9} {:>9} {:>7} {:>7} {:>18} {:>18} {:>18} {:>6} {:>6} {:>6} {:>4} {:>6} {:>7} {:>13}",
        "scenario", "secs", "writes/s", "etcd w/s", "txn/s", "ka/s", "→etcd p50/p99 ms", "A p50/p99 ms", "B p50/p99 ms", "etcd s", "A s", "B s", "lost", "leases", "db MB", "RSS A/B MB"
    );
    for s in scenarios {
        let lat_of = |i: usize| s.latency.get(i).map(|v| lat(v)).unwrap_or("-".into());
        let agreed = |i: usize| s.agreed.get(i).copied().flatten();
        let rss = s
            .rss
            .iter()
            .map(|(_, peak)| format!("{peak:.0}"))
            .collect::<Vec<_>>()
            .join("/");
        let _ = writeln!(
            out,
            "{:<36} {:>6.1} {:>9.1} {:>9.1} {:>7.1} {:>7.1} {:>18} {:>18} {:>18} {:>6} {:>6} {:>6} {:>4} {:>6} {:>7.1} {:>13}",
            s.name,
            s.secs,
            s.watch_writes,
            s.etcd_writes,
            s.txns,
            s.keepalives,
            lat(&s.to_etcd),
            lat_of(0),
            lat_of(1),
            opt(s.etcd_settled),
            opt(agreed(0)),
            opt(agreed(1)),
            s.lost,
            s.leases,
            s.db_mb,
            rss
        );
    }
    let _ = writeln!(
        out,
        "\nwrites/s: puts + deletes under the prefix as the bench's own watch saw them; etcd w/s: etcd_mvcc_put_total + etcd_mvcc_delete_total of the busiest member; ka/s: etcd_debugging_lease_renewed_total (all members); →etcd: scripted event → its put seen by the bench's watch (the registrar's and etcd's share of A and B); etcd s / A s / B s: seconds after the scenario's last step until etcd holds exactly what the running hosts register, and until each HAProxy runs exactly what etcd holds; lost: instances missing or extra after that (must be 0); RSS: the watcher's peak (VmHWM)."
    );
    let own = observe::rss_mb(std::process::id() as i32);
    let _ = writeln!(
        out,
        "- the simulator (all {} registrar sessions, the bench's watch and polls, one process): RSS {:.0} MB, peak {:.0} MB, {} file descriptors open at the end; keep-alives expected at {:.0}/s ({} leases renewed every TTL/3; hosts started together renew together, so a short window sees whole rounds)",
        a.hosts,
        own.0,
        own.1,
        observe::fds(std::process::id() as i32),
        a.hosts as f64 * 3.0 / a.ttl.as_secs_f64(),
        a.hosts
    );
    for s in scenarios {
        for n in &s.notes {
            let _ = writeln!(out, "- {}: {n}", s.name);
        }
        if s.untimed > 0 {
            let _ = writeln!(
                out,
                "- {}: {} replacements made, {} of them timed",
                s.name,
                s.scripted,
                s.scripted - s.untimed
            );
        }
    }
    out
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let Some(args) = Args::parse() else { return };
    let when = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let on = machine();
    eprintln!("fleet bench on {on}: {args:?}");
    let mut w = World::start(args.clone()).await;
    let mut scenarios = Vec::new();
    scenarios.push(start_from_empty(&mut w).await);
    scenarios.push(at_rest(&mut w).await);
    scenarios.push(steady_churn(&mut w).await);
    scenarios.push(lose(&mut w, "one host lost (lease expiry)", 0..1).await);
    scenarios.push(back(&mut w, "one host back", 0..1).await);
    let tenth = (args.hosts / 10).max(1);
    scenarios.push(lose(&mut w, "10 % of hosts lost at once", 1..1 + tenth).await);
    scenarios.push(back(&mut w, "10 % of hosts back", 1..1 + tenth).await);
    scenarios.push(member_restart(&mut w).await);
    let text = report(&w, &scenarios, &when, &on);
    println!("{text}");
    let own = observe::rss_mb(std::process::id() as i32);
    let json = json!({
        "date": when,
        "machine": on,
        "hosts": args.hosts,
        "instances_per_host": args.per_host,
        "services": args.services(),
        "ttl_s": args.ttl.as_secs(),
        "churn_per_min_percent": args.churn_per_min,
        "simulator_rss_mb": own.0,
        "simulator_peak_rss_mb": own.1,
        "simulator_fds": observe::fds(std::process::id() as i32),
        "scenarios": scenarios.iter().map(|s| json!({
            "name": s.name,
            "secs": s.secs,
            "writes_per_s_watch": s.watch_writes,
            "writes_per_s_etcd": s.etcd_writes,
            "txns_per_s": s.txns,
            "keepalives_per_s": s.keepalives,
            "scripted_changes": s.scripted,
            "untimed_changes": s.untimed,
            "change_to_etcd_ms": s.to_etcd.iter().copied().map(ms).collect::<Vec<_>>(),
            "change_to_routed_ms": s.latency.iter().map(|v| v.iter().copied().map(ms).collect::<Vec<_>>()).collect::<Vec<_>>(),
            "etcd_settled_s": s.etcd_settled.map(|d| d.as_secs_f64()),
            "doors_agreed_s": s.agreed.iter().map(|d| d.map(|d| d.as_secs_f64())).collect::<Vec<_>>(),
            "changes_lost": s.lost,
            "leases": s.leases,
            "db_mb": s.db_mb,
            "db_in_use_mb": s.db_in_use_mb,
            "keys": s.keys,
            "watcher_rss_mb": s.rss.iter().map(|(r, p)| json!({"rss": r, "peak": p})).collect::<Vec<_>>(),
            "notes": s.notes,
        })).collect::<Vec<_>>(),
    });
    w.stop.cancel();
    for h in &mut w.hosts {
        h.lose().await;
    }
    if args.docs && !args.quick {
        let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
        let _ = std::fs::write(docs.join("fleet.txt"), &text);
        let _ = std::fs::write(
            docs.join("fleet.json"),
            serde_json::to_string_pretty(&json).unwrap_or_default() + "\n",
        );
        let _ = std::fs::write(docs.join("fleet.svg"), svg::timeline(&w));
        println!("wrote docs/fleet.txt, docs/fleet.json and docs/fleet.svg");
    } else {
        let out = std::env::temp_dir().join("portolan-fleet");
        let _ = std::fs::create_dir_all(&out);
        let _ = std::fs::write(out.join("fleet.txt"), &text);
        let _ = std::fs::write(
            out.join("fleet.json"),
            serde_json::to_string_pretty(&json).unwrap_or_default() + "\n",
        );
        let _ = std::fs::write(out.join("fleet.svg"), svg::timeline(&w));
        println!(
            "(--quick or --no-docs: docs/ left as it was; wrote {}/fleet.{{txt,json,svg}})",
            out.display()
        );
    }
}
