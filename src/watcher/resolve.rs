//! Host-name resolution for the routing policy, off the render path, with a memory.
//!
//! The source asks `lookup(name)` while it builds a snapshot; the answer comes from a
//! cache and never waits. A name not seen before is `Pending`, unless an answer for it
//! was kept in the state dir by the last run: a restart renders that answer at once
//! (no gap, and the first render is the live file: no reload), and looks the name up
//! again in the background. The background task (`run`) resolves names with libc (as
//! HAProxy's `init-addr libc` would), at most `MAX_IN_FLIGHT` at a time, each with a
//! timeout, and bumps the `changed` counter when what a name means changes, so the
//! source builds the snapshot again. Names are looked up every `dns_refresh_s`;
//! failures are retried with a backoff. Names no instance uses any more are dropped
//! (`retain`).
//!
//! Stale-if-error: a lookup that fails (no answer, SERVFAIL, NXDOMAIN alike) keeps the
//! last good answer for `dns_stale_s` after it was had; past that the name is `Failed`
//! and its instances leave, each named by the source. An answer is an answer: one
//! naming an address the policy denies is judged as it is, never outlived by the
//! previous one.
//!
//! Kept answers: `<state_dir>/dns-answers.json`, each name's last good addresses and
//! when they were had, written crash-safely (temp file, fsync, rename, fsync of the
//! folder) when an answer changes and at most once a refresh otherwise. A kept answer
//! older than `dns_stale_s` is not used.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures_util::stream::{FuturesUnordered, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::policy::Resolution;
use crate::backoff::Backoff;

/// Longest one lookup may take.
pub(crate) const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);
/// Lookups running at once: a thousand names refresh in a few rounds, without a
/// thousand blocking getaddrinfo threads.
pub(crate) const MAX_IN_FLIGHT: usize = 8;
/// The kept answers' file in the state dir.
pub(crate) const ANSWERS_FILE: &str = "dns-answers.json";

/// How names are looked up and kept (`[watcher] dns_refresh_s`, `dns_stale_s`,
/// `state_dir`).
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) refresh: Duration,
    pub(crate) stale: Duration,
    /// None: answers are not kept across restarts (the state dir is unusable).
    pub(crate) file: Option<PathBuf>,
}

/// A lookup that answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Good {
    ips: Vec<IpAddr>,
    /// When it answered, in milliseconds since the Unix epoch.
    at_ms: u64,
}

struct Entry {
    good: Option<Good>,
    /// Why the lookups since `good` failed; None while the last one answered.
    failing: Option<String>,
    /// What `lookup` says: `meaning` of the two above, kept to notice changes.
    resolution: Resolution,
    due: Instant,
    retry: Backoff,
    asking: bool,
}

