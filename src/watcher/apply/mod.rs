//! One `[[template]]` resource and the executor that carries out its routes.
//!
//! A render goes `Resource::apply` → `State::route` (pure, `route.rs`: which path) →
//! the steps of that path here (`dest.rs`: the crash-safe file; `command.rs`: check and
//! reload commands; `haproxy::runtime_api`: the admin socket; `haproxy::master`:
//! confirmed reloads) → a typed `Outcome` (`outcome.rs`), which the caller reports
//! through `watcher::report`. Each step's result goes back into the state through one
//! transition; nothing here decides a path.
//!
//! The invariants the paths keep (HAProxy never reloaded onto an unchecked file, a
//! refused reload puts the last confirmed file back, runtime-first changes checked in
//! the background) are written down and tested in `route.rs`; `dest.rs` keeps the file
//! crash-safe. After each apply the file HAProxy last confirmed goes to
//! `<dest>.last-good` when it changed (`State::unsaved`), so a restarted watcher knows it.

mod command;
mod dest;
mod outcome;
mod route;

use std::time::Duration;

use command::check_copy;
pub(crate) use command::{run_shell, CommandResult};
pub(crate) use outcome::{failure_report, ApplyError, Chain, Left, Outcome};
pub(crate) use route::Bytes;

use super::diff;
use super::haproxy::runtime_plan::{self, RuntimeOp, RuntimePlan};
use super::haproxy::{master, runtime_api};
use super::render::{self, Template, TemplateError};
use super::store::StoreSnapshot;
use crate::config::TemplateResource;
use dest::Dest;
use route::{Check, CheckFirst, Means, Restore, Route, State, Then, Verdict};

/// Lines of diff logged with a rejected check.
const DIFF_LINES_LOGGED: usize = 40;

pub(crate) struct Resource {
    pub(crate) cfg: TemplateResource,
    dest: Dest,
    /// `<dest>.last-good`: the file HAProxy last confirmed, kept across restarts.
    last_good: Dest,
    state: State,
    /// Last template that compiled. Kept when an edit breaks the file.
    template: Option<Template>,
    /// Text of the template file as last read, to skip recompiling an unchanged file.
    source_text: Option<String>,
    /// Set while the template file on disk does not compile.
    pub(crate) template_error: Option<TemplateError>,
    /// Reloads start at least this long after the previous one (`min_reload_interval_ms`):
    /// a flapping input costs bounded reloads, and old workers pile up no faster.
    min_reload_interval: Duration,
    last_reload: Option<tokio::time::Instant>,
    /// The master's pid as of its last answer: a master socket that stops answering
    /// while that process is gone fails the reload at once.
    master_pid: Option<u32>,
    /// Tera values of the instances last rendered, reused by the next render.
    values: render::InstanceValues,
    /// The certificate paths and served certificates templates see (`watcher::tls`).
    pub(crate) tls: Option<std::sync::Arc<super::tls::View>>,
}

/// A check of bytes applied runtime first, to run off the latency path
/// (`Resource::pending_check`); its verdict goes to `Resource::deferred_checked`.
#[derive(Debug)]
pub(crate) struct DeferredCheck {
    cmd: String,
    dest: Dest,
    pub(crate) bytes: Bytes,
    timeout: Duration,
}

impl DeferredCheck {
    pub(crate) async fn run(&self) -> CommandResult {
        check_copy(
            &self.cmd,
            &self.dest,
            &self.bytes,
            self.timeout,
            command::BACKGROUND_NICE,
        )
        .await
    }
}

impl Resource {
    /// The resource with what `dest` holds now (a missing file: nothing live).
    pub(crate) async fn open(
        cfg: TemplateResource,
        min_reload_interval: Duration,
    ) -> std::io::Result<Resource> {
        let dest = Dest::new(cfg.dest.clone(), cfg.mode.clone());
        let means = Means {
            check: cfg.check_cmd.is_some(),
            reload: cfg.haproxy_master_socket.is_some() || cfg.reload_cmd.is_some(),
            runtime: cfg.haproxy_admin_socket.is_some(),
        };
        let live = dest.read().await?;
        let last_good = dest.last_good();
        // Unreadable, it is as if there were none: the watcher starts as before it kept one.
        let good = last_good.read().await.unwrap_or_else(|e| {
            tracing::warn!(
                "cannot read {} ({e}): a reload refused before HAProxy confirms a file puts back the file there before",
                last_good.show()
            );
            None
        });
        Ok(Resource {
            cfg,
            dest,
            last_good,
            state: State::new(means, live, good),
            template: None,
            source_text: None,
            template_error: None,
            min_reload_interval,
            last_reload: None,
            master_pid: None,
            values: render::InstanceValues::default(),
            tls: None,
        })
    }

