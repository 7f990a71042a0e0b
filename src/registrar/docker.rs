//! The Docker side: connect, subscribe to container events, list what runs, and turn
//! both into `DockerReport`s for the loop. Reconnects with backoff forever; a closed
//! stream is a reason to reconnect and resync, never to exit.
//!
//! No gap between list and watch: the event stream is opened with `since` a moment
//! before the list, so the daemon replays whatever happened in between. Replays are
//! harmless because every event leads to an inspect of the container's current state
//! (or to a deregistration of a container that is going away anyway).

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bollard::errors::Error as DockerError;
use bollard::models::{ContainerInspectResponse, EventMessage, EventMessageTypeEnum};
use bollard::query_parameters::{EventsOptions, ListContainersOptions};
use bollard::{ClientVersion, Docker};
use futures_util::{StreamExt, TryStreamExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::backoff::{sleep_or_stop, Backoff};

/// Per-request time limit for list and inspect (the event stream is not limited).
const REQUEST_TIMEOUT_SECS: u64 = 30;
/// Inspects in flight at once, after an event burst or for a full list.
const INSPECT_CONCURRENCY: usize = 16;
/// How far back the event stream starts, to cover the list that follows it.
const SINCE_MARGIN: Duration = Duration::from_secs(2);

/// Events that can change what is registered; others (exec_*, attach, …) are filtered
/// out by the daemon. `health_status` matches `health_status: healthy` and friends.
const EVENTS: &[&str] = &[
    "start",
    "restart",
    "unpause",
    "health_status",
    "die",
    "stop",
    "kill",
    "oom",
    "pause",
    "destroy",
];

#[derive(Debug, Clone)]
pub(crate) struct DockerSettings {
    /// None: `DOCKER_HOST` or the local socket.
    pub(crate) host: Option<String>,
    /// None: negotiate (Engine 20.10 speaks 1.41; a newer client version prefix gets
    /// HTTP 400 from it).
    pub(crate) api_version: Option<String>,
    /// `KEY` or `KEY=VALUE`: only containers with this label are seen at all.
    pub(crate) only_label: Option<String>,
}

impl DockerSettings {
    pub(crate) fn of(cfg: &crate::config::RegistrarConfig) -> DockerSettings {
        DockerSettings {
            host: cfg.docker_host.clone(),
            api_version: cfg.docker_api_version.clone(),
            only_label: cfg.only_label.clone(),
        }
    }
}

/// What the Docker task tells the loop (and a scripted `Source` too: the registrar's
/// `ContainerReport`).
#[derive(Debug)]
pub enum DockerReport {
    /// Every running container, after a (re)connect or on request: the loop rebuilds its
    /// view from this and reconciles etcd against it.
    Snapshot(Vec<ContainerInspectResponse>),
    /// A container's current state after an event that may register it.
    Changed(Box<ContainerInspectResponse>),
    /// Deregister this container now, without asking Docker anything.
    Gone { id: String, action: String },
    /// The container got a signal (`signal`: Docker's attribute, a number): its stop
    /// signal starts a drain (`drain::StopPolicy`), any other changes nothing.
    Killed { id: String, signal: Option<String> },
    /// One of the above, caused by a Docker event at `at` (Docker's own clock): the
    /// loop measures event → etcd from it.
    Event {
        at: std::time::SystemTime,
        report: Box<DockerReport>,
    },
}

/// What an event means for registration.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Action {
    /// Look at the container again (it may have become registrable).
    Refresh,
    /// It is going away or must not take traffic: deregister at once.
    Deregister,
    /// A signal: the loop, which knows the container's stop signal, decides.
    Killed(Option<String>),
}

