//! The registrar's own probes, for containers that ask for one by label
//! (`portolan.check.http=/path`, `portolan.check.tcp=true`).
//!
//! One tracked task per probed instance, so however many containers there are, a slow
//! probe never holds up the event loop. A probe targets the address being registered,
//! the one the load balancer will use, never the container's bridge IP: that is the
//! path that has to work.
//!
//! A new instance is registered at its first success (it should take traffic as soon
//! as it answers); after `fall` failures in a row it is deregistered, and it comes back
//! after `rise` successes in a row. `fall` failures count even before any success: a
//! restarted registrar may find a key from before for a service that is now down.
//!
//! `Probes` is the loop's side: which probe runs for which instance, and the verdict
//! each has reported last.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::selector::{Check, CheckKind, Registration};
use crate::backoff::sleep_or_stop;

/// Until an instance first answers, probe this often (capped by its interval), so a
/// fresh container is registered moments after it starts listening.
const FIRST_PROBE_PERIOD: Duration = Duration::from_millis(250);
/// How long a TCP peer must keep a connection open to count as alive: docker-proxy
/// accepts on behalf of a dead backend and closes at once.
const TCP_SETTLE: Duration = Duration::from_millis(100);

/// A probed instance's state, as the desired key set sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// No verdict yet: the probe is warming up.
    Pending,
    Up,
    Down,
}

struct Slot {
    addr: String,
    check: Check,
    /// Tells this probe's reports from those of the one it replaced.
    generation: u64,
    /// None until the first verdict.
    up: Option<bool>,
    stop: CancellationToken,
}

/// The running probes, one per probed instance, and their verdicts.
pub(crate) struct Probes {
    slots: BTreeMap<String, Slot>,
    generation: u64,
    tracker: TaskTracker,
    reports: mpsc::Sender<ProbeReport>,
    shutdown: CancellationToken,
}

impl Probes {
    pub(crate) fn new(
        tracker: TaskTracker,
        reports: mpsc::Sender<ProbeReport>,
        shutdown: CancellationToken,
    ) -> Probes {
        Probes {
            slots: BTreeMap::new(),
            generation: 0,
            tracker,
            reports,
            shutdown,
        }
    }

    /// One probe per instance that asks for one; probes of instances gone or changed stop.
    pub(crate) fn sync<'a>(&mut self, registrations: impl IntoIterator<Item = &'a Registration>) {
        let wanted: BTreeMap<&str, (&str, &Check)> = registrations
            .into_iter()
            .filter_map(|r| {
                r.check
                    .as_ref()
                    .map(|c| (r.instance.as_str(), (r.record.addr.as_str(), c)))
            })
            .collect();
        self.slots.retain(|instance, slot| {
            let keep = wanted
                .get(instance.as_str())
                .is_some_and(|(addr, check)| slot.addr == *addr && slot.check == **check);
            if !keep {
                slot.stop.cancel();
            }
            keep
        });
        for (instance, (addr, check)) in wanted {
            if self.slots.contains_key(instance) {
                continue;
            }
            self.generation += 1;
            let stop = self.shutdown.child_token();
            self.tracker.spawn(run(
                instance.to_string(),
                self.generation,
                addr.to_string(),
                check.clone(),
                self.reports.clone(),
                stop.clone(),
            ));
            self.slots.insert(
                instance.to_string(),
                Slot {
                    addr: addr.to_string(),
                    check: check.clone(),
                    generation: self.generation,
                    up: None,
                    stop,
                },
            );
        }
    }

    /// Records a probe's report (one of a replaced probe is ignored) and logs the change.
    pub(crate) fn apply(&mut self, r: ProbeReport) {
        let Some(slot) = self.slots.get_mut(&r.instance) else {
            return;
        };
        if slot.generation != r.generation {
            return;
        }
        let before = slot.up.replace(r.up);
        if r.up {
            tracing::info!(instance = %r.instance, addr = %slot.addr, "probe passes");
        } else if before.is_none() {
            // Still starting, or down since before a registrar restart: any key it has
            // from then goes.
            tracing::info!(
                instance = %r.instance,
                addr = %slot.addr,
                error = r.error.as_deref().unwrap_or("-"),
                "probe has not passed yet; not registered"
            );
        } else {
            tracing::warn!(
                instance = %r.instance,
                addr = %slot.addr,
                error = r.error.as_deref().unwrap_or("-"),
                "probe fails; deregistering"
            );
        }
    }

    /// The instance's verdict; None when no probe runs for it.
    pub(crate) fn verdict(&self, instance: &str) -> Option<Verdict> {
        self.slots.get(instance).map(|slot| match slot.up {
            None => Verdict::Pending,
            Some(true) => Verdict::Up,
            Some(false) => Verdict::Down,
        })
    }

    /// Stops every probe (at shutdown).
    pub(crate) fn stop(&self) {
        for slot in self.slots.values() {
            slot.stop.cancel();
        }
    }
}

