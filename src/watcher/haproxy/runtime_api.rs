//! The admin-socket client of the runtime fast path: sends the ops `runtime_plan`
//! decided to HAProxy's runtime API (the `stats socket … level admin`). Any refusal is
//! an error, and the caller falls back to a reload of the (already written) file, so
//! correctness never depends on this path.
//!
//! HAProxy 2.6 facts this relies on (management guide, tried on this machine):
//! - A dynamic server starts in maintenance with checks off: `enable health` (and
//!   `enable agent`) then `enable server`.
//! - `del server` needs the server in maintenance with no connection left, idle pooled
//!   ones included. Entering maintenance empties the idle pool, but a request in flight
//!   then hands its connection back to the pool when it finishes (2.6 does not check the
//!   server's state there), and only the purge task would close it: every
//!   `pool-purge-delay` (5 s by default; one process-wide task, so the longest delay of
//!   any server paces it), about half of the pool per round. So after a refused `del` the
//!   server goes through `drain` back to `maint`, which empties the pool again (measured
//!   here: `del` refused for 28 s under keep-alive load without it, 24-45 ms with it).
//!   `drain` lets only clients that persist on the server reach it, for the sub-millisecond
//!   between the two commands; nothing else is routed to it. Sessions are never shut
//!   down (that fails in-flight requests); a server still busy after `DRAIN` falls back
//!   to a reload, whose old worker lets them finish.

use std::path::Path;
use std::time::Duration;

use tokio::time::Instant;

use super::runtime_plan::{AdminState, Command, RuntimeOp};
use super::socket;

/// How long a removed server may take to finish its requests before a reload is used.
const DRAIN: Duration = Duration::from_secs(1);
const DRAIN_POLL: Duration = Duration::from_millis(2);

/// Why a runtime apply failed. The caller falls back to a reload in every case.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RuntimeError {
    #[error(
        "HAProxy admin socket {path} did not answer (the global section needs `stats socket {path} level admin`, e.g. the default template's admin_socket variable)"
    )]
    Unreachable {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("HAProxy refused `{command}`: {answer}")]
    Refused { command: String, answer: String },
    #[error("{server} still had connections {DRAIN:?} after it was put in maintenance")]
    Busy { server: String },
}

/// What `apply` did, for the log.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Applied {
    pub(crate) added: usize,
    pub(crate) removed: usize,
    pub(crate) reweighted: usize,
    /// Taken out of rotation (draining) / put back.
    pub(crate) drained: usize,
    pub(crate) restored: usize,
    /// From the first command sent to the last answer.
    pub(crate) took: Duration,
    /// When the last answer came: HAProxy runs the change from then on.
    pub(crate) done_at: Option<std::time::Instant>,
}

impl std::fmt::Display for Applied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "+{} -{} ~{} servers",
            self.added, self.removed, self.reweighted
        )?;
        if self.drained > 0 {
            write!(f, ", {} out of rotation", self.drained)?;
        }
        if self.restored > 0 {
            write!(f, ", {} back in rotation", self.restored)?;
        }
        Ok(())
    }
}

/// Sends `ops` to the admin socket in order, each as its `RuntimeOp::commands`. Stops at
/// the first refusal: HAProxy then runs a mix of old and new, which the caller's reload
/// replaces.
pub(crate) async fn apply(
    sock: &Path,
    ops: &[RuntimeOp],
    timeout: Duration,
) -> Result<Applied, RuntimeError> {
    let start = Instant::now();
    let mut done = Applied::default();
    for op in ops {
        let commands = op.commands();
        let Some((last, first)) = commands.split_last() else {
            continue;
        };
        for c in first {
            expect(sock, c, timeout).await?;
        }
        match op {
            RuntimeOp::Remove { backend, server } => {
                remove(sock, op, last, &format!("{backend}/{server}"), timeout).await?
            }
            _ => expect(sock, last, timeout).await?,
        }
        match op {
            RuntimeOp::Add { .. } => done.added += 1,
            RuntimeOp::Weight { .. } => done.reweighted += 1,
            RuntimeOp::State {
                state: AdminState::Ready,
                ..
            } => done.restored += 1,
            RuntimeOp::State { .. } => done.drained += 1,
            RuntimeOp::Remove { .. } => done.removed += 1,
        }
    }
    done.took = start.elapsed();
    done.done_at = Some(std::time::Instant::now());
    Ok(done)
}

/// `del server` (`del`), retried for up to `DRAIN` while the server still has pooled
/// connections, the pool emptied again (`op.repool()`) between tries.
async fn remove(
    sock: &Path,
    op: &RuntimeOp,
    del: &Command,
    id: &str,
    timeout: Duration,
) -> Result<(), RuntimeError> {
    let deadline = Instant::now() + DRAIN;
    loop {
        let answer = send(sock, &del.text, timeout).await?;
        if answer == del.expect {
            return Ok(());
        }
        if !answer.contains("still has connections") {
            return Err(RuntimeError::Refused {
                command: del.text.clone(),
                answer,
            });
        }
        if Instant::now() >= deadline {
            return Err(RuntimeError::Busy { server: id.into() });
        }
        tokio::time::sleep(DRAIN_POLL).await;
        // Connections handed back to the pool since: empty it again.
        for c in op.repool() {
            expect(sock, &c, timeout).await?;
        }
    }
}

/// Sends one command; its trimmed answer must be the one it expects.
async fn expect(sock: &Path, c: &Command, timeout: Duration) -> Result<(), RuntimeError> {
    let answer = send(sock, &c.text, timeout).await?;
    if answer == c.expect {
        Ok(())
    } else {
        Err(RuntimeError::Refused {
            command: c.text.clone(),
            answer,
        })
    }
}

async fn send(sock: &Path, cmd: &str, timeout: Duration) -> Result<String, RuntimeError> {
    match socket::exchange(sock, cmd, timeout).await {
        Ok(answer) => Ok(answer.trim().to_string()),
        Err(source) => Err(RuntimeError::Unreachable {
            path: sock.display().to_string(),
            source,
        }),
    }
}
