//! What is said about an apply (pure): its log lines, counters, hook event and status
//! fields, from its `Outcome`. One table for the three reporters — a pass of the loop,
//! a deferred check's verdict, `render --once` — so an outcome is named the same way in
//! the log, `/metrics`, the hooks and the status key. `sink` carries a `Report` out.

use std::path::Path;
use std::time::{Duration, Instant};

use super::apply::{failure_report, ApplyError, Chain, CommandResult, Left, Outcome, Resource};
use super::guard::Held;
use super::haproxy::first_error_line;
use super::haproxy::runtime_api::RuntimeError;
use super::store::StoreSnapshot;
use crate::config::MassRemoval;
use crate::hook::WatcherEvent;
use crate::schema::{ApplyPath, ReloadResult};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Level {
    Info,
    Warn,
    Error,
}

/// Where and when the outcome happened.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Scene<'a> {
    pub(crate) dest: &'a Path,
    pub(crate) template: &'a str,
    pub(crate) services: usize,
    pub(crate) instances: usize,
    /// Since the pass started.
    pub(crate) elapsed: Duration,
    pub(crate) now: Instant,
}

impl<'a> Scene<'a> {
    /// An apply of `resource`, begun at `started`, for `snapshot`.
    pub(crate) fn of(
        resource: &'a Resource,
        template: &'a str,
        snapshot: &StoreSnapshot,
        started: Instant,
    ) -> Scene<'a> {
        Scene {
            dest: &resource.cfg.dest,
            template,
            services: snapshot.services.len(),
            instances: snapshot.instance_count(),
            elapsed: started.elapsed(),
            now: Instant::now(),
        }
    }
}

/// Counter increments, by the labels `metrics` exports.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct Counts {
    /// `applies_total{result}`.
    pub(crate) apply: Option<&'static str>,
    /// `deferred_checks_total{result}`: ok, failed.
    pub(crate) deferred: Option<&'static str>,
    /// `updates_total{status}`: noop, dynamic (runtime API), full (file and reload).
    pub(crate) update: Option<&'static str>,
    /// `reloads_total{result}`.
    pub(crate) reload: Option<&'static str>,
    /// `runtime_updates_total{result}`: ok, or fallback (refused, reloaded instead).
    pub(crate) runtime: Option<&'static str>,
    /// `check_failures_total`.
    pub(crate) check_failure: bool,
    /// `reload_duration_seconds`.
    pub(crate) reload_took: Option<Duration>,
}

/// When HAProxy began to run the rendered file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Live {
    /// It ran it already (nothing changed).
    Already,
    At(Instant),
    /// It does not run it.
    Not,
}

/// Everything said about one outcome.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Report {
    pub(crate) lines: Vec<(Level, String)>,
    pub(crate) hook: Option<(WatcherEvent, String)>,
    pub(crate) counts: Counts,
    /// Status key: the last reload's result, the last apply's path, an error to show.
    pub(crate) reload: Option<ReloadResult>,
    pub(crate) path: Option<ApplyPath>,
    pub(crate) error: Option<String>,
    pub(crate) live: Live,
    /// A transient or outside failure: try again on the backoff timer.
    pub(crate) retry: bool,
    /// What `render --once` prints.
    pub(crate) once: String,
}

impl Report {
    fn new(apply: &'static str, live: Live, once: String) -> Report {
        Report {
            lines: Vec::new(),
            hook: None,
            counts: Counts {
                apply: Some(apply),
                ..Default::default()
            },
            reload: None,
            path: None,
            error: None,
            live,
            retry: false,
            once,
        }
    }
}

/// What a whole pass (every resource) sums up to, for the status key and the loop.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct Pass {
    pub(crate) errors: Vec<String>,
    /// Every resource runs what the snapshot says (or had nothing to change).
    pub(crate) all_live: bool,
    /// When the last resource began to run it.
    pub(crate) live_at: Option<Instant>,
    pub(crate) reload: Option<ReloadResult>,
    pub(crate) path: Option<ApplyPath>,
    pub(crate) retry: bool,
}

impl Pass {
    pub(crate) fn new(errors: Vec<String>) -> Pass {
        Pass {
            errors,
            all_live: true,
            ..Default::default()
        }
    }

