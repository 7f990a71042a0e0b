//! The status page: a read-only view of the watcher, served on `watcher.listen` when
//! `watcher.ui` is on (`/` and `/ui`: HTML; `/api/status`: the JSON it is drawn from;
//! `/api/events`: the same page, live, as server-sent events).
//!
//! ```text
//!  loop (pass, deferred checks) ──Feed (watch)──▶ ui::run ──Page (watch)──▶ endpoint: /, /api/…
//!  HAProxy admin socket (`show servers state`) ──┘   │  builds the Board (pure) and its HTML
//!  etcd endpoints (`Status`) ────────────────────────┘
//! ```
//!
//! The loop publishes what it knows as it goes (`Feed`: the snapshot from etcd, the
//! one rendered, what was left out, the hold, the applies and checks, the files): the
//! page never reads etcd's keys. The task here adds what only a probe tells —
//! HAProxy's own view of every server (its state and health checks) and each etcd
//! endpoint's health — while someone watches (every `PROBE_WATCHED`; otherwise every
//! `PROBE_IDLE`), and rebuilds the page when anything it shows changed.
//!
//! Everything shown that came from etcd is escaped (`html::esc`); the page's own CSS
//! and script are files of this binary, served with a policy that lets nothing else run.

mod html;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::drift;
use super::haproxy::servers::Admin;
use super::haproxy::socket::exchange;
use super::metrics::Metrics;
use super::store::StoreSnapshot;
use crate::config::EtcdConfig;
use crate::schema::unix_now;

pub(crate) mod serve;

/// Applies and deferred-check verdicts kept for the page.
const HISTORY: usize = 20;
/// Instances drawn per service in the HTML (the JSON has them all).
const DRAWN_PER_SERVICE: usize = 200;
/// HAProxy and etcd are asked this often while a live page is open…
const PROBE_WATCHED: Duration = Duration::from_secs(2);
/// …and this often otherwise, so a first look is not older than this.
const PROBE_IDLE: Duration = Duration::from_secs(15);
/// etcd endpoints are asked at most this often (a connection and a `Status` each).
const ETCD_PROBE: Duration = Duration::from_secs(10);
const ADMIN_TIMEOUT: Duration = Duration::from_secs(2);

/// What the loop tells the page, as it goes.
#[derive(Debug, Clone, Default)]
pub(crate) struct Feed {
    pub(crate) revision: i64,
    /// etcd's snapshot as the source admitted it.
    pub(crate) desired: Arc<StoreSnapshot>,
    /// The snapshot rendered: with held removals and lingering backends.
    pub(crate) rendered: Arc<StoreSnapshot>,
    pub(crate) left_out: Arc<BTreeMap<String, String>>,
    /// Seconds since the epoch when the held removals are due.
    pub(crate) held_until: Option<u64>,
    pub(crate) applies: VecDeque<ApplyRow>,
    pub(crate) checks: VecDeque<CheckRow>,
    /// One per `[[template]]`, in order.
    pub(crate) files: Vec<FileFeed>,
    pub(crate) errors: Vec<String>,
}

impl Feed {
    pub(crate) fn applied(&mut self, row: ApplyRow) {
        push(&mut self.applies, row);
    }

    pub(crate) fn checked(&mut self, row: CheckRow) {
        push(&mut self.checks, row);
    }
}

fn push<T>(q: &mut VecDeque<T>, row: T) {
    q.push_front(row);
    q.truncate(HISTORY);
}

/// One `[[template]]`'s files, for the drift view.
#[derive(Debug, Clone, Default)]
pub(crate) struct FileFeed {
    pub(crate) dest: PathBuf,
    pub(crate) admin_socket: Option<PathBuf>,
    /// The last render from the snapshot.
    pub(crate) rendered: Option<Arc<str>>,
    /// What `dest` holds (as the watcher last wrote or read it).
    pub(crate) file: Option<Arc<str>>,
}

/// One apply that changed something.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct ApplyRow {
    pub(crate) at: u64,
    pub(crate) revision: i64,
    pub(crate) dest: String,
    /// runtime, reload (or none: written only, refused, failed).
    pub(crate) path: Option<&'static str>,
    /// The outcome as `applies_total` names it: runtime, reloaded, written, rejected, failed.
    pub(crate) result: &'static str,
    /// From the start of the pass to the end of this apply.
    pub(crate) took_ms: u64,
    pub(crate) error: Option<String>,
}