    /// Files the config loads (certificates) changed in a way the runtime API did not
    /// carry: see `State::inputs_changed`.
    pub(crate) fn inputs_changed(&mut self) {
        self.state.inputs_changed();
    }

    /// For one-shot renders: see `State::assume_running`.
    pub(crate) fn assume_running(&mut self) {
        self.state.assume_running();
    }

    pub(crate) fn name(&self) -> String {
        self.cfg.src.display().to_string()
    }

    /// Removes staging files a killed run left beside `dest` (and its last-good copy).
    /// Returns how many.
    pub(crate) async fn clean_stale_staging(&self) -> std::io::Result<usize> {
        Ok(self.dest.clean_stale().await? + self.last_good.clean_stale().await?)
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

    pub(crate) fn live(&self) -> Option<&[u8]> {
        self.state.live().map(|b| &**b)
    }

    /// Renders with the last good template; None before any template compiled.
    pub(crate) fn render(
        &mut self,
        snapshot: &StoreSnapshot,
    ) -> Option<Result<String, TemplateError>> {
        let t = self.template.as_ref()?;
        let mut ctx = self
            .values
            .context_for(snapshot, &self.cfg.vars, t.sees_draining());
        if let Some(tls) = &self.tls {
            tls.insert_into(&mut ctx, snapshot);
        }
        Some(t.render(&ctx))
    }

    /// The route conflicts its last render found, one sentence each.
    pub(crate) fn route_conflicts(&self) -> impl Iterator<Item = String> + '_ {
        self.values.conflicts().iter().map(|c| c.to_string())
    }

