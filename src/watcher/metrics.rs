//! The watcher's numbers (`/metrics`, Prometheus text via prometheus-client) and its
//! health (`/healthz`), served by `endpoint` on `watcher.listen`.
//!
//! `/healthz` answers 200 once the first render from etcd went through (the moment
//! systemd is told READY=1) and while the etcd session is up; 503 with the reason
//! otherwise. A watcher that cannot reach etcd still serves the last good config, so
//! probes should alert on it, not restart it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use hyper::StatusCode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Metric, Registry};

use super::report::Counts;
use crate::endpoint::Endpoint;
use crate::hook::{HookMetrics, HookStats};

type Labels = [(&'static str, &'static str); 1];

pub(crate) struct Metrics {
    registry: Registry,
    /// Template renders (one per resource per pass).
    pub(crate) renders: Counter,
    /// Template compile or render errors.
    pub(crate) template_errors: Counter,
    /// Apply outcomes by `result` (unchanged, runtime, reloaded, written, rejected, failed).
    pub(crate) applies: Family<Labels, Counter>,
    /// Reloads by `result` (ok, failed).
    pub(crate) reloads: Family<Labels, Counter>,
    /// Changes applied through the runtime API by `result`: ok (no reload), fallback
    /// (refused, reloaded instead).
    pub(crate) runtime_updates: Family<Labels, Counter>,
    /// Rendered files refused by `check_cmd`.
    pub(crate) check_failures: Counter,
    /// Checks of files applied through the runtime API first, by `result` (ok,
    /// failed: HAProxy and a checked file disagreed, and the watcher repaired it).
    pub(crate) deferred_checks: Family<Labels, Counter>,
    /// Wall time of the last pass that changed something: render, check, swap, reload.
    pub(crate) last_apply_seconds: Gauge<f64, AtomicU64>,
    /// 1 while the etcd list/watch session is up.
    pub(crate) etcd_up: Gauge,
    /// etcd revision of the snapshot last rendered.
    pub(crate) revision: Gauge,
    /// Full re-lists of the prefix (start, reconnect, compaction, cluster replaced).
    pub(crate) resyncs: Counter,
    /// Keys under the prefix left out: they break the schema, or the routing policy
    /// refuses (or cannot yet resolve) their address.
    pub(crate) invalid_keys: Gauge,
    pub(crate) services: Gauge,
    pub(crate) instances: Gauge,
    /// etcd revision HAProxy runs: advanced only by a pass in which every resource
    /// went live (or had nothing to do). A lagging watcher shows here.
    pub(crate) applied_revision: Gauge,
    /// Per resource and pass, by `status`: noop (bytes unchanged), dynamic (runtime
    /// API, no reload), full (file replaced and reloaded).
    pub(crate) updates: Family<Labels, Counter>,
    /// etcd event arrival → HAProxy running it (runtime API answered or reload confirmed).
    pub(crate) event_to_live: Histogram,
    /// Reloads, from the request to HAProxy's confirmation.
    pub(crate) reload_duration: Histogram,
    /// Instances kept in the config by the mass-removal guard.
    pub(crate) removals_held: Gauge,
    /// Services with no instance whose backend is kept for `empty_backend_grace_s`.
    pub(crate) empty_backends: Gauge,
    /// Instance keys refused by confinement (`confine::Reason`), by `reason`: counted
    /// when a key is refused, or refused for another rule.
    refused_keys: Family<Labels, Counter>,
    /// Hook events by `result` (delivered, dropped), copied from `hooks` at each scrape.
    hooks: HookMetrics,
    /// `portolan_acme_orders_total{result}`: the ACME issuer's orders (created,
    /// resumed, valid, failed).
    pub(crate) acme_orders: Family<Labels, Counter>,
    /// `portolan_etcd_rbac_bypassable`, set by `etcd::advisory::watch`.
    pub(crate) etcd_rbac_bypassable: Gauge,
    /// `portolan_cert_not_after_seconds{name}`: each served certificate's expiry.
    pub(crate) cert_not_after: Family<Vec<(&'static str, String)>, Gauge>,
    /// `portolan_cert_rejected_total{reason}`: certificates refused (`certs::Refusal`).
    pub(crate) cert_rejected: Family<Labels, Counter>,
    ready: AtomicBool,
    etcd_connected: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub(crate) fn new() -> Metrics {
        let mut root = Registry::with_prefix("portolan");
        let r = root.sub_registry_with_prefix("watcher");
        let m = Metrics {
            renders: reg(r, "renders", "Template renders", Counter::default()),
            template_errors: reg(r, "template_errors", "Template compile or render errors", Counter::default()),
            applies: reg(r, "applies", "Apply outcomes by result", Family::default()),
            reloads: reg(r, "reloads", "HAProxy reloads by result", Family::default()),
            runtime_updates: reg(r, "runtime_updates", "Changes applied through the runtime API without a reload (ok), or refused and reloaded instead (fallback)", Family::default()),
            check_failures: reg(r, "check_failures", "Rendered files refused by check_cmd", Counter::default()),
            deferred_checks: reg(r, "deferred_checks", "Checks of files applied through the runtime API before their check, by result (failed: HAProxy was put back onto the last checked file)", Family::default()),
            last_apply_seconds: reg(r, "last_apply_duration_seconds", "Wall time of the last pass that changed something", Gauge::default()),
            etcd_up: reg(r, "etcd_up", "1 while the etcd watch is up", Gauge::default()),
            revision: reg(r, "revision", "etcd revision of the snapshot last rendered", Gauge::default()),
            resyncs: reg(r, "resyncs", "Full re-lists of the prefix", Counter::default()),
            invalid_keys: reg(r, "invalid_keys", "Keys left out because they break the schema or the routing policy", Gauge::default()),
            services: reg(r, "services", "Services with an instance", Gauge::default()),
            instances: reg(r, "instances", "Valid instances", Gauge::default()),
            applied_revision: reg(r, "applied_revision", "etcd revision HAProxy runs (every resource live or unchanged); alert when it lags etcd", Gauge::default()),
            updates: reg(r, "updates", "Applies by status: noop (unchanged), dynamic (runtime API), full (reload)", Family::default()),
            event_to_live: reg(r, "event_to_live_seconds", "From an etcd event's arrival to HAProxy running it", Histogram::new(exponential_buckets(0.001, 2.0, 14))),
            reload_duration: reg(r, "reload_duration_seconds", "HAProxy reloads, from the request to the confirmation", Histogram::new(exponential_buckets(0.005, 2.0, 12))),
            removals_held: reg(r, "removals_held", "Instances kept in the config by the mass-removal guard", Gauge::default()),
            empty_backends: reg(r, "empty_backends", "Services with no instance whose backend is kept for empty_backend_grace_s", Gauge::default()),
            refused_keys: reg(r, "refused", "Instance keys refused by confinement, by reason", Family::default()),
            hooks: HookMetrics::default(),
            acme_orders: Family::default(),
            etcd_rbac_bypassable: Gauge::default(),
            cert_not_after: Family::default(),
            cert_rejected: Family::default(),
            ready: AtomicBool::new(false),
            etcd_connected: AtomicBool::new(false),
            registry: Registry::default(),
        };
        // Every reason at 0 from the start, so an alert on an increase sees the first.
        for reason in crate::watcher::confine::Reason::ALL {
            drop(m.refused_keys.get_or_create(&[("reason", reason.label())]));
        }
        m.hooks.register(r);
        root.register(
            "acme_orders",
            "ACME orders by result: created (a new order at the CA), resumed (one in progress, picked up), valid (certificate written), failed",
            m.acme_orders.clone(),
        );
        root.register_with_unit(
            "cert_not_after",
            "Expiry of each certificate this watcher serves, seconds since the epoch",
            prometheus_client::registry::Unit::Seconds,
            m.cert_not_after.clone(),
        );
        root.register(
            "cert_rejected",
            "Certificates refused, by reason (the last good one of the name is served)",
            m.cert_rejected.clone(),
        );
        crate::etcd::advisory::register(&mut root, &m.etcd_rbac_bypassable);
        Metrics {
            registry: root,
            ..m
        }
    }

    /// The counters of one report.
    pub(crate) fn count(&self, c: &Counts) {
        if let Some(a) = c.apply {
            self.applies.get_or_create(&result(a)).inc();
        }
        if let Some(d) = c.deferred {
            self.deferred_checks.get_or_create(&result(d)).inc();
        }
        if let Some(s) = c.update {
            self.updates.get_or_create(&status(s)).inc();
        }
        if let Some(r) = c.reload {
            self.reloads.get_or_create(&result(r)).inc();
        }
        if let Some(r) = c.runtime {
            self.runtime_updates.get_or_create(&result(r)).inc();
        }
        if c.check_failure {
            self.check_failures.inc();
        }
        if let Some(took) = c.reload_took {
            self.reload_duration.observe(took.as_secs_f64());
        }
    }

    /// `event_to_live_seconds` by bucket: (upper bound, None for +Inf; cumulative
    /// count), and the sum, read back from its own exposition (the crate has no other
    /// accessor).
    pub(crate) fn event_to_live_buckets(&self) -> (Vec<(Option<f64>, u64)>, f64) {
        let mut one = Registry::default();
        one.register("h", "", self.event_to_live.clone());
        let text = crate::endpoint::encode(&one);
        let sum = text
            .lines()
            .find_map(|l| l.strip_prefix("h_sum ")?.trim().parse().ok())
            .unwrap_or(0.0);
        let buckets = text
            .lines()
            .filter_map(|l| {
                let rest = l.strip_prefix("h_bucket{le=\"")?;
                let (le, count) = rest.split_once("\"} ")?;
                let count = count.split_whitespace().next()?.parse().ok()?;
                Some((le.parse::<f64>().ok().filter(|v| v.is_finite()), count))
            })
            .collect();
        (buckets, sum)
    }

    pub(crate) fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    pub(crate) fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    pub(crate) fn refused(&self, reason: crate::watcher::confine::Reason) {
        self.refused_keys
            .get_or_create(&[("reason", reason.label())])
            .inc();
    }

    pub(crate) fn set_etcd_connected(&self, up: bool) {
        self.etcd_connected.store(up, Ordering::Relaxed);
        self.etcd_up.set(i64::from(up));
    }

    /// The hooks whose counters `/metrics` exports.
    pub(crate) fn export_hooks(&self, stats: Arc<HookStats>) {
        self.hooks.export(stats);
    }

    pub(crate) fn encode(&self) -> String {
        self.hooks.encode(&self.registry)
    }

    fn health(&self) -> (StatusCode, &'static str) {
        crate::endpoint::health(
            self.ready.load(Ordering::Relaxed),
            self.etcd_connected.load(Ordering::Relaxed),
            "not ready: no render from etcd yet\n",
            "etcd unreachable: serving the last good config\n",
        )
    }
}

/// Registers `metric` as `name` and hands it back, to keep in a field.
fn reg<M: Metric + Clone>(registry: &mut Registry, name: &str, help: &str, metric: M) -> M {
    registry.register(name, help, metric.clone());
    metric
}

pub(crate) fn result(r: &'static str) -> Labels {
    [("result", r)]
}

pub(crate) fn status(s: &'static str) -> Labels {
    [("status", s)]
}

impl Endpoint for Metrics {
    fn encode(&self) -> String {
        Metrics::encode(self)
    }