/// Classifies a container event. Pure; None for anything that does not matter.
fn classify(ev: &EventMessage) -> Option<(String, Action, String)> {
    if ev.typ != Some(EventMessageTypeEnum::CONTAINER) {
        return None;
    }
    let actor = ev.actor.as_ref()?;
    let id = actor.id.clone().filter(|id| !id.is_empty())?;
    let action = ev.action.as_deref()?.trim();
    let what = match action {
        // `oom` comes when any process in the container's cgroup is OOM-killed, not only
        // PID 1: look again (if PID 1 died, `die` follows).
        "start" | "restart" | "unpause" | "health_status: healthy" | "oom" => Action::Refresh,
        "die" | "stop" | "pause" | "destroy" | "health_status: unhealthy" => Action::Deregister,
        // `docker stop` is a `kill` with the stop signal now and a `die` up to the stop
        // timeout later; `docker kill -s HUP` is a reload, not a death.
        "kill" => Action::Killed(
            actor
                .attributes
                .as_ref()
                .and_then(|a| a.get("signal"))
                .cloned(),
        ),
        _ => return None,
    };
    Some((id, what, action.to_string()))
}

/// Connects and settles the API version. Cheap: nothing is sent before the first call
/// unless the version is negotiated.
async fn connect(settings: &DockerSettings) -> Result<Docker, DockerError> {
    let host = settings
        .host
        .clone()
        .or_else(|| std::env::var("DOCKER_HOST").ok().filter(|h| !h.is_empty()))
        .unwrap_or_else(|| "unix:///var/run/docker.sock".to_string());
    let explicit = settings
        .api_version
        .as_deref()
        .map(parse_version)
        .transpose()?;
    let version = explicit.unwrap_or(*bollard::API_DEFAULT_VERSION);
    let docker = if host.starts_with("unix://") {
        Docker::connect_with_unix(&host, REQUEST_TIMEOUT_SECS, &version)?
    } else if host.starts_with("tcp://") || host.starts_with("http://") {
        Docker::connect_with_http(&host, REQUEST_TIMEOUT_SECS, &version)?
    } else if host.starts_with('/') {
        Docker::connect_with_unix(&format!("unix://{host}"), REQUEST_TIMEOUT_SECS, &version)?
    } else {
        return Err(DockerError::UnsupportedURISchemeError { uri: host });
    };
    if explicit.is_some() {
        Ok(docker)
    } else {
        docker.negotiate_version().await
    }
}

fn parse_version(v: &str) -> Result<ClientVersion, DockerError> {
    let bad = || DockerError::APIVersionParseError {};
    let (major, minor) = v.trim().split_once('.').ok_or_else(bad)?;
    Ok(ClientVersion {
        major_version: major.parse().map_err(|_| bad())?,
        minor_version: minor.parse().map_err(|_| bad())?,
    })
}

fn label_filter(settings: &DockerSettings) -> HashMap<String, Vec<String>> {
    let mut filters = HashMap::new();
    if let Some(l) = &settings.only_label {
        filters.insert("label".to_string(), vec![l.clone()]);
    }
    filters
}

/// Running containers, inspected. A container that vanishes between list and inspect
/// is simply not there.
async fn snapshot(
    docker: &Docker,
    settings: &DockerSettings,
) -> Result<Vec<ContainerInspectResponse>, DockerError> {
    let list = docker
        .list_containers(Some(ListContainersOptions {
            all: false,
            filters: Some(label_filter(settings)),
            ..Default::default()
        }))
        .await?;
    let ids: Vec<String> = list.into_iter().filter_map(|c| c.id).collect();
    futures_util::stream::iter(ids)
        .map(|id| inspect(docker, id))
        .buffer_unordered(INSPECT_CONCURRENCY)
        .try_filter_map(|c| async move { Ok(c) })
        .try_collect()
        .await
}