/// Consecutive-result counting, HAProxy style. Pure.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Counter {
    fall: u32,
    rise: u32,
    /// None until the first verdict: failures from the very first try must still be
    /// reported, or a key left by a previous registrar would outlive a dead service.
    up: Option<bool>,
    ever_up: bool,
    /// Consecutive results equal to `streak_ok`.
    streak: u32,
    streak_ok: bool,
}

impl Counter {
    fn new(fall: u32, rise: u32) -> Counter {
        Counter {
            fall: fall.max(1),
            rise: rise.max(1),
            up: None,
            ever_up: false,
            streak: 0,
            streak_ok: false,
        }
    }

    fn ever_up(&self) -> bool {
        self.ever_up
    }

    /// Records one result; returns the new state when it changes.
    fn observe(&mut self, ok: bool) -> Option<bool> {
        if self.up == Some(ok) {
            self.streak = 0;
            return None;
        }
        if self.streak_ok != ok {
            self.streak = 0;
            self.streak_ok = ok;
        }
        self.streak += 1;
        let needed = match (ok, self.ever_up) {
            (true, false) => 1,
            (true, true) => self.rise,
            (false, _) => self.fall,
        };
        if self.streak < needed {
            return None;
        }
        self.up = Some(ok);
        self.ever_up |= ok;
        self.streak = 0;
        Some(ok)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ProbeReport {
    instance: String,
    /// Tells a report of a replaced probe from the current one's.
    generation: u64,
    up: bool,
    /// The last failure, for the log.
    error: Option<String>,
}

/// Probes `addr` until cancelled, reporting each change of state.
async fn run(
    instance: String,
    generation: u64,
    addr: String,
    check: Check,
    reports: mpsc::Sender<ProbeReport>,
    shutdown: CancellationToken,
) {
    let mut counter = Counter::new(check.fall, check.rise);
    loop {
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = probe_once(&check.kind, &addr, check.timeout) => r,
        };
        if let Some(up) = counter.observe(result.is_ok()) {
            let report = ProbeReport {
                instance: instance.clone(),
                generation,
                up,
                error: result.err(),
            };
            if reports.send(report).await.is_err() {
                return;
            }
        }
        let pause = if counter.ever_up() {
            check.interval
        } else {
            check.interval.min(FIRST_PROBE_PERIOD)
        };
        if !sleep_or_stop(pause, &shutdown).await {
            return;
        }
    }
}

/// One probe within `timeout`. Err says what failed.
async fn probe_once(kind: &CheckKind, addr: &str, timeout: Duration) -> Result<(), String> {
    let attempt = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        match kind {
            CheckKind::Http { path } => {
                let request = format!(
                    "GET {path} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: portolan-registrar\r\nConnection: close\r\n\r\n"
                );
                stream
                    .write_all(request.as_bytes())
                    .await
                    .map_err(|e| format!("send to {addr}: {e}"))?;
                let mut head = Vec::with_capacity(64);
                let mut buf = [0u8; 256];
                while !head.contains(&b'\n') && head.len() < 1024 {
                    let n = stream
                        .read(&mut buf)
                        .await
                        .map_err(|e| format!("read from {addr}: {e}"))?;
                    if n == 0 {
                        break;
                    }
                    head.extend_from_slice(&buf[..n]);
                }
                http_status_ok(&head).map(|_| ())
            }
            CheckKind::Tcp => {
                let mut byte = [0u8; 1];
                match tokio::time::timeout(TCP_SETTLE.min(timeout / 2), stream.read(&mut byte))
                    .await
                {
                    Err(_) | Ok(Ok(1..)) => Ok(()),
                    Ok(Ok(0)) => Err(format!("{addr} closed the connection at once")),
                    Ok(Err(e)) => Err(format!("read from {addr}: {e}")),
                }
            }
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer from {addr} within {timeout:?}")),
    }
}

/// `HTTP/1.x 2xx|3xx …` is a success. Pure.
fn http_status_ok(head: &[u8]) -> Result<u16, String> {
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (Some(proto), Some(code)) = (parts.next(), parts.next()) else {
        return Err(if head.is_empty() {
            "connection closed without an answer".to_string()
        } else {
            format!("not an HTTP answer: {:?}", line.trim())
        });
    };
    let code: u16 = code
        .parse()
        .ok()
        .filter(|_| proto.starts_with("HTTP/"))
        .ok_or_else(|| format!("not an HTTP answer: {:?}", line.trim()))?;
    if (200..400).contains(&code) {
        Ok(code)
    } else {
        Err(format!("HTTP status {code}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_success_registers_then_fall_and_rise() {
        let mut c = Counter::new(3, 2);
        assert_eq!(c.observe(false), None);
        assert_eq!(c.observe(true), Some(true));
        assert_eq!(c.observe(false), None);
        assert_eq!(c.observe(false), None);
        assert_eq!(c.observe(true), None, "a success resets the failure streak");
        assert_eq!(c.observe(false), None);
        assert_eq!(c.observe(false), None);
        assert_eq!(c.observe(false), Some(false));
        assert_eq!(c.observe(false), None);
        assert_eq!(c.observe(true), None);
        assert_eq!(
            c.observe(false),
            None,
            "a failure resets the success streak"
        );
        assert_eq!(c.observe(true), None);
        assert_eq!(c.observe(true), Some(true));
    }

    #[test]
    fn failing_from_the_first_try_is_reported_down() {
        let mut c = Counter::new(3, 2);
        assert_eq!(c.observe(false), None);
        assert_eq!(c.observe(false), None);
        assert_eq!(c.observe(false), Some(false));
        assert_eq!(c.observe(false), None);
        assert_eq!(
            c.observe(true),
            Some(true),
            "never up: the first success registers"
        );
        let mut c = Counter::new(2, 2);
        assert_eq!(c.observe(false), None);
        assert_eq!(c.observe(true), Some(true));
        let mut c = Counter::new(1, 1);
        assert_eq!(c.observe(false), Some(false));
    }

    #[test]
    fn fall_and_rise_of_one() {
        let mut c = Counter::new(1, 1);
        assert_eq!(c.observe(true), Some(true));
        assert_eq!(c.observe(false), Some(false));
        assert_eq!(c.observe(true), Some(true));
    }

    #[test]
    fn http_status_lines() {
        assert_eq!(http_status_ok(b"HTTP/1.0 200 OK\r\n"), Ok(200));
        assert_eq!(
            http_status_ok(b"HTTP/1.1 302 Found\r\nLocation: /"),
            Ok(302)
        );
        assert!(http_status_ok(b"HTTP/1.1 503 Service Unavailable\r\n").is_err());
        assert!(http_status_ok(b"HTTP/1.1 404 Not Found\r\n").is_err());
        assert!(http_status_ok(b"SSH-2.0-OpenSSH\r\n").is_err());
        assert!(http_status_ok(b"")
            .unwrap_err()
            .contains("without an answer"));
    }

    #[tokio::test]
    async fn probes_a_real_socket() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server = tokio::spawn(async move {
            // First connection: a good HTTP answer; second: closed at once.
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 512];
            let _ = s.read(&mut buf).await;
            s.write_all(b"HTTP/1.0 204 No Content\r\n\r\n")
                .await
                .unwrap();
            drop(s);
            let (s, _) = listener.accept().await.unwrap();
            drop(s);
            listener
        });
        let http = CheckKind::Http { path: "/".into() };
        let t = Duration::from_secs(2);
        assert_eq!(probe_once(&http, &addr, t).await, Ok(()));
        assert!(probe_once(&CheckKind::Tcp, &addr, t).await.is_err());
        let listener = server.await.unwrap();
        // Accepted but never answered: the HTTP probe times out, TCP counts as alive.
        let held = tokio::spawn(async move {
            let mut conns = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                conns.push(s);
            }
        });
        let short = Duration::from_millis(300);
        assert!(probe_once(&http, &addr, short)
            .await
            .unwrap_err()
            .contains("no answer"));
        assert_eq!(probe_once(&CheckKind::Tcp, &addr, short).await, Ok(()));
        held.abort();
    }
}
