//! The task machine, every event that can arrive in every state it can be in. A lease answer
//! arrives only while a lease is out, a post answer only while a post is out, a failed power
//! action only after one began: the states where those cannot arrive leave them out, and each
//! row's follow-up tick shows what the machine asks for next (so a lease it should not have
//! out shows there).

use std::time::Duration;

use ironroot_contract::wire::{Task, TaskOutcome, TaskResult, TaskSpec};

use super::Tasks;
use crate::service::node::{Action, Now};
use crate::service::rollout::{Job, Reconciled};

fn at(s: u64) -> Now {
    Now { mono: Duration::from_secs(s), wall: 1_000 + s }
}

fn task(id: &str, spec: TaskSpec) -> Task {
    Task { id: id.parse().unwrap(), spec, lease_until: 2_000, deadline: None }
}

#[derive(Debug, Clone, Copy)]
enum State {
    /// Nothing out, nothing to post.
    Idle,
    /// A lease out.
    Leasing,
    /// The lease failed at 100 s; again at 104 s.
    LeaseBackoff,
    /// `t-1` (module-update) waits for its reconcile.
    Reconciling,
    /// `t-2` (an unknown kind, answered unsupported) posted, and a lease out.
    Posting,
    /// That post failed at 100 s (again at 104 s); a lease out.
    PostBackoff,
    /// `t-3` (soft-reboot) answered and acknowledged: the soft reboot begun; a lease out.
    Leaving,
}

#[derive(Debug, Clone, Copy)]
enum Event {
    /// The timer at 101 s, and at 10,000 s.
    EarlyTick,
    LateTick,
    LeasedNothing,
    /// `t-9`, a module-update.
    LeasedUpdate,
    /// `t-8`, a reboot.
    LeasedReboot,
    /// `t-0` again, which an earlier run of the agent finished.
    LeasedAgain,
    LeaseFailed,
    /// A reconcile ended, ok or not.
    Reconciled(bool),
    PostedOk,
    PostFailed,
    PowerFailed,
}

fn reach(state: State) -> Tasks {
    let earlier = TaskResult::new(TaskOutcome::Succeeded, Some("earlier".into()));
    let mut t = Tasks::new([("t-0".parse().unwrap(), earlier)]);
    let mut out = Vec::new();
    let leased = |t: &mut Tasks, task: Task, out: &mut Vec<Action>| {
        t.on_leased(Ok(Some(task)), at(100), out);
        t.due(at(100), out);
    };
    if !matches!(state, State::Idle) {
        t.due(at(100), &mut out);
    }
    match state {
        State::Idle | State::Leasing => {}
        State::LeaseBackoff => t.on_leased(Err("plane away".into()), at(100), &mut out),
        State::Reconciling => leased(&mut t, task("t-1", TaskSpec::ModuleUpdate), &mut out),
        State::Posting | State::PostBackoff => {
            leased(&mut t, task("t-2", TaskSpec::Unsupported { kind: "teleport".into() }), &mut out);
            if matches!(state, State::PostBackoff) {
                t.on_posted(&"t-2".parse().unwrap(), Err("plane away".into()), at(100), &mut out);
            }
        }
        State::Leaving => {
            leased(&mut t, task("t-3", TaskSpec::SoftReboot), &mut out);
            t.on_posted(&"t-3".parse().unwrap(), Ok(()), at(100), &mut out);
        }
    }
    t
}

/// The actions, one word each: `lease`, `post:<task>:<outcome>`, `done:<task>` (journaled),
/// `power`.
fn words(out: &[Action]) -> String {
    let word = |a: &Action| match a {
        Action::Lease { .. } => "lease".to_owned(),
        Action::Post { task, result } => format!("post:{task}:{:?}", result.outcome).to_lowercase(),
        Action::Record { data, .. } => format!("done:{}", data["task"].as_str().unwrap_or("?")),
        Action::Run(job) if matches!(**job, Job::Power(_)) => "power".to_owned(),
        other => format!("{other:?}"),
    };
    out.iter().map(word).collect::<Vec<_>>().join(" ")
}

