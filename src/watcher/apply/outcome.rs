//! What one apply did, typed: the executor returns it, `watcher::report` says it.

use std::time::Duration;

use super::command::CommandResult;
use crate::watcher::haproxy::{master, runtime_api};

/// What one apply did. Nothing here has been logged yet: the caller reports it once.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Rendered bytes equal the live file; nothing was touched.
    Unchanged,
    /// Written, and HAProxy's servers changed through the runtime API, with no reload.
    Runtime { applied: runtime_api::Applied },
    /// Written and reloaded (reload confirmed by HAProxy, or `reload_cmd` succeeded).
    /// `fallback`: the runtime API was tried first and failed this way.
    Reloaded {
        fallback: Option<runtime_api::RuntimeError>,
        /// How long the reload took to be confirmed.
        took: Duration,
    },
    /// Written; no reload is configured for this resource.
    Written,
    /// `check_cmd` refused the new file; `dest` is untouched. `diff`: the first lines
    /// of the diff from the live file (empty when the refused bytes were the live ones).
    Rejected { check: CommandResult, diff: String },
    /// Writing or reloading failed; `left` says what `dest` holds now. `fallback` as in
    /// `Reloaded`.
    Failed {
        error: ApplyError,
        fallback: Option<runtime_api::RuntimeError>,
        left: Left,
    },
}

impl Outcome {
    /// A failure before `dest` was touched.
    pub(crate) fn failed(error: ApplyError) -> Outcome {
        Outcome::Failed {
            error,
            fallback: None,
            left: Left::AsItWas,
        }
    }
}

/// What `dest` holds after a failed apply: said with the failure, never assumed.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Left {
    /// Untouched: what it held before the apply.
    AsItWas,
    /// The new file stays, unconfirmed (a reload not confirmed in time: HAProxy may run
    /// it already); it is reloaded again until HAProxy confirms it.
    NewFile,
    /// The file HAProxy last confirmed is back (or never left).
    LastGood,
    /// No file was confirmed yet since the watcher started (and none is kept in
    /// `<dest>.last-good`): the file there before the apply is back.
    Previous,
    /// No file to go back to: `dest` holds the refused file.
    NoLastGood,
    /// The last good file could not be put back (why): `dest` holds the refused file.
    NotRestored(String),
}

/// Why writing or reloading failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApplyError {
    #[error(
        "cannot write a staging file beside {dest} (check the folder's permissions and free space)"
    )]
    Stage {
        dest: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot replace {dest}")]
    Swap {
        dest: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} stayed locked for {waited:?}: another apply (a `portolan render --once`?) holds it"
    )]
    Locked { path: String, waited: Duration },
    /// The lock file exists and this user cannot open it: another user (root running
    /// `render --once`, typically) made it unreadable to the watcher.
    #[error(
        "cannot open the lock file {path} (owner {owner}, mode {mode}) as {me}; another user made it (a `portolan render --once` run as root?): give it to the watcher's user (`chown {me} {path}`) or remove it (`rm {path}`: the next apply makes a new one)"
    )]
    LockDenied {
        path: String,
        owner: String,
        mode: String,
        me: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Master(#[from] master::ReloadError),
    #[error("reload_cmd {cmd:?} failed ({status}): {output}")]
    ReloadCmd {
        cmd: String,
        status: String,
        output: String,
        /// Killed at the timeout: the reload may still have gone through.
        timed_out: bool,
    },
}

impl ApplyError {
    /// No confirmation in time: the reload may still be running or have gone through.
    pub(crate) fn timed_out(&self) -> bool {
        match self {
            ApplyError::Master(e) => matches!(e, master::ReloadError::Timeout(_)),
            ApplyError::ReloadCmd { timed_out, .. } => *timed_out,
            _ => false,
        }
    }

    pub(crate) fn reload_cmd(cmd: &str, r: CommandResult) -> ApplyError {
        ApplyError::ReloadCmd {
            cmd: cmd.to_string(),
            status: r.status,
            output: r.output,
            timed_out: r.timed_out,
        }
    }
}

/// The one line reported for a failed apply, with the runtime API's failure when it
/// was tried first.
pub(crate) fn failure_report(
    error: &ApplyError,
    fallback: Option<&runtime_api::RuntimeError>,
) -> String {
    match fallback {
        Some(f) => format!(
            "{} (after the runtime API failed: {})",
            Chain(error),
            Chain(f)
        ),
        None => Chain(error).to_string(),
    }
}

/// Displays an error with its sources, `outer: inner: …`: the one line logged or
/// recorded for an error where it is handled.
pub(crate) struct Chain<'a>(pub &'a dyn std::error::Error);

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(e) = source {
            write!(f, ": {e}")?;
            source = e.source();
        }
        Ok(())
    }
}
