//! The rollout machine: from the plane's desired state to the modules that run, one
//! transaction at a time. A live module (`opt`, `ext`) goes planned → staged → attached →
//! health-gated → committed, or is rolled back to the version before it, with the reason; a
//! removed one is detached (units stopped first). Every step is journaled before it is taken
//! (the shell syncs a `Record` before running what follows it), so after a `kill -9` the
//! service resumes from the journal: a transaction that passed its health gate is committed,
//! any other rolled back (see [`Rollout::new`]'s `open`). Serial floors rise only at commit.
//! Each transaction ends in a receipt.
//!
//! A changed root (or `usr` layer) is staged as a whole new root and entered by soft reboot.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use ironroot_contract::config::{HealthCheck, MountRole};
use ironroot_contract::wire::{DesiredModule, DesiredState, Health, ModuleVersion};
use ironroot_contract::{OciDigest, VerityDigest};
use serde::{Deserialize, Serialize};

mod job;
#[cfg(test)]
mod tests;
mod trial;
#[cfg(test)]
mod trial_tests;
mod txn;

pub use job::{Job, JobDone};

use super::node::{Action, Now};

/// A verified module's facts the core decides by (from its signed config).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleInfo {
    pub name: String,
    /// Where it came from (`registry/repository@sha256:…`).
    pub reference: String,
    pub digest: OciDigest,
    pub composefs: VerityDigest,
    pub version: String,
    pub serial: u64,
    pub role: MountRole,
    /// Live roles: where it is mounted.
    pub mount_point: Option<String>,
    pub units: Vec<String>,
    /// Live roles: the module's own health probe and the gate's deadline.
    #[serde(default)]
    pub health: Option<HealthCheck>,
}

impl ModuleInfo {
    pub fn version(&self) -> ModuleVersion {
        ModuleVersion {
            version: self.version.clone(),
            serial: self.serial,
            digest: self.digest,
            composefs_digest: self.composefs,
        }
    }

    /// The module as the plane would pin it (to verify it again).
    pub fn pinned(&self) -> DesiredModule {
        DesiredModule {
            name: self.name.clone(),
            reference: self.reference.clone(),
            digest: self.digest,
            serial: self.serial,
        }
    }
}

/// Where a transaction is (journaled as `txn` records).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    Planned,
    Staged,
    Attached,
    Healthy,
    Unhealthy,
    Restoring,
}

/// The transaction a stopped agent left open, read back from the journal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpenTxn {
    pub id: String,
    pub step: Step,
    pub to: ModuleInfo,
    pub from: Option<ModuleInfo>,
    pub started: u64,
}

/// A root entered by soft reboot, as the service finds it at start (from its boot record).
#[derive(Debug, Clone, PartialEq)]
pub struct Trial {
    pub txn: String,
    /// Seconds since the epoch.
    pub started: u64,
    /// By when the root must pass its gate (seconds since the epoch).
    pub deadline: u64,
    /// The modules that changed, with what they replaced.
    pub changed: Vec<(Option<ModuleInfo>, ModuleInfo)>,
    /// The soft reboot into the staged root did not happen (why): the change failed.
    pub not_entered: Option<String>,
    /// The journal shows the gate passed (the service stopped before the commit): commit.
    pub passed: bool,
    /// The transaction's parts before this service (`verify`, `stage` from the root's record,
    /// `reboot` from staged to this service's start), in milliseconds.
    pub steps_ms: BTreeMap<String, u64>,
}

/// One module change.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
enum Change {
    /// `from` is None for a first attach.
    Put {
        to: ModuleInfo,
        from: Option<ModuleInfo>,
    },
    Remove(ModuleInfo),
    /// A new root: all its modules, and those that changed (with what they replace).
    Root {
        modules: Vec<ModuleInfo>,
        changed: Vec<(Option<ModuleInfo>, ModuleInfo)>,
    },
}

#[derive(Debug, Clone, PartialEq)]
struct Txn {
    id: String,
    change: Change,
    step: Step,
    started: u64,
    units: Vec<String>,
    health: Option<Health>,
    reason: Option<String>,
    /// Milliseconds spent on each part of the change (the receipt's `steps_ms`), and the
    /// monotonic time the current step began.
    steps_ms: BTreeMap<String, u64>,
    mark: Duration,
}

impl Txn {
    fn new(id: String, change: Change, step: Step, started: u64, mark: Duration) -> Self {
        Txn {
            id,
            change,
            step,
            started,
            units: Vec::new(),
            health: None,
            reason: None,
            steps_ms: BTreeMap::new(),
            mark,
        }
    }

