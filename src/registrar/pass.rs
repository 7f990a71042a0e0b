//! One pass of the registrar's loop: bring etcd in line with the desired state.
//!
//! `sync` runs `try_sync`: open the session if there is none, then (once Docker has
//! answered) either `reconcile` (read this node's keys back and make them match: at
//! start, after a reconnect, a lost lease, a failed write, a key touched behind our
//! back, every `--resync`) or `apply_changes` (write the difference against what we
//! know etcd holds). Every write goes through `Session::write` on our one lease.

use super::*;

impl Registrar {
    /// Brings etcd in line, or schedules a retry.
    pub(super) async fn sync(&mut self) {
        let result = self.try_sync().await;
        self.metrics.set_etcd_ok(result.is_ok());
        match result {
            Ok(()) => {
                // An event that led to no write (a HUP, a container we skip) measures
                // nothing.
                self.pending_event = None;
                self.session.succeeded()
            }
            Err(SessionError::LeaseLost) => self.lease_lost(),
            Err(SessionError::NodeTaken(holder)) => self.taken = Some(holder),
            Err(e) => {
                self.dirty = true;
                self.session.failed(&e);
            }
        }
    }

    async fn try_sync(&mut self) -> Result<(), SessionError> {
        let lease = match self.session.lease() {
            Some(l) => l,
            None => {
                let l = self.session.open().await?;
                self.node_value = None;
                self.dirty = true;
                l
            }
        };
        if !self.docker_synced {
            return Ok(());
        }
        if self.dirty {
            self.reconcile(lease).await
        } else {
            self.apply_changes(lease).await
        }
    }

    /// The desired key set; `present` says which keys are on our lease already.
    fn desired(&self, present: impl Fn(&str) -> bool) -> BTreeMap<String, String> {
        let node_value = self
            .node_value
            .clone()
            .unwrap_or_else(|| serde_json::to_string(&self.node_want).unwrap_or_default());
        plan::desired(
            &self.cfg.etcd.prefix,
            (&self.node_key, &node_value),
            self.containers.registrations().chain(&self.services),
            |instance| self.probes.verdict(instance),
            present,
        )
    }