    /// A resource that did not get to apply (no template yet, a render error).
    pub(crate) fn not_applied(&mut self, error: Option<String>) {
        self.all_live = false;
        self.errors.extend(error);
    }

    pub(crate) fn add(&mut self, r: &Report) {
        match r.live {
            Live::Already => {}
            Live::At(at) => self.live_at = self.live_at.max(Some(at)),
            Live::Not => self.all_live = false,
        }
        // A reload anywhere is the path of the pass; a failure is its reload result.
        self.path = match r.path {
            Some(ApplyPath::Runtime) => self.path.or(r.path),
            None => self.path,
            p => p,
        };
        self.reload = match r.reload {
            Some(ReloadResult::Ok) => self.reload.or(r.reload),
            None => self.reload,
            worse => worse,
        };
        self.errors.extend(r.error.clone());
        self.retry |= r.retry;
    }
}

/// The report of one apply.
pub(crate) fn apply(outcome: &Outcome, s: &Scene) -> Report {
    let dest = s.dest.display();
    let ms = s.elapsed.as_millis();
    match outcome {
        Outcome::Unchanged => {
            let mut r = Report::new("unchanged", Live::Already, format!("{dest}: unchanged"));
            r.counts.update = Some("noop");
            r
        }
        Outcome::Written => {
            let mut r = Report::new("written", Live::At(s.now), format!("{dest}: written"));
            r.counts.update = Some("full");
            r.lines
                .push((Level::Info, "written (no reload configured)".to_string()));
            r
        }
        Outcome::Runtime { applied } => {
            let mut r = Report::new(
                "runtime",
                Live::At(applied.done_at.unwrap_or(s.now)),
                format!(
                    "{dest}: written and applied through the runtime API ({applied}), no reload"
                ),
            );
            r.counts.update = Some("dynamic");
            r.counts.runtime = Some("ok");
            r.path = Some(ApplyPath::Runtime);
            r.lines.push((
                Level::Info,
                format!(
                    "applied through the runtime API, no reload ({applied}) in {ms} ms, {:.2} ms of it in the runtime API",
                    applied.took.as_secs_f64() * 1000.0,
                ),
            ));
            r.hook = Some((WatcherEvent::Runtime, applied.to_string()));
            r
        }
        Outcome::Reloaded { fallback, took } => reloaded(fallback.as_ref(), *took, s),
        Outcome::Rejected { check, diff } => rejected(check, diff, s),
        Outcome::Failed {
            error,
            fallback,
            left,
        } => failed(error, fallback.as_ref(), left, s),
    }
}

fn reloaded(fallback: Option<&RuntimeError>, took: Duration, s: &Scene) -> Report {
    let dest = s.dest.display();
    let ms = s.elapsed.as_millis();
    let mut r = Report::new("reloaded", Live::At(s.now), String::new());
    r.counts.update = Some("full");
    r.counts.reload = Some("ok");
    r.counts.reload_took = Some(took);
    r.reload = Some(ReloadResult::Ok);
    r.path = Some(ApplyPath::Reload);
    if let Some(why) = fallback {
        r.counts.runtime = Some("fallback");
        let why = Chain(why);
        r.lines.push((
            Level::Warn,
            format!("runtime API failed, reloaded instead: {why}"),
        ));
        r.once = format!("{dest}: runtime API failed: {why}\n");
    }
    r.once += &format!("{dest}: written and reloaded");
    r.lines.push((Level::Info, format!("reloaded in {ms} ms")));
    r.hook = Some((
        WatcherEvent::Reload,
        format!(
            "reloaded {dest} in {ms} ms ({} services, {} instances)",
            s.services, s.instances
        ),
    ));
    r
}

