//! The rendered file on disk, changed crash-safely: a lock beside it, a staging file
//! beside it, fsync, rename(2) over it, fsync of the folder.
//!
//! Invariant: `dest` only ever changes by the rename of a fully written, fsynced file, so
//! a crash at any point leaves either the old or the new file, never a partial one.
//! Staged files are named `.<dest name>.portolan.<pid>.<n>.tmp`; leftovers of a killed
//! run are removed by `clean_stale` at start. The lock (`.<dest name>.portolan.lock`,
//! flock(2)) keeps a `render --once` and a running watcher from interleaving.
//!
//! Ownership: a file made here by root (a `render --once` run as root beside a watcher
//! that is not) is given to the folder's owner and group — a new version of a file
//! keeps the owner of the version it replaces — so root never leaves behind a file the
//! watcher cannot open. The lock is made mode 0660: whoever may write the folder may
//! take it; flock(2) needs only a read-only open, so a readable lock made by another
//! user still works, and one that is not is refused by name, owner and mode, with what
//! to do.
//!
//! `<dest>.last-good` (`last_good`) holds the last file HAProxy confirmed, written the
//! same crash-safe way, so a refused reload after a restart puts back what HAProxy
//! confirmed rather than whatever the previous run left at `dest`.

use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};
use tokio::io::AsyncWriteExt;

use super::outcome::ApplyError;

static STAGING_COUNTER: AtomicU64 = AtomicU64::new(0);
const LOCK_POLL: Duration = Duration::from_millis(10);
/// The lock's mode: the folder's owner and group, who may write the folder anyway.
const LOCK_MODE: u32 = 0o660;
/// `<dest>.last-good`'s mode: the watcher's own copy, readable by the folder's group
/// (the watcher's, when root made the copy).
const LAST_GOOD_MODE: &str = "0640";

/// One resource's `dest`, with the mode its new versions get.
#[derive(Debug, Clone)]
pub(crate) struct Dest {
    pub(crate) path: PathBuf,
    /// Octal mode from the config; None keeps the mode of the file there.
    mode: Option<String>,
}

/// The lock beside `dest`, held until dropped.
pub(crate) type Lock = Flock<std::fs::File>;

impl Dest {
    pub(crate) fn new(path: PathBuf, mode: Option<String>) -> Dest {
        Dest { path, mode }
    }

