//! The task machine: one long-poll lease at a time; a task is done at least once, and the node
//! remembers what it finished (in its journal), so a redelivered task is answered with the
//! recorded result instead of running twice. `module-update` asks the rollout to reconcile now
//! and is answered when it is done; `reboot` and `soft-reboot` are answered first and carried
//! out only once the plane has the answer (a diskless node's journal does not survive a reboot,
//! and the task must not come back); a kind this node does not know is `unsupported`.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use ironroot_contract::wire::{Task, TaskId, TaskOutcome, TaskResult, TaskSpec};

use super::node::{Action, Now};
use super::rollout::{Job, Reconciled};
use super::systemd::PowerOp;

/// How long a lease request waits at the plane for a task.
pub const LEASE_WAIT: Duration = Duration::from_secs(25);
/// Finished task ids remembered (a redelivery comes within a lease or two).
const REMEMBERED: usize = 1024;
/// The journal record kind of a finished task.
pub const FINISHED_KIND: &str = "task.finished";

fn backoff(failures: u32) -> Duration {
    Duration::from_secs(2).saturating_mul(1 << failures.min(5)).min(Duration::from_secs(60))
}

#[derive(Debug, Default)]
pub struct Tasks {
    leasing: bool,
    lease_retry: Option<Duration>,
    lease_failures: u32,
    /// Results the plane has not acknowledged, oldest first; `power` is carried out once it has.
    to_post: VecDeque<(TaskId, TaskResult, Option<PowerOp>)>,
    posting: bool,
    post_retry: Option<Duration>,
    post_failures: u32,
    finished: BTreeMap<TaskId, TaskResult>,
    /// Insertion order of `finished`, to forget the oldest.
    order: VecDeque<TaskId>,
    /// A `module-update` waiting for the reconcile it asked for.
    reconciling: Option<Task>,
    reconcile_request: bool,
    /// A power action the plane knows about: nothing more to lease.
    leaving: bool,
}

impl Tasks {
    /// Starts knowing the tasks an earlier run of this agent finished (from the journal).
    pub fn new(finished: impl IntoIterator<Item = (TaskId, TaskResult)>) -> Self {
        let mut t = Self::default();
        for (id, result) in finished {
            t.remember(id, result);
        }
        t
    }

    fn remember(&mut self, id: TaskId, result: TaskResult) {
        if self.finished.insert(id.clone(), result).is_none() {
            self.order.push_back(id);
        }
        while self.order.len() > REMEMBERED {
            if let Some(old) = self.order.pop_front() {
                self.finished.remove(&old);
            }
        }
    }

    pub fn next_wake(&self) -> Option<Duration> {
        [self.lease_retry, self.post_retry].into_iter().flatten().min()
    }

    /// Whether a `module-update` asked the rollout to reconcile (once).
    pub fn take_reconcile_request(&mut self) -> bool {
        std::mem::take(&mut self.reconcile_request)
    }

    /// Finishes `task` with `result`: journaled first, then posted.
    fn finish(&mut self, task: &Task, result: TaskResult, power: Option<PowerOp>, out: &mut Vec<Action>) {
        out.push(Action::Record {
            kind: FINISHED_KIND.to_owned(),
            data: serde_json::json!({"task": task.id, "kind": task.spec.kind(), "result": result}),
        });
        self.remember(task.id.clone(), result.clone());
        self.to_post.push_back((task.id.clone(), result, power));
    }

