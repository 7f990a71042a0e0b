//! Which path a rendered change takes to HAProxy, decided from one value (pure).
//!
//! `State` is what one resource knows: the bytes at `dest` (`live`), the last file HAProxy
//! confirmed running (`confirmed`; kept on disk in `<dest>.last-good`, read back at
//! start, so it survives a restart — `saved` is what that file holds), the last file
//! that passed `check_cmd` (`checked`),
//! whether changes must be checked before they are applied (`check_first`), and whether
//! HAProxy may not run `live` (`reload_pending`). `State::route` turns a render into a
//! `Route`; the executor (`apply/mod.rs`) carries it out and feeds each result back
//! through one transition method, so every path reads as route → execute → transition.
//!
//! The paths:
//! - **runtime first**: HAProxy runs `live`, the change is server lines only
//!   (`runtime_plan`), and `live` descends from a checked file by such changes: the ops go
//!   to the admin socket before any check and the file follows unchecked. Why that is
//!   safe: the file differs from a checked one only by server lines HAProxy's own parser
//!   just accepted; it is still checked in the background (`unchecked_live`) and before
//!   any reload.
//! - **check first**: stage, check, swap, then the runtime ops, a reload, or nothing (no
//!   reload configured). Taken when runtime first is not possible, after the runtime API
//!   refused (`fallback_route`: a reload makes HAProxy whole again), and while
//!   `check_first` is on.
//! - **repair**: a deferred check refused the bytes HAProxy runs: the last checked file
//!   goes back, HAProxy is reloaded onto it, and `check_first` stays on until a file passes.
//!
//! Invariants: HAProxy is never reloaded onto bytes that did not pass `check_cmd` (a reload
//! of unchecked `live` bytes checks them first: `Check::Live`); a refused reload puts back
//! `confirmed`, the file HAProxy last confirmed — by this run or, read from
//! `<dest>.last-good`, a previous one — not merely the one before (`Restore`); nothing
//! read from disk counts as checked.

use std::sync::Arc;

use crate::watcher::haproxy::runtime_plan::{RuntimeOp, RuntimePlan};

/// File contents, shared between `live`, `confirmed` and `checked`.
pub(crate) type Bytes = Arc<[u8]>;

/// What a resource's config lets the watcher do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Means {
    /// A `check_cmd` is configured.
    pub(crate) check: bool,
    /// A master socket or `reload_cmd` is configured.
    pub(crate) reload: bool,
    /// An admin socket is configured (runtime API).
    pub(crate) runtime: bool,
}

#[derive(Debug, Clone)]
pub(crate) struct State {
    means: Means,
    live: Option<Bytes>,
    confirmed: Option<Bytes>,
    /// What `<dest>.last-good` holds (as read at start, or last written).
    saved: Option<Bytes>,
    checked: Option<Bytes>,
    check_first: bool,
    /// Reload even if the bytes are unchanged: a previous run may have died between
    /// rename and reload, or the runtime API left HAProxy half-way.
    reload_pending: bool,
}

/// The next thing to do with a rendered file.
#[derive(Debug, PartialEq)]
pub(crate) enum Route {
    /// The bytes are live and nothing needs reloading.
    Unchanged,
    /// Send these to the admin socket, then write the file without a check.
    RuntimeFirst(Vec<RuntimeOp>),
    CheckFirst(CheckFirst),
}

/// Check, swap, then make HAProxy run the file.
#[derive(Debug, PartialEq)]
pub(crate) struct CheckFirst {
    pub(crate) check: Check,
    pub(crate) then: Then,
}

#[derive(Debug, PartialEq)]
pub(crate) enum Check {
    /// Stage the rendered bytes, check them (when a check is configured), swap them in.
    Rendered,
    /// The rendered bytes are those at `dest` already, and no check passed them yet
    /// (a previous run's, or bytes applied runtime first): check a copy.
    Live,
    /// The rendered bytes are at `dest` and passed before (or there is no check).
    Nothing,
}

#[derive(Debug, PartialEq)]
pub(crate) enum Then {
    /// No reload is configured: the file is all there is.
    Write,
    /// The file is checked and in place: these make HAProxy run it.
    Runtime(Vec<RuntimeOp>),
    /// `Some(why)`: the runtime API was possible but cannot express this change.
    Reload(Option<String>),
}

