//! The status page's paths on the watcher's endpoint: `/` and `/ui` (the page, drawn
//! on the server, so it reads with JavaScript off), `/ui/page.css` and `/ui/page.js`
//! (files of this binary), `/api/status` (JSON) and `/api/events` (server-sent events:
//! the page's fragment again whenever it changes, and a comment every `KEEPALIVE`).
//!
//! Every answer forbids what the page does not need: no script, style or connection
//! but the page's own (`CSP`), no framing, no sniffing, no caching.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::BodyExt as _;
use hyper::body::{Bytes, Frame};
use hyper::{Response, StatusCode};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_util::sync::CancellationToken;

use super::html::esc;
use super::Page;
use crate::endpoint::{full, Body};

const SHELL: &str = include_str!("assets/page.html");
const CSS: &str = include_str!("assets/page.css");
const JS: &str = include_str!("assets/page.js");
const ICON: &str = "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 16 16\"><circle cx=\"8\" cy=\"8\" r=\"7\" fill=\"#14213d\"/><path d=\"M8 2l2 6-2 6-2-6z\" fill=\"#fff\"/></svg>";

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";
/// Live pages open at once; one more is told to come back later. The endpoint's own
/// connection cap is higher, so scrapes and probes still get through.
const MAX_STREAMS: usize = 32;
/// A comment this often keeps proxies from closing a quiet stream, and ends the stream
/// of a client that went away.
const KEEPALIVE: Duration = Duration::from_secs(15);
/// How long a cut browser waits before it reconnects.
const RETRY_MS: u64 = 2000;

/// The page's side of the endpoint.
#[derive(Clone)]
pub(crate) struct Ui {
    page: watch::Receiver<Arc<Page>>,
    streams: Arc<Semaphore>,
    shutdown: CancellationToken,
}

impl Ui {
    pub(crate) fn new(page: watch::Receiver<Arc<Page>>, shutdown: CancellationToken) -> Ui {
        Ui {
            page,
            streams: Arc::new(Semaphore::new(MAX_STREAMS)),
            shutdown,
        }
    }

    /// The answer for `path`, if it is one of the page's.
    pub(crate) fn route(&self, path: &str) -> Option<Response<Body>> {
        Some(match path {
            "/" | "/ui" | "/ui/" => {
                let page = self.page.borrow().clone();
                let html = SHELL
                    .replace("{{watcher}}", &esc(&page.watcher))
                    .replace("{{main}}", &page.html);
                answer(StatusCode::OK, "text/html; charset=utf-8", full(html))
            }
            "/ui/favicon.svg" | "/favicon.ico" => {
                answer(StatusCode::OK, "image/svg+xml", full(ICON))
            }
            "/ui/page.css" => answer(StatusCode::OK, "text/css; charset=utf-8", full(CSS)),
            "/ui/page.js" => answer(StatusCode::OK, "text/javascript; charset=utf-8", full(JS)),
            "/api/status" => {
                let json = self.page.borrow().json.clone();
                answer(StatusCode::OK, "application/json", full(json))
            }
            "/api/events" => self.events(),
            _ => return None,
        })
    }

    fn events(&self) -> Response<Body> {
        let Ok(permit) = self.streams.clone().try_acquire_owned() else {
            return answer(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                full(format!(
                    "{MAX_STREAMS} live pages are open: try again later\n"
                )),
            );
        };
        let (tx, rx) = mpsc::channel::<Bytes>(2);
        let mut page = self.page.clone();
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut keepalive = tokio::time::interval(KEEPALIVE);
            keepalive.reset();
            let first = format!(
                "retry: {RETRY_MS}\n\n{}",
                event(&page.borrow_and_update().html)
            );
            if tx.send(Bytes::from(first)).await.is_err() {
                return;
            }
            loop {
                let chunk = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    // The client went away: the body, and with it `rx`, is gone.
                    _ = tx.closed() => return,
                    r = page.changed() => match r {
                        Ok(()) => event(&page.borrow_and_update().html),
                        Err(_) => return,
                    },
                    _ = keepalive.tick() => ": keep-alive\n\n".to_string(),
                };
                if tx.send(Bytes::from(chunk)).await.is_err() {
                    return;
                }
            }
        });
        let mut r = answer(StatusCode::OK, "text/event-stream", Events { rx }.boxed());
        r.headers_mut().insert(
            hyper::header::HeaderName::from_static("x-accel-buffering"),
            hyper::header::HeaderValue::from_static("no"),
        );
        r
    }
}