    pub fn on_leased(&mut self, result: Result<Option<Task>, String>, now: Now, out: &mut Vec<Action>) {
        self.leasing = false;
        let task = match result {
            Ok(Some(task)) => task,
            Ok(None) => return,
            Err(_) => {
                self.lease_failures = self.lease_failures.saturating_add(1);
                self.lease_retry = Some(now.mono + backoff(self.lease_failures));
                return;
            }
        };
        self.lease_failures = 0;
        if let Some(recorded) = self.finished.get(&task.id) {
            // Redelivered (the plane lost our answer, or its lease ran out): answer again.
            self.to_post.push_back((task.id.clone(), recorded.clone(), None));
            return;
        }
        if task.deadline.is_some_and(|d| now.wall >= d) {
            let r = TaskResult::new(TaskOutcome::TimedOut, Some("the task's deadline passed before it started".into()));
            self.finish(&task, r, None, out);
            return;
        }
        match &task.spec {
            TaskSpec::ModuleUpdate => {
                self.reconcile_request = true;
                self.reconciling = Some(task);
            }
            TaskSpec::Reboot | TaskSpec::SoftReboot => {
                let op = if task.spec == TaskSpec::Reboot { PowerOp::Reboot } else { PowerOp::SoftReboot };
                let r = TaskResult::new(TaskOutcome::Succeeded, Some(format!("{} begins", task.spec.kind())));
                self.finish(&task, r, Some(op), out);
            }
            TaskSpec::Invalid { kind, reason } => {
                let r = TaskResult::new(TaskOutcome::Failed, Some(format!("task {kind}: {reason}")));
                self.finish(&task, r, None, out);
            }
            TaskSpec::Unsupported { kind } => {
                let r = TaskResult::new(
                    TaskOutcome::Unsupported,
                    Some(format!("this agent does not know task kind {kind:?}")),
                );
                self.finish(&task, r, None, out);
            }
            TaskSpec::Exec { .. } | TaskSpec::Drain | TaskSpec::Vet => {
                let why = format!("this agent does not carry out {} tasks yet", task.spec.kind());
                self.finish(&task, TaskResult::new(TaskOutcome::Unsupported, Some(why)), None, out);
            }
        }
    }

    /// The reconcile a `module-update` asked for ended.
    pub fn on_reconciled(&mut self, r: &Reconciled, _now: Now, out: &mut Vec<Action>) {
        if let Some(task) = self.reconciling.take() {
            let outcome = if r.ok { TaskOutcome::Succeeded } else { TaskOutcome::Failed };
            self.finish(&task, TaskResult::new(outcome, Some(r.summary.clone())), None, out);
        }
    }

    pub fn on_posted(&mut self, task: &TaskId, result: Result<(), String>, now: Now, out: &mut Vec<Action>) {
        self.posting = false;
        match result {
            Ok(()) => {
                self.post_failures = 0;
                if self.to_post.front().is_some_and(|(id, _, _)| id == task)
                    && let Some((_, _, power)) = self.to_post.pop_front()
                    && let Some(op) = power
                {
                    self.leaving = true;
                    out.push(Action::run(Job::Power(op)));
                }
            }
            Err(_) => {
                self.post_failures = self.post_failures.saturating_add(1);
                self.post_retry = Some(now.mono + backoff(self.post_failures));
            }
        }
    }

    /// The reboot a task asked for did not begin: the node stays, and leases again.
    pub fn on_power_failed(&mut self) {
        self.leaving = false;
    }

    /// Posts the oldest unacknowledged result, and keeps one lease outstanding. A
    /// `module-update` still reconciling at its deadline is answered `timed-out` (the change
    /// under way ends on its own, committed or rolled back: a transaction is not cut short).
    pub fn due(&mut self, now: Now, out: &mut Vec<Action>) {
        if self.reconciling.as_ref().and_then(|t| t.deadline).is_some_and(|d| now.wall >= d)
            && let Some(task) = self.reconciling.take()
        {
            let why =
                "the reconcile did not end before the task's deadline; the change under way still ends on its own";
            self.finish(&task, TaskResult::new(TaskOutcome::TimedOut, Some(why.into())), None, out);
        }
        if !self.posting
            && self.post_retry.is_none_or(|t| now.mono >= t)
            && let Some((id, result, _)) = self.to_post.front()
        {
            self.post_retry = None;
            self.posting = true;
            out.push(Action::Post { task: id.clone(), result: result.clone() });
        }
        if self.leaving || self.leasing || self.reconciling.is_some() || self.lease_retry.is_some_and(|t| now.mono < t)
        {
            return;
        }
        self.lease_retry = None;
        self.leasing = true;
        out.push(Action::Lease { wait: LEASE_WAIT });
    }
}

