//! One `[[template]]` resource: its compiled template, the bytes live at `dest`, and
//! the apply pipeline — stage beside `dest`, check, fsync, rename, fsync the folder,
//! then either the runtime API (membership changes only, see `haproxy::runtime_plan`)
//! or a reload — with a typed outcome, which the caller reports.
//!
//! Invariants:
//! - `dest` only ever changes by `rename(2)` of a fully written, fsynced file, so a
//!   crash at any point leaves either the old or the new file, never a partial one.
//!   Staged files are named `.<dest name>.portolan.<pid>.<n>.tmp`; leftovers of a killed
//!   run are removed by `clean_stale_staging` at start.
//! - HAProxy is never reloaded onto a file that has not passed `check_cmd`: every
//!   reload path checks the file it reloads unless those exact bytes passed before
//!   (`checked`). A failed check leaves `dest` byte-identical.
//! - A refused reload puts the last good bytes back — the file HAProxy last confirmed
//!   (`confirmed`), not merely the one before, which may be a file whose reload timed
//!   out — so the file on disk is always what HAProxy runs (or last accepted).
//!
//! **Runtime first.** When HAProxy runs `live` (no reload pending) and the change is
//! one `runtime_plan` can express, the commands go to the admin socket *before* any
//! check, and the file follows (staged, renamed) without one: the change is live
//! about a millisecond after the render instead of after a whole-file `haproxy -c`
//! (tens of milliseconds at a few servers, hundreds at 10,000). Why that file needs no
//! check on the latency path: it differs from `checked` — a file that passed — only by
//! `server` lines inside backends both have (the plan refuses anything else, so a run of
//! runtime changes, each only server lines, sums up to only server lines), and each
//! added or changed line was just accepted by HAProxy's own server parser (`add
//! server` with the file's effective `default-server` arguments; a removed line or a
//! `disabled` toggle cannot make a config invalid). What `haproxy -c` would still
//! judge differently is outside the line — a certificate file deleted since, a limit
//! summed over servers — so the file is checked anyway, in the background
//! (`pending_check`, off the latency path, only the newest bytes), before any
//! reload, and at start. Should that check ever fail, HAProxy and a checked file
//! disagree: `repair` says so loudly, puts the last checked file back and reloads onto
//! it, and every later change is checked before it is applied until a file passes.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};
use tokio::io::AsyncWriteExt;

use super::diff;
use super::haproxy::runtime_plan::{self, RuntimePlan};
use super::haproxy::{master, runtime_api};
use super::render::{self, Template, TemplateError};
use super::store::StoreSnapshot;
use crate::config::TemplateResource;

/// Lines of diff logged with a rejected check.
const DIFF_LINES_LOGGED: usize = 40;

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
    /// of the diff from the live file.
    Rejected { check: CommandResult, diff: String },
    /// Writing or reloading failed; `dest` holds the last good bytes again (except after
    /// a reload that timed out, see `apply`). `fallback` as in `Reloaded`.
    Failed {
        error: ApplyError,
        fallback: Option<runtime_api::RuntimeError>,
    },
}

