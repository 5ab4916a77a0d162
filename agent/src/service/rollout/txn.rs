//! The rollout machine's transitions on finished jobs, and the receipts they end in.

use ironroot_contract::wire::{Health, Outcome, RECEIPT_KIND, Receipt};

use super::{Change, Job, JobDone, ModuleInfo, Rollout, State, Step, Txn, record};
use crate::service::node::{Action, Now};
use crate::service::systemd::PowerOp;

/// Receipts and records carry text to the plane, which refuses control characters.
pub fn clean(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { ' ' } else { c }).take(1000).collect()
}

/// A health result as the receipt carries it: no control characters (a probe's stderr has
/// newlines), bounded.
fn clean_health(h: Health) -> Health {
    Health {
        healthy: h.healthy,
        units: h.units.into_iter().map(|(u, s)| (clean(&u), clean(&s))).collect(),
        probe: h.probe.as_deref().map(clean),
    }
}

fn unhealthy_reason(h: &Health) -> String {
    let units: Vec<String> =
        h.units.iter().filter(|(_, state)| state != "active").map(|(u, state)| format!("{u} is {state}")).collect();
    let mut parts = units;
    if let Some(p) = &h.probe {
        parts.push(format!("probe: {p}"));
    }
    if parts.is_empty() {
        "the health gate failed".to_owned()
    } else {
        format!("health gate failed: {}", parts.join("; "))
    }
}

