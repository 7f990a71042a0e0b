//! This node's registrable containers, as Docker last reported them: container id →
//! the registrations it asks for, and how it is stopped. A container that is not
//! running, not healthy or misconfigured has no entry; its configuration warnings (and
//! the ports it publishes but cannot register) are logged once per change, so a resync
//! does not repeat them.
//!
//! A container that got its stop signal is draining until it exits (its entry goes)
//! or its give-back deadline passes (`drain`). The drain is part of the desired
//! state: a fresh inspect or a full snapshot of a draining container keeps it, so a
//! resync never puts a stopping container back into rotation.

use std::collections::{BTreeMap, BTreeSet};

use bollard::models::ContainerInspectResponse;
use tokio::time::Instant;

use super::docker::DockerReport;
use super::drain::StopPolicy;
use super::selector::{self, Gate, NodeSettings, Registration};
use crate::schema;

struct Entry {
    /// `record.draining` is set exactly when the container is in `drains`.
    regs: Vec<Registration>,
    stop: StopPolicy,
}

pub(crate) struct Containers {
    settings: NodeSettings,
    /// Registrable containers (running, healthy, valid labels) → what they register.
    registrable: BTreeMap<String, Entry>,
    /// Draining registrable containers → when they are given back if still running.
    drains: BTreeMap<String, Instant>,
    /// Container id → the warnings last logged for it.
    warned: BTreeMap<String, String>,
}

impl Containers {
    pub(crate) fn new(settings: NodeSettings) -> Containers {
        Containers {
            settings,
            registrable: BTreeMap::new(),
            drains: BTreeMap::new(),
            warned: BTreeMap::new(),
        }
    }

    /// Every registration of every registrable container.
    pub(crate) fn registrations(&self) -> impl Iterator<Item = &Registration> {
        self.registrable.values().flat_map(|e| e.regs.iter())
    }

    /// Folds in one report at `now`. True for a snapshot: the whole view was rebuilt.
    pub(crate) fn apply(&mut self, report: DockerReport, now: Instant) -> bool {
        match report {
            DockerReport::Event { report, .. } => return self.apply(*report, now),
            DockerReport::Snapshot(list) => {
                let mut next = BTreeMap::new();
                for c in &list {
                    if let Some((id, entry)) = self.evaluate(c) {
                        next.insert(id, entry);
                    }
                }
                let seen: BTreeSet<&str> = list.iter().filter_map(|c| c.id.as_deref()).collect();
                self.warned.retain(|id, _| seen.contains(id.as_str()));
                self.registrable = next;
                self.drains
                    .retain(|id, _| self.registrable.contains_key(id));
                return true;
            }
            DockerReport::Changed(c) => {
                let Some(id) = c.id.clone() else {
                    return false;
                };
                match self.evaluate(&c) {
                    Some((id, entry)) => {
                        self.registrable.insert(id, entry);
                    }
                    None => {
                        self.registrable.remove(&id);
                        self.drains.remove(&id);
                    }
                }
            }
            DockerReport::Gone { id, action } => {
                if self.registrable.remove(&id).is_some() {
                    tracing::debug!(container = %schema::short_id(&id), action = %action, "container going away");
                }
                self.drains.remove(&id);
                self.warned.remove(&id);
            }
            DockerReport::Killed { id, signal } => {
                let Some(entry) = self.registrable.get(&id) else {
                    return false;
                };
                if !entry.stop.drains_on(signal.as_deref()) {
                    tracing::debug!(container = %schema::short_id(&id), signal = signal.as_deref().unwrap_or("-"), "signal is not a stop; nothing changes");
                    return false;
                }
                let until = now + entry.stop.give_back_after();
                let deadline = self.drains.entry(id.clone()).or_insert(until);
                *deadline = (*deadline).max(until);
                tracing::info!(container = %schema::short_id(&id), signal = signal.as_deref().unwrap_or("-"), "container is stopping; draining its instances");
                self.mark(&id);
            }
        }
        false
    }

    /// When the next draining container is due to be given back.
    pub(crate) fn next_give_back(&self) -> Option<Instant> {
        self.drains.values().min().copied()
    }

