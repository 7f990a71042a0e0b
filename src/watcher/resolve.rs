//! Host-name resolution for the routing policy, off the render path.
//!
//! The source asks `lookup(name)` while it builds a snapshot; the answer comes from a
//! cache and never waits. A name not seen before is `Pending`: the background task
//! (`run`) resolves it with libc (as HAProxy will), with a timeout, and bumps the
//! `changed` counter when an answer differs from the cached one, so the source builds
//! the snapshot again. Answers are refreshed every `REFRESH`; failures are retried with
//! a backoff. Names no instance uses any more are dropped (`retain`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::policy::Resolution;
use crate::backoff::Backoff;

/// Longest one lookup may take.
pub(crate) const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

struct Entry {
    resolution: Resolution,
    due: Instant,
    retry: Backoff,
}

struct Shared {
    refresh: Duration,
    cache: Mutex<BTreeMap<String, Entry>>,
    wake: Notify,
    changed: watch::Sender<u64>,
}

/// A handle on the cache; clones share it.
#[derive(Clone)]
pub(crate) struct Resolver {
    shared: Arc<Shared>,
}

impl Resolver {
    /// The resolver, and a receiver that changes whenever an answer does.
    pub(crate) fn new(refresh: Duration) -> (Resolver, watch::Receiver<u64>) {
        let (changed, rx) = watch::channel(0);
        let shared = Arc::new(Shared {
            refresh,
            cache: Mutex::new(BTreeMap::new()),
            wake: Notify::new(),
            changed,
        });
        (Resolver { shared }, rx)
    }

    /// What `name` resolved to last; `Pending` (and queued) when it was never looked up.
    pub(crate) fn lookup(&self, name: &str) -> Resolution {
        let mut cache = self.shared.cache.lock().expect("resolver cache");
        if let Some(e) = cache.get(name) {
            return e.resolution.clone();
        }
        cache.insert(
            name.to_string(),
            Entry {
                resolution: Resolution::Pending,
                due: Instant::now(),
                retry: Backoff::new(Duration::from_millis(500), self.shared.refresh),
            },
        );
        drop(cache);
        self.shared.wake.notify_one();
        Resolution::Pending
    }

    /// Forgets every name not in `used`.
    pub(crate) fn retain(&self, used: &BTreeSet<String>) {
        self.shared
            .cache
            .lock()
            .expect("resolver cache")
            .retain(|name, _| used.contains(name));
    }

    /// Resolves due names until `shutdown`.
    pub(crate) async fn run(self, shutdown: CancellationToken) {
        loop {
            let now = Instant::now();
            let due: Vec<String> = {
                let cache = self.shared.cache.lock().expect("resolver cache");
                cache
                    .iter()
                    .filter(|(_, e)| e.due <= now)
                    .map(|(n, _)| n.clone())
                    .collect()
            };
            let mut changed = false;
            for name in due {
                let answer = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    a = resolve(&name, LOOKUP_TIMEOUT) => a,
                };
                let mut cache = self.shared.cache.lock().expect("resolver cache");
                // Dropped by `retain` while we were asking.
                let Some(e) = cache.get_mut(&name) else {
                    continue;
                };
                let resolution = match answer {
                    Ok(ips) => {
                        e.retry.reset();
                        e.due = Instant::now() + self.shared.refresh;
                        Resolution::Resolved(ips)
                    }
                    Err(why) => {
                        e.due = Instant::now() + e.retry.next_delay();
                        Resolution::Failed(why)
                    }
                };
                if e.resolution != resolution {
                    e.resolution = resolution;
                    changed = true;
                }
            }
            if changed {
                self.shared.changed.send_modify(|n| *n += 1);
            }
            let next = {
                let cache = self.shared.cache.lock().expect("resolver cache");
                cache.values().map(|e| e.due).min()
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.shared.wake.notified() => {}
                _ = crate::backoff::sleep_until(next), if next.is_some() => {}
            }
        }
    }
}

/// One lookup through libc (`getaddrinfo`, as HAProxy's `init-addr libc`), sorted.
pub(crate) async fn resolve(name: &str, timeout: Duration) -> Result<Vec<IpAddr>, String> {
    match tokio::time::timeout(timeout, tokio::net::lookup_host((name, 0))).await {
        Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(addrs)) => {
            let ips: BTreeSet<IpAddr> = addrs.map(|a| a.ip()).collect();
            Ok(ips.into_iter().collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_new_name_is_pending_then_resolved_in_the_background() {
        let (r, mut changed) = Resolver::new(Duration::from_secs(30));
        let stop = CancellationToken::new();
        let task = tokio::spawn(r.clone().run(stop.clone()));
        assert_eq!(r.lookup("localhost"), Resolution::Pending);
        tokio::time::timeout(Duration::from_secs(5), changed.changed())
            .await
            .expect("an answer")
            .unwrap();
        match r.lookup("localhost") {
            Resolution::Resolved(ips) => assert!(ips.iter().all(|i| i.is_loopback()), "{ips:?}"),
            other => panic!("{other:?}"),
        }
        r.retain(&BTreeSet::new());
        assert_eq!(r.lookup("localhost"), Resolution::Pending, "forgotten");
        stop.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn a_name_that_does_not_resolve_fails_with_a_reason() {
        let err = resolve("no-such-host.invalid", LOOKUP_TIMEOUT)
            .await
            .unwrap_err();
        assert!(!err.is_empty());
    }
}
