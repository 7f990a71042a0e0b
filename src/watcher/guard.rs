//! The mass-removal guard: removals that would drop the live instances more than `share`
//! below their peak over the last `hold` (and by at least `min`) are held — the removed
//! instances stay in the rendered config for `hold`, or until the operator confirms
//! (SIGUSR1) — so an etcd emptied by mistake, a lost registrar prefix, a bad script or a
//! wave of expiring leases does not empty the load balancer. Held servers that really are
//! dead cost nothing: HAProxy's health checks and `observe layer4` keep them out of
//! rotation. With `per_service_share` below 1 the same is judged per service too.
//!
//! It has memory: the drop is measured from the peak live count of the window, not from
//! the previous batch, so `del` 4, 3, 3 half a second apart, a key-by-key delete loop and
//! hosts' leases expiring a second apart are held like one big delete. What is never
//! delayed: a single failure and any drop under `min`; a rolling deploy, whose
//! replacements keep the count near its peak; one host of many going away.
//!
//! Pure (the caller passes the clock). "Live" is what the previous pass rendered, held
//! instances included, so a held removal cannot be re-judged against an already
//! shrunken set; at start it is seeded from the file HAProxy runs (`seed`), so the first
//! render after a restart is judged like any other.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::haproxy::sections::servers_by_backend;
use super::store::StoreSnapshot;
use crate::config::MassRemoval;
use crate::schema::{Addr, Instance};

/// A removal just held back, for the log, the hook and the status.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Held {
    /// Instances this batch would have removed.
    pub(crate) count: usize,
    /// The peak live count they are judged against.
    pub(crate) live: usize,
    /// The drop from that peak the batch would have made (earlier removals included).
    pub(crate) drop: usize,
    /// The service judged alone (`per_service_share`), or None for all instances.
    pub(crate) service: Option<String>,
    /// Held until then (every held instance, this batch's and earlier ones).
    pub(crate) until: Instant,
}

impl Held {
    pub(crate) fn percent(&self) -> f64 {
        100.0 * self.drop as f64 / self.live.max(1) as f64
    }
}

/// Removals found too many: whose (None: all instances'), which, judged against which
/// peak, dropping it by how much.
struct TooMany<'a> {
    service: Option<String>,
    removed: Vec<&'a Arc<Instance>>,
    peak: usize,
    drop: usize,
}

/// The highest count seen within the window, and when it was seen.
#[derive(Debug, Clone, Copy)]
struct Peak {
    count: usize,
    at: Instant,
}

impl Peak {
    /// The peak over the window ending `now`, `count` seen now: a peak older than the
    /// window is replaced by what is live now.
    fn update(old: Option<Peak>, count: usize, now: Instant, window: Duration) -> Peak {
        match old {
            Some(p) if p.count >= count && now.saturating_duration_since(p.at) < window => p,
            _ => Peak { count, at: now },
        }
    }
}

#[derive(Debug)]
pub(crate) struct Guard {
    share: f64,
    per_service_share: f64,
    min: usize,
    /// Zero: off.
    hold: Duration,
    /// (service, instance id) → the instance as last rendered.
    held: BTreeMap<(String, String), Arc<Instance>>,
    until: Option<Instant>,
    /// Removals released since the last `filter`: not judged again against a `live`
    /// that still shows them.
    released: BTreeSet<(String, String)>,
    peak: Option<Peak>,
    service_peaks: BTreeMap<String, Peak>,
    /// The end of a hold an earlier run started: a hold this run starts in its first
    /// judgement ends then, not a fresh `hold` later.
    resumed: Option<Instant>,
}

