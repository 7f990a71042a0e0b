//! The HTTP endpoint both daemons serve: `/metrics` (Prometheus text) and `/healthz`,
//! with hyper, bounded in connections and in how long a client may idle. A daemon may
//! answer more paths (`Endpoint::route`: the watcher's status page).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What a daemon exports: its metrics, encoded, and its health.
pub(crate) trait Endpoint: Send + Sync + 'static {
    fn encode(&self) -> String;
    /// 200 and "ok", or 503 and why.
    fn health(&self) -> (StatusCode, &'static str);
    /// The answer for another path, if the daemon serves it (GET and HEAD only).
    fn route(&self, _path: &str) -> Option<Response<Body>> {
        None
    }
}

/// A response body: whole, or streamed (server-sent events).
pub(crate) type Body = BoxBody<Bytes, Infallible>;

/// `body` as a whole response body.
pub(crate) fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into()).boxed()
}

/// Prometheus text of `registry`.
pub(crate) fn encode(registry: &prometheus_client::registry::Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

/// Connections served at once; one over it is closed at once. Scrapers and probes
/// need a handful; the cap keeps a flood of clients from using up the fds.
pub(crate) const MAX_CONNECTIONS: usize = 128;
/// A client that sends no complete request head within this is disconnected, idle
/// keep-alive connections included.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed accept (EMFILE…), so it is not retried in a busy loop.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(200);

/// Serves `listener` until `shutdown`. Connections are tracked by `tracker`.
/// A daemon's `/healthz`: 200 once it is `ready` while etcd answers (`etcd`); 503 saying
/// which is missing otherwise.
pub(crate) fn health(
    ready: bool,
    etcd: bool,
    not_ready: &'static str,
    no_etcd: &'static str,
) -> (StatusCode, &'static str) {
    match (ready, etcd) {
        (true, true) => (StatusCode::OK, "ok\n"),
        (false, _) => (StatusCode::SERVICE_UNAVAILABLE, not_ready),
        (true, false) => (StatusCode::SERVICE_UNAVAILABLE, no_etcd),
    }
}

/// Binds `addr` (the daemon's `listen` option, named `option` in the error) and serves
/// `metrics` on it in a task of `tracker`'s until `shutdown`.
pub(crate) async fn start(
    addr: std::net::SocketAddr,
    option: &str,
    metrics: Arc<dyn Endpoint>,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} for /metrics ({option}): {e}"))?;
    tracker.spawn(serve(listener, metrics, tracker.clone(), shutdown.clone()));
    Ok(())
}

pub(crate) async fn serve(
    listener: TcpListener,
    metrics: Arc<dyn Endpoint>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    serve_limited(listener, metrics, tracker, shutdown, MAX_CONNECTIONS).await
}

pub(crate) async fn serve_limited(
    listener: TcpListener,
    metrics: Arc<dyn Endpoint>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    max_connections: usize,
) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!("serving /metrics and /healthz on http://{addr}");
    }
    let slots = Arc::new(Semaphore::new(max_connections));
    let mut last_warning: Option<Instant> = None;
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                        tracing::warn!("metrics listener: accept failed: {e}");
                        last_warning = Some(Instant::now());
                    }
                    if !crate::backoff::sleep_or_stop(ACCEPT_BACKOFF, &shutdown).await {
                        return;
                    }
                    continue;
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::debug!("metrics listener: {max_connections} connections open, closing {peer}");
            drop(stream);
            continue;
        };
        let metrics = metrics.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |req| {
                let metrics = metrics.clone();
                async move { Ok::<_, Infallible>(respond(metrics.as_ref(), &req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = shutdown.cancelled() => {}
            }
        });
    }
}

fn respond(metrics: &dyn Endpoint, req: &Request<Incoming>) -> Response<Body> {
    let path = req.uri().path();
    if matches!(*req.method(), hyper::Method::GET | hyper::Method::HEAD) {
        if let Some(r) = metrics.route(path) {
            return r;
        }
    }
    let (status, ctype, body) = match path {
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
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(ctype) {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    resp
}
