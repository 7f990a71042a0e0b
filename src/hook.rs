//! Event hooks: tell a team what happened (an instance registered, a reload, a refused
//! render), by HTTP POST or by running a command.
//!
//! Delivery never delays the daemon that emits: `Hooks::emit` only puts the event on
//! each matching hook's bounded queue (full → dropped and counted); one task per hook
//! delivers in order, each attempt time-limited, a few retries with backoff, then the
//! event is dropped and counted. A webhook URL is a secret: logs name only its host.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde_json::{Map, Value};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backoff::{sleep_or_stop, Backoff};
use crate::config::{redact_url, HookConfig, HookFormat, HookTarget};

/// Events a hook may wait on per daemon, before it is dropped.
const QUEUE: usize = 256;
/// Attempts per event (the first and the retries).
const ATTEMPTS: u32 = 4;

/// The events a registrar emits. The spelling (`as_str`) is what `[[hook]] events`
/// names and what a hook receives as `event`: a new kind is a variant and its arm here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegistrarEvent {
    /// An instance's key was written (also: back in rotation after a drain).
    Register,
    /// An instance's key was deleted.
    Deregister,
    /// An instance left rotation: its container is stopping.
    Drain,
    /// The registrar's lease was lost (expired during an outage, or etcd lost its
    /// data) and its instances were written again: one event for all of them, instead
    /// of a `register` for each.
    Reregister,
}

/// The events a watcher emits (see `RegistrarEvent`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatcherEvent {
    /// HAProxy was reloaded onto a new file.
    Reload,
    /// A change went to HAProxy through the runtime API, with no reload.
    Runtime,
    /// A check refused a rendered file (or one HAProxy ran).
    Reject,
    /// A reload or a write failed.
    Fail,
    /// A mass removal was held back.
    Hold,
    /// The ACME issuer wrote a certificate for names that had none.
    CertIssued,
    /// The ACME issuer replaced a certificate (renewal, names added, unreadable).
    CertRenewed,
    /// An ACME order failed; the certificate is tried again after a backoff.
    CertFailed,
}

impl RegistrarEvent {
    pub const ALL: [RegistrarEvent; 4] = [
        Self::Register,
        Self::Deregister,
        Self::Drain,
        Self::Reregister,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Register => "register",
            Self::Deregister => "deregister",
            Self::Drain => "drain",
            Self::Reregister => "reregister",
        }
    }
}

impl WatcherEvent {
    pub const ALL: [WatcherEvent; 8] = [
        Self::Reload,
        Self::Runtime,
        Self::Reject,
        Self::Fail,
        Self::Hold,
        Self::CertIssued,
        Self::CertRenewed,
        Self::CertFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reload => "reload",
            Self::Runtime => "runtime",
            Self::Reject => "reject",
            Self::Fail => "fail",
            Self::Hold => "hold",
            Self::CertIssued => "cert_issued",
            Self::CertRenewed => "cert_renewed",
            Self::CertFailed => "cert_failed",
        }
    }
}

/// Any event either daemon emits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Registrar(RegistrarEvent),
    Watcher(WatcherEvent),
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Registrar(e) => e.as_str(),
            EventKind::Watcher(e) => e.as_str(),
        }
    }

    /// The event spelled `name`, if either daemon emits it.
    pub fn parse(name: &str) -> Option<EventKind> {
        let registrar = RegistrarEvent::ALL.into_iter().map(EventKind::Registrar);
        let watcher = WatcherEvent::ALL.into_iter().map(EventKind::Watcher);
        registrar.chain(watcher).find(|e| e.as_str() == name)
    }
}

impl From<RegistrarEvent> for EventKind {
    fn from(e: RegistrarEvent) -> Self {
        EventKind::Registrar(e)
    }
}

impl From<WatcherEvent> for EventKind {
    fn from(e: WatcherEvent) -> Self {
        EventKind::Watcher(e)
    }
}

/// One event: its kind and its fields, as JSON (`event` and `at` are added).
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub kind: EventKind,
    pub fields: Map<String, Value>,
    /// One line for humans (Slack's `text`).
    pub summary: String,
}

impl Event {
    pub fn new(kind: impl Into<EventKind>, summary: impl Into<String>) -> Event {
        Event {
            kind: kind.into(),
            fields: Map::new(),
            summary: summary.into(),
        }
    }

    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Event {
        self.fields.insert(key.to_string(), value.into());
        self
    }