/// One deferred check's verdict.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct CheckRow {
    pub(crate) at: u64,
    pub(crate) dest: String,
    pub(crate) result: &'static str,
    pub(crate) error: Option<String>,
}

/// What the probes found.
#[derive(Debug, Clone, Default)]
struct Probes {
    /// Per file: `show servers state`'s answer, or why there is none.
    haproxy: Vec<Option<Result<String, String>>>,
    etcd: Vec<Endpoint>,
}

/// The page's data: `/api/status`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub(crate) struct Board {
    pub(crate) watcher: String,
    pub(crate) pid: u32,
    /// Seconds since the epoch when it was built.
    pub(crate) now: u64,
    pub(crate) revision: i64,
    pub(crate) applied_revision: i64,
    pub(crate) ready: bool,
    pub(crate) etcd_up: bool,
    pub(crate) services: Vec<Service>,
    pub(crate) left_out: Vec<LeftOut>,
    pub(crate) hold: Option<Hold>,
    pub(crate) applies: Vec<ApplyRow>,
    pub(crate) checks: Vec<CheckRow>,
    pub(crate) drift: Vec<Drift>,
    pub(crate) etcd: Vec<Endpoint>,
    pub(crate) event_to_live: Histogram,
    pub(crate) errors: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Service {
    pub(crate) name: String,
    pub(crate) instances: Vec<InstanceRow>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct InstanceRow {
    pub(crate) id: String,
    pub(crate) addr: String,
    pub(crate) node: String,
    pub(crate) container: String,
    pub(crate) tags: Vec<String>,
    pub(crate) weight: u32,
    pub(crate) draining: bool,
    /// Gone from etcd, kept in the config by the mass-removal guard.
    pub(crate) held: bool,
    /// HAProxy's view, when a file has an admin socket.
    pub(crate) haproxy: Option<Running>,
    /// Seconds since the epoch when this watcher first saw it.
    pub(crate) seen_since: u64,
}

/// One server as HAProxy runs it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Running {
    pub(crate) backend: String,
    /// ready, maint, drain; or "absent": the config has it, HAProxy does not run it.
    pub(crate) state: String,
    /// Health checks: true up, false down, None when not running.
    pub(crate) up: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct LeftOut {
    pub(crate) key: String,
    pub(crate) why: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Hold {
    pub(crate) count: usize,
    /// Seconds since the epoch when the hold ends.
    pub(crate) until: Option<u64>,
    /// service/id of every held instance.
    pub(crate) instances: Vec<String>,
    /// What ends it early.
    pub(crate) confirm: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Drift {
    pub(crate) dest: String,
    /// None: no admin socket, HAProxy's own view is not compared.
    pub(crate) haproxy_compared: bool,
    pub(crate) differences: Vec<String>,
    pub(crate) error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Endpoint {
    pub(crate) endpoint: String,
    /// None: not asked yet.
    pub(crate) healthy: Option<bool>,
    /// Its version, or why it did not answer.
    pub(crate) detail: String,
}

/// `event_to_live_seconds`, per bucket (not cumulative).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub(crate) struct Histogram {
    /// (upper bound in seconds, None for +Inf; observations in this bucket).
    pub(crate) buckets: Vec<(Option<f64>, u64)>,
    pub(crate) count: u64,
    pub(crate) sum: f64,
}

/// What `serve` hands out: the board as JSON, and as the page's HTML fragment.
#[derive(Debug, Default)]
pub(crate) struct Page {
    pub(crate) json: String,
    pub(crate) html: String,
    pub(crate) watcher: String,
}

/// Builds the board from the feed and the probes. Pure: `now` and `seen` (when each
/// Each file's drift between etcd, the file and HAProxy, and HAProxy's view (from the
/// first file with an answer from its admin socket).
fn drifts(feed: &Feed, probes: &Probes) -> (Option<drift::Backends>, Vec<Drift>) {
    let mut running: Option<drift::Backends> = None;
    let mut drifts = Vec::new();
    for (i, f) in feed.files.iter().enumerate() {
        let answer = probes.haproxy.get(i).cloned().flatten();
        let dest = f.dest.display().to_string();
        let (Some(rendered), Some(file)) = (&f.rendered, &f.file) else {
            drifts.push(Drift {
                dest,
                haproxy_compared: false,
                differences: Vec::new(),
                error: Some("nothing rendered yet".into()),
            });
            continue;
        };
        let (haproxy, mut error) = match &answer {
            Some(Ok(a)) => (Some(a.as_str()), None),
            Some(Err(e)) => (None, Some(e.clone())),
            None => (None, None),
        };
        match drift::compare(rendered, file, haproxy) {
            Ok((backends, differences)) => {
                if haproxy.is_some() && running.is_none() {
                    running = Some(backends);
                }
                drifts.push(Drift {
                    dest,
                    haproxy_compared: haproxy.is_some(),
                    differences,
                    error,
                });
            }
            Err(e) => {
                error = Some(e);
                drifts.push(Drift {
                    dest,
                    haproxy_compared: false,
                    differences: Vec::new(),
                    error,
                });
            }
        }
    }
    (running, drifts)
}

/// instance was first seen, updated here) are the caller's.
fn build(
    feed: &Feed,
    probes: &Probes,
    seen: &mut HashMap<(String, String), u64>,
    now: u64,
) -> Board {
    let (running, drifts) = drifts(feed, probes);
    let mut services = Vec::new();
    let mut still = std::collections::HashSet::new();
    let mut held_names = Vec::new();
    for (name, list) in &feed.rendered.services {
        let wanted = feed.desired.services.get(name);
        let instances = list
            .iter()
            .map(|i| {
                let key = (name.clone(), i.id.clone());
                let since = *seen.entry(key.clone()).or_insert(now);
                still.insert(key);
                let held = !wanted.is_some_and(|w| w.iter().any(|d| d.id == i.id));
                if held {
                    held_names.push(format!("{name}/{}", i.id));
                }
                InstanceRow {
                    id: i.id.clone(),
                    addr: i.addr.clone(),
                    node: i.node.clone(),
                    container: i.container.clone(),
                    tags: i.tags.clone(),
                    weight: i.weight,
                    draining: i.draining,
                    held,
                    haproxy: running.as_ref().map(|b| running_view(b, name, &i.id)),
                    seen_since: since,
                }
            })
            .collect();
        services.push(Service {
            name: name.clone(),
            instances,
        });
    }
    seen.retain(|k, _| still.contains(k));
    let hold = (!held_names.is_empty() || feed.held_until.is_some()).then(|| Hold {
        count: held_names.len(),
        until: feed.held_until,
        instances: held_names,
        confirm: format!(
            "SIGUSR1 to the watcher (kill -USR1 {}, or systemctl kill -s USR1 portolan-watcher) removes them now; a held instance that comes back in etcd is no longer a removal",
            std::process::id()
        ),
    });
    Board {
        watcher: String::new(),
        pid: std::process::id(),
        now,
        revision: feed.revision,
        applied_revision: 0,
        ready: false,
        etcd_up: false,
        services,
        left_out: feed
            .left_out
            .iter()
            .map(|(k, w)| LeftOut {
                key: k.clone(),
                why: w.clone(),
            })
            .collect(),
        hold,
        applies: feed.applies.iter().cloned().collect(),
        checks: feed.checks.iter().cloned().collect(),
        drift: drifts,
        etcd: probes.etcd.clone(),
        event_to_live: Histogram::default(),
        errors: feed.errors.clone(),
    }
}

/// Where `service`/`id` runs in HAProxy: a server named after the instance, in the
/// backend named after the service if several have one (`svc_<name>` in the shipped
/// templates).
fn running_view(backends: &drift::Backends, service: &str, id: &str) -> Running {
    let mut found: Option<(&String, &drift::Row)> = None;
    for (b, servers) in backends {
        if let Some(row) = servers.get(id) {
            if found.is_none() || b.ends_with(service) {
                found = Some((b, row));
            }
        }
    }
    match found {
        Some((b, row)) => match &row.haproxy {
            Some(v) => Running {
                backend: b.clone(),
                state: match v.admin {
                    Admin::Ready => "ready",
                    Admin::Maint => "maint",
                    Admin::Drain => "drain",
                }
                .into(),
                up: v.up,
            },
            None => Running {
                backend: b.clone(),
                state: "absent".into(),
                up: None,
            },
        },
        None => Running {
            backend: String::new(),
            state: "not in the config".into(),
            up: None,
        },
    }
}

/// Reads `event_to_live_seconds` from the watcher's own histogram.
fn histogram(metrics: &Metrics) -> Histogram {
    let mut h = Histogram::default();
    let mut below = 0;
    let (buckets, sum) = metrics.event_to_live_buckets();
    for (le, cumulative) in buckets {
        h.buckets.push((le, cumulative.saturating_sub(below)));
        below = cumulative;
    }
    h.count = below;
    h.sum = sum;
    h
}

/// Keeps `page` current until `shutdown`: rebuilt on every feed change and whenever a
/// probe finds something new.
pub(crate) async fn run(
    watcher: String,
    etcd: EtcdConfig,
    mut feed: watch::Receiver<Feed>,
    page: watch::Sender<Arc<Page>>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut seen = HashMap::new();
    let mut probes = Probes {
        etcd: etcd
            .endpoints
            .iter()
            .map(|e| Endpoint {
                endpoint: e.clone(),
                healthy: None,
                detail: "not asked yet".into(),
            })
            .collect(),
        ..Default::default()
    };
    let mut last: Option<Board> = None;
    let mut etcd_asked: Option<tokio::time::Instant> = None;
    let mut probed: Option<tokio::time::Instant> = None;
    loop {
        // Wakes every PROBE_WATCHED to see whether a probe is due: one receiver is the
        // endpoint's own, more are live pages, which get fresh probes that often.
        let fed = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = feed.changed() => if r.is_err() { return } else { true },
            _ = tokio::time::sleep(if probed.is_none() { Duration::ZERO } else { PROBE_WATCHED }) => false,
        };
        let every = if page.receiver_count() > 1 {
            PROBE_WATCHED
        } else {
            PROBE_IDLE
        };
        let probe = probed.is_none_or(|t| t.elapsed() >= every);
        if probe {
            let f = feed.borrow().clone();
            probes.haproxy = probe_haproxy(&f).await;
            if etcd_asked.is_none_or(|t| t.elapsed() >= ETCD_PROBE) {
                probes.etcd = probe_etcd(&etcd).await;
                etcd_asked = Some(tokio::time::Instant::now());
            }
            probed = Some(tokio::time::Instant::now());
        }
        if !fed && !probe {
            continue;
        }
        let f = feed.borrow_and_update().clone();
        let now = unix_now();
        let mut board = build(&f, &probes, &mut seen, now);
        board.watcher = watcher.clone();
        board.applied_revision = metrics.applied_revision.get();
        board.ready = metrics.is_ready();
        board.etcd_up = metrics.etcd_up.get() == 1;
        board.event_to_live = histogram(&metrics);
        let same = last
            .as_ref()
            .is_some_and(|l| Board { now, ..l.clone() } == board);
        if same {
            continue;
        }
        let json = serde_json::to_string_pretty(&board).unwrap_or_default();
        let html = html::board(&board, DRAWN_PER_SERVICE);
        page.send_replace(Arc::new(Page {
            json,
            html,
            watcher: watcher.clone(),
        }));
        last = Some(board);
    }
}

async fn probe_haproxy(f: &Feed) -> Vec<Option<Result<String, String>>> {
    let mut out = Vec::new();
    for file in &f.files {
        out.push(match &file.admin_socket {
            None => None,
            Some(sock) => Some(
                exchange(sock, "show servers state", ADMIN_TIMEOUT)
                    .await
                    .map_err(|e| {
                        format!(
                            "HAProxy's admin socket {} did not answer: {e}",
                            sock.display()
                        )
                    }),
            ),
        });
    }
    out
}

async fn probe_etcd(cfg: &EtcdConfig) -> Vec<Endpoint> {
    crate::etcd::advisory::check(cfg)
        .await
        .into_iter()
        .map(|e| Endpoint {
            healthy: Some(e.result.is_ok()),
            detail: e.describe(),
            endpoint: e.endpoint,
        })
        .collect()
}

#[cfg(test)]
mod tests;