fn rejected(check: &CommandResult, diff: &str, s: &Scene) -> Report {
    let dest = s.dest.display();
    let mut r = Report::new(
        "rejected",
        Live::Not,
        format!(
            "{dest}: check failed ({}), file left as it was:\n{}\nDiff (first lines):\n{diff}",
            check.status, check.output
        ),
    );
    r.counts.check_failure = true;
    r.reload = Some(ReloadResult::Rejected);
    // The check may fail for a reason outside the file (a missing certificate,
    // a port in use): checked again on the backoff timer.
    r.retry = true;
    r.lines.push((
        Level::Error,
        format!(
            "check_cmd rejected the new file from {} ({}); {dest} keeps its last good content. Check output:\n{}\nDiff (first lines):\n{diff}",
            s.template, check.status, check.output
        ),
    ));
    let first = first_error_line(&check.output);
    r.hook = Some((
        WatcherEvent::Reject,
        if first.is_empty() {
            format!("check_cmd rejected the new file ({})", check.status)
        } else {
            first.to_string()
        },
    ));
    r.error = Some(format!(
        "check_cmd rejected the new {dest}: {}",
        check.output.lines().take(5).collect::<Vec<_>>().join(" | ")
    ));
    r
}

fn failed(error: &ApplyError, fallback: Option<&RuntimeError>, left: &Left, s: &Scene) -> Report {
    let dest = s.dest.display();
    let text = failure_report(error, fallback);
    let after = match left {
        Left::AsItWas => format!("{dest} is as it was"),
        Left::NewFile => format!(
            "the new file stays in {dest} (HAProxy may run it already) and is reloaded again until HAProxy confirms it"
        ),
        Left::LastGood => "the last good file is back in place".to_string(),
        Left::Previous => format!(
            "the file there before is back in {dest} (no file HAProxy confirmed is known yet)"
        ),
        Left::NoLastGood => {
            format!("no file HAProxy confirmed is known: {dest} keeps the refused one")
        }
        Left::NotRestored(why) => {
            format!("the last good file could not be put back ({why}): {dest} holds the refused one")
        }
    };
    let mut r = Report::new("failed", Live::Not, format!("{dest}: {text}"));
    r.counts.reload = Some("failed");
    r.reload = Some(ReloadResult::Failed);
    // Transient or not, try again on the backoff timer: HAProxy may take the
    // file once whatever it lacked (a port, a certificate) is there.
    r.retry = true;
    r.lines.push((Level::Error, format!("{text}; {after}")));
    r.hook = Some((WatcherEvent::Fail, text.clone()));
    r.error = Some(text);
    r
}

/// The report of a deferred check: `repair` is the outcome of putting HAProxy back onto
/// the last checked file, when the check refused what HAProxy runs (None: passed, or
/// refused bytes replaced since).
pub(crate) fn deferred(check: &CommandResult, repair: Option<&Outcome>) -> Report {
    let Some(repair) = repair else {
        let mut r = Report::new("", Live::Already, String::new());
        r.counts = Counts {
            deferred: Some(if check.success { "ok" } else { "failed" }),
            ..Default::default()
        };
        if !check.success {
            r.lines.push((
                Level::Warn,
                format!("check_cmd rejected a file applied through the runtime API and replaced since ({}); the newer file is checked next", check.status),
            ));
        }
        return r;
    };
    let what = match repair {
        Outcome::Reloaded { .. } => "HAProxy was reloaded onto the last checked file".to_string(),
        Outcome::Failed { error, .. } => format!(
            "putting the last checked file back failed too: {}",
            Chain(error)
        ),
        _ => "no checked file to go back to".to_string(),
    };
    let summary = format!(
        "HAProxy ran a file that check_cmd rejects ({}): it was applied through the runtime API, checked afterwards, and the file and HAProxy disagreed; {what}, and every change is checked before it is applied until a file passes",
        check.status
    );
    let mut r = Report::new("", Live::Not, String::new());
    r.counts = Counts {
        deferred: Some("failed"),
        check_failure: true,
        ..Default::default()
    };
    r.lines.push((
        Level::Error,
        format!("{summary}. Check output:\n{}", check.output),
    ));
    r.hook = Some((WatcherEvent::Reject, summary.clone()));
    r.reload = Some(match repair {
        Outcome::Reloaded { .. } => ReloadResult::Ok,
        _ => ReloadResult::Failed,
    });
    r.error = Some(summary);
    r
}

/// `reject` and `fail` hooks fire once per distinct file: a file refused again on the
/// retry timer is logged and counted each time, but its hook is not sent again until
/// the file (or the event) changes. One per resource; an apply that went through forgets
/// it, so the same file refused later is news again.
#[derive(Debug, Default)]
pub(crate) struct Repeats {
    /// The event and file of the last refusal whose hook went out.
    last: Option<(WatcherEvent, u64)>,
}