    fn health(&self) -> (StatusCode, &'static str) {
        Metrics::health(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::net::TcpListener;
    use tokio_util::sync::CancellationToken;
    use tokio_util::task::TaskTracker;

    #[test]
    fn encodes_counters_with_results() {
        let m = Metrics::new();
        m.reloads.get_or_create(&result("ok")).inc();
        m.check_failures.inc();
        m.last_apply_seconds.set(0.25);
        let text = m.encode();
        assert!(
            text.contains("portolan_watcher_reloads_total{result=\"ok\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("portolan_watcher_check_failures_total 1"),
            "{text}"
        );
        assert!(
            text.contains("portolan_watcher_last_apply_duration_seconds 0.25"),
            "{text}"
        );
    }

    #[test]
    fn exports_updates_histograms_and_hook_counters() {
        let m = Metrics::new();
        m.updates.get_or_create(&status("dynamic")).inc();
        m.event_to_live.observe(0.003);
        m.applied_revision.set(42);
        let stats = Arc::new(HookStats::default());
        stats.delivered.store(3, Ordering::Relaxed);
        m.export_hooks(stats.clone());
        let text = m.encode();
        for want in [
            "portolan_watcher_updates_total{status=\"dynamic\"} 1",
            "portolan_watcher_event_to_live_seconds_count 1",
            "portolan_watcher_event_to_live_seconds_bucket{le=\"0.004\"} 1",
            "portolan_watcher_reload_duration_seconds_count 0",
            "portolan_watcher_applied_revision 42",
            "portolan_watcher_hook_events_total{result=\"delivered\"} 3",
            "portolan_watcher_hook_events_total{result=\"dropped\"} 0",
        ] {
            assert!(text.contains(want), "{want} missing:\n{text}");
        }
        // Counters follow the hooks at every scrape.
        stats.dropped.store(2, Ordering::Relaxed);
        assert!(m
            .encode()
            .contains("portolan_watcher_hook_events_total{result=\"dropped\"} 2"));
    }

    #[test]
    fn the_status_page_reads_the_histogram_it_exports() {
        let m = Metrics::new();
        m.event_to_live.observe(0.0015);
        m.event_to_live.observe(0.0015);
        m.event_to_live.observe(100.0);
        let (b, sum) = m.event_to_live_buckets();
        assert_eq!(sum, 100.003);
        assert_eq!(b.len(), 15, "{b:?}");
        assert_eq!(b[0], (Some(0.001), 0));
        assert_eq!(b[1], (Some(0.002), 2));
        assert_eq!(b[14], (None, 3));
    }

    #[test]
    fn health_follows_readiness_and_etcd() {
        let m = Metrics::new();
        assert_eq!(m.health().0, StatusCode::SERVICE_UNAVAILABLE);
        m.set_ready();
        m.set_etcd_connected(true);
        assert_eq!(m.health().0, StatusCode::OK);
        m.set_etcd_connected(false);
        assert_eq!(m.health().0, StatusCode::SERVICE_UNAVAILABLE);
    }

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    async fn start(max_connections: usize) -> (std::net::SocketAddr, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        tokio::spawn(crate::endpoint::serve_limited(
            listener,
            Arc::new(Metrics::new()),
            TaskTracker::new(),
            shutdown.clone(),
            max_connections,
        ));
        (addr, shutdown)
    }

    async fn get_metrics(addr: std::net::SocketAddr) -> String {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), c.read_to_string(&mut out)).await;
        out
    }

    /// True when the server closed `c` (EOF or reset) within `within`.
    async fn closed(c: &mut TcpStream, within: Duration) -> bool {
        let mut buf = [0u8; 64];
        matches!(
            tokio::time::timeout(within, c.read(&mut buf)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    #[tokio::test]
    async fn idle_clients_are_dropped_and_do_not_block_scrapes() {
        let (addr, shutdown) = start(crate::endpoint::MAX_CONNECTIONS).await;
        let mut idle = Vec::new();
        for _ in 0..100 {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        let answer = get_metrics(addr).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
        assert!(
            answer.contains("portolan_watcher_renders_total"),
            "{answer:?}"
        );
        // Nothing sent: the header read timeout (10 s) closes every one of them.
        assert!(closed(&mut idle[0], Duration::from_secs(15)).await);
        for c in &mut idle[1..] {
            assert!(closed(c, Duration::from_secs(2)).await);
        }
        shutdown.cancel();
    }

    #[tokio::test]
    async fn a_connection_over_the_cap_is_closed_at_once() {
        let (addr, shutdown) = start(2).await;
        let _a = TcpStream::connect(addr).await.unwrap();
        let _b = TcpStream::connect(addr).await.unwrap();
        let mut over = TcpStream::connect(addr).await.unwrap();
        assert!(closed(&mut over, Duration::from_secs(2)).await);
        drop((_a, _b));
        // Slots come back once the connections end.
        let mut answer = String::new();
        for _ in 0..50 {
            answer = get_metrics(addr).await;
            if answer.starts_with("HTTP/1.1 200") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
        shutdown.cancel();
    }
}
