//! Noticing template edits (notify 8).
//!
//! The *folders* holding the templates are watched, not the files: editors save by
//! writing a new file and renaming it over the old one, which replaces the inode a
//! file watch would be attached to. Events for other files in those folders, and
//! read-only access (our own reads of the template) are ignored.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;

use super::{Loop, TEMPLATE_SETTLE};

/// Keeps the OS watch alive; dropping it stops the events.
pub(crate) struct TemplateFiles {
    _watcher: RecommendedWatcher,
}

/// Watches the folders of `templates` and sends `()` on `tx` after a relevant change.
/// The channel should have capacity 1: a pending signal already means "re-read".
pub(crate) fn watch(templates: &[PathBuf], tx: mpsc::Sender<()>) -> notify::Result<TemplateFiles> {
    let mut files = BTreeSet::new();
    let mut dirs = BTreeSet::new();
    for t in templates {
        let (dir, name) = split(t);
        let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
        files.insert(dir.join(name));
        dirs.insert(dir);
    }
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let Ok(ev) = res else { return };
        if matches!(ev.kind, EventKind::Access(_)) {
            return;
        }
        if ev.paths.iter().any(|p| files.contains(p)) {
            // Full means a signal is already pending; that is enough.
            let _ = tx.try_send(());
        }
    })?;
    for d in &dirs {
        watcher.watch(d, RecursiveMode::NonRecursive)?;
    }
    Ok(TemplateFiles { _watcher: watcher })
}

fn split(path: &Path) -> (PathBuf, PathBuf) {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().map(PathBuf::from).unwrap_or_default();
    (dir, name)
}
impl Loop<'_> {
    /// Re-reads every template after an edit. True when one of them changed.
    pub(super) async fn reload_templates(&mut self) -> bool {
        tokio::time::sleep(TEMPLATE_SETTLE).await;
        while self.tpl_rx.try_recv().is_ok() {}
        let mut changed = false;
        for r in &mut self.resources {
            match r.load_template().await {
                Ok(true) => {
                    tracing::info!(template = %r.name(), "template changed, re-rendering");
                    changed = true;
                }
                Ok(false) => {}
                Err(e) => {
                    self.sink.metrics.template_errors.inc();
                    tracing::error!(
                        "{e}\n{} keeps its last good content until the template is fixed",
                        r.cfg.dest.display()
                    );
                    self.sink.status(|s| s.last_error = Some(e.to_string()));
                }
            }
        }
        changed
    }
}