/// What goes back to `dest` after a refused reload.
#[derive(Debug, PartialEq)]
pub(crate) enum Restore {
    /// The file HAProxy last confirmed.
    Confirmed(Bytes),
    /// Nothing confirmed is known: the file that was there before this apply.
    Previous(Bytes),
    /// `dest` holds the confirmed file already.
    InPlace,
    /// Nothing to go back to: `dest` keeps the refused file.
    Nothing,
}

/// What to make of a deferred check's verdict.
#[derive(Debug, PartialEq)]
pub(crate) enum Verdict {
    /// Those bytes are checked now (runtime first is back on).
    Passed,
    /// Refused, but `dest` holds newer bytes since, which get a check of their own.
    Stale,
    /// HAProxy runs what no check accepts: put `good` back and reload onto it (None:
    /// no checked file to go back to, which runtime first never starts without).
    Repair(Option<Bytes>),
}

impl State {
    /// A resource at start: HAProxy may run an older file than `dest` (a previous run
    /// may have died between rename and reload), so the first apply reloads.
    /// `last_good`: what `<dest>.last-good` holds, the file HAProxy last confirmed to a
    /// previous run (not taken as checked: a reload of it is checked first).
    pub(crate) fn new(means: Means, live: Option<Bytes>, last_good: Option<Bytes>) -> State {
        State {
            means,
            live,
            confirmed: last_good.clone(),
            saved: last_good,
            checked: None,
            check_first: false,
            reload_pending: true,
        }
    }

    /// For one-shot runs: HAProxy is taken to run the file on disk, so identical bytes
    /// cause no reload; and nothing checks in the background, so every change is
    /// checked before it is applied.
    /// The assumption is not a confirmation: it is not saved to `<dest>.last-good`.
    pub(crate) fn assume_running(&mut self) {
        self.reload_pending = false;
        self.confirmed = self.live.clone();
        self.saved = self.confirmed.clone();
        self.check_first = true;
    }

    /// Files the config loads (certificates, `watcher::tls`) changed and HAProxy does
    /// not run them: reload, and check first, as no check passed the config with them.
    pub(crate) fn inputs_changed(&mut self) {
        self.checked = None;
        self.reload_pending = true;
    }

    pub(crate) fn live(&self) -> Option<&Bytes> {
        self.live.as_ref()
    }

    /// Whether `bytes` may be reloaded without running `check_cmd` on them again.
    fn is_checked(&self, bytes: &[u8]) -> bool {
        !self.means.check || self.checked.as_deref() == Some(bytes)
    }

    /// The path `rendered` takes; `plan` is the runtime planner, asked only when the
    /// runtime API could carry the change.
    pub(crate) fn route(
        &self,
        rendered: &[u8],
        plan: impl FnOnce(&[u8], &[u8]) -> RuntimePlan,
    ) -> Route {
        let changed = self.live.as_deref() != Some(rendered);
        let must_reload = self.reload_pending && self.means.reload;
        if !changed && !must_reload {
            return Route::Unchanged;
        }
        let plan = match &self.live {
            Some(live)
                if changed && !self.reload_pending && self.means.reload && self.means.runtime =>
            {
                Some(plan(live, rendered))
            }
            _ => None,
        };
        // Runtime first needs a checked file to start from: `live` is that file, or one
        // derived from it by server lines HAProxy took.
        let from_checked = !self.means.check || self.checked.is_some();
        match plan {
            Some(RuntimePlan::Runtime(ops)) if !self.check_first && from_checked => {
                Route::RuntimeFirst(ops)
            }
            plan => Route::CheckFirst(self.check_route(rendered, plan)),
        }
    }

    /// The runtime API refused a runtime-first change part-way: HAProxy may run a mix,
    /// and only a reload of the checked file makes it whole again.
    pub(crate) fn fallback_route(&mut self, rendered: &[u8]) -> CheckFirst {
        self.reload_pending = true;
        self.check_route(rendered, None)
    }

    fn check_route(&self, rendered: &[u8], plan: Option<RuntimePlan>) -> CheckFirst {
        let check = if self.live.as_deref() != Some(rendered) {
            Check::Rendered
        } else if self.is_checked(rendered) {
            Check::Nothing
        } else {
            Check::Live
        };
        let then = match plan {
            _ if !self.means.reload => Then::Write,
            Some(RuntimePlan::Runtime(ops)) => Then::Runtime(ops),
            Some(RuntimePlan::Reload(why)) => Then::Reload(Some(why)),
            None => Then::Reload(None),
        };
        CheckFirst { check, then }
    }

