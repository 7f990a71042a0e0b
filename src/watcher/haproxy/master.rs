//! Confirmed reloads through the HAProxy master CLI (`haproxy -W -S <socket>`).
//!
//! HAProxy 2.6 silently drops a reload that arrives while the previous one is still
//! running, and its master CLI refuses connections meanwhile (both measured on this
//! project's machines). So a reload here is: read the master's reload counter with
//! `show proc`, send `reload`, then poll `show proc` until the counter goes up. The
//! watcher's loop awaits that before it starts the next apply, which makes "one reload
//! in flight" a property of the control flow rather than of a lock.
//!
//! The `[failed: N]` figure next to the counter is the number of failed loads since the
//! last good one, so a non-zero value right after our reload means HAProxy refused the
//! new file (the old workers keep serving).
//!
//! A master killed mid-reload looks, from the socket, like one re-executing itself: the
//! socket refuses connections (its file stays). The master keeps its pid across a
//! reload (it re-executes in place), so a refusing socket whose master process is gone
//! (or a zombie: killed, not yet reaped) is a master that vanished: the reload fails at
//! once (`MasterGone`) instead of at the timeout. The pid is only trusted when `/proc`
//! showed a `haproxy` process under it when the master answered — a watcher in another
//! pid namespace than HAProxy's waits for the timeout as before.

use std::path::Path;
use std::time::Duration;

use tokio::time::Instant;

use super::socket::exchange;

/// How often the master is polled while a reload runs. A reload of a small config
/// takes tens of milliseconds; polling faster only adds refused connections.
const POLL: Duration = Duration::from_millis(10);

/// The master process line of `show proc`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MasterStatus {
    pub pid: u32,
    /// Reloads since the master started (successful or not).
    pub reloads: u64,
    /// Failed loads since the last successful one.
    pub failed: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The master socket did not answer: HAProxy is not running, or not in master-worker
    /// mode with `-S` pointing here. Transient: retried with backoff.
    #[error(
        "HAProxy master socket {path} did not answer (is HAProxy running as `haproxy -W -S {path} -f …`?)"
    )]
    Unreachable {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// HAProxy tried the new file and refused it; the old workers keep serving.
    #[error("HAProxy refused the new configuration on reload (its log says why; failed loads: {failed})")]
    LoadFailed { failed: u64 },
    #[error("HAProxy did not confirm the reload within {0:?} (reload counter did not go up)")]
    Timeout(Duration),
    /// The master process exited (killed, crashed) during the reload or since it last
    /// answered: nothing will confirm it. Not a timeout: the new file is not kept as
    /// what HAProxy may run.
    #[error("HAProxy's master (pid {pid}) exited and its socket {path} refuses connections: the reload cannot be confirmed (HAProxy must be started again; it starts on the file at dest)")]
    MasterGone { pid: u32, path: String },
    #[error("unexpected `show proc` answer from {path}: {answer:?}")]
    Protocol { path: String, answer: String },
}

/// Parses the answer to `show proc` (HAProxy 2.x):
///
/// ```text
/// #<PID>          <type>          <reloads>       <uptime>        <version>
/// 15510           master          1 [failed: 0]   0d00h00m02s     2.6.12
/// # workers
/// 15562           worker          0               0d00h00m01s     2.6.12
/// ```
fn parse_show_proc(answer: &str) -> Option<MasterStatus> {
    let line = answer
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("master"))?;
    let mut words = line.split_whitespace();
    let pid = words.next()?.parse().ok()?;
    words.next();
    let reloads = words.next()?.parse().ok()?;
    let failed = line
        .split_once("[failed:")
        .and_then(|(_, rest)| rest.split(']').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    Some(MasterStatus {
        pid,
        reloads,
        failed,
    })
}

/// Sends one command to the master CLI.
async fn command(path: &Path, cmd: &str, timeout: Duration) -> Result<String, ReloadError> {
    exchange(path, cmd, timeout)
        .await
        .map_err(|source| ReloadError::Unreachable {
            path: path.display().to_string(),
            source,
        })
}