impl Rollout {
    /// A job finished.
    pub fn on_job(&mut self, done: JobDone, now: Now, out: &mut Vec<Action>) {
        (self.wall, self.mono) = (now.wall, now.mono);
        if let JobDone::Verified { name, result } = done {
            self.on_verified(&name, result, now, out);
            return;
        }
        if done == JobDone::PowerBegun {
            return;
        }
        if matches!(done, JobDone::PowerFailed(_)) && !self.leaving {
            // A task's reboot: not this machine's.
            tracing::warn!(?done, "a reboot asked by a task did not begin");
            return;
        }
        let State::Applying { txn: Some(txn), .. } = &mut self.state else {
            tracing::warn!(?done, "a job finished outside a transaction");
            return;
        };
        let mut txn = (**txn).clone();
        let step_record = |txn: &Txn, extra: serde_json::Value| {
            let mut data = serde_json::json!({"txn": txn.id, "step": txn.step});
            if let (Some(d), serde_json::Value::Object(e)) = (data.as_object_mut(), extra) {
                d.extend(e);
            }
            record("txn", data)
        };
        let (to, from) = match &txn.change {
            Change::Put { to, from } => (Some(to.clone()), from.clone()),
            Change::Remove(m) => (None, Some(m.clone())),
            Change::Root { .. } => (None, None),
        };
        let restore = |txn: &mut Txn, reason: String, out: &mut Vec<Action>| {
            txn.reason = Some(clean(&reason));
            txn.enter(Step::Restoring, now.mono);
            out.push(step_record(txn, serde_json::json!({"reason": txn.reason})));
            match &txn.change {
                Change::Put { to, from } => {
                    out.push(Action::run(Job::Restore { txn: txn.id.clone(), to: to.clone(), from: from.clone() }));
                }
                Change::Root { .. } => {
                    out.push(Action::run(Job::StagePrevious { txn: txn.id.clone(), started: txn.started }));
                }
                Change::Remove(_) => {}
            }
        };
        match done {
            JobDone::Verified { .. } | JobDone::PowerBegun => return,
            JobDone::Staged { result: Ok(()), .. } => {
                txn.enter(Step::Staged, now.mono);
                out.push(step_record(&txn, serde_json::Value::Null));
                if let Some(to) = &to {
                    out.push(Action::run(Job::Attach { txn: txn.id.clone(), to: to.clone(), from: from.clone() }));
                }
            }
            JobDone::Staged { result: Err(why), .. } => {
                txn.reason = Some(clean(&format!("staging: {why}")));
                return self.end(txn, Outcome::Failed, now, out);
            }
            JobDone::Attached { result: Ok(units), .. } => {
                txn.units = units;
                txn.enter(Step::Attached, now.mono);
                out.push(step_record(&txn, serde_json::json!({"units": txn.units})));
                if let Some(to) = &to {
                    out.push(Action::run(Job::Gate { txn: txn.id.clone(), module: to.clone() }));
                }
            }
            JobDone::Attached { result: Err(why), .. } => restore(&mut txn, format!("attaching: {why}"), out),
            JobDone::Gated { health, .. } => {
                let health = clean_health(health);
                let healthy = health.healthy;
                txn.health = Some(health.clone());
                if healthy {
                    txn.enter(Step::Healthy, now.mono);
                    out.push(step_record(&txn, serde_json::json!({"health": health})));
                    if let Some(to) = &to {
                        out.push(Action::run(Job::Commit { txn: txn.id.clone(), to: to.clone(), from: from.clone() }));
                    } else if let Change::Root { modules, .. } = &txn.change {
                        out.push(Action::run(Job::CommitRoot { txn: txn.id.clone(), modules: modules.clone() }));
                    }
                } else {
                    restore(&mut txn, unhealthy_reason(&health), out);
                }
            }
            JobDone::Committed { result, .. } => {
                if let Err(why) = result {
                    txn.reason = Some(clean(&format!("committed, but the serial floor was not raised: {why}")));
                }
                if let Some(to) = &to {
                    self.live.insert(to.name.clone(), to.clone());
                }
                return self.end(txn, Outcome::Committed, now, out);
            }
            JobDone::Restored { result, .. } => {
                let name = to.as_ref().map(|t| t.name.clone()).unwrap_or_default();
                let outcome = match result {
                    Ok(()) => {
                        match &from {
                            Some(f) => self.live.insert(name, f.clone()),
                            None => self.live.remove(&name),
                        };
                        Outcome::RolledBack
                    }
                    Err(why) => {
                        self.live.remove(&name);
                        let before = txn.reason.clone().unwrap_or_default();
                        txn.reason = Some(clean(&format!("{before}; the rollback failed too: {why}")));
                        Outcome::Failed
                    }
                };
                return self.end(txn, outcome, now, out);
            }
            JobDone::Detached { result, .. } => match result {
                Ok(units) => {
                    txn.units = units;
                    if let Some(f) = &from {
                        self.live.remove(&f.name);
                    }
                    return self.end(txn, Outcome::Committed, now, out);
                }
                Err(why) => {
                    txn.reason = Some(clean(&format!("detaching: {why}")));
                    return self.end(txn, Outcome::Failed, now, out);
                }
            },
            JobDone::RootStaged { result: Ok(()), .. } => {
                if txn.step == Step::Restoring {
                    // Going back: the receipt is written before this userspace ends (the
                    // service in the previous root only spools it).
                    let receipt = self.receipt(&txn, Outcome::RolledBack, now);
                    out.push(record(RECEIPT_KIND, serde_json::to_value(&receipt).unwrap_or_default()));
                } else {
                    txn.enter(Step::Staged, now.mono);
                    out.push(step_record(&txn, serde_json::Value::Null));
                }
                out.push(Action::run(Job::Power(PowerOp::SoftReboot)));
                self.leaving = true;
            }
            JobDone::RootStaged { result: Err(why), .. } => {
                let reason = if txn.step == Step::Restoring {
                    let before = txn.reason.clone().unwrap_or_default();
                    format!("{before}; going back to the previous root failed too: {why}")
                } else {
                    format!("staging the new root: {why}")
                };
                txn.reason = Some(clean(&reason));
                return self.end(txn, Outcome::Failed, now, out);
            }
            JobDone::PowerFailed(why) => {
                self.leaving = false;
                let before = txn.reason.clone().map(|r| format!("{r}; ")).unwrap_or_default();
                txn.reason = Some(clean(&format!("{before}the soft reboot did not begin: {why}")));
                return self.end(txn, Outcome::Failed, now, out);
            }
        }
        if let State::Applying { txn: slot, .. } = &mut self.state {
            *slot = Some(Box::new(txn));
        }
    }