    /// The JSON object a hook receives: `event`, `at` (RFC 3339), then the fields.
    pub fn to_json(&self, at: std::time::SystemTime) -> Value {
        let mut m = Map::new();
        m.insert("event".into(), self.kind.as_str().into());
        m.insert(
            "at".into(),
            humantime::format_rfc3339_millis(at).to_string().into(),
        );
        m.insert("summary".into(), self.summary.clone().into());
        m.extend(self.fields.clone());
        Value::Object(m)
    }

    /// The body for `format`.
    pub fn body(&self, format: HookFormat, at: std::time::SystemTime) -> String {
        match format {
            HookFormat::Json => self.to_json(at).to_string(),
            HookFormat::Slack => {
                serde_json::json!({ "text": format!("[{}] {}", self.kind.as_str(), self.summary) })
                    .to_string()
            }
        }
    }
}

/// Counters a daemon may export.
#[derive(Debug, Default)]
pub struct HookStats {
    pub delivered: AtomicU64,
    pub dropped: AtomicU64,
}

/// The hooks' counters as a metric family, for a daemon's `/metrics`:
/// `hook_events_total{result="delivered|dropped"}`.
#[derive(Default)]
pub(crate) struct HookMetrics {
    stats: std::sync::OnceLock<Arc<HookStats>>,
    events: Family<[(&'static str, &'static str); 1], Counter>,
}

impl HookMetrics {
    pub(crate) fn register(&self, registry: &mut Registry) {
        registry.register(
            "hook_events",
            "Hook events delivered, or dropped (queue full or every attempt failed)",
            self.events.clone(),
        );
    }

    /// The hooks whose counters are exported.
    pub(crate) fn export(&self, stats: Arc<HookStats>) {
        let _ = self.stats.set(stats);
    }

    /// `registry` (which holds this family) as Prometheus text, the counters fresh.
    pub(crate) fn encode(&self, registry: &Registry) -> String {
        self.refresh();
        crate::endpoint::encode(registry)
    }

    /// Copies the delivery counters into the family: call before encoding.
    fn refresh(&self) {
        if let Some(h) = self.stats.get() {
            for (label, n) in [("delivered", &h.delivered), ("dropped", &h.dropped)] {
                self.events
                    .get_or_create(&[("result", label)])
                    .inner()
                    .store(n.load(Ordering::Relaxed), Ordering::Relaxed);
            }
        }
    }
}

struct Queue {
    events: Vec<EventKind>,
    tx: mpsc::Sender<(Event, std::time::SystemTime)>,
}

/// The hooks of one daemon. Cheap to clone; `emit` never waits.
#[derive(Clone, Default)]
pub struct Hooks {
    queues: Arc<Vec<Queue>>,
    pub stats: Arc<HookStats>,
}

impl Hooks {
    /// Starts one delivery task per hook on `tracker`; they end with `shutdown`.
    pub fn start(
        hooks: &[HookConfig],
        tracker: &TaskTracker,
        shutdown: &CancellationToken,
    ) -> Hooks {
        let stats = Arc::new(HookStats::default());
        let client = reqwest::Client::builder()
            .user_agent(concat!("portolan/", env!("CARGO_PKG_VERSION")))
            .build()
            .ok();
        let mut queues = Vec::new();
        for h in hooks {
            let (tx, rx) = mpsc::channel(QUEUE);
            tracker.spawn(deliver(
                h.clone(),
                client.clone(),
                rx,
                stats.clone(),
                shutdown.clone(),
            ));
            queues.push(Queue {
                events: h.events.clone(),
                tx,
            });
        }
        Hooks {
            queues: Arc::new(queues),
            stats,
        }
    }

    /// Queues `event` for every hook that wants it. Never blocks: a full queue drops it.
    pub fn emit(&self, event: Event) {
        let at = std::time::SystemTime::now();
        for q in self
            .queues
            .iter()
            .filter(|q| q.events.contains(&event.kind))
        {
            if q.tx.try_send((event.clone(), at)).is_err() {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    event = event.kind.as_str(),
                    "hook queue full: event dropped"
                );
            }
        }
    }
}

fn target_name(t: &HookTarget) -> String {
    match t {
        HookTarget::Url(u) => redact_url(u),
        HookTarget::Command(argv) => argv[0].clone(),
    }
}