/// `show proc` on the master socket.
pub async fn show_proc(path: &Path, timeout: Duration) -> Result<MasterStatus, ReloadError> {
    let answer = command(path, "show proc", timeout).await?;
    parse_show_proc(&answer).ok_or_else(|| ReloadError::Protocol {
        path: path.display().to_string(),
        answer: answer.chars().take(200).collect(),
    })
}

/// Whether process `pid` is gone, or a zombie (killed, not yet reaped by its parent).
fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // `pid (comm) state …`: comm may hold spaces and parentheses, state follows the last `)`.
        Ok(stat) => matches!(
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next()),
            Some("Z" | "X")
        ),
    }
}

/// Whether `/proc` shows a HAProxy process under `pid` (its command name starts with
/// `haproxy`): only then does its disappearance say the master exited.
pub(crate) fn watchable(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.starts_with("haproxy"))
        && !exited(pid)
}

/// Reloads HAProxy and waits (up to `timeout`) until the master confirms it.
/// Returns the master status after the reload. `known`: the master's pid as of its last
/// answer (when `watchable`), so a master gone before this reload fails it at once too.
///
/// `timeout` bounds the whole attempt: each exchange with the master only gets the time
/// left before the deadline, so a hung socket cannot stretch it (the last poll may end
/// up to `POLL` late).
pub(crate) async fn reload(
    path: &Path,
    timeout: Duration,
    known: Option<u32>,
) -> Result<MasterStatus, ReloadError> {
    let deadline = Instant::now() + timeout;
    let left = || deadline.saturating_duration_since(Instant::now());
    // No socket file at all: HAProxy is not running. Fail now rather than at the timeout.
    if let Err(source) = tokio::fs::metadata(path).await {
        return Err(ReloadError::Unreachable {
            path: path.display().to_string(),
            source,
        });
    }
    let gone = |pid: u32| ReloadError::MasterGone {
        pid,
        path: path.display().to_string(),
    };
    // A reload started by someone else may still be running: wait for the CLI.
    let before = loop {
        match show_proc(path, left()).await {
            Ok(s) => break s,
            Err(e) if Instant::now() + POLL >= deadline => return Err(e),
            Err(_) => match known {
                Some(pid) if exited(pid) => return Err(gone(pid)),
                _ => tokio::time::sleep(POLL).await,
            },
        }
    };
    // Seen in /proc now: its disappearance later means it exited.
    let watched = watchable(before.pid).then_some(before.pid);
    match exchange(path, "reload", left()).await {
        Ok(_) => {}
        // Sent but not closed in time: the master may be reloading already.
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
            return Err(ReloadError::Timeout(timeout))
        }
        Err(source) => {
            return Err(ReloadError::Unreachable {
                path: path.display().to_string(),
                source,
            })
        }
    }
    loop {
        if Instant::now() >= deadline {
            return Err(ReloadError::Timeout(timeout));
        }
        tokio::time::sleep(POLL).await;
        // Refused connections are expected while the master re-executes itself —
        // unless the master is gone.
        let Ok(now) = show_proc(path, left()).await else {
            match watched {
                Some(pid) if exited(pid) => return Err(gone(pid)),
                _ => continue,
            }
        };
        if now.reloads > before.reloads {
            if now.failed > 0 {
                return Err(ReloadError::LoadFailed { failed: now.failed });
            }
            return Ok(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn parses_haproxy_2_6_show_proc() {
        let answer =
            "#<PID>          <type>          <reloads>       <uptime>        <version>      \n\
15510           master          2 [failed: 1]   0d00h00m05s     2.6.12-1+deb12u4\n\
# workers\n\
15562           worker          1               0d00h00m04s     2.6.12-1+deb12u4\n\
# programs\n\n";
        assert_eq!(
            parse_show_proc(answer),
            Some(MasterStatus {
                pid: 15510,
                reloads: 2,
                failed: 1
            })
        );
    }

    #[test]
    fn tolerates_a_missing_failed_count_and_rejects_garbage() {
        let s = parse_show_proc("1 master 7 0d00h00m05s 2.4\n").unwrap();
        assert_eq!((s.reloads, s.failed), (7, 0));
        assert_eq!(parse_show_proc("Unknown command.\n"), None);
        assert_eq!(parse_show_proc(""), None);
    }

    #[test]
    fn a_process_is_gone_when_it_exited_or_is_a_zombie() {
        assert!(!exited(std::process::id()));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        // Exited, not reaped yet: a zombie.
        while !exited(pid) {
            std::thread::sleep(Duration::from_millis(5));
        }
        child.wait().unwrap();
        assert!(exited(pid), "reaped");
    }

    /// A master that answers `show proc` with the pid of a process that then exits,
    /// and refuses connections from then on (its socket file stays).
    #[tokio::test]
    async fn a_master_gone_mid_reload_fails_at_once_not_at_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.sock");
        // A process named haproxy, as HAProxy's master is.
        let fake = dir.path().join("haproxy");
        std::fs::copy("/bin/sleep", &fake).unwrap();
        let mut master = std::process::Command::new(&fake).arg("30").spawn().unwrap();
        let pid = master.id();
        // Until its exec completes, the child still bears the test binary's name.
        let named = Instant::now() + Duration::from_secs(5);
        while !watchable(pid) && Instant::now() < named {
            std::thread::sleep(Duration::from_millis(2));
        }
        assert!(watchable(pid));
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let answer = format!("{pid} master 3 [failed: 0] 0d00h00m05s 2.6\n");
        let server = tokio::spawn(async move {
            // `show proc`, then `reload`; then the master dies.
            for reply in [answer.as_str(), ""] {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 64];
                let _ = s.read(&mut buf).await;
                s.write_all(reply.as_bytes()).await.unwrap();
            }
        });
        let killer = tokio::spawn(async move {
            server.await.unwrap(); // the listener is dropped: connections are refused
            master.kill().unwrap();
            master.wait().unwrap();
        });
        let timeout = Duration::from_secs(10);
        let start = Instant::now();
        let err = reload(&path, timeout, None).await.unwrap_err();
        killer.await.unwrap();
        assert!(
            matches!(err, ReloadError::MasterGone { pid: p, .. } if p == pid),
            "{err}"
        );
        assert!(err.to_string().contains("exited"), "{err}");
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn only_a_haproxy_process_is_watched() {
        assert!(
            !watchable(std::process::id()),
            "the test binary is not HAProxy"
        );
        assert!(!watchable(u32::MAX), "no such process");
    }

    #[tokio::test]
    async fn a_master_gone_since_its_last_answer_fails_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.sock");
        // A socket file nobody listens on, as a killed master leaves it.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        let start = Instant::now();
        let err = reload(&path, Duration::from_secs(10), Some(pid))
            .await
            .unwrap_err();
        assert!(matches!(err, ReloadError::MasterGone { .. }), "{err}");
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn a_hung_master_costs_one_timeout_in_all() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        // Answers the first `show proc`, then accepts and never answers.
        tokio::spawn(async move {
            let mut held = Vec::new();
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 64];
            let _ = s.read(&mut buf).await;
            s.write_all(b"1 master 3 [failed: 0] 0d00h00m05s 2.6\n")
                .await
                .unwrap();
            drop(s);
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        });
        let timeout = Duration::from_millis(500);
        let start = Instant::now();
        let err = reload(&path, timeout, None).await.unwrap_err();
        assert!(matches!(err, ReloadError::Timeout(_)), "{err}");
        assert!(
            start.elapsed() < timeout + POLL * 10,
            "{:?}",
            start.elapsed()
        );
    }
}
