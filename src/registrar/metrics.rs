//! The registrar's numbers (`/metrics`) and health (`/healthz`), served by `endpoint`
//! on `registrar.listen` when it is set.
//!
//! `/healthz` answers 200 once the first reconcile went through and while etcd takes
//! writes; 503 with the reason otherwise.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use hyper::StatusCode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::endpoint::Endpoint;
use crate::hook::{HookMetrics, HookStats};

type Labels = [(&'static str, &'static str); 1];

pub(crate) struct Metrics {
    registry: Registry,
    /// From a Docker event (Docker's own timestamp) to the etcd write it caused.
    pub(crate) event_to_etcd: Histogram,
    /// Keys written, by `op` (put, delete).
    pub(crate) writes: Family<Labels, Counter>,
    /// Instances registered now.
    pub(crate) instances: Gauge,
    hooks: HookMetrics,
    /// `portolan_etcd_rbac_bypassable`, set by `etcd::advisory::watch`.
    pub(crate) etcd_rbac_bypassable: Gauge,
    ready: AtomicBool,
    etcd_ok: AtomicBool,
}

impl Metrics {
    pub(crate) fn new() -> Metrics {
        let mut root = Registry::with_prefix("portolan");
        let m = Metrics {
            registry: Registry::default(),
            // 1 ms .. ~16 s.
            event_to_etcd: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            writes: Family::default(),
            instances: Gauge::default(),
            hooks: HookMetrics::default(),
            etcd_rbac_bypassable: Gauge::default(),
            ready: AtomicBool::new(false),
            etcd_ok: AtomicBool::new(false),
        };
        crate::etcd::advisory::register(&mut root, &m.etcd_rbac_bypassable);
        let registry = root.sub_registry_with_prefix("registrar");
        registry.register(
            "event_to_etcd_seconds",
            "From a Docker event (Docker's timestamp) to the etcd write it caused",
            m.event_to_etcd.clone(),
        );
        registry.register("writes", "Keys written to etcd, by op", m.writes.clone());
        registry.register("instances", "Instances registered", m.instances.clone());
        m.hooks.register(registry);
        Metrics {
            registry: root,
            ..m
        }
    }

    pub(crate) fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    pub(crate) fn set_etcd_ok(&self, ok: bool) {
        self.etcd_ok.store(ok, Ordering::Relaxed);
    }

    /// The hooks whose counters `/metrics` exports.
    pub(crate) fn export_hooks(&self, stats: Arc<HookStats>) {
        self.hooks.export(stats);
    }
}

impl Endpoint for Metrics {
    fn encode(&self) -> String {
        self.hooks.encode(&self.registry)
    }

    fn health(&self) -> (StatusCode, &'static str) {
        crate::endpoint::health(
            self.ready.load(Ordering::Relaxed),
            self.etcd_ok.load(Ordering::Relaxed),
            "not ready: no reconcile with etcd yet\n",
            "etcd refuses writes: registrations may be stale\n",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exports_the_event_to_etcd_histogram_and_health() {
        let m = Metrics::new();
        m.event_to_etcd.observe(0.004);
        m.writes.get_or_create(&[("op", "put")]).inc();
        let text = m.encode();
        assert!(
            text.contains("portolan_registrar_event_to_etcd_seconds_count 1"),
            "{text}"
        );
        assert!(
            text.contains(r#"portolan_registrar_writes_total{op="put"} 1"#),
            "{text}"
        );
        assert_eq!(m.health().0, StatusCode::SERVICE_UNAVAILABLE);
        m.set_ready();
        m.set_etcd_ok(true);
        assert_eq!(m.health(), (StatusCode::OK, "ok\n"));
    }
}
