//! Where reports go: the log, `/metrics`, the hooks, the status key and the status
//! page's feed. The one place the watcher's loop and its deferred checks say what
//! happened (`report` decides what).

use std::path::Path;
use std::sync::Arc;

use tokio::sync::watch;

use super::metrics::Metrics;
use super::report::{Level, Report};
use super::ui::Feed;
use crate::hook::{Event, Hooks, WatcherEvent};
use crate::schema::WatcherStatus;

pub(crate) struct Sink {
    pub(crate) metrics: Arc<Metrics>,
    hooks: Hooks,
    status: watch::Sender<WatcherStatus>,
    /// The status page's feed, when the page is on.
    feed: Option<watch::Sender<Feed>>,
    watcher: String,
}

impl Sink {
    pub(crate) fn new(
        watcher: String,
        metrics: Arc<Metrics>,
        hooks: Hooks,
        status: watch::Sender<WatcherStatus>,
        feed: Option<watch::Sender<Feed>>,
    ) -> Sink {
        Sink {
            metrics,
            hooks,
            status,
            feed,
            watcher,
        }
    }

    /// True when the status page listens: what only it needs is worth gathering.
    pub(crate) fn feeds(&self) -> bool {
        self.feed.is_some()
    }

    /// Tells the status page (nothing when it is off).
    pub(crate) fn feed(&self, change: impl FnOnce(&mut Feed)) {
        if let Some(f) = &self.feed {
            f.send_modify(change);
        }
    }

    /// Logs, counts and announces one report (the status key is the caller's: it sums
    /// up a whole pass).
    pub(crate) fn tell(&self, r: &Report, dest: &Path, revision: i64) {
        let dest_shown = dest.display();
        for (level, line) in &r.lines {
            match level {
                Level::Info => tracing::info!(dest = %dest_shown, revision, "{line}"),
                Level::Warn => tracing::warn!(dest = %dest_shown, revision, "{line}"),
                Level::Error => tracing::error!(dest = %dest_shown, revision, "{line}"),
            }
        }
        self.metrics.count(&r.counts);
        if let Some((event, summary)) = &r.hook {
            self.hook(*event, summary.clone(), dest, revision);
        }
    }

    /// One hook event with the fields every watcher event carries.
    pub(crate) fn hook(&self, event: WatcherEvent, summary: String, dest: &Path, revision: i64) {
        self.hooks.emit(
            Event::new(event, summary)
                .with("watcher", self.watcher.as_str())
                .with("revision", revision)
                .with("dest", dest.display().to_string()),
        );
    }

    pub(crate) fn status(&self, change: impl FnOnce(&mut WatcherStatus)) {
        self.status.send_modify(change);
    }
}