    /// Reads this node's keys back and makes them match.
    async fn reconcile(&mut self, lease: i64) -> Result<(), SessionError> {
        let read = self.session.read_back(lease).await?;
        let actual = read.keys;
        if !self.ready {
            // A registrar restarted in the middle of a drain keeps it going.
            let draining: BTreeSet<String> = actual
                .iter()
                .filter(|(_, a)| a.value.contains(r#""draining":true"#))
                .map(|(k, _)| k.clone())
                .collect();
            self.containers
                .adopt_drains(&self.cfg.etcd.prefix, &draining, Instant::now());
        }
        self.node_value = Some(plan::node_value(
            &self.node_want,
            actual.get(&self.node_key),
            lease,
        ));
        let desired = self.desired(|key| actual.get(key).is_some_and(|a| a.lease == lease));
        let ops = plan::plan(&desired, &actual, lease);
        let wrote = !ops.is_empty();
        // After a lost lease every instance is written again: one `reregister` for
        // them, not a `register` each.
        let mut folded = self.lease_regranted.then(Vec::new);
        let announce = announcer(
            &self.hooks,
            &self.cfg.etcd.prefix,
            &self.cfg.node,
            &actual,
            folded.as_mut(),
        );
        self.session.write(&ops, lease, announce).await?;
        self.lease_regranted = false;
        if let Some(e) = folded.and_then(|f| announce::reregistered(&self.cfg.node, &f)) {
            self.hooks.emit(e);
        }
        // What was written is what etcd holds now: `wrote` counts it (the instances
        // gauge read the old map here and lagged one write behind).
        self.believed = desired;
        self.wrote(&ops);
        self.dirty = false;
        if !self.v1_cleaned {
            self.remove_v1_keys().await;
        }
        let revision = read.revision;
        self.start_watch(revision + 1).await?;
        if wrote {
            tracing::info!(
                revision,
                instances = self.believed.len() - 1,
                changes = ops.len(),
                "reconciled"
            );
        } else {
            tracing::debug!(
                revision,
                instances = self.believed.len() - 1,
                "reconciled: etcd already matches"
            );
        }
        if !self.ready {
            self.ready = true;
            self.metrics.set_ready();
            let status = format!("{} instances registered", self.believed.len() - 1);
            tracing::info!(node = %self.cfg.node, "registrar ready: {status}");
            sd::ready(&status);
        }
        Ok(())
    }

    /// Once after start, once this node's v2 keys are written (so no service goes
    /// empty in between): deletes what a v1 registrar of this node left. Best effort;
    /// a transient failure tries again at the next reconcile.
    async fn remove_v1_keys(&mut self) {
        match self.session.remove_v1_keys().await {
            Ok(V1Cleanup::Done(0)) => self.v1_cleaned = true,
            Ok(V1Cleanup::Done(n)) => {
                tracing::info!(node = %self.cfg.node, keys = n, "removed this node's keys of the v1 layout");
                self.v1_cleaned = true;
            }
            Ok(V1Cleanup::Refused) => {
                tracing::info!(
                    node = %self.cfg.node,
                    "etcd refuses access outside this node's prefix (a least-privilege role): not looking for keys of the v1 layout; an operator removes any that a v1 registrar left"
                );
                self.v1_cleaned = true;
            }
            Err(e) => tracing::warn!(
                error = %e,
                "cannot remove this node's keys of the v1 layout; trying again at the next reconcile"
            ),
        }
    }

    /// Applies the difference between the desired set and what etcd is known to hold.
    async fn apply_changes(&mut self, lease: i64) -> Result<(), SessionError> {
        let desired = self.desired(|key| self.believed.contains_key(key));
        let actual: BTreeMap<String, Actual> = self
            .believed
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    Actual {
                        value: v.clone(),
                        lease,
                    },
                )
            })
            .collect();
        let ops = plan::plan(&desired, &actual, lease);
        if ops.is_empty() {
            return Ok(());
        }
        let announce = announcer(
            &self.hooks,
            &self.cfg.etcd.prefix,
            &self.cfg.node,
            &actual,
            None,
        );
        self.session.write(&ops, lease, announce).await?;
        // What was written is what etcd holds now: `wrote` counts it (the instances
        // gauge read the old map here and lagged one write behind).
        self.believed = desired;
        self.wrote(&ops);
        Ok(())
    }

    /// Counts what a write did, and measures Docker event → etcd when an event caused it.
    fn wrote(&mut self, ops: &[KeyOp]) {
        if ops.is_empty() {
            return;
        }
        for op in ops {
            let label = match op {
                KeyOp::Put { .. } => "put",
                KeyOp::Delete { .. } => "delete",
            };
            self.metrics.writes.get_or_create(&[("op", label)]).inc();
        }
        if let Some(at) = self.pending_event.take() {
            if let Ok(took) = std::time::SystemTime::now().duration_since(at) {
                self.metrics.event_to_etcd.observe(took.as_secs_f64());
            }
        }
        self.metrics
            .instances
            .set(self.believed.len().saturating_sub(1) as i64);
    }
}

/// Emits the hook event (`announce::event`) of each op written; `before` is what etcd
/// held before the write. With `fold`, `register` events are kept there instead (for
/// one `reregister`); the others are emitted as they come.
fn announcer<'a>(
    hooks: &'a Hooks,
    prefix: &'a str,
    node: &'a str,
    before: &'a BTreeMap<String, Actual>,
    mut fold: Option<&'a mut Vec<crate::hook::Event>>,
) -> impl FnMut(&KeyOp) + 'a {
    move |op| {
        let key = match op {
            KeyOp::Put { key, .. } | KeyOp::Delete { key } => key,
        };
        let was = before.get(key).map(|a| a.value.as_str());
        if let Some(e) = announce::event(prefix, node, op, was) {
            match fold.as_deref_mut() {
                Some(f) if e.kind == crate::hook::RegistrarEvent::Register.into() => f.push(e),
                _ => hooks.emit(e),
            }
        }
    }
}