    /// Moves to `step` at `mono`, counting the time of the step left to its part.
    fn enter(&mut self, step: Step, mono: Duration) {
        let part = match self.step {
            Step::Planned => "stage",
            Step::Staged => "swap",
            Step::Attached | Step::Unhealthy => "gate",
            Step::Healthy => "commit",
            Step::Restoring => "restore",
        };
        let ms = u64::try_from(mono.saturating_sub(self.mark).as_millis()).unwrap_or(u64::MAX);
        let total = self.steps_ms.entry(part.to_owned()).or_default();
        *total = total.saturating_add(ms);
        self.step = step;
        self.mark = mono;
    }
}

#[derive(Debug, Clone, PartialEq)]
enum State {
    Idle,
    Fetching,
    Verifying { generation: Option<u64>, todo: VecDeque<DesiredModule>, done: Vec<ModuleInfo>, failed: usize },
    Applying { generation: Option<u64>, queue: VecDeque<Change>, txn: Option<Box<Txn>>, failed: usize },
}

/// How a reconcile ended (for a waiting `module-update` task).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reconciled {
    pub ok: bool,
    pub summary: String,
}

#[derive(Debug)]
pub struct Rollout {
    /// What runs now, by module name.
    live: BTreeMap<String, ModuleInfo>,
    known: Option<u64>,
    applied: Option<u64>,
    state: State,
    /// Verifying the booted modules once an open transaction is finished.
    startup: Option<(u64, Vec<DesiredModule>)>,
    /// Digests refused or rolled back at the current generation: not tried again until it moves.
    refused: BTreeSet<OciDigest>,
    /// Live modules the plane no longer wants (collected while verifying).
    removals: Vec<ModuleInfo>,
    retry_at: Option<Duration>,
    failures: u32,
    last: Option<String>,
    ready: bool,
    now_requested: bool,
    next_txn: u64,
    /// The wall clock at the latest event (transactions' start times), and the monotonic one.
    wall: u64,
    mono: Duration,
    /// When the module being verified began, and how long each verified one took, by digest.
    verify_started: Duration,
    verify_ms: BTreeMap<OciDigest, u64>,
    /// How the latest reconcile ended, until the node takes it.
    reconciled: Option<Reconciled>,
    /// What the latest `report` record said (an unchanged outcome is not journaled again).
    journaled_report: Option<serde_json::Value>,
    boot_tag: String,
    agent_version: String,
    /// A root entered by soft reboot, gated once the live modules are attached.
    trial: Option<Trial>,
    /// How long a new root may take to pass its gate (the template's, else the default).
    trial_deadline_s: u64,
    /// A soft reboot was asked for: this userspace is ending.
    leaving: bool,
    /// The desired state names a refused root or `usr` module: no root change this reconcile
    /// (the rest of it would make a root that was never asked for).
    root_held: bool,
}

/// Retry delay after a failed exchange with the plane: 5 s doubling to 5 min.
fn backoff(failures: u32) -> Duration {
    Duration::from_secs(5).saturating_mul(1 << failures.min(6)).min(Duration::from_secs(300))
}

fn record(kind: &str, data: serde_json::Value) -> Action {
    Action::Record { kind: kind.to_owned(), data }
}