#[test]
fn every_event_that_can_arrive_in_every_state() {
    use Event::*;
    use State::*;
    let leases = [LeasedNothing, LeasedUpdate, LeasedReboot, LeasedAgain, LeaseFailed];
    // (state, event, what the event asks for, what a tick long after then asks for)
    let table: &[(State, Event, &str, &str)] = &[
        (Idle, EarlyTick, "lease", ""),
        (Idle, LateTick, "lease", ""),
        (Idle, Reconciled(true), "", "lease"),
        (Leasing, EarlyTick, "", ""),
        (Leasing, LateTick, "", ""),
        (Leasing, LeasedNothing, "", "lease"),
        // No lease while a module-update waits for its reconcile.
        (Leasing, LeasedUpdate, "", ""),
        (Leasing, LeasedReboot, "done:t-8", "post:t-8:succeeded lease"),
        (Leasing, LeasedAgain, "", "post:t-0:succeeded lease"),
        (Leasing, LeaseFailed, "", "lease"),
        (Leasing, Reconciled(true), "", ""),
        (LeaseBackoff, EarlyTick, "", "lease"),
        (LeaseBackoff, LateTick, "lease", ""),
        (LeaseBackoff, Reconciled(false), "", "lease"),
        (Reconciling, EarlyTick, "", ""),
        (Reconciling, LateTick, "", ""),
        (Reconciling, Reconciled(true), "done:t-1", "post:t-1:succeeded lease"),
        (Reconciling, Reconciled(false), "done:t-1", "post:t-1:failed lease"),
        (Posting, EarlyTick, "", ""),
        (Posting, LateTick, "", ""),
        (Posting, LeasedNothing, "", "lease"),
        (Posting, LeasedUpdate, "", ""),
        // Queued behind the result in flight.
        (Posting, LeasedReboot, "done:t-8", "lease"),
        (Posting, LeasedAgain, "", "lease"),
        (Posting, LeaseFailed, "", "lease"),
        (Posting, Reconciled(true), "", ""),
        (Posting, PostedOk, "", ""),
        (Posting, PostFailed, "", "post:t-2:unsupported"),
        (PostBackoff, EarlyTick, "", "post:t-2:unsupported"),
        (PostBackoff, LateTick, "post:t-2:unsupported", ""),
        (PostBackoff, LeasedNothing, "", "post:t-2:unsupported lease"),
        (PostBackoff, LeasedUpdate, "", "post:t-2:unsupported"),
        (PostBackoff, LeasedReboot, "done:t-8", "post:t-2:unsupported lease"),
        (PostBackoff, LeasedAgain, "", "post:t-2:unsupported lease"),
        (PostBackoff, LeaseFailed, "", "post:t-2:unsupported lease"),
        (PostBackoff, Reconciled(true), "", "post:t-2:unsupported"),
        // Leaving: nothing more is leased; what the lease still out brings is answered.
        (Leaving, EarlyTick, "", ""),
        (Leaving, LateTick, "", ""),
        (Leaving, LeasedNothing, "", ""),
        (Leaving, LeasedUpdate, "", ""),
        (Leaving, LeasedReboot, "done:t-8", "post:t-8:succeeded"),
        (Leaving, LeasedAgain, "", "post:t-0:succeeded"),
        (Leaving, LeaseFailed, "", ""),
        (Leaving, Reconciled(true), "", ""),
        (Leaving, PowerFailed, "", ""),
    ];
    for (state, event, want, then) in table {
        let mut t = reach(*state);
        let mut out = Vec::new();
        let lease = |t: &mut Tasks, task, out: &mut Vec<Action>| t.on_leased(Ok(Some(task)), at(101), out);
        match *event {
            EarlyTick => t.due(at(101), &mut out),
            LateTick => t.due(at(10_000), &mut out),
            LeasedNothing => t.on_leased(Ok(None), at(101), &mut out),
            LeasedUpdate => lease(&mut t, task("t-9", TaskSpec::ModuleUpdate), &mut out),
            LeasedReboot => lease(&mut t, task("t-8", TaskSpec::Reboot), &mut out),
            LeasedAgain => lease(&mut t, task("t-0", TaskSpec::ModuleUpdate), &mut out),
            LeaseFailed => t.on_leased(Err("plane away".into()), at(101), &mut out),
            Reconciled(ok) => t.on_reconciled(&super::Reconciled { ok, summary: "s".into() }, at(101), &mut out),
            PostedOk => t.on_posted(&"t-2".parse().unwrap(), Ok(()), at(101), &mut out),
            PostFailed => t.on_posted(&"t-2".parse().unwrap(), Err("refused".into()), at(101), &mut out),
            PowerFailed => t.on_power_failed(),
        }
        assert_eq!(words(&out), *want, "{state:?} on {event:?}");
        out.clear();
        t.due(at(10_000), &mut out);
        assert_eq!(words(&out), *then, "{state:?} on {event:?}, then a tick");
    }
    // Every lease answer appears in every state with a lease out.
    for state in [Leasing, Posting, PostBackoff, Leaving] {
        for event in leases {
            let n = table.iter().filter(|(s, e, ..)| {
                format!("{s:?}") == format!("{state:?}") && format!("{e:?}") == format!("{event:?}")
            });
            assert_eq!(n.count(), 1, "{state:?} on {event:?} is in the table");
        }
    }
    // A module-update is asked of the rollout exactly when it is leased.
    let mut t = reach(Leasing);
    assert!(!t.take_reconcile_request());
    t.on_leased(Ok(Some(task("t-9", TaskSpec::ModuleUpdate))), at(101), &mut Vec::new());
    assert!(t.take_reconcile_request() && !t.take_reconcile_request(), "once");
}

#[test]
fn reconciled_by_name_is_the_rollouts_answer() {
    // The row type in the table is the rollout's own: a summary passes through to the result.
    let mut t = reach(State::Reconciling);
    let mut out = Vec::new();
    t.on_reconciled(&Reconciled { ok: false, summary: "hello 2 rolled back".into() }, at(101), &mut out);
    t.due(at(10_000), &mut out);
    let said = out.iter().find_map(|a| match a {
        Action::Post { result, .. } => result.reason.clone(),
        _ => None,
    });
    assert_eq!(said.as_deref(), Some("hello 2 rolled back"));
}