impl Guard {
    pub(crate) fn new(m: &MassRemoval) -> Guard {
        Guard {
            share: m.share,
            per_service_share: m.per_service_share,
            min: m.min.max(1),
            hold: m.hold,
            held: BTreeMap::new(),
            until: None,
            released: BTreeSet::new(),
            peak: None,
            service_peaks: BTreeMap::new(),
            resumed: None,
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

    /// A hold that an earlier run of the watcher started ends no later than `until`
    /// (read from its status record): a restart does not lengthen it.
    pub(crate) fn resume_hold(&mut self, until: Instant) {
        self.resumed = Some(until);
    }

    /// The operator confirmed (or the hold ran out): the next `filter` applies every
    /// held removal, and the count it leaves is the new peak. Returns how many were held.
    pub(crate) fn release(&mut self) -> usize {
        self.until = None;
        let held = std::mem::take(&mut self.held);
        let n = held.len();
        self.released.extend(held.into_keys());
        self.peak = None;
        self.service_peaks.clear();
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
        let released = std::mem::take(&mut self.released);
        let resumed = self.resumed.take();
        let news = match live.filter(|_| !self.hold.is_zero()) {
            Some(live) => self.judge(live, desired, &released, now, resumed),
            None => None,
        };
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

    /// Holds this batch's removals from `live` when the drop they make from the
    /// window's peak is too large, globally or for one service.
    fn judge(
        &mut self,
        live: &StoreSnapshot,
        desired: &StoreSnapshot,
        released: &BTreeSet<(String, String)>,
        now: Instant,
        resumed: Option<Instant>,
    ) -> Option<Held> {
        let removed: Vec<&Arc<Instance>> = live
            .services
            .values()
            .flatten()
            .filter(|i| !contains(desired, &i.service, &i.id))
            .filter(|i| !self.held.contains_key(&key(i)) && !released.contains(&key(i)))
            .collect();
        // Live, but for removals the operator just released: those are gone for good.
        let still = |i: &&Arc<Instance>| !released.contains(&key(i));
        let live_count = live.services.values().flatten().filter(still).count();
        let peak = Peak::update(self.peak, live_count, now, self.hold);
        self.peak = Some(peak);
        for (name, list) in &live.services {
            let n = list.iter().filter(still).count();
            let p = Peak::update(self.service_peaks.get(name).copied(), n, now, self.hold);
            self.service_peaks.insert(name.clone(), p);
        }
        self.service_peaks.retain(|name, p| {
            live.services.contains_key(name) || now.saturating_duration_since(p.at) < self.hold
        });
        if removed.is_empty() {
            return None;
        }
        let after = desired.instance_count() + self.held.len();
        let drop = peak.count.saturating_sub(after);
        let verdict = if self.too_much(drop, peak.count, self.share) {
            Some(TooMany {
                service: None,
                removed,
                peak: peak.count,
                drop,
            })
        } else {
            self.worst_service(&removed, desired)
        };
        let TooMany {
            service,
            removed,
            peak: live_count,
            drop,
        } = verdict?;
        let until = resumed.unwrap_or(now + self.hold);
        self.until = Some(match (self.until, resumed) {
            (Some(u), None) => u.max(until),
            _ => until,
        });
        for i in &removed {
            self.held.insert(key(i), (*i).clone());
        }
        Some(Held {
            count: removed.len(),
            live: live_count,
            drop,
            service,
            until: self.until.unwrap_or(until),
        })
    }

    fn too_much(&self, drop: usize, peak: usize, share: f64) -> bool {
        drop >= self.min && drop as f64 > share * peak as f64
    }

    /// The first service (by name) whose own drop is too large, with its removals.
    fn worst_service<'a>(
        &self,
        removed: &[&'a Arc<Instance>],
        desired: &StoreSnapshot,
    ) -> Option<TooMany<'a>> {
        if self.per_service_share >= 1.0 {
            return None;
        }
        let services: BTreeSet<&str> = removed.iter().map(|i| i.service.as_str()).collect();
        services.into_iter().find_map(|name| {
            let peak = self.service_peaks.get(name)?.count;
            let held = self.held.keys().filter(|(s, _)| s == name).count();
            let after = desired.services.get(name).map_or(0, Vec::len) + held;
            let drop = peak.saturating_sub(after);
            self.too_much(drop, peak, self.per_service_share).then(|| {
                let mine = removed
                    .iter()
                    .copied()
                    .filter(|i| i.service == name)
                    .collect();
                TooMany {
                    service: Some(name.to_string()),
                    removed: mine,
                    peak,
                    drop,
                }
            })
        })
    }
}

/// What the file HAProxy runs says was live, as instances: the first render after a
/// restart is judged against it. Each backend's servers belong to the service whose
/// instances `desired` puts under those names, or else to the service its name spells
/// after the default templates' `svc_` / `tcp_` prefix. Only what the guard and the
/// template need is known from a server line: id, address, weight, draining.
pub(crate) fn seed(file: &str, desired: &StoreSnapshot) -> StoreSnapshot {
    let mut owner: BTreeMap<&str, &str> = BTreeMap::new();
    for (service, list) in &desired.services {
        for i in list {
            owner.insert(i.id.as_str(), service.as_str());
        }
    }
    let mut out = StoreSnapshot::default();
    let Ok(backends) = servers_by_backend(file) else {
        return out;
    };
    for (backend, servers) in backends {
        let by_name = backend
            .strip_prefix("svc_")
            .or_else(|| backend.strip_prefix("tcp_"))
            .unwrap_or(&backend);
        for (id, line) in servers {
            let service = owner.get(id.as_str()).copied().unwrap_or(by_name);
            if let Some(i) = instance_of_line(service, &id, &line) {
                out.services
                    .entry(service.to_string())
                    .or_default()
                    .push(Arc::new(i));
            }
        }
    }
    for list in out.services.values_mut() {
        list.sort_by(|a, b| a.id.cmp(&b.id));
        list.dedup_by(|a, b| a.id == b.id);
    }
    out
}

/// `server ID ADDR [weight N] … [disabled]` as an instance of `service`.
fn instance_of_line(service: &str, id: &str, line: &str) -> Option<Instance> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let addr = Addr::parse(words.get(2)?).ok()?;
    let weight = words
        .iter()
        .position(|w| *w == "weight")
        .and_then(|i| words.get(i + 1)?.parse().ok())
        .unwrap_or(crate::schema::DEFAULT_WEIGHT);
    Some(Instance {
        id: id.to_string(),
        service: service.to_string(),
        addr: addr.to_string(),
        host: addr.host,
        port: addr.port,
        host_name: String::new(),
        node: String::new(),
        container: String::new(),
        tags: Vec::new(),
        weight,
        draining: words.contains(&"disabled"),
        // It is in the file: it was routed.
        route: true,
        routing: None,
        created: 0,
    })
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
            host_name: String::new(),
            node: node.into(),
            container: String::new(),
            tags: Vec::new(),
            weight: 100,
            draining: false,
            route: true,
            routing: None,
            created: 0,
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

    fn settings(per_service_share: f64, hold_s: u64) -> MassRemoval {
        MassRemoval {
            share: 0.5,
            per_service_share,
            min: 5,
            hold: Duration::from_secs(hold_s),
        }
    }

    fn guard() -> Guard {
        Guard::new(&settings(1.0, 60))
    }

    /// Applies `desired` through the guard as the loop does: `live` is what it rendered.
    fn step(
        g: &mut Guard,
        live: &mut StoreSnapshot,
        desired: &StoreSnapshot,
        now: Instant,
    ) -> Option<Held> {
        let (out, held) = g.filter(Some(live), desired, now);
        *live = out;
        held
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
        assert_eq!((held.count, held.live, held.drop), (10, 10, 10));
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
        let mut off = Guard::new(&settings(1.0, 0));
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

    #[test]
    fn staged_deletes_a_key_by_key_loop_and_a_lease_wave_are_held_like_one_delete() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        // `del` 4, 3, 3 half a second apart: 4 go, the next 3 would drop 7 of 10.
        let (mut g, mut live) = (guard(), fleet(10, 5));
        let staged = [4, 7, 10];
        let mut held_at = None;
        for (k, n) in staged.iter().enumerate() {
            let next = without(&fleet(10, 5), |i| {
                i.id.as_str() < format!("i{n:02}").as_str()
            });
            if let Some(h) = step(&mut g, &mut live, &next, t0 + ms(500 * k as u64)) {
                held_at.get_or_insert((k, h));
            }
        }
        let (k, h) = held_at.expect("the staged delete is held");
        assert_eq!((k, h.live, h.drop), (1, 10, 7));
        assert_eq!(live.instance_count(), 6, "only the first 4 went");
        // A key-by-key loop: one at a time, 20 ms apart.
        let (mut g, mut live) = (guard(), fleet(10, 5));
        let mut gone = 0;
        for n in 1..=10 {
            let next = without(&fleet(10, 5), |i| {
                i.id.as_str() < format!("i{n:02}").as_str()
            });
            if step(&mut g, &mut live, &next, t0 + ms(20 * n)).is_some() {
                break;
            }
            gone = n;
        }
        assert_eq!(gone, 5, "the sixth removal would drop more than half");
        assert!(live.instance_count() >= 5);
        // Five hosts' leases expiring a second apart: 10 → 8 → 6 → 4 → 2 → 0.
        let (mut g, mut live) = (guard(), fleet(10, 5));
        let mut held = None;
        for h in 0..5 {
            let next = without(&fleet(10, 5), |i| {
                (0..=h).any(|k| i.node == format!("h{k}"))
            });
            held = held.or(step(
                &mut g,
                &mut live,
                &next,
                t0 + Duration::from_secs(h as u64),
            ));
        }
        assert!(held.is_some(), "the wave is held");
        assert!(live.instance_count() >= 4, "{}", live.instance_count());
    }

    #[test]
    fn a_slow_decline_over_more_than_the_window_is_not_held() {
        // Two instances go every 40 s with a 60 s window: never more than half of the
        // window's peak at once.
        let t0 = Instant::now();
        let (mut g, mut live) = (guard(), fleet(10, 5));
        for k in 1..=4u64 {
            let next = without(&fleet(10, 5), |i| {
                i.id.as_str() < format!("i{:02}", 2 * k).as_str()
            });
            assert_eq!(
                step(&mut g, &mut live, &next, t0 + Duration::from_secs(40 * k)),
                None,
                "step {k}"
            );
        }
        assert_eq!(live.instance_count(), 2);
    }

    #[test]
    fn a_confirmed_release_makes_the_new_level_the_peak() {
        let t0 = Instant::now();
        let (mut g, mut live) = (guard(), fleet(10, 5));
        assert!(step(&mut g, &mut live, &fleet(4, 2), t0).is_some());
        assert_eq!(g.release(), 6);
        assert_eq!(step(&mut g, &mut live, &fleet(4, 2), t0), None);
        assert_eq!(live.instance_count(), 4);
        // One more goes: judged against 4, not 10.
        assert_eq!(step(&mut g, &mut live, &fleet(3, 2), t0), None);
    }

    #[test]
    fn one_service_emptied_in_a_large_fleet_is_held_only_with_per_service_share() {
        let t0 = Instant::now();
        let mut big = fleet(40, 10);
        for k in 0..6 {
            big.services
                .entry("pay".into())
                .or_default()
                .push(inst("pay", &format!("p{k}"), "h1"));
        }
        let mut no_pay = big.clone();
        no_pay.services.remove("pay");
        let (mut g, mut live) = (guard(), big.clone());
        assert_eq!(
            step(&mut g, &mut live, &no_pay, t0),
            None,
            "6 of 46: off by default"
        );
        let mut g = Guard::new(&settings(0.5, 60));
        let mut live = big.clone();
        let held = step(&mut g, &mut live, &no_pay, t0).expect("held per service");
        assert_eq!(
            (held.service.as_deref(), held.count, held.live),
            (Some("pay"), 6, 6)
        );
        assert_eq!(live.services["pay"].len(), 6);
        // The rest of the fleet still changes as it should.
        let fewer = without(&no_pay, |i| i.id == "i00");
        assert_eq!(step(&mut g, &mut live, &fewer, t0), None);
        assert_eq!(live.services["web"].len(), 39);
    }

    #[test]
    fn after_a_restart_the_file_haproxy_runs_is_the_live_set() {
        let file = "global\n    daemon\nbackend svc_web\n    server i00 10.0.0.1:80 weight 7 check\n    server i01 10.0.0.2:80 check disabled\nlisten tcp_db\n    server d1 [fd00::1]:5432 check\nbackend other\n    server x1 10.0.0.3:80\n";
        let mut desired = StoreSnapshot::default();
        desired
            .services
            .insert("api".into(), vec![inst("api", "x1", "h1")]);
        let seeded = seed(file, &desired);
        let ids = |s: &str| {
            seeded.services[s]
                .iter()
                .map(|i| i.id.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(ids("web"), ["i00", "i01"]);
        assert_eq!(ids("db"), ["d1"]);
        assert_eq!(
            ids("api"),
            ["x1"],
            "servers named as desired's instances follow them"
        );
        let i00 = &seeded.services["web"][0];
        assert_eq!(
            (i00.addr.as_str(), i00.weight, i00.draining),
            ("10.0.0.1:80", 7, false)
        );
        assert!(seeded.services["web"][1].draining);
        assert_eq!(seeded.services["db"][0].host, "fd00::1");
        // etcd found empty at start: the first render is judged against the file.
        let mut g = guard();
        let servers: String = (0..10)
            .map(|i| format!("    server i{i:02} 10.0.0.1:80\n"))
            .collect();
        let fleet_file = format!("backend svc_web\n{servers}");
        let live = seed(&fleet_file, &StoreSnapshot::default());
        let (out, held) = g.filter(Some(&live), &StoreSnapshot::default(), Instant::now());
        assert_eq!(
            (out.instance_count(), held.map(|h| h.count)),
            (10, Some(10))
        );
    }

    #[test]
    fn a_resumed_hold_keeps_its_end() {
        let t0 = Instant::now();
        let mut g = guard();
        g.resume_hold(t0 + Duration::from_secs(5));
        let (out, held) = g.filter(Some(&fleet(10, 5)), &StoreSnapshot::default(), t0);
        assert!(held.is_some());
        assert_eq!(
            g.deadline(),
            Some(t0 + Duration::from_secs(5)),
            "not a fresh 60 s"
        );
        let (out, _) = g.filter(
            Some(&out),
            &StoreSnapshot::default(),
            t0 + Duration::from_secs(5),
        );
        assert_eq!(out.instance_count(), 0);
    }

    #[test]
    fn a_held_removal_reports_its_drop_as_a_percentage_of_the_peak() {
        let held = |live, drop| Held {
            count: 3,
            live,
            drop,
            service: None,
            until: Instant::now(),
        };
        assert_eq!(held(10, 7).percent(), 70.0);
        assert_eq!(held(8, 8).percent(), 100.0);
        assert_eq!(held(0, 0).percent(), 0.0, "no peak: no division by zero");
    }

    #[test]
    fn a_peak_exactly_one_window_old_has_left_the_window() {
        // 20 live, then 9 go (not more than half), then 5 more exactly one window
        // after the peak of 20: judged against the 11 live now, 5 of 11 is not held.
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let at_boundary = |late: Duration| {
            let (mut g, mut live) = (guard(), fleet(20, 5));
            assert_eq!(step(&mut g, &mut live, &fleet(20, 5), t0), None);
            assert_eq!(step(&mut g, &mut live, &fleet(11, 5), t0 + s(30)), None);
            step(&mut g, &mut live, &fleet(6, 5), t0 + late)
        };
        assert_eq!(
            at_boundary(s(60)),
            None,
            "the window is [peak, peak + hold)"
        );
        let inside = at_boundary(s(60) - Duration::from_millis(1)).expect("held");
        assert_eq!((inside.live, inside.drop), (20, 14));
    }

    #[test]
    fn a_second_batch_held_counts_only_its_own_removals() {
        let mut g = Guard::new(&MassRemoval {
            share: 0.2,
            per_service_share: 1.0,
            min: 5,
            hold: Duration::from_secs(60),
        });
        let t0 = Instant::now();
        let mut live = fleet(20, 5);
        let first = step(&mut g, &mut live, &fleet(14, 5), t0).expect("6 of 20 held");
        assert_eq!(first.count, 6);
        // Six more go while the first six are held: those are not removed again.
        let second = step(&mut g, &mut live, &fleet(8, 5), t0 + Duration::from_secs(1))
            .expect("6 more held");
        assert_eq!((second.count, second.drop), (6, 6));
        assert_eq!((g.held(), live.instance_count()), (12, 20));
    }

    #[test]
    fn a_services_peak_is_remembered_while_it_is_absent_within_the_window() {
        // `b` had 6, is absent from one render, then one instance of it comes and goes:
        // judged against the peak of 6 (still within the window), not the 1 it had.
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut big = fleet(40, 10);
        big.services.insert(
            "b".into(),
            (0..6).map(|k| inst("b", &format!("b{k}"), "h1")).collect(),
        );
        let web = without(&big, |i| i.service == "b");
        let mut b_back = web.clone();
        b_back
            .services
            .insert("b".into(), vec![inst("b", "b0", "h1")]);
        let mut g = Guard::new(&settings(0.5, 60));
        assert_eq!(g.filter(Some(&big), &big, t0).1, None);
        assert_eq!(g.filter(Some(&web), &web, t0 + s(1)).1, None);
        let held = g.filter(Some(&b_back), &web, t0 + s(2)).1.expect("b0 held");
        assert_eq!(
            (held.service.as_deref(), held.count, held.live, held.drop),
            (Some("b"), 1, 6, 6)
        );
    }

    #[test]
    fn a_later_batch_never_brings_the_held_deadline_forward() {
        // An earlier run held until t0 + 100 s (a longer `hold` then); this run's hold
        // is 60 s. A second batch held at t0 + 1 s keeps the later end for all.
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut g = Guard::new(&MassRemoval {
            share: 0.2,
            ..settings(1.0, 60)
        });
        g.resume_hold(t0 + s(100));
        let mut live = fleet(20, 5);
        assert!(step(&mut g, &mut live, &fleet(14, 5), t0).is_some());
        assert_eq!(g.deadline(), Some(t0 + s(100)));
        let second = step(&mut g, &mut live, &fleet(8, 5), t0 + s(1)).expect("held");
        assert_eq!(second.until, t0 + s(100));
        assert_eq!(g.deadline(), Some(t0 + s(100)));
    }

    #[test]
    fn a_services_held_instances_count_as_still_there_when_more_of_it_go() {
        // `pay` 12 → 5 is held (7 of 12); then 2 more go: against 5 + 7 held that is a
        // drop of 2, under `min`, so they go.
        let t0 = Instant::now();
        let mut big = fleet(40, 10);
        big.services.insert(
            "pay".into(),
            (0..12)
                .map(|k| inst("pay", &format!("p{k:02}"), "h1"))
                .collect(),
        );
        let pay_left =
            |n: usize| without(&big, |i| i.service == "pay" && i.id >= format!("p{n:02}"));
        let mut g = Guard::new(&settings(0.5, 60));
        let mut live = big.clone();
        let held = step(&mut g, &mut live, &pay_left(5), t0).expect("pay held");
        assert_eq!((held.service.as_deref(), held.count), (Some("pay"), 7));
        assert_eq!(
            step(&mut g, &mut live, &pay_left(3), t0 + Duration::from_secs(1)),
            None
        );
        assert_eq!((g.held(), live.services["pay"].len()), (7, 10));
    }
}