impl Rollout {
    /// Starts from what this boot runs: `running` (the root and `usr` layers the boot mounted)
    /// and `attach` (live modules to verify again, offline when the store has them, and attach
    /// — or find attached by an earlier run of this service), at `generation`. `refused`: what
    /// an earlier run of this boot failed or rolled back (not tried again until the desired
    /// state moves). `run_tag` names
    /// this run of the service in transaction ids (unique per node: boot and start time).
    /// When a transaction was left open it is finished first. The node says `ready` once
    /// `attach` is done.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        running: Vec<ModuleInfo>,
        attach: Vec<DesiredModule>,
        generation: u64,
        open: Option<OpenTxn>,
        refused: Vec<OciDigest>,
        run_tag: &str,
        agent_version: &str,
        trial: Option<Trial>,
        out: &mut Vec<Action>,
    ) -> Self {
        let mut r = Self {
            live: running.into_iter().map(|m| (m.name.clone(), m)).collect(),
            known: None,
            applied: None,
            state: State::Idle,
            startup: Some((generation, attach)),
            refused: refused.into_iter().collect(),
            removals: Vec::new(),
            retry_at: None,
            failures: 0,
            last: None,
            ready: false,
            now_requested: false,
            next_txn: 0,
            wall: 0,
            mono: Duration::ZERO,
            verify_started: Duration::ZERO,
            verify_ms: BTreeMap::new(),
            reconciled: None,
            journaled_report: None,
            boot_tag: run_tag.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').take(32).collect(),
            agent_version: agent_version.to_owned(),
            trial: None,
            trial_deadline_s: ironroot_contract::run_state::DEFAULT_TRIAL_DEADLINE_S,
            leaving: false,
            root_held: false,
        };
        if let Some(trial) = trial {
            r.wall = trial.started;
            r.begin_trial(trial, out);
        }
        match open {
            Some(open) => {
                let (job, step) = if open.step == Step::Healthy {
                    (Job::Commit { txn: open.id.clone(), to: open.to.clone(), from: open.from.clone() }, Step::Healthy)
                } else {
                    (
                        Job::Restore { txn: open.id.clone(), to: open.to.clone(), from: open.from.clone() },
                        Step::Restoring,
                    )
                };
                let reason = format!("the agent stopped during the change (after step {})", step_name(open.step));
                let mut txn =
                    Txn::new(open.id, Change::Put { to: open.to, from: open.from }, step, open.started, r.mono);
                txn.reason = Some(reason);
                r.state =
                    State::Applying { generation: None, queue: VecDeque::new(), txn: Some(Box::new(txn)), failed: 0 };
                out.push(Action::Run(Box::new(job)));
            }
            None => r.start_verifying_booted(out),
        }
        r
    }

    fn start_verifying_booted(&mut self, out: &mut Vec<Action>) {
        if let Some((generation, booted)) = self.startup.take() {
            self.state =
                State::Verifying { generation: Some(generation), todo: booted.into(), done: Vec::new(), failed: 0 };
            self.verify_next(out);
        }
    }

    /// Whether the live modules are attached (or given up on): the handshake may say `ready`.
    pub fn ready(&self) -> bool {
        self.ready
    }

    /// A soft reboot into a staged root (or back) was asked for.
    pub fn leaving(&self) -> bool {
        self.leaving
    }

    pub fn is_idle(&self) -> bool {
        matches!(self.state, State::Idle | State::Fetching) && !self.leaving
    }

    pub fn last_result(&self) -> Option<String> {
        self.last.clone()
    }

    /// What runs now.
    pub fn live(&self) -> impl Iterator<Item = &ModuleInfo> {
        self.live.values()
    }

    pub fn next_wake(&self) -> Option<Duration> {
        self.retry_at
    }

    /// The plane's desired-state generation, from a heartbeat answer.
    pub fn on_generation(&mut self, generation: u64, now: Now, out: &mut Vec<Action>) {
        (self.wall, self.mono) = (now.wall, now.mono);
        if self.known != Some(generation) {
            // Refusals carried over from an earlier run stand until the plane's desired state
            // moves while this run watches (or an operator asks): a change that crashed the
            // agent is not tried again by every restart.
            if self.known.is_some() {
                self.refused.clear();
            }
            self.known = Some(generation);
            self.retry_at = None;
        }
        self.due(now, out);
    }

    /// A `module-update` task: fetch the desired state and reconcile now, whatever the
    /// generation says.
    pub fn reconcile_now(&mut self, now: Now, out: &mut Vec<Action>) {
        self.now_requested = true;
        self.refused.clear();
        self.retry_at = None;
        self.due(now, out);
    }

    /// A record of a change could not be journaled. A change whose `planned` record was refused
    /// never began: it waits (retried after a backoff; a waiting `module-update` is answered
    /// with why). Any other record of a transaction (a step, its receipt) ends the service:
    /// systemd starts it again and the open transaction is finished from the journal, as after
    /// `kill -9`.
    pub fn on_not_journaled(&mut self, kind: &str, step: Option<&str>, why: &str, now: Now, out: &mut Vec<Action>) {
        let planned = kind == "txn" && step == Some("planned");
        if planned
            && let State::Applying { txn: Some(t), .. } = &self.state
            && t.step == Step::Planned
        {
            self.failures = self.failures.saturating_add(1);
            self.retry_at = Some(now.mono + backoff(self.failures));
            let summary = format!("changes refused: {why}");
            self.last = Some(summary.clone());
            self.reconciled = Some(Reconciled { ok: false, summary });
            self.state = State::Idle;
        } else if kind == REPORT_KIND {
            // Not written: the next outcome is, even an equal one.
            self.journaled_report = None;
        } else if kind == "txn" || kind == ironroot_contract::wire::RECEIPT_KIND {
            tracing::error!(%why, "a transaction's record could not be journaled; the service ends to finish it from the journal");
            out.push(Action::Exit);
        }
    }

    /// Fetches the desired state when it moved (or was asked for) and nothing else runs.
    pub fn due(&mut self, now: Now, out: &mut Vec<Action>) {
        if self.state != State::Idle || !self.ready || self.retry_at.is_some_and(|t| now.mono < t) {
            return;
        }
        let moved = self.known.is_some() && self.known != self.applied;
        if moved || self.now_requested {
            self.now_requested = false;
            self.retry_at = None;
            self.state = State::Fetching;
            out.push(Action::FetchDesired);
        }
    }

    pub fn on_desired(&mut self, result: Result<DesiredState, String>, now: Now, out: &mut Vec<Action>) {
        (self.wall, self.mono) = (now.wall, now.mono);
        if self.state != State::Fetching {
            return;
        }
        let desired = match result {
            Ok(d) => d,
            Err(why) => {
                self.failures = self.failures.saturating_add(1);
                self.retry_at = Some(now.mono + backoff(self.failures));
                self.last = Some(format!("desired state: {why}"));
                self.state = State::Idle;
                return;
            }
        };
        self.failures = 0;
        self.trial_deadline_s =
            desired.trial_deadline_s.unwrap_or(ironroot_contract::run_state::DEFAULT_TRIAL_DEADLINE_S);
        let wanted: BTreeSet<&str> = desired.modules.iter().map(|m| m.name.as_str()).collect();
        self.removals =
            self.live.values().filter(|m| m.role.is_live() && !wanted.contains(m.name.as_str())).cloned().collect();
        self.root_held = desired
            .modules
            .iter()
            .any(|m| self.refused.contains(&m.digest) && self.live.get(&m.name).is_some_and(|l| !l.role.is_live()));
        let todo: VecDeque<DesiredModule> = desired
            .modules
            .into_iter()
            .filter(|m| {
                self.live.get(&m.name).is_none_or(|l| l.digest != m.digest) && !self.refused.contains(&m.digest)
            })
            .collect();
        self.state = State::Verifying { generation: Some(desired.generation), todo, done: Vec::new(), failed: 0 };
        self.verify_next(out);
    }

    fn verify_next(&mut self, out: &mut Vec<Action>) {
        let State::Verifying { generation, todo, done, failed } = &mut self.state else { return };
        if let Some(module) = todo.front() {
            out.push(Action::run(Job::Verify { module: module.clone() }));
            self.verify_started = self.mono;
            return;
        }
        let (generation, done, failed) = (*generation, std::mem::take(done), *failed);
        let mut queue = VecDeque::new();
        let mut root_changed = false;
        let mut new_root: Vec<ModuleInfo> = Vec::new();
        for m in done {
            if m.role.is_live() && self.live.get(&m.name).is_some_and(|l| l.digest == m.digest) {
                // Already live (a restarted service finding what it attached): nothing to do.
            } else if m.role.is_live() {
                queue.push_back(Change::Put { from: self.live.get(&m.name).cloned(), to: m });
            } else if self.live.get(&m.name).is_some_and(|l| l.digest != m.digest) {
                // Not live until the node runs it (after the soft reboot).
                root_changed = true;
                new_root.push(m);
            } else {
                // A booted root/usr module verified again: it is what runs.
                self.live.insert(m.name.clone(), m);
            }
        }
        queue.extend(std::mem::take(&mut self.removals).into_iter().map(Change::Remove));
        if root_changed && self.root_held {
            tracing::warn!("a root change held back: the desired root names a module refused at this generation");
        } else if root_changed {
            let mut modules: Vec<ModuleInfo> = self
                .live
                .values()
                .filter(|m| !m.role.is_live() && !new_root.iter().any(|n| n.name == m.name))
                .cloned()
                .collect();
            let changed = new_root.iter().map(|n| (self.live.get(&n.name).cloned(), n.clone())).collect();
            modules.extend(new_root);
            modules.sort_by(|a, b| a.name.cmp(&b.name));
            queue.push_back(Change::Root { modules, changed });
        }
        self.state = State::Applying { generation, queue, txn: None, failed };
        self.apply_next(out);
    }

    fn txn_id(&mut self) -> String {
        self.next_txn += 1;
        format!("x-{}-{}", self.boot_tag, self.next_txn)
    }

    /// Starts the next queued change, or finishes the reconcile.
    fn apply_next(&mut self, out: &mut Vec<Action>) {
        let (wall, deadline_s) = (self.wall, self.trial_deadline_s);
        let State::Applying { queue, txn, generation, .. } = &mut self.state else { return };
        let generation = *generation;
        if txn.is_some() {
            return;
        }
        let Some(change) = queue.pop_front() else {
            self.finish(out);
            return;
        };
        let id = self.txn_id();
        // Verification (with the download it streams) came before the transaction.
        let verified: Vec<OciDigest> = match &change {
            Change::Put { to, .. } => vec![to.digest],
            Change::Root { changed, .. } => changed.iter().map(|(_, to)| to.digest).collect(),
            Change::Remove(_) => Vec::new(),
        };
        let verify_ms: u64 = verified.iter().filter_map(|d| self.verify_ms.remove(d)).sum();
        let (job, data) = match &change {
            Change::Put { to, from } => (
                Job::Stage { txn: id.clone(), to: to.clone() },
                serde_json::json!({"txn": id, "step": Step::Planned, "module": to.name, "to": to, "from": from}),
            ),
            Change::Remove(m) => (
                Job::Detach { txn: id.clone(), module: m.clone() },
                serde_json::json!({"txn": id, "step": Step::Planned, "module": m.name, "detach": m}),
            ),
            Change::Root { modules, .. } => (
                Job::StageRoot {
                    txn: id.clone(),
                    modules: modules.clone(),
                    generation,
                    started: wall,
                    deadline_s,
                    verify_ms,
                },
                serde_json::json!({"txn": id, "step": Step::Planned, "module": "root", "root": modules}),
            ),
        };
        let mut new = Txn::new(id, change, Step::Planned, wall, self.mono);
        if verify_ms > 0 {
            new.steps_ms.insert("verify".to_owned(), verify_ms);
        }
        let State::Applying { txn, .. } = &mut self.state else { return };
        *txn = Some(Box::new(new));
        out.push(record("txn", data));
        out.push(Action::Run(Box::new(job)));
    }

    /// How the latest reconcile ended, once.
    pub fn take_reconciled(&mut self) -> Option<Reconciled> {
        self.reconciled.take()
    }

    fn finish(&mut self, out: &mut Vec<Action>) {
        let (generation, failed) = match &self.state {
            State::Applying { generation, failed, .. } => (*generation, *failed),
            _ => (None, 0),
        };
        if generation.is_some() {
            self.applied = generation;
        }
        if self.startup.is_none()
            && let Some(trial) = self.trial.take()
        {
            // The live modules are attached: now the root on trial is gated.
            self.gate_trial(trial, out);
            return;
        }
        self.ready = true;
        self.state = State::Idle;
        let summary = if failed == 0 {
            format!("ok: generation {}", generation.map_or("-".into(), |g| g.to_string()))
        } else {
            format!(
                "{failed} change(s) failed or rolled back at generation {}",
                generation.map_or("-".into(), |g| g.to_string())
            )
        };
        self.last = Some(summary.clone());
        if self.startup.is_some() {
            // An open transaction was finished first: now the booted modules.
            self.ready = false;
            self.start_verifying_booted(out);
            return;
        }
        self.journal_report(generation, &summary, out);
        self.reconciled = Some(Reconciled { ok: failed == 0, summary });
    }

    /// A reconcile's outcome goes to the node journal as a `report` record — what the node's
    /// next report says (its generation, the outcome, the live modules' digests) — so the plane
    /// gets each outcome in order even when it was away when it was reached. An outcome equal
    /// to the last one this service journaled is not written again (one the journal refused
    /// is).
    fn journal_report(&mut self, generation: Option<u64>, summary: &str, out: &mut Vec<Action>) {
        let mut digests: Vec<String> = self.live.values().map(|m| m.digest.to_string()).collect();
        digests.sort();
        let data = serde_json::json!({"generation": generation, "last_reconcile": summary, "module_digests": digests});
        if self.journaled_report.as_ref() != Some(&data) {
            out.push(record(REPORT_KIND, data.clone()));
            self.journaled_report = Some(data);
        }
    }
}

/// Kind of the node journal record of a reconcile's outcome.
pub const REPORT_KIND: &str = "report";

fn step_name(step: Step) -> &'static str {
    match step {
        Step::Planned => "planned",
        Step::Staged => "staged",
        Step::Attached => "attached",
        Step::Healthy => "healthy",
        Step::Unhealthy => "unhealthy",
        Step::Restoring => "restoring",
    }
}
