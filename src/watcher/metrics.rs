//! The watcher's numbers (`/metrics`, Prometheus text via prometheus-client) and its
//! health (`/healthz`), served with hyper on `watcher.listen`.
//!
//! `/healthz` answers 200 once the first render from etcd went through (the moment
//! systemd is told READY=1) and while the etcd session is up; 503 with the reason
//! otherwise. A watcher that cannot reach etcd still serves the last good config, so
//! probes should alert on it, not restart it.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

type Labels = [(&'static str, &'static str); 1];

pub struct Metrics {
    registry: Registry,
    /// Template renders (one per resource per pass).
    pub renders: Counter,
    /// Template compile or render errors.
    pub template_errors: Counter,
    /// Apply outcomes by `result` (unchanged, runtime, reloaded, written, rejected, failed).
    pub applies: Family<Labels, Counter>,
    /// Reloads by `result` (ok, failed).
    pub reloads: Family<Labels, Counter>,
    /// Changes applied through the runtime API by `result`: ok (no reload), fallback
    /// (refused, reloaded instead).
    pub runtime_updates: Family<Labels, Counter>,
    /// Rendered files refused by `check_cmd`.
    pub check_failures: Counter,
    /// Wall time of the last pass that changed something: render, check, swap, reload.
    pub last_apply_seconds: Gauge<f64, AtomicU64>,
    /// 1 while the etcd list/watch session is up.
    pub etcd_up: Gauge,
    /// etcd revision of the snapshot last rendered.
    pub revision: Gauge,
    /// Full re-lists of the prefix (start, reconnect, compaction, cluster replaced).
    pub resyncs: Counter,
    /// Keys under the prefix left out because they break the schema.
    pub invalid_keys: Gauge,
    pub services: Gauge,
    pub instances: Gauge,
    ready: AtomicBool,
    etcd_connected: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("portolan_watcher");
        let m = Metrics {
            registry: Registry::default(),
            renders: Counter::default(),
            template_errors: Counter::default(),
            applies: Family::default(),
            reloads: Family::default(),
            runtime_updates: Family::default(),
            check_failures: Counter::default(),
            last_apply_seconds: Gauge::default(),
            etcd_up: Gauge::default(),
            revision: Gauge::default(),
            resyncs: Counter::default(),
            invalid_keys: Gauge::default(),
            services: Gauge::default(),
            instances: Gauge::default(),
            ready: AtomicBool::new(false),
            etcd_connected: AtomicBool::new(false),
        };
        registry.register("renders", "Template renders", m.renders.clone());
        registry.register(
            "template_errors",
            "Template compile or render errors",
            m.template_errors.clone(),
        );
        registry.register("applies", "Apply outcomes by result", m.applies.clone());
        registry.register("reloads", "HAProxy reloads by result", m.reloads.clone());
        registry.register(
            "runtime_updates",
            "Changes applied through the runtime API without a reload (ok), or refused and reloaded instead (fallback)",
            m.runtime_updates.clone(),
        );
        registry.register(
            "check_failures",
            "Rendered files refused by check_cmd",
            m.check_failures.clone(),
        );
        registry.register(
            "last_apply_duration_seconds",
            "Wall time of the last pass that changed something",
            m.last_apply_seconds.clone(),
        );
        registry.register("etcd_up", "1 while the etcd watch is up", m.etcd_up.clone());
        registry.register(
            "revision",
            "etcd revision of the snapshot last rendered",
            m.revision.clone(),
        );
        registry.register("resyncs", "Full re-lists of the prefix", m.resyncs.clone());
        registry.register(
            "invalid_keys",
            "Keys left out because they break the schema",
            m.invalid_keys.clone(),
        );
        registry.register("services", "Services with an instance", m.services.clone());
        registry.register("instances", "Valid instances", m.instances.clone());
        Metrics { registry, ..m }
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    pub fn set_etcd_connected(&self, up: bool) {
        self.etcd_connected.store(up, Ordering::Relaxed);
        self.etcd_up.set(i64::from(up));
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    fn health(&self) -> (StatusCode, &'static str) {
        match (
            self.ready.load(Ordering::Relaxed),
            self.etcd_connected.load(Ordering::Relaxed),
        ) {
            (true, true) => (StatusCode::OK, "ok\n"),
            (false, _) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: no render from etcd yet\n",
            ),
            (true, false) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "etcd unreachable: serving the last good config\n",
            ),
        }
    }
}

pub fn result(r: &'static str) -> Labels {
    [("result", r)]
}

/// Serves `listener` until `shutdown`. Connections are tracked by `tracker`.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!("serving /metrics and /healthz on http://{addr}");
    }
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("metrics listener: accept failed: {e}");
                    continue;
                }
            },
        };
        let metrics = metrics.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let metrics = metrics.clone();
                async move { Ok::<_, Infallible>(respond(&metrics, &req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = shutdown.cancelled() => {}
            }
        });
    }
}

fn respond(metrics: &Metrics, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let (status, ctype, body) = match req.uri().path() {
        "/metrics" => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode(),
        ),
        "/healthz" => {
            let (s, b) = metrics.health();
            (s, "text/plain", b.to_string())
        }
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics or /healthz\n".to_string(),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(ctype) {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn health_follows_readiness_and_etcd() {
        let m = Metrics::new();
        assert_eq!(m.health().0, StatusCode::SERVICE_UNAVAILABLE);
        m.set_ready();
        m.set_etcd_connected(true);
        assert_eq!(m.health().0, StatusCode::OK);
        m.set_etcd_connected(false);
        assert_eq!(m.health().0, StatusCode::SERVICE_UNAVAILABLE);
    }
}
