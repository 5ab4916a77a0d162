//! The trial guard: what brings a node back when the root it soft-rebooted into never runs an
//! agent that ends the trial (a broken agent binary, a unit that never starts, an agent that
//! hangs). The agent that stages a trial root starts the guard — a copy of itself, from
//! `/run`, as a transient unit with `SurviveFinalKillSignal=yes` and no default dependencies
//! (systemd ≥ 255: a soft reboot neither stops nor kills it) — before it soft-reboots. The guard follows PID 1 into the new
//! root and watches the boot records. The trial's own agent ends the trial (committed, or gone
//! back by itself) before its deadline; then the guard has nothing to do and exits. Past the
//! deadline plus a grace, with the trial still open and the node in the trial root, the guard
//! stops `ironroot-agent.service`, stages the root before the trial the way the agent would,
//! journals the `rolled-back` receipt and soft-reboots back. The agent of that root starts on
//! a record without a trial and delivers the receipt; the plane halts the rollout and pins the
//! node, as for any rolled-back change.
//!
//! [`decide`] is the pure part (table-tested below); [`run`] is the shell around it.

mod run;

pub use run::{GuardError, GuardOptions, guard};

use ironroot_contract::run_state::TrialRecord;

/// Seconds past the trial's deadline the guard leaves to the trial root's own agent, which
/// goes back by itself when its gate fails (staging the root before takes seconds).
pub const GRACE_S: u64 = 60;

/// The transient unit the guard of transaction `txn` runs as (a unit name keeps ASCII
/// letters, digits and `-`).
pub fn unit_name(txn: &str) -> String {
    let id: String = txn.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').take(64).collect();
    format!("ironroot-trial-guard-{id}.service")
}

/// What the guard reads at each look: the trials of its transaction the boot records hold,
/// and the root PID 1 runs in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Look {
    /// `boot.json`'s trial, when it is the guard's transaction (the trial root's agent
    /// promoted its record).
    pub promoted: Option<TrialRecord>,
    /// `boot.next.json`'s trial, when it is the guard's transaction: the trial root staged and
    /// not promoted yet, or the way back staged (`rollback`).
    pub staged: Option<TrialRecord>,
    /// The device number of the root PID 1 runs in (`st_dev` of `/` after following it).
    pub root_dev: u64,
    /// Seconds since the epoch.
    pub now: u64,
}

/// What the guard does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The trial is open and its deadline (plus the grace) not reached: look again later.
    Wait,
    /// Nothing is left to guard; why.
    Done(&'static str),
    /// In the trial root past the deadline, the trial open: stop the agent, stage the root
    /// before (its record is `boot.json` when the trial root's record was never promoted,
    /// else `boot.prev.json`), journal the receipt, soft-reboot.
    GoBack {
        /// The trial root's record is `boot.json` (its agent ran far enough to promote it).
        promoted: bool,
    },
    /// The agent staged the way back itself (its receipt written) and the soft reboot did not
    /// follow: stop the agent and soft-reboot.
    Finish,
}

impl Look {
    /// The open trial of the guard's transaction: staged or promoted, not a way back.
    pub fn open_trial(&self) -> Option<&TrialRecord> {
        self.staged.as_ref().filter(|t| !t.rollback).or(self.promoted.as_ref().filter(|t| !t.rollback))
    }

    /// The staged way back, if the trial root's agent staged it.
    fn going_back(&self) -> Option<&TrialRecord> {
        self.staged.as_ref().filter(|t| t.rollback)
    }
}

/// When the guard acts on `trial`: its deadline plus `grace` seconds.
pub fn fire_at(trial: &TrialRecord, grace: u64) -> u64 {
    trial.started.saturating_add(trial.deadline_s).saturating_add(grace)
}

/// Decides from `look` (the guard's transaction's trials) what to do, acting at `fire_at`.
pub fn decide(look: &Look, fire_at: u64) -> Verdict {
    let open = look.open_trial();
    if open.is_none() && look.going_back().is_none() {
        return Verdict::Done("the trial ended (committed, gone back, or never entered)");
    }
    if look.now < fire_at {
        return Verdict::Wait;
    }
    if look.going_back().is_some() {
        return Verdict::Finish;
    }
    match open {
        Some(t) if t.root_dev != look.root_dev => Verdict::Done(
            "the soft reboot into the trial root did not happen (the agent that staged it ends the trial)",
        ),
        _ => Verdict::GoBack { promoted: look.staged.is_none() },
    }
}

#[cfg(test)]
mod tests;
