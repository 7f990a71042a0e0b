//! The deferred checks: a file applied runtime first is checked off the latency path,
//! `QUIET` after the last apply (a burst costs one check, and no check competes for the
//! CPU with the change right behind another), but no later than `LATEST` after the first
//! apply it covers (steady churn cannot put it off for good). At most one check runs per
//! resource; each runs in a task owned here, so none outlives the loop, and its verdict
//! comes back through `next` for the resource to take (`Resource::deferred_checked`).

use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;

use super::apply::{Bytes, CommandResult, Resource};
use super::{report, Loop};

const QUIET: Duration = Duration::from_millis(250);
const LATEST: Duration = Duration::from_secs(2);

/// A deferred check's verdict: resource index, the bytes checked, the result.
pub(crate) type Done = (usize, Bytes, CommandResult);

pub(crate) enum Wake {
    /// Time to start the checks that are due.
    Due,
    Done(Done),
}

#[derive(Default)]
pub(crate) struct Deferred {
    /// Resource indexes with a check running.
    running: Vec<usize>,
    tasks: JoinSet<Done>,
    due: Option<Instant>,
    /// The first apply since the checks last started.
    since: Option<Instant>,
}

impl Deferred {
    /// An apply ended at `now`: the checks are due `QUIET` from now, at the latest
    /// `LATEST` after the first apply they cover.
    pub(crate) fn applied(&mut self, now: Instant) {
        let since = *self.since.get_or_insert(now);
        self.due = Some((now + QUIET).min(since + LATEST));
    }

    /// A start is already due (an apply came after the last one): it will start what
    /// is left unchecked, at its time.
    pub(crate) fn due(&self) -> bool {
        self.due.is_some()
    }

    /// The next thing to do: start the checks, or take a verdict. Pending while neither.
    pub(crate) async fn next(&mut self) -> Wake {
        loop {
            tokio::select! {
                joined = self.tasks.join_next(), if !self.tasks.is_empty() => match joined {
                    Some(Ok(done)) => {
                        self.running.retain(|i| *i != done.0);
                        return Wake::Done(done);
                    }
                    // A check task panicked: its resource gets a new check next time.
                    _ if self.tasks.is_empty() => self.running.clear(),
                    _ => {}
                },
                _ = crate::backoff::sleep_until(self.due), if self.due.is_some() => {
                    self.due = None;
                    self.since = None;
                    return Wake::Due;
                }
                else => std::future::pending::<()>().await,
            }
        }
    }

    /// Starts the check of every resource whose `dest` holds bytes applied runtime first
    /// and not checked yet (none already running for it).
    pub(crate) fn start(&mut self, resources: &[Resource], timeout: Duration) {
        for (i, r) in resources.iter().enumerate() {
            if self.running.contains(&i) {
                continue;
            }
            let Some(check) = r.pending_check(timeout) else {
                continue;
            };
            self.running.push(i);
            self.tasks.spawn(async move {
                let result = check.run().await;
                (i, check.bytes, result)
            });
        }
    }
}

impl Loop<'_> {
    /// Takes a deferred check's verdict. True when HAProxy had to be put back onto the
    /// last checked file: the loop then renders again, which checks first from now on.
    pub(super) async fn deferred_checked(&mut self, (i, bytes, result): Done) -> bool {
        let timeout = self.cfg.command_timeout;
        let repair = self.resources[i]
            .deferred_checked(bytes.clone(), &result, timeout)
            .await;
        let mut report = report::deferred(&result, repair.as_ref());
        self.repeats[i].judge(&mut report, &bytes);
        let revision = self.sink.metrics.revision.get();
        self.sink
            .tell(&report, &self.resources[i].cfg.dest, revision);
        self.sink.feed(|f| {
            f.checked(super::ui::CheckRow {
                at: crate::schema::unix_now(),
                dest: self.resources[i].cfg.dest.display().to_string(),
                result: report.counts.deferred.unwrap_or("failed"),
                error: report.error.clone(),
            })
        });
        if repair.is_none() {
            // Bytes applied while this check ran: checked at once only when their own
            // start has passed already (it skipped this resource, busy); otherwise at
            // that start, so steady churn is checked every `LATEST`, not back to back.
            if !self.deferred.due() {
                self.deferred.start(&self.resources, timeout);
            }
            return false;
        }
        self.sink.status(|s| {
            s.last_error = report.error.clone();
            s.last_reload_at = Some(crate::schema::unix_now());
            s.last_reload_result = report.reload;
        });
        true
    }
}