struct Shared {
    settings: Settings,
    cache: Mutex<BTreeMap<String, Entry>>,
    /// Answers kept by the last run that no instance has asked for yet.
    kept: Mutex<BTreeMap<String, Good>>,
    /// The kept file is behind the cache: set by answers and by names dropped.
    dirty: Mutex<Dirty>,
    wake: Notify,
    changed: watch::Sender<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Dirty {
    No,
    /// Only the times of answers changed: written at most once a refresh.
    Times,
    /// An answer or the set of names changed: written at once.
    Answers,
}

/// A handle on the cache; clones share it.
#[derive(Clone)]
pub(crate) struct Resolver {
    shared: Arc<Shared>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn list(ips: &[IpAddr]) -> String {
    ips.iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// What a name means now, from its last good answer and the failures since (pure).
fn meaning(good: Option<&Good>, failing: Option<&str>, stale: Duration, now_ms: u64) -> Resolution {
    match (good, failing) {
        (None, None) => Resolution::Pending,
        (Some(g), None) => Resolution::Resolved(g.ips.clone()),
        (None, Some(why)) => Resolution::Failed(why.to_string()),
        (Some(g), Some(why)) => {
            if now_ms.saturating_sub(g.at_ms) <= stale.as_millis() as u64 {
                Resolution::Resolved(g.ips.clone())
            } else {
                Resolution::Failed(format!(
                    "{why}; its last good answer ({}) is older than watcher.dns_stale_s = {} s",
                    list(&g.ips),
                    stale.as_secs()
                ))
            }
        }
    }
}

impl Resolver {
    /// The resolver, with the answers kept in `settings.file`, and a receiver that
    /// changes whenever what a name means does.
    pub(crate) fn new(settings: Settings) -> (Resolver, watch::Receiver<u64>) {
        let kept = settings
            .file
            .as_deref()
            .map(|f| load(f, settings.stale, now_ms()))
            .unwrap_or_default();
        let (changed, rx) = watch::channel(0);
        let shared = Arc::new(Shared {
            settings,
            cache: Mutex::new(BTreeMap::new()),
            kept: Mutex::new(kept),
            dirty: Mutex::new(Dirty::No),
            wake: Notify::new(),
            changed,
        });
        (Resolver { shared }, rx)
    }

    /// What `name` means now; `Pending` (and queued) when it was never looked up and no
    /// answer for it was kept.
    pub(crate) fn lookup(&self, name: &str) -> Resolution {
        let mut cache = self.shared.cache.lock().expect("resolver cache");
        if let Some(e) = cache.get(name) {
            return e.resolution.clone();
        }
        let good = self.shared.kept.lock().expect("kept answers").remove(name);
        let resolution = meaning(good.as_ref(), None, self.shared.settings.stale, now_ms());
        cache.insert(
            name.to_string(),
            Entry {
                good,
                failing: None,
                resolution: resolution.clone(),
                due: Instant::now(),
                retry: Backoff::new(Duration::from_millis(500), self.shared.settings.refresh),
                asking: false,
            },
        );
        drop(cache);
        self.shared.wake.notify_one();
        resolution
    }

    /// Forgets every name not in `used`.
    pub(crate) fn retain(&self, used: &BTreeSet<String>) {
        let mut cache = self.shared.cache.lock().expect("resolver cache");
        let before = cache.len();
        cache.retain(|name, _| used.contains(name));
        if cache.len() != before {
            self.mark(Dirty::Answers);
        }
        self.shared
            .kept
            .lock()
            .expect("kept answers")
            .retain(|name, _| used.contains(name));
    }

    fn mark(&self, d: Dirty) {
        let mut dirty = self.shared.dirty.lock().expect("dirty");
        *dirty = (*dirty).max(d);
    }

    /// Resolves due names, at most `MAX_IN_FLIGHT` at once, until `shutdown`.
    pub(crate) async fn run(self, shutdown: CancellationToken) {
        let mut inflight = FuturesUnordered::new();
        let mut written: Option<Instant> = None;
        let mut write_error: Option<String> = None;
        loop {
            let now = Instant::now();
            let mut next: Option<Instant> = None;
            {
                let mut cache = self.shared.cache.lock().expect("resolver cache");
                for (name, e) in cache.iter_mut().filter(|(_, e)| !e.asking) {
                    if e.due <= now && inflight.len() < MAX_IN_FLIGHT {
                        e.asking = true;
                        let name = name.clone();
                        inflight.push(async move {
                            let answer = resolve(&name, LOOKUP_TIMEOUT).await;
                            (name, answer)
                        });
                    } else if e.due > now {
                        next = Some(next.map_or(e.due, |n| n.min(e.due)));
                    }
                }
                // A stale answer's end is a change nobody else would notice.
                let (stale, now_ms) = (self.shared.settings.stale, now_ms());
                let mut changed = false;
                for (name, e) in cache.iter_mut() {
                    changed |= rejudge(name, e, stale, now_ms);
                    if let (Some(g), Some(_)) = (&e.good, &e.failing) {
                        let end = g.at_ms + stale.as_millis() as u64;
                        if end >= now_ms {
                            let at = now + Duration::from_millis(end - now_ms + 1);
                            next = Some(next.map_or(at, |n| n.min(at)));
                        }
                    }
                }
                if changed {
                    self.shared.changed.send_modify(|n| *n += 1);
                }
            }
            self.persist(&mut written, &mut write_error).await;
            tokio::select! {
                _ = shutdown.cancelled() => return,
                Some((name, answer)) = inflight.next(), if !inflight.is_empty() => {
                    self.record(&name, answer);
                }
                _ = self.shared.wake.notified() => {}
                _ = crate::backoff::sleep_until(next), if next.is_some() => {}
            }
        }
    }

    /// Takes one lookup's answer in.
    fn record(&self, name: &str, answer: Result<Vec<IpAddr>, String>) {
        let settings = &self.shared.settings;
        let mut cache = self.shared.cache.lock().expect("resolver cache");
        // Dropped by `retain` while we were asking.
        let Some(e) = cache.get_mut(name) else {
            return;
        };
        e.asking = false;
        let now = now_ms();
        match answer {
            Ok(ips) => {
                e.retry.reset();
                e.due = Instant::now() + settings.refresh;
                if e.failing.take().is_some() {
                    tracing::info!("host name {name:?} resolves again ({})", list(&ips));
                }
                let same = e.good.as_ref().is_some_and(|g| g.ips == ips);
                e.good = Some(Good { ips, at_ms: now });
                self.mark(if same { Dirty::Times } else { Dirty::Answers });
            }
            Err(why) => {
                e.due = Instant::now() + e.retry.next_delay();
                if e.failing.is_none() {
                    if let Resolution::Resolved(ips) =
                        meaning(e.good.as_ref(), Some(&why), settings.stale, now)
                    {
                        tracing::warn!(
                            "host name {name:?} does not resolve ({why}): its instances keep its last good answer ({}) for up to {} s after it was had (watcher.dns_stale_s)",
                            list(&ips),
                            settings.stale.as_secs()
                        );
                    }
                }
                e.failing = Some(why);
            }
        }
        if rejudge(name, e, settings.stale, now) {
            self.shared.changed.send_modify(|n| *n += 1);
        }
    }

    /// Writes the kept answers when they are behind: at once for a changed answer, at
    /// most once a refresh for times only. A failure is warned once per reason.
    async fn persist(&self, written: &mut Option<Instant>, error: &mut Option<String>) {
        let Some(file) = self.shared.settings.file.clone() else {
            return;
        };
        let due = {
            let mut dirty = self.shared.dirty.lock().expect("dirty");
            let due = match *dirty {
                Dirty::No => false,
                Dirty::Answers => true,
                Dirty::Times => written.is_none_or(|w| w.elapsed() >= self.shared.settings.refresh),
            };
            if due {
                *dirty = Dirty::No;
            }
            due
        };
        if !due {
            return;
        }
        let answers: BTreeMap<String, Good> = {
            let cache = self.shared.cache.lock().expect("resolver cache");
            cache
                .iter()
                .filter_map(|(n, e)| Some((n.clone(), e.good.clone()?)))
                .collect()
        };
        let text = serde_json::to_vec_pretty(&Kept { answers }).expect("answers serialise");
        let f = file.clone();
        let result = tokio::task::spawn_blocking(move || write_atomically(&f, &text))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
        *written = Some(Instant::now());
        match result {
            Ok(()) => *error = None,
            Err(e) => {
                let why = e.to_string();
                if error.as_deref() != Some(&why) {
                    tracing::warn!(
                        "cannot write the kept DNS answers to {} ({why}): a restart will wait for its first lookups; make watcher.state_dir writable by the watcher",
                        file.display()
                    );
                }
                *error = Some(why);
            }
        }
    }
}

/// Re-derives what `e` means; true when that changed.
fn rejudge(name: &str, e: &mut Entry, stale: Duration, now_ms: u64) -> bool {
    let r = meaning(e.good.as_ref(), e.failing.as_deref(), stale, now_ms);
    if r == e.resolution {
        return false;
    }
    if matches!(r, Resolution::Failed(_)) && matches!(e.resolution, Resolution::Resolved(_)) {
        tracing::warn!("host name {name:?}: its last good answer has expired (watcher.dns_stale_s = {} s); its instances leave", stale.as_secs());
    }
    e.resolution = r;
    true
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Kept {
    answers: BTreeMap<String, Good>,
}

/// The answers kept in `file` that are younger than `stale`. A missing file is none; an
/// unreadable or broken one is warned about, naming it, and taken as none.
fn load(file: &Path, stale: Duration, now_ms: u64) -> BTreeMap<String, Good> {
    let text = match std::fs::read(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return BTreeMap::new(),
        Err(e) => {
            tracing::warn!("cannot read the kept DNS answers {} ({e}): DNS-named instances wait for their first lookup", file.display());
            return BTreeMap::new();
        }
    };
    match serde_json::from_slice::<Kept>(&text) {
        Ok(k) => k
            .answers
            .into_iter()
            .filter(|(_, g)| {
                !g.ips.is_empty() && now_ms.saturating_sub(g.at_ms) <= stale.as_millis() as u64
            })
            .collect(),
        Err(e) => {
            tracing::warn!("the kept DNS answers {} are not valid ({e}): ignored; DNS-named instances wait for their first lookup", file.display());
            BTreeMap::new()
        }
    }
}

/// Temp file beside `path`, fsync, rename over it, fsync of the folder: a crash leaves
/// the old file or the new one, whole.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("state")
    ));
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Creates `dir` (0700) if it is missing. Err: why it cannot be used.
pub(crate) fn prepare_state_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// One lookup through libc (`getaddrinfo`, as HAProxy's `init-addr libc`), sorted.
pub(crate) async fn resolve(name: &str, timeout: Duration) -> Result<Vec<IpAddr>, String> {
    match tokio::time::timeout(timeout, tokio::net::lookup_host((name, 0))).await {
        Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(addrs)) => {
            let ips: BTreeSet<IpAddr> = addrs.map(|a| a.ip()).collect();
            if ips.is_empty() {
                return Err("no address".into());
            }
            Ok(ips.into_iter().collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn settings(file: Option<PathBuf>) -> Settings {
        Settings {
            refresh: Duration::from_secs(30),
            stale: Duration::from_secs(300),
            file,
        }
    }

    #[test]
    fn a_failed_lookup_keeps_the_last_good_answer_for_dns_stale_s_then_fails_naming_it() {
        let stale = Duration::from_secs(300);
        let good = Good {
            ips: vec![ip("10.0.0.1")],
            at_ms: 1_000_000,
        };
        let ok = Resolution::Resolved(vec![ip("10.0.0.1")]);
        assert_eq!(meaning(Some(&good), None, stale, 1_000_000), ok);
        assert_eq!(
            meaning(Some(&good), Some("timeout"), stale, 1_000_000 + 300_000),
            ok
        );
        match meaning(Some(&good), Some("timeout"), stale, 1_000_000 + 300_001) {
            Resolution::Failed(why) => {
                assert!(
                    why.contains("timeout") && why.contains("dns_stale_s = 300"),
                    "{why}"
                )
            }
            other => panic!("{other:?}"),
        }
        // dns_stale_s = 0: the first failure.
        assert!(matches!(
            meaning(Some(&good), Some("x"), Duration::ZERO, 1_000_001),
            Resolution::Failed(_)
        ));
        assert_eq!(meaning(None, None, stale, 0), Resolution::Pending);
        assert_eq!(
            meaning(None, Some("x"), stale, 0),
            Resolution::Failed("x".into())
        );
    }

    #[test]
    fn kept_answers_survive_a_restart_unless_older_than_dns_stale_s_or_broken() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(ANSWERS_FILE);
        let kept = Kept {
            answers: BTreeMap::from([
                (
                    "new.example".into(),
                    Good {
                        ips: vec![ip("10.0.0.1")],
                        at_ms: 990_000,
                    },
                ),
                (
                    "old.example".into(),
                    Good {
                        ips: vec![ip("10.0.0.2")],
                        at_ms: 1,
                    },
                ),
            ]),
        };
        write_atomically(&file, &serde_json::to_vec(&kept).unwrap()).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let got = load(&file, Duration::from_secs(300), 1_000_000);
        assert_eq!(got.keys().collect::<Vec<_>>(), ["new.example"]);
        std::fs::write(&file, "{not json").unwrap();
        assert!(load(&file, Duration::from_secs(300), 1_000_000).is_empty());
        assert!(load(&dir.path().join("missing"), Duration::from_secs(300), 0).is_empty());
    }

    #[test]
    fn the_state_dir_is_made_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("a/state");
        prepare_state_dir(&state).unwrap();
        assert_eq!(
            std::fs::metadata(&state).unwrap().permissions().mode() & 0o077,
            0
        );
    }

    #[tokio::test]
    async fn a_new_name_is_pending_then_resolved_in_the_background_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(ANSWERS_FILE);
        let (r, mut changed) = Resolver::new(settings(Some(file.clone())));
        let stop = CancellationToken::new();
        let task = tokio::spawn(r.clone().run(stop.clone()));
        assert_eq!(r.lookup("localhost"), Resolution::Pending);
        tokio::time::timeout(Duration::from_secs(5), changed.changed())
            .await
            .expect("an answer")
            .unwrap();
        let Resolution::Resolved(ips) = r.lookup("localhost") else {
            panic!("{:?}", r.lookup("localhost"));
        };
        assert!(ips.iter().all(|i| i.is_loopback()), "{ips:?}");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !file.exists() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop.cancel();
        task.await.unwrap();
        // A restart: the kept answer is there before any lookup.
        let (again, _) = Resolver::new(settings(Some(file)));
        assert_eq!(again.lookup("localhost"), Resolution::Resolved(ips));
        again.retain(&BTreeSet::new());
        assert_eq!(again.lookup("localhost"), Resolution::Pending, "forgotten");
    }

    #[tokio::test]
    async fn a_name_that_does_not_resolve_fails_with_a_reason() {
        let err = resolve("no-such-host.invalid", LOOKUP_TIMEOUT)
            .await
            .unwrap_err();
        assert!(!err.is_empty());
    }
}
