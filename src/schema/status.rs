//! The value of `<prefix>/watchers/<name>`: what a watcher last rendered and applied,
//! read by `portolan status`, `portolan ls`, `portolan certs ls` and the status page.

use serde::{Deserialize, Serialize};

/// The value of `<prefix>/watchers/<name>`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatcherStatus {
    pub name: String,
    /// etcd revision of the snapshot last rendered.
    pub revision: i64,
    /// Seconds since the epoch of the last reload attempt, if any.
    pub last_reload_at: Option<u64>,
    /// How the last reload attempt ended; None before the first.
    pub last_reload_result: Option<ReloadResult>,
    /// How the last change reached HAProxy. Absent in records of older watchers.
    #[serde(default)]
    pub last_apply_path: Option<ApplyPath>,
    /// Seconds since the epoch of the last apply (a runtime change, a reload, or a
    /// render its check refused), whatever its path. Absent in older watchers' records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_apply_at: Option<u64>,
    /// How the last apply ended: `ok`, `rejected` (its check refused it) or `failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_apply_result: Option<ReloadResult>,
    pub last_error: Option<String>,
    /// Removed instances the mass-removal guard holds back now, and until when (seconds
    /// since the epoch): a watcher restarted during a hold ends it then, not later.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub removals_held: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_until: Option<u64>,
    /// Certificates this watcher serves: name → the leaf's expiry (seconds since the
    /// epoch). `portolan certs ls` reads which front doors serve what from here.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub certs_served: std::collections::BTreeMap<String, i64>,
    /// Certificates refused: name → why (the last good one of the name stays served).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub certs_refused: std::collections::BTreeMap<String, String>,
    /// Routes refused to a service because another owns them, and instances outvoted
    /// on route options (`watcher::routes`), one sentence each, as of the last render.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub route_conflicts: Vec<String>,
}

impl WatcherStatus {
    /// Records one pass that applied something at `now`: the reload's result when it
    /// reloaded, and the apply's own (whatever its path) in any case, so the last apply
    /// is never confused with the last reload. `reload`/`path`: what the pass did;
    /// `failed`: it ended in an error.
    pub fn record_apply(
        &mut self,
        reload: Option<ReloadResult>,
        path: Option<ApplyPath>,
        failed: bool,
        now: u64,
    ) {
        if let Some(result) = reload {
            self.last_reload_at = Some(now);
            self.last_reload_result = Some(result);
        }
        if path.is_some() {
            self.last_apply_path = path;
        }
        if reload.is_some() || path.is_some() {
            self.last_apply_at = Some(now);
            self.last_apply_result = Some(match reload {
                Some(r) => r,
                None if failed => ReloadResult::Failed,
                None => ReloadResult::Ok,
            });
        }
    }
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// `WatcherStatus::last_reload_result`, spelled `ok`, `rejected`, `failed` in the record
/// (readers of the record match on those).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReloadResult {
    Ok,
    /// `check_cmd` refused the new file: no reload was attempted.
    Rejected,
    Failed,
    /// A spelling this version does not know (a newer watcher's).
    #[serde(other)]
    Other,
}

/// `WatcherStatus::last_apply_path`, spelled `runtime` (the runtime API, no reload) or
/// `reload` in the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApplyPath {
    Runtime,
    Reload,
    #[serde(other)]
    Other,
}

#[rustfmt::skip]
impl ReloadResult {
    /// The spelling in the record (serde's).
    pub fn as_str(self) -> &'static str {
        match self { Self::Ok => "ok", Self::Rejected => "rejected", Self::Failed => "failed", Self::Other => "other" }
    }
}

#[rustfmt::skip]
impl ApplyPath {
    /// The spelling in the record (serde's).
    pub fn as_str(self) -> &'static str {
        match self { Self::Runtime => "runtime", Self::Reload => "reload", Self::Other => "other" }
    }
}