/// None when the container no longer exists.
async fn inspect(
    docker: &Docker,
    id: String,
) -> Result<Option<ContainerInspectResponse>, DockerError> {
    match docker.inspect_container(&id, None).await {
        Ok(c) => Ok(Some(c)),
        Err(DockerError::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Turns one event into a report, inspecting when the event calls for it.
async fn report_for(
    docker: Docker,
    ev: Result<EventMessage, DockerError>,
) -> Result<Option<DockerReport>, DockerError> {
    let ev = ev?;
    let Some((id, action, name)) = classify(&ev) else {
        return Ok(None);
    };
    let at = ev
        .time_nano
        .and_then(|n| u64::try_from(n).ok())
        .map(|n| std::time::UNIX_EPOCH + std::time::Duration::from_nanos(n));
    let report = match action {
        Action::Deregister => DockerReport::Gone { id, action: name },
        Action::Killed(signal) => DockerReport::Killed { id, signal },
        Action::Refresh => match inspect(&docker, id.clone()).await? {
            Some(c) => DockerReport::Changed(Box::new(c)),
            None => DockerReport::Gone {
                id,
                action: "vanished".into(),
            },
        },
    };
    Ok(Some(match at {
        Some(at) => DockerReport::Event {
            at,
            report: Box::new(report),
        },
        None => report,
    }))
}

/// The Docker task: runs until cancelled. `resync` asks for a fresh snapshot.
pub(crate) async fn run(
    settings: DockerSettings,
    reports: mpsc::Sender<DockerReport>,
    mut resync: mpsc::Receiver<()>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    let mut was_down = false;
    loop {
        let lost = tokio::select! {
            _ = shutdown.cancelled() => return,
            end = session(&settings, &reports, &mut resync, &mut backoff, &mut was_down) => match end {
                SessionEnd::LoopGone => return,
                SessionEnd::Lost(lost) => lost,
            },
        };
        let delay = backoff.next_delay();
        if !was_down {
            tracing::warn!(error = %lost, "docker: connection lost; reconnecting with backoff");
        } else {
            tracing::debug!(error = %lost, retry_in = ?delay, "docker still unreachable");
        }
        was_down = true;
        if !sleep_or_stop(delay, &shutdown).await {
            return;
        }
    }
}

/// How one connection's life ended.
enum SessionEnd {
    /// The loop has gone away: nothing left to report to, stop for good.
    LoopGone,
    /// Transient: reconnect after a backoff.
    Lost(Lost),
}

/// Why the connection to Docker was lost.
#[derive(Debug, thiserror::Error)]
enum Lost {
    #[error("cannot connect: {0} (is dockerd running? is --docker-host right?)")]
    Connect(#[source] DockerError),
    #[error("cannot list containers: {0}")]
    List(#[source] DockerError),
    #[error("event stream: {0}")]
    Events(#[source] DockerError),
    #[error("event stream closed")]
    EventsClosed,
}

/// One connection's life, until it ends.
async fn session(
    settings: &DockerSettings,
    reports: &mpsc::Sender<DockerReport>,
    resync: &mut mpsc::Receiver<()>,
    backoff: &mut Backoff,
    was_down: &mut bool,
) -> SessionEnd {
    let docker = match connect(settings).await {
        Ok(d) => d,
        Err(e) => return SessionEnd::Lost(Lost::Connect(e)),
    };
    let since = SystemTime::now()
        .checked_sub(SINCE_MARGIN)
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| format!("{}.{:09}", d.as_secs(), d.subsec_nanos()));
    let mut filters = label_filter(settings);
    filters.insert("type".into(), vec!["container".into()]);
    filters.insert(
        "event".into(),
        EVENTS.iter().map(|e| e.to_string()).collect(),
    );
    let events = docker.events(Some(EventsOptions {
        since,
        until: None,
        filters: Some(filters),
    }));
    let containers = match snapshot(&docker, settings).await {
        Ok(c) => c,
        Err(e) => return SessionEnd::Lost(Lost::List(e)),
    };
    let version = docker.client_version();
    if *was_down {
        tracing::info!(containers = containers.len(), "docker: reconnected");
    } else {
        tracing::info!(
            containers = containers.len(),
            api = %format!("{}.{}", version.major_version, version.minor_version),
            "docker: connected"
        );
    }
    *was_down = false;
    if reports
        .send(DockerReport::Snapshot(containers))
        .await
        .is_err()
    {
        return SessionEnd::LoopGone;
    }
    backoff.reset();
    // Ordered, bounded concurrency: inspects overlap, reports keep event order, so a
    // `die` can never be overtaken by the `start` before it.
    let docker_for_events = docker.clone();
    let mut pipeline = events
        .map(move |ev| report_for(docker_for_events.clone(), ev))
        .buffered(INSPECT_CONCURRENCY);
    loop {
        tokio::select! {
            asked = resync.recv() => {
                if asked.is_none() {
                    return SessionEnd::LoopGone;
                }
                match snapshot(&docker, settings).await {
                    Ok(c) => {
                        if reports.send(DockerReport::Snapshot(c)).await.is_err() {
                            return SessionEnd::LoopGone;
                        }
                    }
                    Err(e) => return SessionEnd::Lost(Lost::List(e)),
                }
            }
            item = pipeline.next() => match item {
                None => return SessionEnd::Lost(Lost::EventsClosed),
                Some(Err(e)) => return SessionEnd::Lost(Lost::Events(e)),
                Some(Ok(None)) => {}
                Some(Ok(Some(report))) => {
                    if reports.send(report).await.is_err() {
                        return SessionEnd::LoopGone;
                    }
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(action: &str, attrs: &[(&str, &str)]) -> EventMessage {
        serde_json::from_value(serde_json::json!({
            "Type": "container",
            "Action": action,
            "Actor": {
                "ID": "3f2a9c1b7d10aaaa",
                "Attributes": attrs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<HashMap<_, _>>(),
            },
            "time": 1700000000,
            "timeNano": 1700000000000000000i64,
        }))
        .unwrap()
    }

    fn action(ev: &EventMessage) -> Option<Action> {
        classify(ev).map(|(_, a, _)| a)
    }

    #[test]
    fn classifies_events() {
        #[rustfmt::skip]
        let table = [
            (["start", "restart", "unpause", "health_status: healthy", "oom"], Some(Action::Refresh)),
            (["die", "stop", "pause", "destroy", "health_status: unhealthy"], Some(Action::Deregister)),
            (["create", "exec_start: sh", "attach", "rename", "health_status: starting"], None),
        ];
        for (actions, want) in table {
            for a in actions {
                assert_eq!(action(&event(a, &[])), want, "{a}");
            }
        }
        let (id, _, name) = classify(&event("die", &[])).unwrap();
        assert_eq!(id, "3f2a9c1b7d10aaaa");
        assert_eq!(name, "die");
    }

    #[test]
    fn a_kill_carries_its_signal_to_the_loop() {
        for s in ["15", "9", "1", "SIGQUIT"] {
            assert_eq!(
                action(&event("kill", &[("signal", s)])),
                Some(Action::Killed(Some(s.to_string()))),
                "{s}"
            );
        }
        assert_eq!(action(&event("kill", &[])), Some(Action::Killed(None)));
    }

    #[test]
    fn malformed_events_are_ignored() {
        let ev: EventMessage = serde_json::from_str("{}").unwrap();
        assert_eq!(classify(&ev), None);
        let ev: EventMessage =
            serde_json::from_str(r#"{"Type":"container","Action":"die"}"#).unwrap();
        assert_eq!(classify(&ev), None);
        let ev: EventMessage =
            serde_json::from_str(r#"{"Type":"network","Action":"connect","Actor":{"ID":"abc"}}"#)
                .unwrap();
        assert_eq!(classify(&ev), None);
    }

    #[test]
    fn api_versions() {
        let v = parse_version("1.41").unwrap();
        assert_eq!((v.major_version, v.minor_version), (1, 41));
        assert!(parse_version("v1").is_err());
        assert!(parse_version("1.x").is_err());
    }
}