    fn on_verified(&mut self, name: &str, result: Result<ModuleInfo, String>, now: Now, out: &mut Vec<Action>) {
        let State::Verifying { todo, done, failed, .. } = &mut self.state else { return };
        let Some(wanted) = todo.pop_front() else { return };
        match result {
            Ok(info) => {
                let ms = u64::try_from(now.mono.saturating_sub(self.verify_started).as_millis()).unwrap_or(u64::MAX);
                self.verify_ms.insert(info.digest, ms);
                done.push(info);
            }
            Err(why) => {
                *failed += 1;
                self.refused.insert(wanted.digest);
                let from = self.live.get(name).map(ModuleInfo::version);
                let receipt = Receipt {
                    transaction: format!(
                        "v-{}-{}",
                        self.boot_tag,
                        wanted.digest.hex().chars().take(12).collect::<String>()
                    ),
                    module: if wanted.name.is_empty() { name.to_owned() } else { wanted.name.clone() },
                    role: self.live.get(name).map(|m| m.role),
                    from,
                    to: None,
                    wanted: Some(wanted.digest),
                    units: Vec::new(),
                    health: None,
                    started: now.wall,
                    finished: now.wall,
                    outcome: Outcome::Failed,
                    reason: Some(clean(&format!("{} was refused: {why}", wanted.digest))),
                    agent_version: self.agent_version.clone(),
                    steps_ms: std::collections::BTreeMap::new(),
                };
                out.push(record(RECEIPT_KIND, serde_json::to_value(&receipt).unwrap_or_default()));
            }
        }
        self.verify_next(out);
    }

    /// The receipt of `txn` ending with `outcome` now.
    pub(super) fn receipt(&self, txn: &Txn, outcome: Outcome, now: Now) -> Receipt {
        let (module, role, from, to, wanted) = match &txn.change {
            Change::Put { to, from } => (
                to.name.clone(),
                Some(to.role),
                from.as_ref().map(ModuleInfo::version),
                Some(to.version()),
                Some(to.digest),
            ),
            Change::Remove(m) => (m.name.clone(), Some(m.role), Some(m.version()), None, None),
            // A root change names its first changed module (the root, or a `usr` layer).
            Change::Root { changed, .. } => match changed.first() {
                Some((from, to)) => (
                    to.name.clone(),
                    Some(to.role),
                    from.as_ref().map(ModuleInfo::version),
                    Some(to.version()),
                    Some(to.digest),
                ),
                None => ("root".to_owned(), None, None, None, None),
            },
        };
        Receipt {
            transaction: txn.id.clone(),
            module,
            role,
            from,
            to,
            wanted,
            units: txn.units.clone(),
            health: txn.health.clone(),
            started: txn.started,
            finished: now.wall.max(txn.started),
            outcome,
            reason: txn.reason.clone(),
            agent_version: self.agent_version.clone(),
            steps_ms: txn.steps_ms.clone(),
        }
    }

    /// Ends the open transaction with its receipt and starts the next change.
    fn end(&mut self, txn: Txn, outcome: Outcome, now: Now, out: &mut Vec<Action>) {
        if outcome != Outcome::Committed {
            match &txn.change {
                Change::Put { to, .. } => {
                    self.refused.insert(to.digest);
                }
                Change::Root { changed, .. } => self.refused.extend(changed.iter().map(|(_, to)| to.digest)),
                Change::Remove(_) => {}
            }
        }
        let mut txn = txn;
        txn.enter(txn.step, now.mono);
        let receipt = self.receipt(&txn, outcome, now);
        out.push(record(RECEIPT_KIND, serde_json::to_value(&receipt).unwrap_or_default()));
        if let State::Applying { txn: slot, failed, .. } = &mut self.state {
            *slot = None;
            if outcome != Outcome::Committed {
                *failed += 1;
            }
        }
        self.apply_next(out)
    }
}