/// One `board` event: the fragment, one `data:` line per line.
pub(super) fn event(html: &str) -> String {
    let mut out = String::with_capacity(html.len() + 64);
    out.push_str("event: board\n");
    for line in html.lines() {
        out.push_str("data: ");
        out.push_str(line);
        out.push('\n');
    }
    out.push('\n');
    out
}

fn answer(status: StatusCode, ctype: &'static str, body: Body) -> Response<Body> {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    let h = r.headers_mut();
    use hyper::header::{self, HeaderValue};
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    r
}

/// The events' body: what the stream's task sends, as it comes.
struct Events {
    rx: mpsc::Receiver<Bytes>,
}

impl hyper::body::Body for Events {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

/// What the watcher's endpoint serves: its metrics and health, and the page when on.
pub(crate) struct Site {
    pub(crate) metrics: Arc<crate::watcher::metrics::Metrics>,
    pub(crate) ui: Option<Ui>,
    /// With `[acme]`: the HTTP-01 answers, served whatever `ui` says (the front door
    /// sends the CA's requests here).
    pub(crate) acme: Option<crate::acme::Answers>,
}

impl crate::endpoint::Endpoint for Site {
    fn encode(&self) -> String {
        self.metrics.encode()
    }

    fn health(&self) -> (StatusCode, &'static str) {
        crate::endpoint::Endpoint::health(&*self.metrics)
    }

    fn route(&self, path: &str) -> Option<Response<Body>> {
        if let Some(answers) = self.acme.as_ref() {
            if path.starts_with(crate::acme::challenge::PATH) {
                return Some(match answers.answer(path) {
                    Some(v) => answer(StatusCode::OK, "application/octet-stream", full(v)),
                    None => answer(
                        StatusCode::NOT_FOUND,
                        "text/plain",
                        full("no such ACME challenge\n"),
                    ),
                });
            }
        }
        match &self.ui {
            Some(ui) => ui.route(path),
            None if matches!(path, "/" | "/ui" | "/api/status" | "/api/events") => Some(answer(
                StatusCode::NOT_FOUND,
                "text/plain",
                full("the status page is off: `ui = true` in [watcher] (or --ui true) serves it here\n"),
            )),
            None => None,
        }
    }
}

/// Serves `/metrics`, `/healthz` and, with `[watcher] ui`, the status page on `addr`.
/// Returns the feed the loop publishes the page's state on (None: no page).
pub(crate) async fn start(
    addr: std::net::SocketAddr,
    cfg: &crate::config::WatcherConfig,
    metrics: &Arc<crate::watcher::metrics::Metrics>,
    tracker: &tokio_util::task::TaskTracker,
    tasks: &tokio_util::sync::CancellationToken,
    acme: Option<crate::acme::Answers>,
) -> anyhow::Result<Option<tokio::sync::watch::Sender<super::Feed>>> {
    let mut feed = None;
    let page_ui = cfg.ui.then(|| {
        let (feed_tx, feed_rx) = tokio::sync::watch::channel(super::Feed::default());
        let (page_tx, page_rx) = tokio::sync::watch::channel(Arc::new(super::Page::default()));
        tracker.spawn(super::run(
            cfg.name.clone(),
            cfg.etcd.clone(),
            feed_rx,
            page_tx,
            metrics.clone(),
            tasks.clone(),
        ));
        feed = Some(feed_tx);
        Ui::new(page_rx, tasks.clone())
    });
    let site = Arc::new(Site {
        metrics: metrics.clone(),
        ui: page_ui,
        acme,
    });
    crate::endpoint::start(addr, "watcher.listen", site, tracker, tasks).await?;
    if cfg.ui {
        tracing::info!("status page on http://{addr}/ (read-only, unauthenticated: watcher.ui)");
    }
    Ok(feed)
}
