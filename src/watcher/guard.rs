//! The mass-removal guard: a batch of changes that would remove more than `share` of
//! the live instances (and at least `min`) is held — the removed instances stay in the
//! rendered config for `hold`, or until the operator confirms (SIGUSR1) — so an etcd
//! emptied by mistake, a lost registrar prefix or a bad script does not empty the load
//! balancer in one go. Held servers that really are dead cost nothing: HAProxy's health
//! checks and `observe layer4` keep them out of rotation.
//!
//! Pure (the caller passes the clock). What is never delayed: a single failure and
//! anything under `min`; a rolling deploy, whose removals come spread over batches,
//! each a small share; one host of many going away.
//!
//! "Live" is what the previous pass rendered, held instances included, so a held
//! removal cannot be re-judged against an already shrunken set.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::store::StoreSnapshot;
use crate::schema::Instance;

/// A removal just held back, for the log, the hook and the status.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Held {
    /// Instances this batch would have removed.
    pub(crate) count: usize,
    /// Instances live before it.
    pub(crate) live: usize,
    /// Held until then (every held instance, this batch's and earlier ones).
    pub(crate) until: Instant,
}

impl Held {
    pub(crate) fn percent(&self) -> f64 {
        100.0 * self.count as f64 / self.live.max(1) as f64
    }
}

#[derive(Debug)]
pub(crate) struct Guard {
    share: f64,
    min: usize,
    /// Zero: off.
    hold: Duration,
    /// (service, instance id) → the instance as last rendered.
    held: BTreeMap<(String, String), Arc<Instance>>,
    until: Option<Instant>,
    /// Removals released since the last `filter`: not judged again against a `live`
    /// that still shows them.
    released: std::collections::BTreeSet<(String, String)>,
}

impl Guard {
    pub(crate) fn new(share: f64, min: usize, hold: Duration) -> Guard {
        Guard {
            share,
            min: min.max(1),
            hold,
            held: BTreeMap::new(),
            until: None,
            released: Default::default(),
        }
    }

    /// How many instances are held now.
    pub(crate) fn held(&self) -> usize {
        self.held.len()
    }

    /// When the held removals are due.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.until
    }

    /// The operator confirmed (or the hold ran out): the next `filter` applies every
    /// held removal. Returns how many were held.
    pub(crate) fn release(&mut self) -> usize {
        self.until = None;
        let held = std::mem::take(&mut self.held);
        let n = held.len();
        self.released.extend(held.into_keys());
        n
    }

    /// What to render instead of `desired`, given what was rendered last (`live`; None
    /// before the first render), and a removal newly held back, if any.
    pub(crate) fn filter(
        &mut self,
        live: Option<&StoreSnapshot>,
        desired: &StoreSnapshot,
        now: Instant,
    ) -> (StoreSnapshot, Option<Held>) {
        if self.until.is_some_and(|u| now >= u) {
            self.release();
        }
        // Held instances that came back are no longer removals.
        self.held
            .retain(|(service, id), _| !contains(desired, service, id));
        let mut news = None;
        let released = std::mem::take(&mut self.released);
        if let Some(live) = live.filter(|_| !self.hold.is_zero()) {
            let removed: Vec<&Arc<Instance>> = live
                .services
                .values()
                .flatten()
                .filter(|i| !contains(desired, &i.service, &i.id))
                .filter(|i| !self.held.contains_key(&key(i)) && !released.contains(&key(i)))
                .collect();
            let total = live.instance_count();
            if removed.len() >= self.min && removed.len() as f64 > self.share * total as f64 {
                let until = now + self.hold;
                self.until = Some(self.until.map_or(until, |u| u.max(until)));
                for i in &removed {
                    self.held.insert(key(i), (*i).clone());
                }
                news = Some(Held {
                    count: removed.len(),
                    live: total,
                    until: self.until.unwrap_or(until),
                });
            }
        }
        if self.held.is_empty() {
            self.until = None;
            return (desired.clone(), news);
        }
        let mut out = desired.clone();
        for ((service, _), inst) in &self.held {
            let list = out.services.entry(service.clone()).or_default();
            list.push(inst.clone());
            list.sort_by(|a, b| a.id.cmp(&b.id));
        }
        (out, news)
    }
}

fn key(i: &Instance) -> (String, String) {
    (i.service.clone(), i.id.clone())
}