    /// Gives back every draining container whose deadline has passed at `now`: it did
    /// not exit after its stop signal, so it is serving still. True if any was.
    pub(crate) fn give_back(&mut self, now: Instant) -> bool {
        let due: Vec<String> = self
            .drains
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &due {
            self.drains.remove(id);
            let timeout = self.registrable.get(id).map(|e| e.stop.timeout);
            tracing::info!(
                container = %schema::short_id(id),
                stop_timeout = ?timeout.unwrap_or_default(),
                "container did not exit within its stop timeout; taking it back into rotation"
            );
            self.mark(id);
        }
        !due.is_empty()
    }

    /// After a restart: the instances etcd holds as draining (`draining_keys`) belong
    /// to containers that were stopping when the last registrar went. Their drain goes
    /// on, with a fresh deadline from `now`: a restart must not put a stopping container
    /// back into rotation. True if any drain was adopted.
    pub(crate) fn adopt_drains(
        &mut self,
        prefix: &str,
        draining_keys: &BTreeSet<String>,
        now: Instant,
    ) -> bool {
        let adopt: Vec<(String, Instant)> = self
            .registrable
            .iter()
            .filter(|(id, _)| !self.drains.contains_key(*id))
            .filter(|(_, e)| {
                e.regs
                    .iter()
                    .any(|r| draining_keys.contains(&r.key(prefix)))
            })
            .map(|(id, e)| (id.clone(), now + e.stop.give_back_after()))
            .collect();
        for (id, until) in &adopt {
            tracing::info!(container = %schema::short_id(id), "container was draining before this registrar started; it keeps draining");
            self.drains.insert(id.clone(), *until);
            self.mark(id);
        }
        !adopt.is_empty()
    }

    /// Sets `draining` on the container's records from `drains`.
    fn mark(&mut self, id: &str) {
        let draining = self.drains.contains_key(id);
        if let Some(e) = self.registrable.get_mut(id) {
            for r in &mut e.regs {
                r.record.draining = draining;
            }
        }
    }

    /// The container's entry if it may be registered now; logs why not once.
    fn evaluate(&mut self, c: &ContainerInspectResponse) -> Option<(String, Entry)> {
        let (id, mut regs) = self.registrations_of(c)?;
        let draining = self.drains.contains_key(&id);
        for r in &mut regs {
            r.record.draining = draining;
        }
        let stop = StopPolicy::of(c);
        Some((id, Entry { regs, stop }))
    }

    /// The container's registrations if it may be registered now; logs why not once.
    fn registrations_of(
        &mut self,
        c: &ContainerInspectResponse,
    ) -> Option<(String, Vec<Registration>)> {
        let id = c.id.clone()?;
        let gate = selector::gate(c);
        if gate != Gate::Up {
            tracing::debug!(container = %selector::display_name(c), gate = ?gate, "not registrable now");
            return None;
        }
        match selector::registrations(c, &self.settings) {
            Ok(selected) => {
                if selected.skipped.is_empty() {
                    self.warned.remove(&id);
                } else {
                    let text = text_of(&selected.skipped);
                    if self.warned.get(&id) != Some(&text) {
                        for w in &selected.skipped {
                            tracing::warn!(
                                container = %w.container,
                                port = %w.label,
                                "{w}; this port is not registered"
                            );
                        }
                        self.warned.insert(id.clone(), text);
                    }
                }
                Some((id, selected.registrations))
            }
            Err(warnings) => {
                let text = text_of(&warnings);
                if self.warned.get(&id) != Some(&text) {
                    for w in &warnings {
                        tracing::warn!(
                            container = %w.container,
                            label = %w.label,
                            "{w}; the container is not registered until this is fixed"
                        );
                    }
                    self.warned.insert(id, text);
                }
                None
            }
        }
    }
}