    /// Those its last render found and the one before did not.
    pub(crate) fn fresh_route_conflicts(&self) -> impl Iterator<Item = String> + '_ {
        self.values.fresh_conflicts().iter().map(|c| c.to_string())
    }

    /// The diff of the live file against `rendered`, for logs and dry runs.
    pub(crate) fn diff(&self, rendered: &str) -> String {
        let live = self.live().map(String::from_utf8_lossy).unwrap_or_default();
        let dest = self.dest.show().to_string();
        diff::unified(&live, rendered, &dest, &format!("{dest} (new)"))
    }

    /// Makes `dest` hold `rendered` and HAProxy run it, or says why not.
    ///
    /// Holds the lock beside `dest` throughout, so a `render --once` and the running
    /// watcher never interleave; a `dest` replaced by the other while unlocked is taken
    /// as the live file.
    pub(crate) async fn apply(&mut self, rendered: &str, timeout: Duration) -> Outcome {
        let _lock = match self.dest.lock(timeout).await {
            Ok(l) => l,
            Err(error) => return Outcome::failed(error),
        };
        if let Ok(Some(disk)) = self.dest.read().await {
            self.state.saw_on_disk(disk);
        }
        let rendered: Bytes = rendered.as_bytes().into();
        let outcome = match self.state.route(&rendered, plan) {
            // No state to change: `route` answers Unchanged only when no reload is owed
            // or none is configured (and then nothing reads `reload_pending`).
            Route::Unchanged => Outcome::Unchanged,
            Route::RuntimeFirst(ops) => self.runtime_first(rendered, &ops, timeout).await,
            Route::CheckFirst(route) => self.check_first(rendered, route, None, timeout).await,
        };
        self.save_last_good().await;
        outcome
    }

    /// Writes a newly confirmed file to `<dest>.last-good` (stage, fsync, rename, fsync
    /// of the folder). A failed write is tried again after the next apply.
    async fn save_last_good(&mut self) {
        let Some(good) = self.state.unsaved() else {
            return;
        };
        match self.last_good.write(&good).await {
            Ok(()) => self.state.saved(good),
            Err(e) => tracing::warn!(
                dest = %self.dest.show(),
                "cannot keep the confirmed file in {}: {}; after a restart a refused reload puts back an older one",
                self.last_good.show(),
                Chain(&e)
            ),
        }
    }

    /// The ops go to the admin socket, then the file follows with no check on the way
    /// (it is checked in the background). Should the file not make it to `dest`, the
    /// change is taken back out of HAProxy; should the runtime API refuse, the change
    /// takes the checked reload instead.
    async fn runtime_first(
        &mut self,
        rendered: Bytes,
        ops: &[RuntimeOp],
        timeout: Duration,
    ) -> Outcome {
        let sock = self.cfg.haproxy_admin_socket.clone().unwrap_or_default();
        match runtime_api::apply(&sock, ops, timeout).await {
            Ok(applied) => match self.dest.write(&rendered).await {
                Ok(()) => {
                    self.state.followed(rendered);
                    Outcome::Runtime { applied }
                }
                Err(error) => {
                    self.undo_runtime(&rendered, timeout).await;
                    Outcome::failed(error)
                }
            },
            Err(e) => {
                let route = self.state.fallback_route(&rendered);
                self.check_first(rendered, route, Some(e), timeout).await
            }
        }
    }

    /// Check, swap, then the runtime ops, a reload, or nothing. `fallback`: the runtime
    /// API refused this change first (its ops may be half applied).
    async fn check_first(
        &mut self,
        rendered: Bytes,
        route: CheckFirst,
        mut fallback: Option<runtime_api::RuntimeError>,
        timeout: Duration,
    ) -> Outcome {
        if let Some(rejected) = self
            .check(&rendered, route.check, fallback.is_some(), timeout)
            .await
        {
            return match rejected {
                Ok(outcome) => outcome,
                Err(error) => Outcome::Failed {
                    error,
                    fallback,
                    left: Left::AsItWas,
                },
            };
        }
        let previous = self.state.written(rendered);
        let why = match route.then {
            Then::Write => {
                self.state.went_live();
                return Outcome::Written;
            }
            Then::Runtime(ops) => {
                let sock = self.cfg.haproxy_admin_socket.clone().unwrap_or_default();
                match runtime_api::apply(&sock, &ops, timeout).await {
                    Ok(applied) => {
                        self.state.went_live();
                        return Outcome::Runtime { applied };
                    }
                    Err(e) => {
                        // HAProxy may run part of the change: only the reload of the new
                        // file (in place already) makes it whole again.
                        self.state.must_reload();
                        fallback = Some(e);
                        None
                    }
                }
            }
            Then::Reload(why) => why,
        };
        if let Some(why) = why {
            tracing::info!(
                dest = %self.dest.show(),
                "reloading, the runtime API cannot apply this change: {why}"
            );
        }
        let reload_started = std::time::Instant::now();
        match self.reload(timeout).await {
            Ok(()) => {
                self.state.went_live();
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
                self.state.must_reload();
                Outcome::Failed {
                    error,
                    fallback,
                    left: Left::NewFile,
                }
            }
            Err(error) => {
                let left = self.restore(previous).await;
                Outcome::Failed {
                    error,
                    fallback,
                    left,
                }
            }
        }
    }

    /// After a refused reload: puts back what `State::reload_refused` says, and says
    /// what `dest` holds then.
    async fn restore(&mut self, previous: Option<Bytes>) -> Left {
        let (good, left) = match self.state.reload_refused(previous) {
            Restore::InPlace => return Left::LastGood,
            Restore::Nothing => return Left::NoLastGood,
            Restore::Confirmed(good) => (good, Left::LastGood),
            Restore::Previous(good) => (good, Left::Previous),
        };
        match self.dest.write(&good).await {
            Ok(()) => {
                self.state.restored(good);
                left
            }
            Err(e) => Left::NotRestored(Chain(&e).to_string()),
        }
    }

    /// The check step of a check-first route; with `Check::Rendered` the file is in
    /// place afterwards. None: go on. Some(Ok(outcome)): refused, `dest` untouched (and
    /// runtime ops sent first, `sent`, taken back). Some(Err): the file could not be
    /// staged or swapped.
    async fn check(
        &mut self,
        rendered: &Bytes,
        check: Check,
        sent: bool,
        timeout: Duration,
    ) -> Option<Result<Outcome, ApplyError>> {
        let cmd = self.cfg.check_cmd.clone();
        match (check, cmd) {
            (Check::Rendered, cmd) => {
                let staged = match self.dest.stage(rendered).await {
                    Ok(p) => p,
                    Err(e) => return Some(Err(e)),
                };
                if let Some(cmd) = cmd {
                    let result = command::run_check(&cmd, &staged, timeout, 0).await;
                    if !result.success {
                        let _ = tokio::fs::remove_file(&staged).await;
                        if sent {
                            self.undo_runtime(rendered, timeout).await;
                        }
                        let text = String::from_utf8_lossy(rendered);
                        return Some(Ok(Outcome::Rejected {
                            check: result,
                            diff: diff::head(&self.diff(&text), DIFF_LINES_LOGGED),
                        }));
                    }
                }
                self.dest.swap(&staged).await.err().map(Err)
            }
            (Check::Live, Some(cmd)) => {
                let result = check_copy(&cmd, &self.dest, rendered, timeout, 0).await;
                (!result.success).then(|| {
                    Ok(Outcome::Rejected {
                        check: result,
                        diff: String::new(),
                    })
                })
            }
            (Check::Live | Check::Nothing, _) => None,
        }
    }

    /// Takes back runtime commands sent for `rendered`, which then did not make it to
    /// `dest`, so HAProxy runs the live file again; a reload of it if that fails.
    async fn undo_runtime(&mut self, rendered: &[u8], timeout: Duration) {
        let (Some(sock), Some(live)) = (&self.cfg.haproxy_admin_socket, self.state.live()) else {
            return;
        };
        let undone = match plan(rendered, live) {
            RuntimePlan::Runtime(ops) => runtime_api::apply(sock, &ops, timeout).await.is_ok(),
            RuntimePlan::Reload(_) => false,
        };
        if !undone {
            self.state.must_reload();
        }
    }

    /// The check `dest` still needs: it holds bytes applied runtime first, which no
    /// check has passed yet.
    pub(crate) fn pending_check(&self, timeout: Duration) -> Option<DeferredCheck> {
        Some(DeferredCheck {
            cmd: self.cfg.check_cmd.clone()?,
            dest: self.dest.clone(),
            bytes: self.state.unchecked_live()?,
            timeout,
        })
    }

    /// Takes the verdict of a deferred check; when it refused the bytes HAProxy runs,
    /// repairs (last checked file back, reloaded onto) and returns that outcome.
    pub(crate) async fn deferred_checked(
        &mut self,
        bytes: Bytes,
        result: &CommandResult,
        timeout: Duration,
    ) -> Option<Outcome> {
        match self.state.deferred(bytes, result.success) {
            Verdict::Passed | Verdict::Stale => None,
            Verdict::Repair(good) => Some(self.repair(good, timeout).await),
        }
    }

    async fn repair(&mut self, good: Option<Bytes>, timeout: Duration) -> Outcome {
        let _lock = match self.dest.lock(timeout).await {
            Ok(l) => l,
            Err(error) => {
                self.state.must_reload();
                return Outcome::failed(error);
            }
        };
        let Some(good) = good else {
            // Runtime first needs a checked file to start from: cannot happen.
            self.state.must_reload();
            return Outcome::Unchanged;
        };
        if let Err(error) = self.dest.write(&good).await {
            self.state.must_reload();
            return Outcome::failed(error);
        }
        self.state.restored(good);
        let started = std::time::Instant::now();
        let outcome = match self.reload(timeout).await {
            Ok(()) => {
                self.state.went_live();
                Outcome::Reloaded {
                    fallback: None,
                    took: started.elapsed(),
                }
            }
            Err(error) => {
                self.state.must_reload();
                Outcome::Failed {
                    error,
                    fallback: None,
                    left: Left::LastGood,
                }
            }
        };
        self.save_last_good().await;
        outcome
    }

    /// Reload through the master socket, or `reload_cmd`, no sooner than
    /// `min_reload_interval` after the previous one.
    async fn reload(&mut self, timeout: Duration) -> Result<(), ApplyError> {
        if let Some(last) = self.last_reload {
            tokio::time::sleep_until(last + self.min_reload_interval).await;
        }
        let result = if let Some(sock) = &self.cfg.haproxy_master_socket {
            let answer = master::reload(sock, timeout, self.master_pid).await;
            self.master_pid = match &answer {
                Ok(status) => master::watchable(status.pid).then_some(status.pid),
                Err(master::ReloadError::MasterGone { .. }) => None,
                Err(_) => self.master_pid,
            };
            answer.map(|_| ()).map_err(ApplyError::from)
        } else if let Some(cmd) = &self.cfg.reload_cmd {
            let r = run_shell(cmd, timeout, 0).await;
            if r.success {
                Ok(())
            } else {
                Err(ApplyError::reload_cmd(cmd, r))
            }
        } else {
            Ok(())
        };
        self.last_reload = Some(tokio::time::Instant::now());
        result
    }

    /// `render --once --dry-run`: the check runs on a private temporary file, so nothing
    /// is written beside `dest`.
    pub(crate) async fn dry_check(
        &self,
        rendered: &str,
        timeout: Duration,
    ) -> Option<CommandResult> {
        let cmd = self.cfg.check_cmd.as_ref()?;
        let name = self
            .dest
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "dest".into());
        let file = match tempfile::Builder::new()
            .prefix("portolan-dry-run.")
            .suffix(&format!(".{name}"))
            .tempfile()
        {
            Ok(f) => f,
            Err(e) => {
                return Some(CommandResult::not_run(format!(
                    "cannot make a temporary file to check: {e}"
                )))
            }
        };
        if let Err(e) = tokio::fs::write(file.path(), rendered).await {
            return Some(CommandResult::not_run(format!(
                "cannot write {}: {e}",
                file.path().display()
            )));
        }
        Some(command::run_check(cmd, file.path(), timeout, 0).await)
    }
}

