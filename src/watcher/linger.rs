//! Empty backends linger: a service whose last instance leaves keeps its place in the
//! rendered snapshot, with no instance, for `empty_backend_grace_s`. Its backend section
//! stays in the file (answering the template's 503), so when an instance comes back — a
//! single-instance service restarting or flapping — that is a `server` line added to an
//! existing backend, which the runtime API applies, instead of a section added and
//! removed, which takes two reloads.
//!
//! Pure (the caller passes the clock). "Had instances" is judged against what the
//! previous pass rendered, lingering services included, so a lingering service keeps
//! the time it first went empty.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::store::StoreSnapshot;

#[derive(Debug)]
pub(crate) struct Linger {
    /// Zero: off, an empty service is gone at once.
    grace: Duration,
    /// Service → when it went empty.
    empty_since: BTreeMap<String, Instant>,
}

impl Linger {
    pub(crate) fn new(grace: Duration) -> Linger {
        Linger {
            grace,
            empty_since: BTreeMap::new(),
        }
    }

    /// Services lingering now, with no instance.
    pub(crate) fn count(&self) -> usize {
        self.empty_since.len()
    }

    /// When the next lingering service is due to go.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.empty_since
            .values()
            .min()
            .map(|since| *since + self.grace)
    }

    /// `next` with every service that `previous` rendered, that has no instance in
    /// `next` and whose grace has not run out, added back empty. Returns the services
    /// that went empty in this pass, for the log.
    pub(crate) fn keep(
        &mut self,
        previous: Option<&StoreSnapshot>,
        next: &mut StoreSnapshot,
        now: Instant,
    ) -> Vec<String> {
        if self.grace.is_zero() {
            return Vec::new();
        }
        let grace = self.grace;
        let mut over = std::collections::BTreeSet::new();
        self.empty_since.retain(|name, since| {
            if next.services.contains_key(name) {
                return false;
            }
            if now >= *since + grace {
                over.insert(name.clone());
                return false;
            }
            true
        });
        let mut went_empty = Vec::new();
        for name in previous.into_iter().flat_map(|p| p.services.keys()) {
            if !next.services.contains_key(name)
                && !self.empty_since.contains_key(name)
                && !over.contains(name)
            {
                self.empty_since.insert(name.clone(), now);
                went_empty.push(name.clone());
            }
        }
        for name in self.empty_since.keys() {
            next.services.insert(name.clone(), Vec::new());
        }
        went_empty
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::Instance;

    fn snap(services: &[(&str, usize)]) -> StoreSnapshot {
        let mut s = StoreSnapshot::default();
        for (name, n) in services {
            let list = (0..*n)
                .map(|i| {
                    let v = format!(r#"{{"addr":"10.0.0.{}:80","node":"n"}}"#, i + 1);
                    std::sync::Arc::new(
                        crate::schema::decode_owned(
                            "k",
                            name,
                            &format!("i{i}"),
                            None,
                            v.as_bytes(),
                        )
                        .unwrap(),
                    )
                })
                .collect::<Vec<std::sync::Arc<Instance>>>();
            s.services.insert(name.to_string(), list);
        }
        s
    }

    #[test]
    fn an_emptied_service_stays_empty_for_the_grace_then_goes() {
        let t0 = Instant::now();
        let grace = Duration::from_secs(300);
        let mut l = Linger::new(grace);
        let before = snap(&[("web", 1), ("api", 2)]);
        let mut next = snap(&[("api", 2)]);
        assert_eq!(l.keep(Some(&before), &mut next, t0), vec!["web"]);
        assert_eq!(next.services["web"].len(), 0, "web kept, empty");
        assert_eq!(l.deadline(), Some(t0 + grace));
        // Still empty a minute later: kept, with the time it first went empty.
        let rendered = next.clone();
        let mut again = snap(&[("api", 2)]);
        let t1 = t0 + Duration::from_secs(60);
        assert!(l.keep(Some(&rendered), &mut again, t1).is_empty());
        assert!(again.services.contains_key("web"));
        assert_eq!(l.deadline(), Some(t0 + grace));
        // Grace over: gone.
        let mut later = snap(&[("api", 2)]);
        assert!(l.keep(Some(&again), &mut later, t0 + grace).is_empty());
        assert!(!later.services.contains_key("web"));
        assert_eq!(l.count(), 0);
        assert_eq!(l.deadline(), None);
    }

    #[test]
    fn an_instance_coming_back_ends_the_lingering() {
        let t0 = Instant::now();
        let mut l = Linger::new(Duration::from_secs(300));
        let mut empty = snap(&[]);
        l.keep(Some(&snap(&[("web", 1)])), &mut empty, t0);
        assert_eq!(l.count(), 1);
        let mut back = snap(&[("web", 1)]);
        l.keep(Some(&empty), &mut back, t0 + Duration::from_secs(1));
        assert_eq!(back.services["web"].len(), 1);
        assert_eq!(l.count(), 0);
        // Emptied again later: a fresh grace from then.
        let t2 = t0 + Duration::from_secs(400);
        let mut gone = snap(&[]);
        l.keep(Some(&back), &mut gone, t2);
        assert_eq!(l.deadline(), Some(t2 + Duration::from_secs(300)));
    }

    #[test]
    fn zero_grace_is_off_and_nothing_lingers_at_start() {
        let mut l = Linger::new(Duration::ZERO);
        let mut next = snap(&[]);
        assert!(l
            .keep(Some(&snap(&[("web", 1)])), &mut next, Instant::now())
            .is_empty());
        assert!(next.services.is_empty());
        let mut l = Linger::new(Duration::from_secs(1));
        let mut first = snap(&[("api", 1)]);
        assert!(l.keep(None, &mut first, Instant::now()).is_empty());
        assert_eq!(first, snap(&[("api", 1)]));
    }
}