impl Repeats {
    /// Drops `r`'s hook when it repeats the last refusal of the same `file`.
    pub(crate) fn judge(&mut self, r: &mut Report, file: &[u8]) {
        let refusal = match &r.hook {
            Some((e @ (WatcherEvent::Reject | WatcherEvent::Fail), _)) => Some((*e, digest(file))),
            _ => None,
        };
        match refusal {
            Some(key) if self.last == Some(key) => r.hook = None,
            Some(key) => self.last = Some(key),
            // Only an apply's outcome forgets: a deferred check that passed says nothing
            // about the file refused last.
            None if r.counts.apply.is_some() => self.last = None,
            None => {}
        }
    }
}

fn digest(file: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    file.hash(&mut h);
    h.finish()
}

/// What is said when the guard holds back a mass removal.
pub(crate) fn held(h: &Held, m: &MassRemoval, now: Instant) -> String {
    let secs = h.until.saturating_duration_since(now).as_secs();
    let (whose, share) = match &h.service {
        Some(s) => (format!(" of service {s}"), m.per_service_share),
        None => (String::new(), m.share),
    };
    format!(
        "holding back the removal of {} of {} live instances{whose} ({:.0}% gone within {} s, more than the {:.0}% mass_removal share): they stay in the config for {secs} s — HAProxy's health checks keep dead ones out of rotation — then go; send SIGUSR1 to the watcher to remove them now",
        h.count,
        h.live,
        h.percent(),
        m.hold.as_secs(),
        share * 100.0
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::watcher::haproxy::runtime_api::Applied;

    fn scene(now: Instant) -> Scene<'static> {
        Scene {
            dest: Path::new("/etc/haproxy/haproxy.cfg"),
            template: "t.tera",
            services: 2,
            instances: 3,
            elapsed: Duration::from_millis(12),
            now,
        }
    }

    fn check(success: bool, output: &str) -> CommandResult {
        CommandResult {
            success,
            status: if success {
                "exit status: 0"
            } else {
                "exit status: 1"
            }
            .into(),
            output: output.into(),
            timed_out: false,
        }
    }

    fn refused() -> RuntimeError {
        RuntimeError::Refused {
            command: "add server svc_web/a 10.0.0.1:80".into(),
            answer: "No such backend.".into(),
        }
    }

    #[test]
    fn every_outcome_has_one_name_in_metrics_status_and_hooks() {
        let now = Instant::now();
        let applied = Applied {
            added: 1,
            done_at: Some(now),
            ..Default::default()
        };
        let took = Duration::from_millis(40);
        let lock = || ApplyError::Locked {
            path: "/x.lock".into(),
            waited: took,
        };
        type Row = (
            Outcome,
            &'static str,
            Option<&'static str>,
            Option<ReloadResult>,
            Option<ApplyPath>,
            Option<WatcherEvent>,
            Live,
            bool,
        );
        // outcome → applies result, updates status, status reload, status path, hook, live, retry
        #[rustfmt::skip]
        let table: Vec<Row> = vec![
            (Outcome::Unchanged, "unchanged", Some("noop"), None, None, None, Live::Already, false),
            (Outcome::Written, "written", Some("full"), None, None, None, Live::At(now), false),
            (Outcome::Runtime { applied }, "runtime", Some("dynamic"), None,
                Some(ApplyPath::Runtime), Some(WatcherEvent::Runtime), Live::At(now), false),
            (Outcome::Reloaded { fallback: None, took }, "reloaded", Some("full"),
                Some(ReloadResult::Ok), Some(ApplyPath::Reload), Some(WatcherEvent::Reload),
                Live::At(now), false),
            (Outcome::Rejected { check: check(false, "bad"), diff: String::new() }, "rejected",
                None, Some(ReloadResult::Rejected), None, Some(WatcherEvent::Reject), Live::Not, true),
            (Outcome::failed(lock()), "failed", None, Some(ReloadResult::Failed), None,
                Some(WatcherEvent::Fail), Live::Not, true),
        ];
        for (outcome, apply_label, update, reload, path, hook, live, retry) in table {
            let r = apply(&outcome, &scene(now));
            assert_eq!(r.counts.apply, Some(apply_label));
            assert_eq!(r.counts.update, update, "{apply_label}");
            assert_eq!(r.reload, reload, "{apply_label}");
            assert_eq!(r.path, path, "{apply_label}");
            assert_eq!(r.hook.as_ref().map(|h| h.0), hook, "{apply_label}");
            assert_eq!(r.live, live, "{apply_label}");
            assert_eq!(r.retry, retry, "{apply_label}");
            assert_eq!(
                r.error.is_some(),
                retry,
                "{apply_label}: errors are shown in the status"
            );
            let once = &r.once;
            assert!(once.starts_with("/etc/haproxy/haproxy.cfg: "), "{once}");
        }
    }

    #[test]
    fn a_pass_takes_the_latest_live_moment_the_reload_path_and_the_worst_result() {
        let now = Instant::now();
        let later = now + Duration::from_millis(3);
        let runtime = Outcome::Runtime {
            applied: Applied {
                done_at: Some(later),
                ..Default::default()
            },
        };
        let reloaded = Outcome::Reloaded {
            fallback: None,
            took: Duration::ZERO,
        };
        let rejected = Outcome::Rejected {
            check: check(false, "no"),
            diff: String::new(),
        };
        let mut pass = Pass::new(vec!["held".into()]);
        pass.add(&apply(&Outcome::Unchanged, &scene(now)));
        assert!(pass.all_live && pass.live_at.is_none() && pass.path.is_none());
        pass.add(&apply(&runtime, &scene(now)));
        assert_eq!(
            (pass.path, pass.live_at),
            (Some(ApplyPath::Runtime), Some(later))
        );
        pass.add(&apply(&reloaded, &scene(now)));
        assert_eq!(
            (pass.path, pass.reload),
            (Some(ApplyPath::Reload), Some(ReloadResult::Ok))
        );
        assert_eq!(pass.live_at, Some(later), "the latest moment stays");
        pass.add(&apply(&runtime, &scene(now)));
        assert_eq!(
            pass.path,
            Some(ApplyPath::Reload),
            "a reload is not hidden by a runtime change"
        );
        assert!(pass.all_live && !pass.retry);
        pass.add(&apply(&rejected, &scene(now)));
        pass.add(&apply(&reloaded, &scene(now)));
        assert_eq!(
            pass.reload,
            Some(ReloadResult::Rejected),
            "a later ok does not hide a refusal"
        );
        assert!(!pass.all_live && pass.retry);
        assert_eq!(pass.errors.len(), 2, "{:?}", pass.errors);
        let mut missing = Pass::new(Vec::new());
        missing.not_applied(Some("template t.tera: bad".into()));
        assert!(!missing.all_live && missing.errors.len() == 1);
    }

    #[test]
    fn a_fallback_is_counted_and_said_before_the_reload() {
        let r = apply(
            &Outcome::Reloaded {
                fallback: Some(refused()),
                took: Duration::from_millis(5),
            },
            &scene(Instant::now()),
        );
        assert_eq!(r.counts.runtime, Some("fallback"));
        assert_eq!(r.counts.reload, Some("ok"));
        assert_eq!(r.lines[0].0, Level::Warn);
        assert!(r.lines[0].1.contains("runtime API failed, reloaded instead: HAProxy refused `add server svc_web/a 10.0.0.1:80`: No such backend."), "{:?}", r.lines);
        assert!(r.once.contains("runtime API failed") && r.once.ends_with("written and reloaded"));
    }

    #[test]
    fn a_rejected_file_is_summed_up_by_haproxys_first_alert() {
        let out = "[NOTICE] (1) : haproxy version is 2.6.12\n[ALERT] (1) : config : parsing [x.cfg:8] : unknown keyword 'bogus'\n[ALERT] (1) : Fatal errors";
        let r = apply(
            &Outcome::Rejected {
                check: check(false, out),
                diff: "+bogus".into(),
            },
            &scene(Instant::now()),
        );
        assert_eq!(
            r.hook,
            Some((
                WatcherEvent::Reject,
                "[ALERT] (1) : config : parsing [x.cfg:8] : unknown keyword 'bogus'".into()
            ))
        );
        assert!(r.counts.check_failure);
        assert!(r.lines[0].1.contains("+bogus") && r.lines[0].1.contains("t.tera"));
    }

    #[test]
    fn a_failure_says_what_dest_holds_and_never_claims_a_restore_that_did_not_happen() {
        let lock = || ApplyError::Locked {
            path: "/x.lock".into(),
            waited: Duration::ZERO,
        };
        #[rustfmt::skip]
        let table: Vec<(Left, &str)> = vec![
            (Left::AsItWas, "/etc/haproxy/haproxy.cfg is as it was"),
            (Left::NewFile, "the new file stays in /etc/haproxy/haproxy.cfg"),
            (Left::LastGood, "the last good file is back in place"),
            (Left::Previous, "the file there before is back"),
            (Left::NoLastGood, "keeps the refused one"),
            (Left::NotRestored("disk full".into()), "could not be put back (disk full)"),
        ];
        for (left, says) in table {
            let outcome = Outcome::Failed {
                error: lock(),
                fallback: None,
                left: left.clone(),
            };
            let r = apply(&outcome, &scene(Instant::now()));
            let line = &r.lines[0].1;
            assert!(line.contains(says), "{left:?}: {line}");
            let claims = line.contains("back in place");
            assert_eq!(claims, left == Left::LastGood, "{left:?}: {line}");
        }
    }

    #[test]
    fn a_refusal_repeated_on_the_retry_timer_fires_its_hook_once() {
        let now = Instant::now();
        let rejected = || {
            apply(
                &Outcome::Rejected {
                    check: check(false, "bad"),
                    diff: String::new(),
                },
                &scene(now),
            )
        };
        let failed = || {
            let error = ApplyError::Locked {
                path: "/x.lock".into(),
                waited: Duration::ZERO,
            };
            apply(&Outcome::failed(error), &scene(now))
        };
        let reloaded = || {
            apply(
                &Outcome::Reloaded {
                    fallback: None,
                    took: Duration::ZERO,
                },
                &scene(now),
            )
        };
        let passed = || deferred(&check(true, ""), None);
        let mut repeats = Repeats::default();
        // (report, file) → hook sent
        #[rustfmt::skip]
        let steps: Vec<(&str, Report, &[u8], bool)> = vec![
            ("a refused file", rejected(), b"v2", true),
            ("the same file on the retry timer", rejected(), b"v2", false),
            ("and again", rejected(), b"v2", false),
            ("a deferred check passing in between", passed(), b"v1", false),
            ("still the same file", rejected(), b"v2", false),
            ("another file", rejected(), b"v3", true),
            ("that file fails otherwise", failed(), b"v3", true),
            ("failing again", failed(), b"v3", false),
            ("an apply that goes through", reloaded(), b"v4", true),
            ("the first file again is news", rejected(), b"v2", true),
        ];
        for (name, mut r, file, sent) in steps {
            let had = r.hook.is_some();
            repeats.judge(&mut r, file);
            assert_eq!(r.hook.is_some(), sent && had, "{name}");
            assert!(
                !r.lines.is_empty() || r.counts.deferred.is_some(),
                "{name}: still logged"
            );
        }
    }

    #[test]
    fn a_deferred_check_that_refuses_what_haproxy_runs_is_loud() {
        let passed = deferred(&check(true, ""), None);
        assert_eq!(passed.counts.deferred, Some("ok"));
        assert_eq!((passed.counts.apply, passed.lines.len()), (None, 0));
        let stale = deferred(&check(false, "x"), None);
        assert_eq!(stale.lines[0].0, Level::Warn);
        assert!(stale.hook.is_none() && !stale.counts.check_failure);
        let repaired = Outcome::Reloaded {
            fallback: None,
            took: Duration::ZERO,
        };
        let r = deferred(&check(false, "server evil"), Some(&repaired));
        assert_eq!(r.counts.deferred, Some("failed"));
        assert!(r.counts.check_failure);
        assert_eq!(r.reload, Some(ReloadResult::Ok));
        assert_eq!(r.hook.as_ref().map(|h| h.0), Some(WatcherEvent::Reject));
        let error = r.error.unwrap();
        assert!(
            error.contains("HAProxy ran a file that check_cmd rejects"),
            "{error}"
        );
        assert!(
            error.contains("reloaded onto the last checked file"),
            "{error}"
        );
        assert!(r.lines[0].1.contains("server evil"));
    }
}
