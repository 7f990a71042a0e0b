//! What the bench reads back: etcd's own `/metrics`, the fleet's keys in etcd, a watch
//! that counts every write the simulated hosts make (the simulator's side of the count),
//! and the RSS of a process.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::host::Server;

/// GET over HTTP/1.0 (no chunked answers to undo); the body.
pub async fn http10_get(addr: &str, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf).to_string();
        text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .ok()
        .flatten()
}

/// The value of exactly `series` (name and labels as exposed).
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// The sum of every series of metric `name`, whatever its labels.
pub fn sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            if !(rest.starts_with(' ') || rest.starts_with('{')) {
                return None;
            }
            rest.rsplit(' ').next()?.trim().parse::<f64>().ok()
        })
        .sum()
}

/// One member's counters and gauges, as its `/metrics` says.
#[derive(Debug, Clone, Copy, Default)]
pub struct Member {
    pub up: bool,
    pub puts: f64,
    pub deletes: f64,
    pub txns: f64,
    pub renewed: f64,
    pub db_bytes: f64,
    pub db_in_use: f64,
    pub keys: f64,
}

impl Member {
    pub fn of(text: &str) -> Member {
        Member {
            up: !text.is_empty(),
            puts: sum(text, "etcd_mvcc_put_total"),
            deletes: sum(text, "etcd_mvcc_delete_total"),
            txns: sum(text, "etcd_mvcc_txn_total"),
            renewed: sum(text, "etcd_debugging_lease_renewed_total"),
            db_bytes: sum(text, "etcd_mvcc_db_total_size_in_bytes"),
            db_in_use: sum(text, "etcd_mvcc_db_total_size_in_use_in_bytes"),
            keys: sum(text, "etcd_debugging_mvcc_keys_total"),
        }
    }
}

/// Every write under the fleet's prefix, counted as the watch delivers it, and a
/// per-second timeline for the picture.
#[derive(Default)]
pub struct Writes {
    pub puts: AtomicU64,
    pub deletes: AtomicU64,
    /// Writes per second since the bench started.
    pub timeline: Mutex<Vec<u64>>,
    /// Instances followed (`expect`) → when their first put arrived.
    followed: Mutex<HashMap<String, Option<Instant>>>,
}

impl Writes {
    /// Notes when a put of `instance` arrives (see `arrived`).
    pub fn expect(&self, instance: &str) {
        self.followed
            .lock()
            .unwrap()
            .insert(instance.to_string(), None);
    }

    /// When the first put of `instance` arrived, if it has; forgets it.
    pub fn arrived(&self, instance: &str) -> Option<Instant> {
        self.followed.lock().unwrap().remove(instance).flatten()
    }

    pub fn total(&self) -> u64 {
        self.puts.load(Ordering::Relaxed) + self.deletes.load(Ordering::Relaxed)
    }

    /// Watches `prefix` until `stop`, from now; restarts the watch if it ends (a
    /// member restart), from the revision after the last one seen.
    pub fn spawn(
        self: &Arc<Self>,
        endpoints: Vec<String>,
        prefix: String,
        epoch: Instant,
        stop: tokio_util::sync::CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut from = 0i64;
            while !stop.is_cancelled() {
                let Ok(mut c) = etcd_client::Client::connect(&endpoints, None).await else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                let mut opts = etcd_client::WatchOptions::new().with_prefix();
                if from > 0 {
                    opts = opts.with_start_revision(from);
                }
                let Ok(mut stream) = c.watch(prefix.as_str(), Some(opts)).await else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                loop {
                    let msg = tokio::select! {
                        _ = stop.cancelled() => return,
                        m = stream.message() => m,
                    };
                    let Ok(Some(resp)) = msg else { break };
                    let now = Instant::now();
                    let second = epoch.elapsed().as_secs() as usize;
                    let n = resp.events().len() as u64;
                    for ev in resp.events() {
                        match ev.event_type() {
                            etcd_client::EventType::Put => {
                                if let Some(instance) = ev
                                    .kv()
                                    .and_then(|kv| kv.key_str().ok())
                                    .and_then(|k| k.rsplit('/').next())
                                {
                                    if let Some(at @ None) =
                                        me.followed.lock().unwrap().get_mut(instance)
                                    {
                                        *at = Some(now);
                                    }
                                }
                                me.puts.fetch_add(1, Ordering::Relaxed)
                            }
                            etcd_client::EventType::Delete => {
                                me.deletes.fetch_add(1, Ordering::Relaxed)
                            }
                        };
                        if let Some(kv) = ev.kv() {
                            from = from.max(kv.mod_revision() + 1);
                        }
                    }
                    let mut t = me.timeline.lock().unwrap();
                    if t.len() <= second {
                        t.resize(second + 1, 0);
                    }
                    t[second] += n;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    }
}

/// The fleet's instances in etcd, as (backend, server, addr), and the node records.
pub async fn etcd_servers(
    client: &mut etcd_client::Client,
    prefix: &str,
) -> Option<(BTreeSet<Server>, usize)> {
    let listing = portolan::etcd::list_prefix(client, &format!("{prefix}/nodes/"))
        .await
        .ok()?;
    let mut out = BTreeSet::new();
    let mut nodes = 0;
    for kv in &listing.kvs {
        let Ok(key) = kv.key_str() else { continue };
        match portolan::schema::parse_key(prefix, key) {
            Ok(portolan::schema::Key::Service {
                service, instance, ..
            }) => {
                let addr = serde_json::from_slice::<serde_json::Value>(kv.value())
                    .ok()
                    .and_then(|v| v.get("addr")?.as_str().map(str::to_string))
                    .unwrap_or_default();
                out.insert((format!("svc_{service}"), instance, addr));
            }
            _ => nodes += 1,
        }
    }
    Some((out, nodes))
}

/// (VmRSS, VmHWM) of `pid` in MB.
pub fn rss_mb(pid: i32) -> (f64, f64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The number of file descriptors `pid` has open.
pub fn fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}