async fn deliver(
    hook: HookConfig,
    client: Option<reqwest::Client>,
    mut rx: mpsc::Receiver<(Event, std::time::SystemTime)>,
    stats: Arc<HookStats>,
    shutdown: CancellationToken,
) {
    let name = target_name(&hook.target);
    loop {
        let (event, at) = tokio::select! {
            _ = shutdown.cancelled() => return,
            next = rx.recv() => match next {
                Some(e) => e,
                None => return,
            },
        };
        let body = event.body(hook.format, at);
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(4));
        let mut last_error = String::new();
        let mut done = false;
        for attempt in 1..=ATTEMPTS {
            let result = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = tokio::time::timeout(hook.timeout, send(&hook.target, client.as_ref(), &body)) => r,
            };
            match result {
                Ok(Ok(())) => {
                    done = true;
                    break;
                }
                Ok(Err(e)) => last_error = e,
                Err(_) => last_error = format!("no answer within {:?}", hook.timeout),
            }
            tracing::debug!(hook = %name, event = event.kind.as_str(), attempt, error = %last_error, "hook delivery failed");
            if attempt < ATTEMPTS && !sleep_or_stop(backoff.next_delay(), &shutdown).await {
                return;
            }
        }
        if done {
            stats.delivered.fetch_add(1, Ordering::Relaxed);
        } else {
            stats.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(hook = %name, event = event.kind.as_str(), error = %last_error, "hook failed {ATTEMPTS} times: event dropped");
        }
    }
}

/// One delivery attempt.
async fn send(
    target: &HookTarget,
    client: Option<&reqwest::Client>,
    body: &str,
) -> Result<(), String> {
    match target {
        HookTarget::Url(url) => {
            let client = client.ok_or("no HTTP client (TLS setup failed)")?;
            let resp = client
                .post(url)
                .header("content-type", "application/json")
                .body(body.to_string())
                .send()
                .await
                // reqwest's error text carries the URL: keep only its kind.
                .map_err(|e| format!("request failed: {}", e.without_url()))?;
            if resp.status().is_success() {
                Ok(())
            } else {
                Err(format!("answered {}", resp.status()))
            }
        }
        HookTarget::Command(argv) => {
            let mut child = tokio::process::Command::new(&argv[0])
                .args(&argv[1..])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| format!("cannot run {}: {e}", argv[0]))?;
            if let Some(mut stdin) = child.stdin.take() {
                stdin
                    .write_all(body.as_bytes())
                    .await
                    .map_err(|e| format!("cannot write its stdin: {e}"))?;
            }
            let status = child.wait().await.map_err(|e| e.to_string())?;
            status
                .success()
                .then_some(())
                .ok_or_else(|| format!("exited with {status}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_carries_its_name_time_and_fields() {
        let e = Event::new(RegistrarEvent::Register, "web/a at 10.0.0.5:80 on host-a")
            .with("service", "web")
            .with("instance", "a")
            .with("node", "host-a")
            .with("addr", "10.0.0.5:80");
        let at = std::time::UNIX_EPOCH + Duration::from_millis(1_796_140_000_123);
        let v: Value = serde_json::from_str(&e.body(HookFormat::Json, at)).unwrap();
        assert_eq!(v["event"], "register");
        assert_eq!(v["at"], "2026-12-01T15:46:40.123Z");
        assert_eq!(v["service"], "web");
        assert_eq!(v["addr"], "10.0.0.5:80");
        let slack: Value = serde_json::from_str(&e.body(HookFormat::Slack, at)).unwrap();
        assert_eq!(
            slack,
            serde_json::json!({"text": "[register] web/a at 10.0.0.5:80 on host-a"})
        );
    }
}

#[cfg(test)]
mod event_names {
    use super::*;

    #[test]
    fn every_event_is_parsed_back_from_its_one_spelling() {
        let all: Vec<EventKind> = RegistrarEvent::ALL
            .into_iter()
            .map(EventKind::from)
            .chain(WatcherEvent::ALL.into_iter().map(EventKind::from))
            .collect();
        for e in &all {
            assert_eq!(EventKind::parse(e.as_str()), Some(*e));
        }
        let mut names: Vec<_> = all.iter().map(|e| e.as_str()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), all.len(), "two events share a spelling");
        assert_eq!(EventKind::parse("relaod"), None);
    }
}