/// The runtime planner over file bytes.
fn plan(live: &[u8], rendered: &[u8]) -> RuntimePlan {
    runtime_plan::plan(
        &String::from_utf8_lossy(live),
        &String::from_utf8_lossy(rendered),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    async fn resource(dir: &Path, check: Option<&str>) -> Resource {
        let cfg = TemplateResource {
            src: dir.join("t.tera"),
            dest: dir.join("out.cfg"),
            check_cmd: check.map(str::to_string),
            haproxy_master_socket: None,
            reload_cmd: None,
            haproxy_admin_socket: None,
            mode: Some("0640".into()),
            vars: toml::Table::new(),
        };
        Resource::open(cfg, Duration::ZERO).await.unwrap()
    }

    async fn reloading_in_tempdir() -> (tempfile::TempDir, Resource) {
        let dir = tempfile::tempdir().unwrap();
        let r = reloading(dir.path()).await;
        (dir, r)
    }

    /// A resource without a check whose `reload_cmd` (changed by the test) is `true`.
    async fn reloading(dir: &Path) -> Resource {
        let mut r = resource(dir, None).await;
        r.cfg.reload_cmd = Some("true".into());
        r.state = State::new(
            Means {
                check: false,
                reload: true,
                runtime: false,
            },
            None,
            None,
        );
        r
    }

    #[tokio::test]
    async fn writes_checks_and_skips_identical_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = resource(dir.path(), Some("grep -q ok {src}")).await;
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
        let mut r = resource(dir.path(), Some("sleep 30; true {src}")).await;
        let start = std::time::Instant::now();
        let out = r.apply("x", Duration::from_millis(300)).await;
        assert!(
            matches!(out, Outcome::Rejected { ref check, .. } if check.output.contains("did not finish"))
        );
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn src_path_is_quoted() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("it's here");
        std::fs::create_dir(&sub).unwrap();
        let mut r = resource(&sub, Some("test -s {src}")).await;
        let out = r.apply("x\n", Duration::from_secs(5)).await;
        assert!(matches!(out, Outcome::Written), "{out:?}");
    }

    #[tokio::test]
    async fn a_reload_that_times_out_keeps_the_new_file_and_reloads_again() {
        let (dir, mut r) = reloading_in_tempdir().await;
        let dest = dir.path().join("out.cfg");
        let t = Duration::from_millis(300);
        let out = r.apply("v1\n", t).await;
        assert!(
            matches!(out, Outcome::Reloaded { fallback: None, .. }),
            "{out:?}"
        );
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
        let out = r.apply("v2\n", t).await;
        assert!(
            matches!(out, Outcome::Reloaded { fallback: None, .. }),
            "{out:?}"
        );
        assert!(matches!(r.apply("v2\n", t).await, Outcome::Unchanged));
        // A reload that fails outright still puts the last good file back.
        r.cfg.reload_cmd = Some("false".into());
        assert!(matches!(r.apply("v3\n", t).await, Outcome::Failed { .. }));
        assert_eq!(std::fs::read_to_string(&dest).unwrap(), "v2\n");
    }

    #[tokio::test]
    async fn reloads_keep_the_minimum_interval() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = reloading(dir.path()).await;
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
        let mut r = resource(dir.path(), None).await;
        let held = r.dest.lock(Duration::from_secs(1)).await.unwrap();
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
        let out = r.apply("v1\n", Duration::from_millis(200)).await;
        assert!(matches!(out, Outcome::Written), "{out:?}");
        // The lock file is not a staging leftover.
        assert_eq!(r.clean_stale_staging().await.unwrap(), 0);
        // A dest replaced by another apply while unlocked is what is live.
        std::fs::write(&dest, "other\n").unwrap();
        let out = r.apply("other\n", Duration::from_millis(200)).await;
        assert!(matches!(out, Outcome::Unchanged), "{out:?}");
    }

    #[tokio::test]
    async fn a_refused_reload_of_a_file_whose_reload_timed_out_restores_the_confirmed_one() {
        let (dir, mut r) = reloading_in_tempdir().await;
        let dest = dir.path().join("out.cfg");
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
