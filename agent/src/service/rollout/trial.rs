//! A root entered by soft reboot is on trial: once the live modules are attached again, every
//! unit of the node's modules must be active and settled before the trial's deadline. Then the
//! root is committed (serial floors, the trial taken off its record) and the node says
//! `ready`; else the root it replaced is staged and the node soft-reboots back into it, the
//! `rolled-back` receipt written first. A soft reboot that never happened ends the
//! transaction as `failed`.

use std::collections::{BTreeSet, VecDeque};
use std::time::Duration;

use ironroot_contract::wire::{Outcome, RECEIPT_KIND};

use super::{Change, Job, Rollout, State, Step, Trial, Txn, record};
use crate::service::node::{Action, Now};

impl Rollout {
    /// At start: a root entered by soft reboot waits for its gate; one that was not entered
    /// ends its transaction now.
    pub(super) fn begin_trial(&mut self, trial: Trial, out: &mut Vec<Action>) {
        let Some(reason) = trial.not_entered.clone() else {
            self.trial = Some(trial);
            return;
        };
        let txn = Self::trial_txn(&trial, Vec::new(), Some(super::txn::clean(&reason)));
        self.refused.extend(trial.changed.iter().map(|(_, to)| to.digest));
        let receipt = self.receipt(&txn, Outcome::Failed, Now { mono: Default::default(), wall: self.wall });
        out.push(record(RECEIPT_KIND, serde_json::to_value(&receipt).unwrap_or_default()));
    }

    fn trial_txn(trial: &Trial, modules: Vec<super::ModuleInfo>, reason: Option<String>) -> Txn {
        let mut txn = Txn::new(
            trial.txn.clone(),
            Change::Root { modules, changed: trial.changed.clone() },
            Step::Staged,
            trial.started,
            Duration::ZERO,
        );
        txn.reason = reason;
        // The parts before this service came with the root's record.
        txn.steps_ms.clone_from(&trial.steps_ms);
        txn
    }

    /// The live modules are attached: gates the root on trial.
    pub(super) fn gate_trial(&mut self, trial: Trial, out: &mut Vec<Action>) {
        let modules: Vec<_> = self.live.values().filter(|m| !m.role.is_live()).cloned().collect();
        let mut units = BTreeSet::new();
        for m in self.live.values() {
            units.extend(m.units.iter().cloned());
        }
        let mut txn = Self::trial_txn(&trial, modules, None);
        txn.units = units.iter().cloned().collect();
        // This service's own time up to its gate (starting, the live modules attached again)
        // is `attach`; the gate follows, on this service's clock.
        txn.steps_ms.insert("attach".to_owned(), u64::try_from(self.mono.as_millis()).unwrap_or(u64::MAX));
        txn.step = super::Step::Attached;
        txn.mark = self.mono;
        if trial.passed {
            // Gated before a restart: the commit is what was left.
            txn.step = super::Step::Healthy;
            let modules = match &txn.change {
                Change::Root { modules, .. } => modules.clone(),
                _ => Vec::new(),
            };
            out.push(Action::run(Job::CommitRoot { txn: txn.id.clone(), modules }));
        } else {
            out.push(Action::run(Job::GateRoot {
                txn: txn.id.clone(),
                units: txn.units.clone(),
                deadline: trial.deadline,
            }));
        }
        self.state = State::Applying { generation: None, queue: VecDeque::new(), txn: Some(Box::new(txn)), failed: 0 };
    }
}
