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

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::selector::{Check, CheckKind};

/// Until an instance first answers, probe this often (capped by its interval), so a
/// fresh container is registered moments after it starts listening.
const FIRST_PROBE_PERIOD: Duration = Duration::from_millis(250);
/// How long a TCP peer must keep a connection open to count as alive: docker-proxy
/// accepts on behalf of a dead backend and closes at once.
const TCP_SETTLE: Duration = Duration::from_millis(100);

/// Consecutive-result counting, HAProxy style. Pure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Counter {
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
    pub(crate) fn new(fall: u32, rise: u32) -> Counter {
        Counter {
            fall: fall.max(1),
            rise: rise.max(1),
            up: None,
            ever_up: false,
            streak: 0,
            streak_ok: false,
        }
    }

    pub(crate) fn ever_up(&self) -> bool {
        self.ever_up
    }

    /// Records one result; returns the new state when it changes.
    pub(crate) fn observe(&mut self, ok: bool) -> Option<bool> {
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
    pub(crate) instance: String,
    /// Tells a report of a replaced probe from the current one's.
    pub(crate) generation: u64,
    pub(crate) up: bool,
    /// The last failure, for the log.
    pub(crate) error: Option<String>,
}

/// Probes `addr` until cancelled, reporting each change of state.
pub(crate) async fn run(
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
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// One probe within `timeout`. Err says what failed.
pub(crate) async fn probe_once(kind: &CheckKind, addr: &str, timeout: Duration) -> Result<(), String> {
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
pub(crate) fn http_status_ok(head: &[u8]) -> Result<u16, String> {
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
