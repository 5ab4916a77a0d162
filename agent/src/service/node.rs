//! The runtime's pure core: `Node::on(event, now) -> Vec<Action>`. Everything the service
//! decides is decided here, from events the shell feeds it (plane answers, timers, finished
//! jobs) — no I/O, no clock, no randomness of its own, so every machine is table-tested. The
//! shell (`shell`) carries the actions out: plane calls, journal appends (synced before the
//! actions that follow them), long jobs that report back, sd-notify.
//!
//! The node is made of small machines, each in its own file: [`Beat`](super::heartbeat)
//! (handshake and heartbeats), [`Rollout`](super::rollout) (desired state and module
//! transactions), [`Tasks`](super::tasks) (leases, redelivery, results), [`Renewal`]
//! (super::renewal) (the certificate) and [`Spool`](super::spool) (delivering the journal).

use std::time::Duration;

use ironroot_contract::wire::{DesiredState, NodeState, ReportResponse, Task, TaskId, TaskResult};

use super::heartbeat::Beat;
use super::renewal::Renewal;
use super::rollout::{Job, JobDone, Rollout};

pub use super::rollout::ModuleInfo;
use super::spool::Spool;
use super::tasks::Tasks;

/// The core's clock: monotonic time since the service started (timers), and wall-clock
/// seconds since the epoch (deadlines, certificates, records).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    pub mono: Duration,
    pub wall: u64,
}

/// What happened.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A timer the core asked for is due (or the shell just started).
    Tick,
    /// A handshake or heartbeat was answered (or failed, and why).
    Reported {
        handshake: bool,
        result: Result<ReportResponse, String>,
    },
    Desired(Result<DesiredState, String>),
    Leased(Result<Option<Task>, String>),
    Posted {
        task: TaskId,
        result: Result<(), String>,
    },
    /// A renewal finished: the new certificate's expiry, or why not.
    Renewed(Result<u64, String>),
    /// Journal records up to `seq` exist (after an append, and at start).
    Journaled(u64),
    /// The plane acknowledged the journal up to `seq`, or the delivery failed.
    Delivered(Result<u64, String>),
    Job(JobDone),
    /// A `Record` could not be journaled (the journal is full, or the disk failed): its kind,
    /// the transaction step it named, and why.
    NotJournaled {
        kind: String,
        step: Option<String>,
        why: String,
    },
    /// SIGTERM: stop taking work, finish what cannot be left half done.
    Terminate,
}

/// What the shell must do, in order. A `Record` is synced to the journal before any action
/// after it runs; if it cannot be, no `Run` after it runs (a job is never started on a step
/// that is not written down) and the core hears `NotJournaled`; plane calls go on, so a full
/// journal does not stop the heartbeats or the delivery that empties it.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Report {
        handshake: bool,
        last_reconcile: Option<String>,
    },
    FetchDesired,
    Lease {
        wait: Duration,
    },
    Post {
        task: TaskId,
        result: TaskResult,
    },
    Renew,
    /// Send journal records after `after`.
    Deliver {
        after: u64,
    },
    Record {
        kind: String,
        data: serde_json::Value,
    },
    Run(Box<Job>),
    Ready,
    Status(String),
    /// Every long job is done; the service may exit.
    Exit,
}

impl Action {
    pub fn run(job: Job) -> Self {
        Self::Run(Box::new(job))
    }
}

/// The whole node: its machines and what it knows.
#[derive(Debug)]
pub struct Node {
    pub beat: Beat,
    pub rollout: Rollout,
    pub tasks: Tasks,
    pub renewal: Renewal,
    pub spool: Spool,
    pub state: Option<NodeState>,
    stopping: bool,
}

impl Node {
    pub fn new(beat: Beat, rollout: Rollout, tasks: Tasks, renewal: Renewal, spool: Spool) -> Self {
        Self { beat, rollout, tasks, renewal, spool, state: None, stopping: false }
    }

    /// The earliest time (monotonic) any machine wants a `Tick`.
    pub fn next_wake(&self) -> Option<Duration> {
        [
            self.beat.next_wake(),
            self.rollout.next_wake(),
            self.tasks.next_wake(),
            self.renewal.next_wake(),
            self.spool.next_wake(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    pub fn on(&mut self, event: Event, now: Now) -> Vec<Action> {
        let mut out = Vec::new();
        match event {
            Event::Tick => {}
            Event::Reported { handshake, result } => {
                if let Ok(r) = &result {
                    self.state = Some(r.state);
                    self.rollout.on_generation(r.generation, now, &mut out);
                    if handshake {
                        out.push(Action::Ready);
                    }
                    out.push(Action::Status(format!("node {} {}; generation {}", r.node_id, r.state, r.generation)));
                } else if let Err(why) = &result {
                    out.push(Action::Status(format!("plane unreachable: {why}")));
                }
                self.beat.on_reported(handshake, result.is_ok(), now);
            }
            Event::Desired(result) => self.rollout.on_desired(result, now, &mut out),
            Event::Leased(result) => self.tasks.on_leased(result, now, &mut out),
            Event::Posted { task, result } => self.tasks.on_posted(&task, result, now, &mut out),
            Event::Renewed(result) => self.renewal.on_renewed(result, now, &mut out),
            Event::Journaled(seq) => self.spool.on_journaled(seq),
            Event::Delivered(result) => self.spool.on_delivered(result, now),
            Event::Job(done) => {
                if matches!(done, JobDone::PowerFailed(_)) && !self.rollout.leaving() {
                    // A task's reboot that did not begin: leasing goes on.
                    self.tasks.on_power_failed();
                }
                self.rollout.on_job(done, now, &mut out);
            }
            Event::NotJournaled { kind, step, why } => {
                out.push(Action::Status(format!("node journal: {why}")));
                self.rollout.on_not_journaled(&kind, step.as_deref(), &why, now, &mut out);
            }
            Event::Terminate => self.stopping = true,
        }
        // Between machines: a module-update task asks the rollout to reconcile now, and is
        // answered when that reconcile ends.
        if self.tasks.take_reconcile_request() {
            self.rollout.reconcile_now(now, &mut out);
        }
        if let Some(done) = self.rollout.take_reconciled() {
            self.tasks.on_reconciled(&done, now, &mut out);
        }
        if self.stopping {
            // Idle, or leaving: a soft reboot under way ends this userspace (all it needs is
            // journaled), and systemd's stop must not wait for us.
            if self.rollout.is_idle() || self.rollout.leaving() {
                out.push(Action::Exit);
            }
            return out;
        }
        self.beat.due(now, self.rollout.ready(), self.rollout.last_result(), &mut out);
        if self.beat.handshaken() {
            self.tasks.due(now, &mut out);
            self.renewal.due(now, &mut out);
        }
        self.rollout.due(now, &mut out);
        self.spool.due(now, &mut out);
        out
    }
}

#[cfg(test)]
#[path = "node_tests.rs"]
mod tests;