#[cfg(test)]
#[path = "tasks_table.rs"]
mod table;

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: u64) -> Now {
        Now { mono: Duration::from_secs(s), wall: 1_000 + s }
    }

    fn task(id: &str, spec: TaskSpec, deadline: Option<u64>) -> Task {
        Task { id: id.parse().unwrap(), spec, lease_until: 2_000, deadline }
    }

    fn posted(out: &[Action]) -> Vec<(String, TaskOutcome)> {
        out.iter()
            .filter_map(|a| match a {
                Action::Post { task, result } => Some((task.to_string(), result.outcome)),
                _ => None,
            })
            .collect()
    }

    /// The lease outstanding answers `t`; then the machine posts what it has.
    fn lease(tasks: &mut Tasks, t: Task, now: Now) -> Vec<Action> {
        let mut out = Vec::new();
        tasks.due(now, &mut out);
        assert!(tasks.leasing, "one lease is always outstanding: {out:?}");
        out.clear();
        tasks.on_leased(Ok(Some(t)), now, &mut out);
        tasks.due(now, &mut out);
        out
    }

    #[test]
    fn a_kind_the_node_does_not_know_is_unsupported_and_a_redelivery_is_answered_from_the_record() {
        let mut tasks = Tasks::new([]);
        let out = lease(&mut tasks, task("t-1", TaskSpec::Unsupported { kind: "teleport".into() }, None), at(1));
        assert!(out.iter().any(|a| matches!(a, Action::Record { kind, .. } if kind == FINISHED_KIND)));
        assert_eq!(posted(&out), [("t-1".to_owned(), TaskOutcome::Unsupported)]);
        let mut out = Vec::new();
        tasks.on_posted(&"t-1".parse().unwrap(), Ok(()), at(2), &mut out);
        // The plane lost the answer and delivers it again: the recorded result, not a second run.
        let out = lease(&mut tasks, task("t-1", TaskSpec::Unsupported { kind: "teleport".into() }, None), at(3));
        assert!(!out.iter().any(|a| matches!(a, Action::Record { .. })), "nothing runs twice: {out:?}");
        assert_eq!(posted(&out), [("t-1".to_owned(), TaskOutcome::Unsupported)]);
    }

    #[test]
    fn a_deadline_that_passed_before_the_start_or_during_the_reconcile_times_the_task_out() {
        let mut tasks = Tasks::new([]);
        let out = lease(&mut tasks, task("t-2", TaskSpec::ModuleUpdate, Some(1_001)), at(5));
        assert_eq!(posted(&out), [("t-2".to_owned(), TaskOutcome::TimedOut)]);
        assert!(!tasks.take_reconcile_request(), "not started");

        let mut tasks = Tasks::new([]);
        let out = lease(&mut tasks, task("t-3", TaskSpec::ModuleUpdate, Some(1_060)), at(5));
        assert!(posted(&out).is_empty());
        assert!(tasks.take_reconcile_request());
        let mut out = Vec::new();
        tasks.due(at(59), &mut out);
        assert!(posted(&out).is_empty(), "still within its deadline");
        tasks.due(at(60), &mut out);
        assert_eq!(posted(&out), [("t-3".to_owned(), TaskOutcome::TimedOut)]);
        // The reconcile ends later: nothing more is said about the task.
        let mut out = Vec::new();
        tasks.on_reconciled(&Reconciled { ok: true, summary: "ok".into() }, at(70), &mut out);
        assert!(out.is_empty(), "{out:?}");
    }

    #[test]
    fn a_reboot_is_answered_first_and_carried_out_once_the_plane_has_the_answer() {
        let mut tasks = Tasks::new([]);
        let out = lease(&mut tasks, task("t-4", TaskSpec::SoftReboot, None), at(1));
        assert_eq!(posted(&out), [("t-4".to_owned(), TaskOutcome::Succeeded)]);
        assert!(!out.iter().any(|a| matches!(a, Action::Run(_))), "not before the plane has it");
        let mut out = Vec::new();
        tasks.on_posted(&"t-4".parse().unwrap(), Err("plane down".into()), at(2), &mut out);
        assert!(out.is_empty());
        tasks.due(at(60), &mut out);
        assert_eq!(posted(&out).len(), 1, "posted again after the backoff");
        let mut out = Vec::new();
        tasks.on_posted(&"t-4".parse().unwrap(), Ok(()), at(61), &mut out);
        assert_eq!(out, [Action::run(Job::Power(PowerOp::SoftReboot))]);
        let mut out = Vec::new();
        tasks.due(at(62), &mut out);
        assert!(!out.iter().any(|a| matches!(a, Action::Lease { .. })), "nothing more is leased");
    }
}