fn contains(s: &StoreSnapshot, service: &str, id: &str) -> bool {
    s.services
        .get(service)
        .is_some_and(|l| l.iter().any(|i| i.id == id))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(service: &str, id: &str, node: &str) -> Arc<Instance> {
        Arc::new(Instance {
            id: id.into(),
            service: service.into(),
            addr: "10.0.0.1:80".into(),
            host: "10.0.0.1".into(),
            port: 80,
            node: node.into(),
            container: String::new(),
            tags: Vec::new(),
            weight: 100,
            draining: false,
            host_name: String::new(),
        })
    }

    fn snap(ids: impl IntoIterator<Item = (String, String)>) -> StoreSnapshot {
        let mut s = StoreSnapshot::default();
        for (id, node) in ids {
            s.services
                .entry("web".into())
                .or_default()
                .push(inst("web", &id, &node));
        }
        for l in s.services.values_mut() {
            l.sort_by(|a, b| a.id.cmp(&b.id));
        }
        s
    }

    /// `n` instances of `web` spread over `hosts` nodes.
    fn fleet(n: usize, hosts: usize) -> StoreSnapshot {
        snap((0..n).map(|i| (format!("i{i:02}"), format!("h{}", i % hosts))))
    }

    fn without(s: &StoreSnapshot, gone: impl Fn(&Instance) -> bool) -> StoreSnapshot {
        let mut out = s.clone();
        for l in out.services.values_mut() {
            l.retain(|i| !gone(i));
        }
        out.services.retain(|_, l| !l.is_empty());
        out
    }

    fn guard() -> Guard {
        Guard::new(0.5, 5, Duration::from_secs(60))
    }

    #[test]
    fn emptying_etcd_is_held_then_applied_after_the_hold() {
        let mut g = guard();
        let t0 = Instant::now();
        let live = fleet(10, 5);
        let empty = StoreSnapshot::default();
        let (out, held) = g.filter(Some(&live), &empty, t0);
        assert_eq!(out, live, "every removed instance stays rendered");
        let held = held.expect("held");
        assert_eq!((held.count, held.live), (10, 10));
        assert_eq!(held.until, t0 + Duration::from_secs(60));
        assert_eq!(g.held(), 10);
        // Still held, and not announced again, on the next pass.
        let (out, again) = g.filter(Some(&out), &empty, t0 + Duration::from_secs(30));
        assert_eq!((out.instance_count(), again), (10, None));
        // The hold runs out: applied.
        let (out, _) = g.filter(Some(&out), &empty, t0 + Duration::from_secs(60));
        assert_eq!(out.instance_count(), 0);
        assert_eq!((g.held(), g.deadline()), (0, None));
    }

    #[test]
    fn the_operator_confirms_with_release() {
        let mut g = guard();
        let live = fleet(10, 5);
        let now = Instant::now();
        let (out, _) = g.filter(Some(&live), &StoreSnapshot::default(), now);
        assert_eq!(g.release(), 10);
        let (out, held) = g.filter(Some(&out), &StoreSnapshot::default(), now);
        assert_eq!((out.instance_count(), held), (0, None));
    }

    #[test]
    fn a_single_failure_a_rolling_deploy_and_one_host_of_many_are_never_delayed() {
        let now = Instant::now();
        let live = fleet(20, 10);
        // One instance dies.
        let mut g = guard();
        let one = without(&live, |i| i.id == "i03");
        assert_eq!(g.filter(Some(&live), &one, now), (one.clone(), None));
        // A rolling deploy: old instances replaced two at a time, batch after batch.
        let mut g = guard();
        let mut cur = live.clone();
        for step in 0..10 {
            let mut next = without(&cur, |i| {
                i.id == format!("i{:02}", 2 * step) || i.id == format!("i{:02}", 2 * step + 1)
            });
            for k in 0..2 {
                next.services.get_mut("web").unwrap().push(inst(
                    "web",
                    &format!("new{step}-{k}"),
                    "h0",
                ));
            }
            let (out, held) = g.filter(Some(&cur), &next, now);
            assert_eq!((out.instance_count(), held), (20, None), "step {step}");
            cur = out;
        }
        // One host of ten goes away with its two instances.
        let mut g = guard();
        let host = without(&live, |i| i.node == "h7");
        assert_eq!(g.filter(Some(&live), &host, now).1, None);
        // Half of them exactly is not "more than half".
        let mut g = guard();
        let half = without(&live, |i| i.id.as_str() < "i10");
        assert_eq!(g.filter(Some(&live), &half, now).1, None);
    }

    #[test]
    fn small_fleets_below_min_and_the_first_render_are_never_held() {
        let now = Instant::now();
        let mut g = guard();
        let live = fleet(4, 1);
        let (out, held) = g.filter(Some(&live), &StoreSnapshot::default(), now);
        assert_eq!((out.instance_count(), held), (0, None), "4 < min 5");
        assert_eq!(g.filter(None, &StoreSnapshot::default(), now).1, None);
        let mut off = Guard::new(0.5, 5, Duration::ZERO);
        assert_eq!(
            off.filter(Some(&fleet(10, 1)), &StoreSnapshot::default(), now)
                .1,
            None
        );
    }

    #[test]
    fn a_held_instance_that_comes_back_leaves_the_hold_and_additions_go_through() {
        let now = Instant::now();
        let mut g = guard();
        let live = fleet(10, 2);
        let (out, _) = g.filter(Some(&live), &StoreSnapshot::default(), now);
        // Two come back, one new one appears.
        let mut back = snap([("i00".into(), "h0".into()), ("i01".into(), "h1".into())]);
        back.services
            .get_mut("web")
            .unwrap()
            .push(inst("web", "zz", "h9"));
        let (out, held) = g.filter(Some(&out), &back, now);
        assert_eq!(held, None);
        assert_eq!(g.held(), 8);
        assert_eq!(out.instance_count(), 11);
        let web = &out.services["web"];
        assert!(web.windows(2).all(|w| w[0].id < w[1].id), "sorted by id");
    }
}