fn text_of(warnings: &[selector::LabelWarning]) -> String {
    let text: Vec<String> = warnings.iter().map(|w| w.to_string()).collect();
    text.join("; ")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::selector::fixtures::{inspect, one_port, settings, ID};
    use super::*;

    /// A registrable container stopped by `signal` within `timeout` seconds.
    fn container(stop: Option<(&str, i64)>) -> ContainerInspectResponse {
        let mut c = inspect(&[], &[], one_port());
        if let (Some((signal, timeout)), Some(config)) = (stop, c.config.as_mut()) {
            config.stop_signal = Some(signal.into());
            config.stop_timeout = Some(timeout);
        }
        c
    }

    fn draining(cs: &Containers) -> Vec<bool> {
        cs.registrations().map(|r| r.record.draining).collect()
    }

    fn kill(signal: &str) -> DockerReport {
        DockerReport::Killed {
            id: ID.into(),
            signal: Some(signal.into()),
        }
    }

    fn started(c: ContainerInspectResponse, now: Instant) -> Containers {
        let mut cs = Containers::new(settings());
        cs.apply(DockerReport::Snapshot(vec![c]), now);
        assert_eq!(draining(&cs), vec![false]);
        cs
    }

    /// A started container, then `kill -s <signal>`.
    fn killed(signal: &str) -> (Instant, Containers) {
        let now = Instant::now();
        let mut cs = started(container(None), now);
        cs.apply(kill(signal), now);
        (now, cs)
    }

    #[test]
    fn the_stop_signal_drains_and_die_deletes() {
        let (now, mut cs) = killed("15");
        assert_eq!(draining(&cs), vec![true]);
        assert!(cs
            .registrations()
            .all(|r| r.record.to_json().contains(r#""draining":true"#)));
        assert_eq!(cs.next_give_back(), Some(now + Duration::from_secs(12)));
        cs.apply(
            DockerReport::Gone {
                id: ID.into(),
                action: "die".into(),
            },
            now,
        );
        assert_eq!(cs.registrations().count(), 0);
        assert_eq!(cs.next_give_back(), None);
    }

    #[test]
    fn a_reload_signal_changes_nothing_and_sigkill_drains() {
        let (now, mut cs) = killed("1");
        assert_eq!(draining(&cs), vec![false]);
        assert_eq!(cs.next_give_back(), None);
        cs.apply(kill("9"), now);
        assert_eq!(draining(&cs), vec![true]);
    }

    #[test]
    fn a_custom_stop_signal_and_timeout_are_the_containers_own() {
        let now = Instant::now();
        let mut cs = started(container(Some(("SIGQUIT", 3))), now);
        cs.apply(kill("15"), now);
        assert_eq!(draining(&cs), vec![false], "SIGTERM is not its stop signal");
        cs.apply(kill("3"), now);
        assert_eq!(draining(&cs), vec![true]);
        assert_eq!(cs.next_give_back(), Some(now + Duration::from_secs(5)));
    }

    #[test]
    fn a_drain_survives_an_inspect_and_a_resync_until_its_deadline() {
        let now = Instant::now();
        let mut cs = started(container(Some(("SIGTERM", 2))), now);
        cs.apply(kill("SIGTERM"), now);
        cs.apply(
            DockerReport::Changed(Box::new(container(Some(("SIGTERM", 2))))),
            now,
        );
        assert_eq!(draining(&cs), vec![true]);
        assert!(cs.apply(
            DockerReport::Snapshot(vec![container(Some(("SIGTERM", 2)))]),
            now
        ));
        assert_eq!(draining(&cs), vec![true]);
        // A later SIGKILL never shortens the drain.
        cs.apply(kill("9"), now - Duration::from_secs(1));
        assert_eq!(cs.next_give_back(), Some(now + Duration::from_secs(4)));
        assert!(!cs.give_back(now + Duration::from_secs(3)));
        assert_eq!(draining(&cs), vec![true]);
        assert!(cs.give_back(now + Duration::from_secs(4)));
        assert_eq!(draining(&cs), vec![false]);
        assert_eq!(cs.next_give_back(), None);
    }

    #[test]
    fn a_kill_of_an_unknown_container_and_a_resync_without_it_drop_the_drain() {
        let now = Instant::now();
        let mut cs = Containers::new(settings());
        cs.apply(kill("15"), now);
        assert_eq!(cs.next_give_back(), None);
        let mut cs = started(container(None), now);
        cs.apply(kill("15"), now);
        cs.apply(DockerReport::Snapshot(vec![]), now);
        assert_eq!(cs.next_give_back(), None);
    }

    #[test]
    fn a_restarted_registrar_keeps_a_drain_it_finds_in_etcd() {
        let now = Instant::now();
        let mut cs = started(container(None), now);
        let key = cs.registrations().next().unwrap().key("/p");
        assert!(!cs.adopt_drains("/p", &BTreeSet::from(["/p/other".to_string()]), now));
        assert!(cs.adopt_drains("/p", &BTreeSet::from([key.clone()]), now));
        assert_eq!(draining(&cs), vec![true]);
        assert_eq!(cs.next_give_back(), Some(now + Duration::from_secs(12)));
        // Adopting again does not push the deadline out.
        assert!(!cs.adopt_drains("/p", &BTreeSet::from([key]), now + Duration::from_secs(5)));
    }
}