    pub(crate) fn show(&self) -> std::path::Display<'_> {
        self.path.display()
    }

    /// What `dest` holds now (None: no file).
    pub(crate) async fn read(&self) -> std::io::Result<Option<Arc<[u8]>>> {
        match tokio::fs::read(&self.path).await {
            Ok(b) => Ok(Some(b.into())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Takes the exclusive lock beside `dest`, waiting up to `timeout`.
    pub(crate) async fn lock(&self, timeout: Duration) -> Result<Lock, ApplyError> {
        let path = lock_path(&self.path);
        let started = tokio::time::Instant::now();
        loop {
            let file = self.open_lock(&path)?;
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
                Err((_, e)) => return Err(self.stage_error(e.into())),
            }
        }
    }

    /// Opens the lock file read-only (all flock(2) needs), or makes it: mode 0660, and
    /// when made by root, the folder's owner and group. One that exists and cannot be
    /// opened is `LockDenied`.
    fn open_lock(&self, path: &Path) -> Result<std::fs::File, ApplyError> {
        loop {
            match std::fs::File::open(path) {
                Ok(f) => return Ok(f),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(lock_denied(path, source)),
            }
            let made = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(LOCK_MODE)
                .open(path);
            match made {
                Ok(f) => {
                    let given = f
                        .set_permissions(std::fs::Permissions::from_mode(LOCK_MODE))
                        .and_then(|()| give_away(&f, heir(path)));
                    return given.map(|()| f).map_err(|e| self.stage_error(e));
                }
                // Made by another apply in between: open that one.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(self.stage_error(e)),
            }
        }
    }

    /// `<dest>.last-good`, beside `dest`.
    pub(crate) fn last_good(&self) -> Dest {
        let mut name = self.path.as_os_str().to_owned();
        name.push(".last-good");
        Dest::new(PathBuf::from(name), Some(LAST_GOOD_MODE.into()))
    }

    /// Writes `bytes` to a fresh staging file beside `dest` with the resource's mode,
    /// fsynced. The caller swaps it in or removes it.
    pub(crate) async fn stage(&self, bytes: &[u8]) -> Result<PathBuf, ApplyError> {
        let there = tokio::fs::metadata(&self.path).await.ok();
        let mode = match (&self.mode, &there) {
            (Some(m), _) => u32::from_str_radix(m, 8).unwrap_or(0o644),
            (None, Some(md)) => md.permissions().mode() & 0o7777,
            (None, None) => 0o644,
        };
        let owner = match there {
            Some(md) => Some((md.uid(), md.gid())),
            None => heir(&self.path),
        };
        stage(&self.path, bytes, mode, owner)
            .await
            .map_err(|e| self.stage_error(e))
    }

    /// A private copy of `bytes` beside `dest` (mode 0600), for a check of bytes that are
    /// not to be swapped in: relative paths in them resolve as they will.
    pub(crate) async fn stage_copy(&self, bytes: &[u8]) -> std::io::Result<PathBuf> {
        stage(&self.path, bytes, 0o600, None).await
    }

    /// rename(2) `staged` over `dest`, then fsync the folder so the rename is durable.
    /// On failure the staged file is removed.
    pub(crate) async fn swap(&self, staged: &Path) -> Result<(), ApplyError> {
        let result = async {
            tokio::fs::rename(staged, &self.path).await?;
            tokio::fs::File::open(folder(&self.path))
                .await?
                .sync_all()
                .await
        }
        .await;
        result.map_err(|source| {
            let _ = std::fs::remove_file(staged);
            ApplyError::Swap {
                dest: self.path.display().to_string(),
                source,
            }
        })
    }

    /// Stage and swap in one step: `dest` holds `bytes` afterwards, or is unchanged.
    pub(crate) async fn write(&self, bytes: &[u8]) -> Result<(), ApplyError> {
        let staged = self.stage(bytes).await?;
        self.swap(&staged).await
    }

    /// Removes staging files a killed run left beside `dest`. Returns how many.
    pub(crate) async fn clean_stale(&self) -> std::io::Result<usize> {
        let prefix = staging_prefix(&self.path);
        let mut removed = 0;
        let mut entries = tokio::fs::read_dir(folder(&self.path)).await?;
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

    fn stage_error(&self, source: std::io::Error) -> ApplyError {
        ApplyError::Stage {
            dest: self.path.display().to_string(),
            source,
        }
    }
}

/// The lock at `path` cannot be opened: named with its owner and mode, and what to do.
fn lock_denied(path: &Path, source: std::io::Error) -> ApplyError {
    let (owner, mode) = match std::fs::metadata(path) {
        Ok(md) => (user_name(md.uid()), format!("{:04o}", md.mode() & 0o7777)),
        Err(_) => ("unknown".into(), "unknown".into()),
    };
    ApplyError::LockDenied {
        path: path.display().to_string(),
        owner,
        mode,
        me: user_name(nix::unistd::geteuid().as_raw()),
        source,
    }
}

/// A user's name, or `uid N` when it has none.
fn user_name(uid: u32) -> String {
    match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
        Ok(Some(u)) => u.name,
        _ => format!("uid {uid}"),
    }
}

/// Who a new file at `path` goes to when root makes it: the folder's owner and group.
/// None when not root (a file is its maker's, and only root may give it away).
fn heir(path: &Path) -> Option<(u32, u32)> {
    if !nix::unistd::geteuid().is_root() {
        return None;
    }
    let md = std::fs::metadata(folder(path)).ok()?;
    Some((md.uid(), md.gid()))
}

/// fchown(2) `f` to `owner` (None: leave it).
fn give_away(f: &impl std::os::fd::AsFd, owner: Option<(u32, u32)>) -> std::io::Result<()> {
    match owner {
        Some((uid, gid)) if nix::unistd::geteuid().is_root() => {
            std::os::unix::fs::fchown(f, Some(uid), Some(gid))
        }
        _ => Ok(()),
    }
}

/// `.<dest name>.portolan.lock` beside `dest`.
pub(crate) fn lock_path(dest: &Path) -> PathBuf {
    folder(dest).join(format!("{}lock", staging_prefix(dest)))
}

/// The folder `dest` is in (`.` for a bare file name).
fn folder(dest: &Path) -> &Path {
    match dest.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
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
    folder(dest).join(format!(
        "{}{}.{}.tmp",
        staging_prefix(dest),
        std::process::id(),
        STAGING_COUNTER.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Writes `bytes` to a fresh staging file beside `dest` with `mode` (and, made by root,
/// `owner`) and fsyncs it.
async fn stage(
    dest: &Path,
    bytes: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> std::io::Result<PathBuf> {
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
        give_away(&f, owner)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stale_staging_files_are_cleaned_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let dest = Dest::new(dir.path().join("haproxy.cfg"), None);
        std::fs::write(dir.path().join(".haproxy.cfg.portolan.1.0.tmp"), "partial").unwrap();
        std::fs::write(dir.path().join("keep.tmp"), "x").unwrap();
        std::fs::write(lock_path(&dest.path), "").unwrap();
        assert_eq!(dest.clean_stale().await.unwrap(), 1);
        assert!(dir.path().join("keep.tmp").exists());
        assert!(lock_path(&dest.path).exists(), "the lock is not a leftover");
    }

    #[tokio::test]
    async fn a_write_gets_the_configured_mode_and_leaves_no_staging_file() {
        let dir = tempfile::tempdir().unwrap();
        let dest = Dest::new(dir.path().join("out.cfg"), Some("0640".into()));
        dest.write(b"v1\n").await.unwrap();
        assert_eq!(std::fs::read(&dest.path).unwrap(), b"v1\n");
        let mode = std::fs::metadata(&dest.path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        assert_eq!(dest.clean_stale().await.unwrap(), 0);
        // Without a configured mode a new version keeps the mode of the file there.
        std::fs::set_permissions(&dest.path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let kept = Dest::new(dest.path.clone(), None);
        kept.write(b"v2\n").await.unwrap();
        let mode = std::fs::metadata(&dest.path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[tokio::test]
    async fn the_lock_is_made_0660_and_the_last_good_copy_sits_beside_dest() {
        let dir = tempfile::tempdir().unwrap();
        let dest = Dest::new(dir.path().join("out.cfg"), None);
        drop(dest.lock(Duration::from_secs(1)).await.unwrap());
        let md = std::fs::metadata(lock_path(&dest.path)).unwrap();
        assert_eq!(md.permissions().mode() & 0o777, LOCK_MODE);
        let good = dest.last_good();
        assert_eq!(good.path, dir.path().join("out.cfg.last-good"));
        good.write(b"confirmed\n").await.unwrap();
        assert_eq!(
            good.read().await.unwrap().as_deref(),
            Some(&b"confirmed\n"[..])
        );
        let md = std::fs::metadata(&good.path).unwrap();
        assert_eq!(md.permissions().mode() & 0o777, 0o640);
        assert_eq!(good.clean_stale().await.unwrap(), 0);
    }

    #[test]
    fn a_lock_that_cannot_be_opened_is_named_with_its_owner_mode_and_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let lock = dir.path().join(".out.cfg.portolan.lock");
        std::fs::write(&lock, "").unwrap();
        std::fs::set_permissions(&lock, std::fs::Permissions::from_mode(0o600)).unwrap();
        let denied = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        let text = lock_denied(&lock, denied).to_string();
        let shown = lock.display();
        assert!(
            text.contains(&format!("cannot open the lock file {shown}")),
            "{text}"
        );
        assert!(text.contains("mode 0600"), "{text}");
        assert!(
            text.contains("chown ") && text.contains(&format!("rm {shown}")),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_second_lock_waits_then_gives_up_naming_the_lock_file() {
        let dir = tempfile::tempdir().unwrap();
        let dest = Dest::new(dir.path().join("out.cfg"), None);
        let held = dest.lock(Duration::from_secs(1)).await.unwrap();
        let Err(ApplyError::Locked { path, .. }) = dest.lock(Duration::from_millis(100)).await
        else {
            panic!("a held lock must not be taken twice")
        };
        assert!(path.ends_with(".out.cfg.portolan.lock"), "{path}");
        drop(held);
        assert!(dest.lock(Duration::from_millis(100)).await.is_ok());
    }
}
