//! This node's registrable containers, as Docker last reported them: container id →
//! the registrations it asks for. A container that is not running, not healthy or
//! misconfigured has no entry; its configuration warnings (and the ports it publishes
//! but cannot register) are logged once per change, so a resync does not repeat them.

use std::collections::{BTreeMap, BTreeSet};

use bollard::models::ContainerInspectResponse;

use super::docker::DockerReport;
use super::selector::{self, Gate, NodeSettings, Registration};
use crate::schema;

pub(crate) struct Containers {
    settings: NodeSettings,
    /// Registrable containers (running, healthy, valid labels) → what they register.
    registrable: BTreeMap<String, Vec<Registration>>,
    /// Container id → the warnings last logged for it.
    warned: BTreeMap<String, String>,
}

impl Containers {
    pub(crate) fn new(settings: NodeSettings) -> Containers {
        Containers {
            settings,
            registrable: BTreeMap::new(),
            warned: BTreeMap::new(),
        }
    }

    /// Every registration of every registrable container.
    pub(crate) fn registrations(&self) -> impl Iterator<Item = &Registration> {
        self.registrable.values().flatten()
    }

    /// Folds in one report. True for a snapshot: the whole view was rebuilt.
    pub(crate) fn apply(&mut self, report: DockerReport) -> bool {
        match report {
            DockerReport::Snapshot(list) => {
                let mut next = BTreeMap::new();
                for c in &list {
                    if let Some((id, regs)) = self.evaluate(c) {
                        next.insert(id, regs);
                    }
                }
                let seen: BTreeSet<&str> = list.iter().filter_map(|c| c.id.as_deref()).collect();
                self.warned.retain(|id, _| seen.contains(id.as_str()));
                self.registrable = next;
                return true;
            }
            DockerReport::Changed(c) => {
                let Some(id) = c.id.clone() else {
                    return false;
                };
                match self.evaluate(&c) {
                    Some((id, regs)) => {
                        self.registrable.insert(id, regs);
                    }
                    None => {
                        self.registrable.remove(&id);
                    }
                }
            }
            DockerReport::Gone { id, action } => {
                if self.registrable.remove(&id).is_some() {
                    tracing::debug!(container = %schema::short_id(&id), action = %action, "container going away");
                }
                self.warned.remove(&id);
            }
        }
        false
    }

    /// The container's registrations if it may be registered now; logs why not once.
    fn evaluate(&mut self, c: &ContainerInspectResponse) -> Option<(String, Vec<Registration>)> {
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