impl Outcome {
    /// The `result` label of the `applies` metric.
    pub(crate) fn label(&self) -> &'static str {
        match self {
            Outcome::Unchanged => "unchanged",
            Outcome::Runtime { .. } => "runtime",
            Outcome::Reloaded { .. } => "reloaded",
            Outcome::Written => "written",
            Outcome::Rejected { .. } => "rejected",
            Outcome::Failed { .. } => "failed",
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
    fn timed_out(&self) -> bool {
        match self {
            ApplyError::Master(e) => matches!(e, master::ReloadError::Timeout(_)),
            ApplyError::ReloadCmd { timed_out, .. } => *timed_out,
            _ => false,
        }
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

/// Output of a shell command.
#[derive(Debug)]
pub(crate) struct CommandResult {
    pub(crate) success: bool,
    pub(crate) status: String,
    /// stdout then stderr, trimmed.
    pub(crate) output: String,
    /// Killed at the timeout: it may have done part of its work.
    pub(crate) timed_out: bool,
}

impl CommandResult {
    /// The command could not be run at all (its input could not be written).
    fn not_run(output: String) -> CommandResult {
        CommandResult {
            success: false,
            status: "not run".into(),
            output,
            timed_out: false,
        }
    }
}

pub(crate) struct Resource {
    pub(crate) cfg: TemplateResource,
    /// Last template that compiled. Kept when an edit breaks the file.
    template: Option<Template>,
    /// Text of the template file as last read, to skip recompiling an unchanged file.
    source_text: Option<String>,
    /// Set while the template file on disk does not compile.
    pub(crate) template_error: Option<TemplateError>,
    /// What `dest` holds, as far as this process knows (read at start, then written).
    /// Shared with `confirmed` and `checked`, which are mostly the same bytes.
    live: Option<Arc<[u8]>>,
    /// The last good file: what HAProxy last confirmed running (reload confirmed, or
    /// every runtime command answered). None until the first confirmation. A refused
    /// reload puts this back, even when `live` is a file whose reload timed out.
    confirmed: Option<Arc<[u8]>>,
    /// The last bytes that passed `check_cmd` (None until one did).
    checked: Option<Arc<[u8]>>,
    /// Send runtime-API changes before checking the file (see the module docs). Off
    /// after a deferred check failed, until a file passes again; off for one-shot runs.
    pub(crate) runtime_first: bool,
    /// Reload on the next apply even if the bytes are unchanged: a previous run may
    /// have died between rename and reload, so HAProxy could be running an older file.
    reload_pending: bool,
    /// Reloads start at least this long after the previous one (`min_reload_interval_ms`):
    /// a flapping input costs bounded reloads, and old workers pile up no faster.
    pub(crate) min_reload_interval: Duration,
    last_reload: Option<tokio::time::Instant>,
    /// Tera values of the instances last rendered, reused by the next render.
    values: render::InstanceValues,
}

static STAGING_COUNTER: AtomicU64 = AtomicU64::new(0);

impl Resource {
    pub(crate) fn new(cfg: TemplateResource) -> Resource {
        Resource {
            cfg,
            template: None,
            source_text: None,
            template_error: None,
            live: None,
            confirmed: None,
            checked: None,
            runtime_first: true,
            reload_pending: true,
            min_reload_interval: Duration::ZERO,
            last_reload: None,
            values: render::InstanceValues::default(),
        }
    }

    /// For one-shot renders: HAProxy is taken to run the file on disk, so identical
    /// bytes cause no reload.
    pub(crate) fn assume_running(&mut self) {
        self.reload_pending = false;
        self.confirmed = self.live.clone();
        // Nothing checks in the background after a one-shot run.
        self.runtime_first = false;
    }

    pub(crate) fn name(&self) -> String {
        self.cfg.src.display().to_string()
    }

    /// Reads and compiles the template file. Returns true when the compiled template
    /// changed. On error the last good template stays in use and the error is kept in
    /// `template_error` (and returned).
    pub(crate) async fn load_template(&mut self) -> Result<bool, TemplateError> {
        let name = self.name();
        let text = match tokio::fs::read_to_string(&self.cfg.src).await {
            Ok(t) => t,
            Err(e) => {
                let err = TemplateError {
                    name: name.clone(),
                    message: format!("cannot read the template file: {e}"),
                };
                self.template_error = Some(err.clone());
                return Err(err);
            }
        };
        if self.source_text.as_deref() == Some(text.as_str()) && self.template_error.is_none() {
            return Ok(false);
        }
        self.source_text = Some(text.clone());
        match Template::compile(&name, &text) {
            Ok(t) => {
                self.template = Some(t);
                self.template_error = None;
                Ok(true)
            }
            Err(e) => {
                self.template_error = Some(e.clone());
                Err(e)
            }
        }
    }

    /// Reads what `dest` holds now (missing file = nothing live).
    pub(crate) async fn read_live(&mut self) -> std::io::Result<()> {
        self.live = match tokio::fs::read(&self.cfg.dest).await {
            Ok(b) => Some(b.into()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        Ok(())
    }

    pub(crate) fn live(&self) -> Option<&[u8]> {
        self.live.as_deref()
    }

    /// Renders with the last good template; None before any template compiled.
    pub(crate) fn render(
        &mut self,
        snapshot: &StoreSnapshot,
    ) -> Option<Result<String, TemplateError>> {
        let t = self.template.as_ref()?;
        Some(t.render(&self.values.context(snapshot, &self.cfg.vars)))
    }

    /// The diff of the live file against `rendered`, for logs and dry runs.
    pub(crate) fn diff(&self, rendered: &str) -> String {
        let live = self
            .live
            .as_deref()
            .map(String::from_utf8_lossy)
            .unwrap_or_default();
        let dest = self.cfg.dest.display().to_string();
        diff::unified(&live, rendered, &dest, &format!("{dest} (new)"))
    }

    /// Makes `dest` hold `rendered` and HAProxy run it, or says why not.
    ///
    /// Holds the lock beside `dest` throughout, so a `render --once` and the running
    /// watcher never interleave; a `dest` replaced by the other while unlocked is taken
    /// as the live file.
    pub(crate) async fn apply(&mut self, rendered: &str, timeout: Duration) -> Outcome {
        let _lock = match lock(&self.cfg.dest, timeout).await {
            Ok(l) => l,
            Err(error) => {
                return Outcome::Failed {
                    error,
                    fallback: None,
                }
            }
        };
        if let Ok(disk) = tokio::fs::read(&self.cfg.dest).await {
            if self.live.as_deref() != Some(disk.as_slice()) {
                self.live = Some(disk.into());
                // Not derived from a checked file by changes HAProxy took: the next
                // change is checked before it is applied.
                self.checked = None;
            }
        }
        let outcome = self.apply_inner(rendered, timeout).await;
        if matches!(
            outcome,
            Outcome::Runtime { .. } | Outcome::Reloaded { .. } | Outcome::Written
        ) {
            // `live` holds `rendered` now: share its bytes.
            self.confirmed = self.live.clone();
        }
        outcome
    }

    /// Whether `bytes` may be reloaded without running `check_cmd` on them again.
    fn is_checked(&self, bytes: &[u8]) -> bool {
        self.cfg.check_cmd.is_none() || self.checked.as_deref() == Some(bytes)
    }

    /// The check `dest` still needs: it holds bytes applied runtime-first, which no
    /// check has passed yet. The caller runs it off the latency path and hands the
    /// result to `deferred_checked`.
    pub(crate) fn pending_check(&self, timeout: Duration) -> Option<DeferredCheck> {
        let cmd = self.cfg.check_cmd.clone()?;
        let live = self.live.clone()?;
        if self.is_checked(&live) {
            return None;
        }
        Some(DeferredCheck {
            cmd,
            dest: self.cfg.dest.clone(),
            bytes: live,
            timeout,
        })
    }

    /// Takes the verdict of a deferred check. A pass makes those bytes checked (and
    /// turns runtime first back on). A failure of the bytes still at `dest` means HAProxy
    /// runs what no check accepts: `repair` follows, and its outcome is returned for
    /// the caller to report. A failure of bytes replaced since changes nothing: the
    /// newer ones get a check of their own.
    pub(crate) async fn deferred_checked(
        &mut self,
        bytes: Arc<[u8]>,
        result: &CommandResult,
        timeout: Duration,
    ) -> Option<Outcome> {
        if result.success {
            self.checked = Some(bytes);
            self.runtime_first = true;
            return None;
        }
        if self.live.as_deref() != Some(&*bytes) {
            return None;
        }
        Some(self.repair(timeout).await)
    }

    /// HAProxy runs a file that failed its check (applied runtime first): put the last
    /// checked file back, reload onto it, and check every change before it is applied
    /// until one passes.
    async fn repair(&mut self, timeout: Duration) -> Outcome {
        self.runtime_first = false;
        let _lock = match lock(&self.cfg.dest, timeout).await {
            Ok(l) => l,
            Err(error) => {
                self.reload_pending = true;
                return Outcome::Failed {
                    error,
                    fallback: None,
                };
            }
        };
        let Some(good) = self.checked.clone() else {
            // Runtime first needs a checked file to start from: cannot happen.
            self.reload_pending = true;
            return Outcome::Unchanged;
        };
        if let Err(source) = self.restore(&good).await {
            self.reload_pending = true;
            return Outcome::Failed {
                error: ApplyError::Swap {
                    dest: self.cfg.dest.display().to_string(),
                    source,
                },
                fallback: None,
            };
        }
        self.live = Some(good.clone());
        let started = std::time::Instant::now();
        match self.reload(timeout).await {
            Ok(()) => {
                self.reload_pending = false;
                self.confirmed = Some(good);
                Outcome::Reloaded {
                    fallback: None,
                    took: started.elapsed(),
                }
            }
            Err(error) => {
                self.reload_pending = true;
                Outcome::Failed {
                    error,
                    fallback: None,
                }
            }
        }
    }

    async fn apply_inner(&mut self, rendered: &str, timeout: Duration) -> Outcome {
        let changed = self.live.as_deref() != Some(rendered.as_bytes());
        let must_reload = self.reload_pending && self.has_reload();
        if !changed && !must_reload {
            self.reload_pending = false;
            return Outcome::Unchanged;
        }
        // How HAProxy, running the live file, can be made to run this one.
        let plan = match (&self.cfg.haproxy_admin_socket, &self.live) {
            (Some(_), Some(live)) if changed && !self.reload_pending && self.has_reload() => {
                Some(runtime_plan::plan(&String::from_utf8_lossy(live), rendered))
            }
            _ => None,
        };
        let mut fallback = None;
        let mut sent = false;
        if let (Some(RuntimePlan::Runtime(ops)), Some(sock)) =
            (&plan, &self.cfg.haproxy_admin_socket)
        {
            // Runtime first needs a checked file to start from (see the module docs):
            // `live` is that file, or one derived from it by server lines HAProxy took.
            let from_checked = self.cfg.check_cmd.is_none() || self.checked.is_some();
            if self.runtime_first && from_checked {
                sent = true;
                match runtime_api::apply(sock, ops, timeout).await {
                    Ok(applied) => return self.follow(rendered, applied, timeout).await,
                    Err(e) => {
                        // Part of it may run: only a reload makes HAProxy whole again.
                        self.reload_pending = true;
                        fallback = Some(e);
                    }
                }
            }
        }
        if changed {
            let staged = match self.stage(rendered.as_bytes()).await {
                Ok(p) => p,
                Err(source) => {
                    return Outcome::Failed {
                        error: ApplyError::Stage {
                            dest: self.cfg.dest.display().to_string(),
                            source,
                        },
                        fallback,
                    };
                }
            };
            if let Some(cmd) = &self.cfg.check_cmd {
                let result = run_check(cmd, &staged, timeout, 0).await;
                if !result.success {
                    let _ = tokio::fs::remove_file(&staged).await;
                    if sent {
                        self.undo_runtime(rendered, timeout).await;
                    }
                    return Outcome::Rejected {
                        check: result,
                        diff: diff::head(&self.diff(rendered), DIFF_LINES_LOGGED),
                    };
                }
            }
            if let Err(source) = swap(&staged, &self.cfg.dest).await {
                let _ = tokio::fs::remove_file(&staged).await;
                return Outcome::Failed {
                    error: ApplyError::Swap {
                        dest: self.cfg.dest.display().to_string(),
                        source,
                    },
                    fallback,
                };
            }
        } else if let Some(live) = self.live.clone().filter(|l| !self.is_checked(l)) {
            // A reload of the bytes already at `dest` (a previous run's, or ones applied
            // runtime first): they are checked like any other file first.
            if let Some(cmd) = &self.cfg.check_cmd {
                let result = check_bytes(cmd, &self.cfg.dest, &live, timeout, false).await;
                if !result.success {
                    return Outcome::Rejected {
                        check: result,
                        diff: String::new(),
                    };
                }
            }
        }
        let previous = self.live.replace(Arc::from(rendered.as_bytes()));
        if self.cfg.check_cmd.is_some() {
            self.checked = self.live.clone();
            self.runtime_first = true;
        }
        if !self.has_reload() {
            self.reload_pending = false;
            return Outcome::Written;
        }
        if fallback.is_none() {
            match (plan, &self.cfg.haproxy_admin_socket) {
                (Some(RuntimePlan::Runtime(ops)), Some(sock)) => {
                    // Checked first (runtime first is off): the commands follow the file.
                    match runtime_api::apply(sock, &ops, timeout).await {
                        Ok(applied) => {
                            self.reload_pending = false;
                            return Outcome::Runtime { applied };
                        }
                        Err(e) => {
                            // HAProxy may run part of the change: only the reload of
                            // the new file (in place already) makes it whole again.
                            self.reload_pending = true;
                            fallback = Some(e);
                        }
                    }
                }
                (Some(RuntimePlan::Reload(why)), _) => {
                    tracing::info!(
                        dest = %self.cfg.dest.display(),
                        "reloading, the runtime API cannot apply this change: {why}"
                    );
                }
                _ => {}
            }
        }
        let reload_started = std::time::Instant::now();
        match self.reload(timeout).await {
            Ok(()) => {
                self.reload_pending = false;
                Outcome::Reloaded {
                    fallback,
                    took: reload_started.elapsed(),
                }
            }
            Err(error) if error.timed_out() => {
                // HAProxy may be merely slow and run the new file already (or soon):
                // putting the old file back could leave it running a file that is no
                // longer on disk. Keep the new one; the next pass (a transient failure
                // schedules one) reloads again until HAProxy confirms it.
                self.reload_pending = true;
                Outcome::Failed { error, fallback }
            }
            Err(error) => {
                // Put the last good file back so the file matches what HAProxy runs:
                // the one it last confirmed, which is not `previous` when that was a
                // file whose reload timed out and was never confirmed.
                let good = self.confirmed.clone().or(previous);
                if let Some(good) = good.filter(|g| self.live.as_ref() != Some(g)) {
                    match self.restore(&good).await {
                        Ok(()) => self.live = Some(good),
                        Err(e) => tracing::error!(
                            dest = %self.cfg.dest.display(),
                            "cannot restore the last good file after a failed reload: {e}"
                        ),
                    }
                }
                Outcome::Failed { error, fallback }
            }
        }
    }

    /// After the runtime API took a change: makes `dest` say what HAProxy runs now,
    /// with no check on the way (see the module docs: it is checked in the background).
    /// Should the file not make it to `dest`, the change is taken back out of HAProxy.
    async fn follow(
        &mut self,
        rendered: &str,
        applied: runtime_api::Applied,
        timeout: Duration,
    ) -> Outcome {
        let written = match self.stage(rendered.as_bytes()).await {
            Ok(staged) => match swap(&staged, &self.cfg.dest).await {
                Ok(()) => Ok(()),
                Err(source) => {
                    let _ = tokio::fs::remove_file(&staged).await;
                    Err(ApplyError::Swap {
                        dest: self.cfg.dest.display().to_string(),
                        source,
                    })
                }
            },
            Err(source) => Err(ApplyError::Stage {
                dest: self.cfg.dest.display().to_string(),
                source,
            }),
        };
        match written {
            Ok(()) => {
                self.live = Some(Arc::from(rendered.as_bytes()));
                self.reload_pending = false;
                Outcome::Runtime { applied }
            }
            Err(error) => {
                self.undo_runtime(rendered, timeout).await;
                Outcome::Failed {
                    error,
                    fallback: None,
                }
            }
        }
    }

    /// Takes back runtime commands sent for `rendered`, which then did not make it to
    /// `dest`, so HAProxy runs the live file again; a reload of it if that fails.
    async fn undo_runtime(&mut self, rendered: &str, timeout: Duration) {
        let (Some(sock), Some(live)) = (&self.cfg.haproxy_admin_socket, &self.live) else {
            return;
        };
        let back = runtime_plan::plan(rendered, &String::from_utf8_lossy(live));
        let undone = match back {
            RuntimePlan::Runtime(ops) => runtime_api::apply(sock, &ops, timeout).await.is_ok(),
            RuntimePlan::Reload(_) => false,
        };
        if !undone {
            self.reload_pending = true;
        }
    }

    fn has_reload(&self) -> bool {
        self.cfg.haproxy_master_socket.is_some() || self.cfg.reload_cmd.is_some()
    }

    /// Reload through the master socket, or `reload_cmd`, no sooner than
    /// `min_reload_interval` after the previous one.
    async fn reload(&mut self, timeout: Duration) -> Result<(), ApplyError> {
        if let Some(last) = self.last_reload {
            tokio::time::sleep_until(last + self.min_reload_interval).await;
        }
        let result = self.reload_now(timeout).await;
        self.last_reload = Some(tokio::time::Instant::now());
        result
    }

    async fn reload_now(&self, timeout: Duration) -> Result<(), ApplyError> {
        if let Some(sock) = &self.cfg.haproxy_master_socket {
            master::reload(sock, timeout).await?;
            return Ok(());
        }
        if let Some(cmd) = &self.cfg.reload_cmd {
            let r = run_shell(cmd, timeout).await;
            if !r.success {
                return Err(ApplyError::ReloadCmd {
                    cmd: cmd.clone(),
                    status: r.status,
                    output: r.output,
                    timed_out: r.timed_out,
                });
            }
        }
        Ok(())
    }

    async fn restore(&self, bytes: &[u8]) -> std::io::Result<()> {
        let staged = self.stage(bytes).await?;
        swap(&staged, &self.cfg.dest).await
    }

    /// Writes `bytes` to a fresh staging file beside `dest` and fsyncs it.
    async fn stage(&self, bytes: &[u8]) -> std::io::Result<PathBuf> {
        let mode = match &self.cfg.mode {
            Some(m) => u32::from_str_radix(m, 8).unwrap_or(0o644),
            None => match tokio::fs::metadata(&self.cfg.dest).await {
                Ok(md) => md.permissions().mode() & 0o7777,
                Err(_) => 0o644,
            },
        };
        stage(&self.cfg.dest, bytes, mode).await
    }

    /// `render --once --dry-run`: the check runs on a file in the system temp folder,
    /// so nothing is written beside `dest`.
    pub(crate) async fn dry_check(
        &self,
        rendered: &str,
        timeout: Duration,
    ) -> Option<CommandResult> {
        let cmd = self.cfg.check_cmd.as_ref()?;
        let dir = std::env::temp_dir();
        let name = self
            .cfg
            .dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "dest".into());
        let path = dir.join(format!(
            "portolan-dry-run.{}.{}.{name}",
            std::process::id(),
            STAGING_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        if let Err(e) = tokio::fs::write(&path, rendered).await {
            return Some(CommandResult::not_run(format!(
                "cannot write {}: {e}",
                path.display()
            )));
        }
        let r = run_check(cmd, &path, timeout, 0).await;
        let _ = tokio::fs::remove_file(&path).await;
        Some(r)
    }
}

/// `.<dest name>.portolan.lock` beside `dest`.
pub(crate) fn lock_path(dest: &Path) -> PathBuf {
    let dir = dest.parent().unwrap_or(Path::new("."));
    dir.join(format!("{}lock", staging_prefix(dest)))
}

const LOCK_POLL: Duration = Duration::from_millis(10);

/// Takes the exclusive flock(2) beside `dest`, waiting up to `timeout`. Released on drop.
async fn lock(dest: &Path, timeout: Duration) -> Result<Flock<std::fs::File>, ApplyError> {
    let path = lock_path(dest);
    let started = tokio::time::Instant::now();
    loop {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|source| ApplyError::Stage {
                dest: dest.display().to_string(),
                source,
            })?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => return Ok(l),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) if started.elapsed() < timeout => {
                tokio::time::sleep(LOCK_POLL).await;
            }
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                return Err(ApplyError::Locked {
                    path: path.display().to_string(),
                    waited: started.elapsed(),
                })
            }
            Err((_, e)) => {
                return Err(ApplyError::Stage {
                    dest: dest.display().to_string(),
                    source: e.into(),
                })
            }
        }
    }
}

fn staging_prefix(dest: &Path) -> String {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!(".{name}.portolan.")
}

fn staging_path(dest: &Path) -> PathBuf {
    let dir = dest.parent().unwrap_or(Path::new("."));
    dir.join(format!(
        "{}{}.{}.tmp",
        staging_prefix(dest),
        std::process::id(),
        STAGING_COUNTER.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Removes staging files a killed run left beside `dest`. Returns how many.
pub(crate) async fn clean_stale_staging(dest: &Path) -> std::io::Result<usize> {
    let dir = match dest.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let prefix = staging_prefix(dest);
    let mut removed = 0;
    let mut entries = tokio::fs::read_dir(dir).await?;
    while let Some(entry) = entries.next_entry().await? {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(&prefix) && name.ends_with(".tmp") {
            tokio::fs::remove_file(entry.path()).await?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Writes `bytes` to a fresh staging file beside `dest` with `mode` and fsyncs it.
async fn stage(dest: &Path, bytes: &[u8], mode: u32) -> std::io::Result<PathBuf> {
    let path = staging_path(dest);
    let result = async {
        let mut f = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
            .await?;
        f.write_all(bytes).await?;
        // The umask may have narrowed the mode given at creation.
        f.set_permissions(std::fs::Permissions::from_mode(mode))
            .await?;
        f.sync_all().await
    }
    .await;
    match result {
        Ok(()) => Ok(path),
        Err(e) => {
            let _ = tokio::fs::remove_file(&path).await;
            Err(e)
        }
    }
}

/// Runs `check_cmd` on a staged copy of `bytes` beside `dest` (where the file's
/// relative paths resolve as they will), then removes the copy.
async fn check_bytes(
    cmd: &str,
    dest: &Path,
    bytes: &[u8],
    timeout: Duration,
    background: bool,
) -> CommandResult {
    let staged = match stage(dest, bytes, 0o600).await {
        Ok(p) => p,
        Err(e) => {
            return CommandResult::not_run(format!(
                "cannot stage a copy of {} to check: {e}",
                dest.display()
            ))
        }
    };
    // Off the latency path, a check yields the CPU to HAProxy and the next change.
    let result = run_check(cmd, &staged, timeout, if background { 10 } else { 0 }).await;
    let _ = tokio::fs::remove_file(&staged).await;
    result
}

/// A check of bytes already at `dest`, run off the latency path (`Resource::pending_check`).
#[derive(Debug)]
pub(crate) struct DeferredCheck {
    cmd: String,
    dest: PathBuf,
    pub(crate) bytes: Arc<[u8]>,
    timeout: Duration,
}

impl DeferredCheck {
    pub(crate) async fn run(&self) -> CommandResult {
        check_bytes(&self.cmd, &self.dest, &self.bytes, self.timeout, true).await
    }
}

/// rename(2) `staged` over `dest`, then fsync the folder so the rename is durable.
async fn swap(staged: &Path, dest: &Path) -> std::io::Result<()> {
    tokio::fs::rename(staged, dest).await?;
    let dir = match dest.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    tokio::fs::File::open(dir).await?.sync_all().await
}

/// Quotes a path for `sh -c`.
fn shell_quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', r"'\''"))
}

/// `check_cmd` on `staged`, its CPU priority lowered by `nice` (0: unchanged).
async fn run_check(cmd: &str, staged: &Path, timeout: Duration, nice: i32) -> CommandResult {
    run_shell_niced(&cmd.replace("{src}", &shell_quote(staged)), timeout, nice).await
}

/// Runs `sh -c cmd` in its own process group with a timeout; on timeout the whole group
/// is killed, so a hung check (or anything it started) never wedges the watcher.
pub(crate) async fn run_shell(cmd: &str, timeout: Duration) -> CommandResult {
    run_shell_niced(cmd, timeout, 0).await
}

/// `run_shell` with the command's CPU priority lowered by `nice` (0: unchanged).
async fn run_shell_niced(cmd: &str, timeout: Duration, nice: i32) -> CommandResult {
    let mut command = tokio::process::Command::new("sh");
    command
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    if nice != 0 {
        // SAFETY: setpriority is async-signal-safe, and the closure touches nothing else
        // between fork and exec. A failure only leaves the priority as it was.
        unsafe {
            command.pre_exec(move || {
                nix::libc::setpriority(nix::libc::PRIO_PROCESS, 0, nice);
                Ok(())
            });
        }
    }
    let child = match command.spawn() {
        Ok(c) => c,
        Err(e) => {
            return CommandResult {
                success: false,
                status: "not started".into(),
                output: format!("cannot run `sh -c {cmd}`: {e}"),
                timed_out: false,
            }
        }
    };
    let pgid = child.id();
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(out)) => {
            let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&out.stderr));
            CommandResult {
                success: out.status.success(),
                status: out.status.to_string(),
                output: text.trim().to_string(),
                timed_out: false,
            }
        }
        Ok(Err(e)) => CommandResult {
            success: false,
            status: "wait failed".into(),
            output: format!("waiting for `{cmd}`: {e}"),
            timed_out: false,
        },
        Err(_) => {
            if let Some(id) = pgid {
                // Negative pid: the whole process group this command runs in.
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(-(id as i32)),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            CommandResult {
                success: false,
                status: format!("timed out after {timeout:?}"),
                output: format!(
                    "`{cmd}` did not finish within {timeout:?} and was killed (raise watcher.command_timeout_ms if it is just slow)"
                ),
                timed_out: true,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resource(dir: &Path, check: Option<&str>) -> Resource {
        Resource::new(TemplateResource {
            src: dir.join("t.tera"),
            dest: dir.join("out.cfg"),
            check_cmd: check.map(str::to_string),
            haproxy_master_socket: None,
            reload_cmd: None,
            haproxy_admin_socket: None,
            mode: Some("0640".into()),
            vars: toml::Table::new(),
        })
    }

    #[tokio::test]
    async fn writes_checks_and_skips_identical_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = resource(dir.path(), Some("grep -q ok {src}"));
        r.read_live().await.unwrap();
        let t = Duration::from_secs(5);
        assert!(matches!(r.apply("ok 1\n", t).await, Outcome::Written));
        let dest = dir.path().join("out.cfg");
        assert_eq!(std::fs::read_to_string(&dest).unwrap(), "ok 1\n");
        let mode = std::fs::metadata(&dest).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        assert!(matches!(r.apply("ok 1\n", t).await, Outcome::Unchanged));
        let Outcome::Rejected { .. } = r.apply("bad\n", t).await else {
            panic!("check must reject")
        };
        assert_eq!(std::fs::read_to_string(&dest).unwrap(), "ok 1\n");
        // Nothing staged is left behind (the lock file stays, empty).
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(
            left.contains(&".out.cfg.portolan.lock".to_string()),
            "{left:?}"
        );
    }

    #[tokio::test]
    async fn hung_check_is_killed_at_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = resource(dir.path(), Some("sleep 30; true {src}"));
        let start = std::time::Instant::now();
        let out = r.apply("x", Duration::from_millis(300)).await;
        assert!(
            matches!(out, Outcome::Rejected { ref check, .. } if check.output.contains("did not finish"))
        );
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn stale_staging_files_are_cleaned() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("haproxy.cfg");
        std::fs::write(dir.path().join(".haproxy.cfg.portolan.1.0.tmp"), "partial").unwrap();
        std::fs::write(dir.path().join("keep.tmp"), "x").unwrap();
        assert_eq!(clean_stale_staging(&dest).await.unwrap(), 1);
        assert!(dir.path().join("keep.tmp").exists());
    }

    #[tokio::test]
    async fn src_path_is_quoted() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("it's here");
        std::fs::create_dir(&sub).unwrap();
        let mut r = resource(&sub, Some("test -s {src}"));
        assert!(matches!(
            r.apply("x\n", Duration::from_secs(5)).await,
            Outcome::Written
        ));
    }

    #[tokio::test]
    async fn a_reload_that_times_out_keeps_the_new_file_and_reloads_again() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.cfg");
        let mut r = resource(dir.path(), None);
        r.cfg.reload_cmd = Some("true".into());
        r.read_live().await.unwrap();
        let t = Duration::from_millis(300);
        assert!(matches!(
            r.apply("v1\n", t).await,
            Outcome::Reloaded { fallback: None, .. }
        ));
        // Slow, not failed: HAProxy may run v2 already, so v2 stays.
        r.cfg.reload_cmd = Some("sleep 30".into());
        let out = r.apply("v2\n", t).await;
        assert!(
            matches!(out, Outcome::Failed { ref error, .. } if error.timed_out() && error.to_string().contains("timed out")),
            "{out:?}"
        );
        assert_eq!(std::fs::read_to_string(&dest).unwrap(), "v2\n");
        // The next pass renders the same bytes and still reloads to confirm it.
        r.cfg.reload_cmd = Some("true".into());
        assert!(matches!(
            r.apply("v2\n", t).await,
            Outcome::Reloaded { fallback: None, .. }
        ));
        assert!(matches!(r.apply("v2\n", t).await, Outcome::Unchanged));
        // A reload that fails outright still puts the last good file back.
        r.cfg.reload_cmd = Some("false".into());
        assert!(matches!(r.apply("v3\n", t).await, Outcome::Failed { .. }));
        assert_eq!(std::fs::read_to_string(&dest).unwrap(), "v2\n");
    }

    #[tokio::test]
    async fn reloads_keep_the_minimum_interval() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = resource(dir.path(), None);
        r.cfg.reload_cmd = Some("true".into());
        r.min_reload_interval = Duration::from_millis(300);
        let t = Duration::from_secs(5);
        assert!(matches!(r.apply("v1\n", t).await, Outcome::Reloaded { .. }));
        let start = std::time::Instant::now();
        assert!(matches!(r.apply("v2\n", t).await, Outcome::Reloaded { .. }));
        assert!(
            start.elapsed() >= Duration::from_millis(250),
            "{:?}",
            start.elapsed()
        );
    }

    #[tokio::test]
    async fn an_apply_waits_for_the_lock_another_apply_holds() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.cfg");
        let mut r = resource(dir.path(), None);
        let held = lock(&dest, Duration::from_secs(1)).await.unwrap();
        let out = r.apply("v1\n", Duration::from_millis(200)).await;
        assert!(
            matches!(
                out,
                Outcome::Failed {
                    error: ApplyError::Locked { .. },
                    ..
                }
            ),
            "{out:?}"
        );
        assert!(!dest.exists());
        drop(held);
        assert!(matches!(
            r.apply("v1\n", Duration::from_millis(200)).await,
            Outcome::Written
        ));
        // The lock file is not a staging leftover.
        assert_eq!(clean_stale_staging(&dest).await.unwrap(), 0);
        // A dest replaced by another apply while unlocked is what is live.
        std::fs::write(&dest, "other\n").unwrap();
        assert!(matches!(
            r.apply("other\n", Duration::from_millis(200)).await,
            Outcome::Unchanged
        ));
    }

    #[tokio::test]
    async fn a_refused_reload_of_a_file_whose_reload_timed_out_restores_the_confirmed_one() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.cfg");
        let mut r = resource(dir.path(), None);
        r.cfg.reload_cmd = Some("true".into());
        r.read_live().await.unwrap();
        let t = Duration::from_millis(300);
        assert!(matches!(r.apply("v1\n", t).await, Outcome::Reloaded { .. }));
        // v2's reload times out: v2 stays at dest, unconfirmed.
        r.cfg.reload_cmd = Some("sleep 30".into());
        assert!(matches!(r.apply("v2\n", t).await, Outcome::Failed { .. }));
        assert_eq!(std::fs::read_to_string(&dest).unwrap(), "v2\n");
        // Its next reload is refused: v1, the last file HAProxy confirmed, comes back,
        // whether the pass renders v2 again or something newer.
        r.cfg.reload_cmd = Some("false".into());
        assert!(matches!(r.apply("v2\n", t).await, Outcome::Failed { .. }));
        assert_eq!(std::fs::read_to_string(&dest).unwrap(), "v1\n");
        assert!(matches!(r.apply("v3\n", t).await, Outcome::Failed { .. }));
        assert_eq!(std::fs::read_to_string(&dest).unwrap(), "v1\n");
        // Once HAProxy takes it, v3 is the new last good file.
        r.cfg.reload_cmd = Some("true".into());
        assert!(matches!(r.apply("v3\n", t).await, Outcome::Reloaded { .. }));
        r.cfg.reload_cmd = Some("false".into());
        assert!(matches!(r.apply("v4\n", t).await, Outcome::Failed { .. }));
        assert_eq!(std::fs::read_to_string(&dest).unwrap(), "v3\n");
    }
}