    /// `dest` as read under the lock. Bytes other than `live` were put there behind the
    /// watcher's back (another `render --once`, a hand edit): they are what is live, and
    /// they are not derived from a checked file, so the next change is checked first.
    pub(crate) fn saw_on_disk(&mut self, disk: Bytes) {
        if self.live.as_deref() != Some(&*disk) {
            self.live = Some(disk);
            self.checked = None;
        }
    }

    /// HAProxy may not run `live` (a runtime change half done and not undone, a reload
    /// unconfirmed or failed): the next apply reloads, even with unchanged bytes.
    pub(crate) fn must_reload(&mut self) {
        self.reload_pending = true;
    }

    /// Runtime first: HAProxy took the ops and `rendered` is at `dest` now (unchecked).
    pub(crate) fn followed(&mut self, rendered: Bytes) {
        self.live = Some(rendered);
        self.went_live();
    }

    /// Check first: `rendered` passed its check (or needed none) and is at `dest`.
    /// Returns the bytes it replaced.
    pub(crate) fn written(&mut self, rendered: Bytes) -> Option<Bytes> {
        let previous = self.live.replace(rendered);
        if self.means.check {
            self.checked = self.live.clone();
            self.check_first = false;
        }
        previous
    }

    /// HAProxy confirmed running `live` (reload confirmed, every runtime command
    /// answered) or, with nothing to reload, it is written: the last good file.
    pub(crate) fn went_live(&mut self) {
        self.reload_pending = false;
        self.confirmed = self.live.clone();
    }

    /// A reload was refused: what to put back so the file says what HAProxy runs. It is
    /// `confirmed`, which is not `previous` when that was a file whose reload timed out
    /// and was never confirmed; `previous` only while nothing was ever confirmed.
    pub(crate) fn reload_refused(&self, previous: Option<Bytes>) -> Restore {
        match (&self.confirmed, previous) {
            (Some(good), _) if self.live.as_ref() == Some(good) => Restore::InPlace,
            (Some(good), _) => Restore::Confirmed(good.clone()),
            (None, Some(before)) if self.live.as_ref() != Some(&before) => {
                Restore::Previous(before)
            }
            (None, _) => Restore::Nothing,
        }
    }

    /// A confirmed file `<dest>.last-good` does not hold yet, to write there (only
    /// where reloads happen: nothing else reads it back).
    pub(crate) fn unsaved(&self) -> Option<Bytes> {
        let good = self.confirmed.clone()?;
        (self.means.reload && self.saved.as_ref() != Some(&good)).then_some(good)
    }

    /// `<dest>.last-good` holds `good` now.
    pub(crate) fn saved(&mut self, good: Bytes) {
        self.saved = Some(good);
    }

    /// `good` is back at `dest`.
    pub(crate) fn restored(&mut self, good: Bytes) {
        self.live = Some(good);
    }

    /// `dest` holds bytes applied runtime first that no check passed yet: they are
    /// checked off the latency path.
    pub(crate) fn unchecked_live(&self) -> Option<Bytes> {
        let live = self.live.clone()?;
        (!self.is_checked(&live)).then_some(live)
    }

