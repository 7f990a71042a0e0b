//! The snapshot the watcher renders: etcd's, as the source admitted it, with a mass
//! removal held back (`guard`) and emptied services' backends lingering (`linger`).
//! Pure (the caller passes the clock). Both judge a snapshot against the one rendered
//! before, which is kept here.

use std::sync::Arc;
use std::time::Instant;

use super::guard::{self, Guard, Held};
use super::linger::Linger;
use super::store::StoreSnapshot;
use crate::config::WatcherConfig;

pub(crate) struct Effective {
    guard: Guard,
    linger: Linger,
    /// The snapshot the last pass rendered (held removals included): what the guard
    /// judges the next batch against.
    rendered: Option<Arc<StoreSnapshot>>,
    /// Before the first pass: the file HAProxy runs, which stands in for the snapshot
    /// rendered last (`guard::seed`), so the first render after a restart is judged too.
    seed: Option<String>,
}

/// What one snapshot becomes.
pub(crate) struct Judged {
    pub(crate) snapshot: Arc<StoreSnapshot>,
    /// A removal held back by this snapshot.
    pub(crate) held: Option<Held>,
    /// Services that went empty with it, whose backends stay.
    pub(crate) went_empty: Vec<String>,
}

impl Effective {
    /// `live`: what the first `[[template]]`'s `dest` holds at start, if anything.
    pub(crate) fn new(cfg: &WatcherConfig, live: Option<&[u8]>) -> Effective {
        Effective {
            guard: Guard::new(&cfg.mass_removal),
            linger: Linger::new(cfg.empty_backend_grace),
            rendered: None,
            seed: live.map(|b| String::from_utf8_lossy(b).into_owned()),
        }
    }

    /// A hold that an earlier run started (its status record says so) ends at `until`.
    pub(crate) fn resume_hold(&mut self, until: Instant) {
        self.guard.resume_hold(until);
    }

    /// The snapshot to render for `desired`; it becomes the one the next is judged by.
    pub(crate) fn judge(&mut self, desired: &StoreSnapshot, now: Instant) -> Judged {
        if let Some(file) = self.seed.take() {
            self.rendered = Some(Arc::new(guard::seed(&file, desired)));
        }
        let (mut effective, held) = self.guard.filter(self.rendered.as_deref(), desired, now);
        let went_empty = self
            .linger
            .keep(self.rendered.as_deref(), &mut effective, now);
        let snapshot = Arc::new(effective);
        self.rendered = Some(snapshot.clone());
        Judged {
            snapshot,
            held,
            went_empty,
        }
    }

    /// Instances held back now.
    pub(crate) fn held(&self) -> usize {
        self.guard.held()
    }

    /// Backends kept for services with no instance.
    pub(crate) fn lingering(&self) -> usize {
        self.linger.count()
    }

    /// When the held removals are due.
    pub(crate) fn hold_over(&self) -> Option<Instant> {
        self.guard.deadline()
    }

    /// When the next lingering backend goes.
    pub(crate) fn grace_over(&self) -> Option<Instant> {
        self.linger.deadline()
    }

    /// The operator confirmed the held removals: the next `judge` applies them.
    /// Returns how many were held.
    pub(crate) fn release(&mut self) -> usize {
        self.guard.release()
    }
}