    /// A deferred check of `bytes` ended.
    pub(crate) fn deferred(&mut self, bytes: Bytes, passed: bool) -> Verdict {
        if passed {
            self.checked = Some(bytes);
            self.check_first = false;
            return Verdict::Passed;
        }
        if self.live.as_deref() != Some(&*bytes) {
            return Verdict::Stale;
        }
        self.check_first = true;
        Verdict::Repair(self.checked.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::watcher::haproxy::runtime_plan::AdminState;

    fn b(s: &str) -> Bytes {
        Arc::from(s.as_bytes())
    }

    const ALL: Means = Means {
        check: true,
        reload: true,
        runtime: true,
    };

    fn op() -> RuntimeOp {
        RuntimeOp::State {
            backend: "svc_web".into(),
            server: "a".into(),
            state: AdminState::Maint,
        }
    }

    /// A planner that says the change is server lines only.
    fn servers(_: &[u8], _: &[u8]) -> RuntimePlan {
        RuntimePlan::Runtime(vec![op()])
    }

    /// A planner that says the change needs a reload.
    fn structural(_: &[u8], _: &[u8]) -> RuntimePlan {
        RuntimePlan::Reload("a new backend".into())
    }

    fn never(_: &[u8], _: &[u8]) -> RuntimePlan {
        panic!("the planner must not be asked")
    }

    /// A resource that started on v1, reloaded onto it (checked and confirmed).
    fn running_v1(means: Means) -> State {
        let mut s = State::new(means, Some(b("v1")), None);
        match s.route(b"v1", never) {
            Route::CheckFirst(c) if c.check == Check::Live || !means.check => {}
            Route::Unchanged if !means.reload => {}
            r => panic!("the first apply checks and reloads what is there: {r:?}"),
        }
        s.written(b("v1"));
        s.went_live();
        s
    }

    /// A reload of the bytes at `dest`, which passed their check.
    fn reload_as_is() -> Route {
        check_first(Check::Nothing, Then::Reload(None))
    }

    fn check_first(check: Check, then: Then) -> Route {
        Route::CheckFirst(CheckFirst { check, then })
    }

    #[test]
    fn at_start_the_file_there_is_checked_then_reloaded_even_if_unchanged() {
        let s = State::new(ALL, Some(b("v1")), None);
        assert_eq!(
            s.route(b"v1", never),
            check_first(Check::Live, Then::Reload(None))
        );
        // A new render at start is checked before the first reload, never runtime first.
        assert_eq!(
            s.route(b"v2", never),
            check_first(Check::Rendered, Then::Reload(None))
        );
        // Nothing to reload with: unchanged bytes are just unchanged.
        let s = State::new(
            Means {
                reload: false,
                ..ALL
            },
            Some(b("v1")),
            None,
        );
        assert_eq!(s.route(b"v1", never), Route::Unchanged);
    }

    #[test]
    fn rules_of_the_route_table() {
        // (state, rendered, planner) → route
        let v1 = running_v1(ALL);
        let mut checking_first = running_v1(ALL);
        checking_first.check_first = true;
        let no_runtime = running_v1(Means {
            runtime: false,
            ..ALL
        });
        let no_reload = running_v1(Means {
            reload: false,
            ..ALL
        });
        let no_check = running_v1(Means {
            check: false,
            ..ALL
        });
        let mut hand_edited = running_v1(ALL);
        hand_edited.saw_on_disk(b("edited"));
        type Planner = fn(&[u8], &[u8]) -> RuntimePlan;
        #[rustfmt::skip]
        let table: Vec<(&str, &State, &str, Planner, Route)> = vec![
            ("same bytes, live", &v1, "v1", never, Route::Unchanged),
            ("server lines only", &v1, "v2", servers, Route::RuntimeFirst(vec![op()])),
            ("structural change", &v1, "v2", structural,
                check_first(Check::Rendered, Then::Reload(Some("a new backend".into())))),
            ("check-first mode", &checking_first, "v2", servers,
                check_first(Check::Rendered, Then::Runtime(vec![op()]))),
            ("no admin socket", &no_runtime, "v2", never,
                check_first(Check::Rendered, Then::Reload(None))),
            ("no reload configured", &no_reload, "v2", never,
                check_first(Check::Rendered, Then::Write)),
            ("no check configured: runtime first from any file", &no_check, "v2", servers,
                Route::RuntimeFirst(vec![op()])),
            ("dest replaced behind our back", &hand_edited, "v2", servers,
                check_first(Check::Rendered, Then::Runtime(vec![op()]))),
        ];
        for (name, state, rendered, planner, want) in table {
            assert_eq!(state.route(rendered.as_bytes(), planner), want, "{name}");
        }
    }

    #[test]
    fn changed_inputs_reload_an_unchanged_file_only_after_a_check() {
        // Certificate files the runtime API could not apply: HAProxy must reload, and
        // no check ran the config with the new files yet, so it runs first.
        let mut s = running_v1(ALL);
        assert_eq!(s.route(b"v1", never), Route::Unchanged);
        s.inputs_changed();
        assert_eq!(
            s.route(b"v1", never),
            check_first(Check::Live, Then::Reload(None))
        );
        // Nor does a server change go runtime first past it.
        assert!(matches!(s.route(b"v2", servers), Route::CheckFirst(_)));
    }

    #[test]
    fn runtime_first_accepted_makes_the_unchecked_file_live_and_due_for_a_check() {
        let mut s = running_v1(ALL);
        assert!(matches!(s.route(b"v2", servers), Route::RuntimeFirst(_)));
        s.followed(b("v2"));
        assert_eq!(s.route(b"v2", never), Route::Unchanged);
        assert_eq!(s.unchecked_live(), Some(b("v2")));
        // A later runtime change chains on it with no check in between.
        assert!(matches!(s.route(b"v3", servers), Route::RuntimeFirst(_)));
    }

    #[test]
    fn runtime_first_refused_or_partly_applied_falls_back_to_a_checked_reload() {
        let mut s = running_v1(ALL);
        assert!(matches!(s.route(b"v2", servers), Route::RuntimeFirst(_)));
        assert_eq!(
            s.fallback_route(b"v2"),
            CheckFirst {
                check: Check::Rendered,
                then: Then::Reload(None)
            }
        );
        // If that check refuses v2 too and the undo fails, HAProxy still runs part of
        // v2: v1 is reloaded, checked already, so without a check.
        s.must_reload();
        assert_eq!(s.route(b"v1", never), reload_as_is());
    }

    #[test]
    fn a_check_that_fails_or_times_out_changes_nothing() {
        // The executor makes no transition on a refused check: the same render routes
        // the same way again, and `dest` is untouched.
        let s = running_v1(Means {
            runtime: false,
            ..ALL
        });
        let before = s.route(b"v2", never);
        assert_eq!(before, check_first(Check::Rendered, Then::Reload(None)));
        assert_eq!(s.route(b"v2", never), before);
        assert_eq!(s.live(), Some(&b("v1")));
    }

    #[test]
    fn a_check_that_passes_makes_the_file_checked_and_runtime_first_possible() {
        let mut s = State::new(ALL, None, None);
        assert_eq!(
            s.route(b"v1", never),
            check_first(Check::Rendered, Then::Reload(None))
        );
        assert_eq!(s.written(b("v1")), None);
        s.went_live();
        assert_eq!(s.unchecked_live(), None);
        assert!(matches!(s.route(b"v2", servers), Route::RuntimeFirst(_)));
    }

    #[test]
    fn a_confirmed_reload_makes_the_file_the_last_good_one() {
        let mut s = running_v1(ALL);
        let previous = s.written(b("v2"));
        assert_eq!(previous, Some(b("v1")));
        s.went_live();
        assert_eq!(s.route(b"v2", never), Route::Unchanged);
        // A refused reload of v3 now puts v2 back, not v1.
        let previous = s.written(b("v3"));
        assert_eq!(s.reload_refused(previous), Restore::Confirmed(b("v2")));
    }

    #[test]
    fn a_refused_reload_puts_back_the_confirmed_file_not_an_unconfirmed_one() {
        let mut s = running_v1(Means {
            runtime: false,
            ..ALL
        });
        // v2's reload timed out: v2 stays at dest, unconfirmed, and is reloaded again.
        let previous = s.written(b("v2"));
        s.must_reload();
        assert_eq!(previous, Some(b("v1")));
        assert_eq!(s.route(b"v2", never), reload_as_is());
        // That reload is refused (or the master is gone): v1, the last confirmed, goes back.
        let previous = s.written(b("v2"));
        assert_eq!(s.reload_refused(previous), Restore::Confirmed(b("v1")));
        s.restored(b("v1"));
        assert_eq!(s.live(), Some(&b("v1")));
        // Nothing to put back when dest holds the confirmed file already.
        assert_eq!(s.reload_refused(Some(b("v0"))), Restore::InPlace);
    }

    #[test]
    fn a_failed_deferred_check_repairs_then_checks_first_until_a_file_passes() {
        let mut s = running_v1(ALL);
        s.followed(b("v2"));
        let due = s.unchecked_live().expect("v2 is due for a check");
        assert_eq!(s.deferred(due, false), Verdict::Repair(Some(b("v1"))));
        // Repair: v1 back, reloaded onto.
        s.restored(b("v1"));
        s.went_live();
        // From now on a server-lines change is checked before it is applied...
        assert_eq!(
            s.route(b"v3", servers),
            check_first(Check::Rendered, Then::Runtime(vec![op()]))
        );
        // ...until a file passes: then runtime first again.
        s.written(b("v3"));
        s.went_live();
        assert!(matches!(s.route(b"v4", servers), Route::RuntimeFirst(_)));
    }

    #[test]
    fn a_deferred_check_passing_turns_runtime_first_back_on() {
        let mut s = running_v1(ALL);
        s.followed(b("v2"));
        s.check_first = true;
        assert_eq!(s.deferred(b("v2"), true), Verdict::Passed);
        assert_eq!(s.unchecked_live(), None);
        assert!(matches!(s.route(b"v3", servers), Route::RuntimeFirst(_)));
    }

    #[test]
    fn a_refused_check_of_bytes_replaced_since_changes_nothing() {
        let mut s = running_v1(ALL);
        s.followed(b("v2"));
        s.followed(b("v3"));
        assert_eq!(s.deferred(b("v2"), false), Verdict::Stale);
        assert_eq!(s.unchecked_live(), Some(b("v3")));
        assert!(matches!(s.route(b"v4", servers), Route::RuntimeFirst(_)));
    }

    #[test]
    fn a_failed_repair_reloads_on_the_next_apply() {
        let mut s = running_v1(ALL);
        s.followed(b("v2"));
        assert!(matches!(s.deferred(b("v2"), false), Verdict::Repair(_)));
        s.restored(b("v1"));
        s.must_reload();
        assert_eq!(s.route(b"v1", never), reload_as_is());
    }

    #[test]
    fn a_one_shot_run_takes_the_file_as_running_and_checks_first() {
        let mut s = State::new(ALL, Some(b("v1")), None);
        s.assume_running();
        assert_eq!(s.route(b"v1", never), Route::Unchanged);
        assert_eq!(
            s.route(b"v2", servers),
            check_first(Check::Rendered, Then::Runtime(vec![op()]))
        );
    }

    #[test]
    fn rules_of_what_a_refused_reload_puts_back() {
        // (confirmed, live before, live now) → restore
        let with = |confirmed: Option<&str>, before: Option<&str>, now: &str| {
            let mut s = State::new(ALL, before.map(b), confirmed.map(b));
            let previous = s.written(b(now));
            s.reload_refused(previous)
        };
        #[rustfmt::skip]
        let table: Vec<(&str, Restore, Restore)> = vec![
            ("a confirmed file goes back", with(Some("v1"), Some("v2"), "v3"), Restore::Confirmed(b("v1"))),
            ("over an unconfirmed one left at dest", with(Some("v1"), Some("v2"), "v2"), Restore::Confirmed(b("v1"))),
            ("the confirmed file is there", with(Some("v1"), Some("v0"), "v1"), Restore::InPlace),
            ("nothing confirmed: the file before", with(None, Some("v0"), "v1"), Restore::Previous(b("v0"))),
            ("nothing confirmed, the refused file was there", with(None, Some("v1"), "v1"), Restore::Nothing),
            ("nothing at all", with(None, None, "v1"), Restore::Nothing),
        ];
        for (name, got, want) in table {
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn the_last_good_file_from_a_previous_run_is_what_a_refused_reload_puts_back() {
        // The previous run confirmed v1, left v2 unconfirmed at dest and was killed.
        let mut s = State::new(ALL, Some(b("v2")), Some(b("v1")));
        // v2 is not taken as checked nor as confirmed: checked, then reloaded.
        assert_eq!(
            s.route(b"v2", never),
            check_first(Check::Live, Then::Reload(None))
        );
        let previous = s.written(b("v2"));
        assert_eq!(s.reload_refused(previous), Restore::Confirmed(b("v1")));
        // Nothing to save: the file on disk says v1 already.
        assert_eq!(s.unsaved(), None);
    }

    #[test]
    fn each_newly_confirmed_file_is_saved_once_and_only_where_reloads_happen() {
        let mut s = running_v1(ALL);
        assert_eq!(s.unsaved(), Some(b("v1")));
        s.saved(b("v1"));
        assert_eq!(s.unsaved(), None);
        // Runtime first: HAProxy took the change, so the file is confirmed.
        s.followed(b("v2"));
        assert_eq!(s.unsaved(), Some(b("v2")));
        // A save that failed is due again at the next apply.
        s.written(b("v3"));
        s.must_reload();
        assert_eq!(s.unsaved(), Some(b("v2")), "v3 is not confirmed");
        // No reload configured: nothing ever reads the copy back.
        let written = running_v1(Means {
            reload: false,
            ..ALL
        });
        assert_eq!(written.unsaved(), None);
        // A one-shot run's assumption is not a confirmation.
        let mut once = State::new(ALL, Some(b("v1")), Some(b("v0")));
        once.assume_running();
        assert_eq!(once.unsaved(), None);
    }
}
