//! `Node::on` across its machines: the handshake gates tasks and renewal, a `module-update`
//! task is answered by the reconcile it asks for, a task's reboot that did not begin lets
//! leasing go on, and SIGTERM while idle exits at once.

use std::time::Duration;

use ironroot_contract::config::MountRole;
use ironroot_contract::wire::{DesiredState, NodeState, ReportResponse, Task, TaskOutcome, TaskSpec};

use crate::service::heartbeat::{Beat, Jitter};
use crate::service::node::{Action, Event, Node, Now};
use crate::service::renewal::Renewal;
use crate::service::rollout::{Job, JobDone, ModuleInfo, Rollout};
use crate::service::spool::Spool;
use crate::service::tasks::Tasks;

fn at(s: u64) -> Now {
    Now { mono: Duration::from_secs(s), wall: 10_000 + s }
}

fn root() -> ModuleInfo {
    let digest = format!("sha256:{}", "ab".repeat(32)).parse().unwrap();
    ModuleInfo {
        name: "base".into(),
        reference: format!("reg/base@{digest}"),
        digest,
        composefs: "cd".repeat(32).parse().unwrap(),
        version: "1".into(),
        serial: 1,
        role: MountRole::Root,
        mount_point: None,
        units: Vec::new(),
        health: None,
    }
}

/// A node running `base` at generation 1, its certificate valid 10,000..100,000 s.
fn node() -> (Node, Vec<Action>) {
    let mut first = Vec::new();
    let rollout = Rollout::new(vec![root()], Vec::new(), 1, None, Vec::new(), "t", "0.1.0", None, &mut first);
    let beat = Beat::new(Duration::from_secs(30), Jitter::new(1));
    let node = Node::new(beat, rollout, Tasks::new([]), Renewal::new(10_000, 100_000, 0.0), Spool::new(0, 0));
    (node, first)
}

fn answered(generation: u64) -> Result<ReportResponse, String> {
    Ok(ReportResponse { node_id: "n-1".parse().unwrap(), state: NodeState::Running, generation })
}

fn has(out: &[Action], what: impl Fn(&Action) -> bool) -> bool {
    out.iter().any(what)
}

/// The node handshaken at 1 s (generation 1, nothing to change).
fn handshaken() -> Node {
    let (mut n, _) = node();
    n.on(Event::Tick, at(0));
    n.on(Event::Reported { handshake: true, result: answered(1) }, at(1));
    n
}

#[test]
fn only_the_handshake_before_it_then_ready_tasks_and_heartbeats() {
    let (mut n, _) = node();
    let out = n.on(Event::Tick, at(0));
    assert!(has(&out, |a| matches!(a, Action::Report { handshake: true, .. })), "{out:?}");
    assert!(!has(&out, |a| matches!(a, Action::Lease { .. } | Action::Renew)), "nothing before the handshake: {out:?}");
    let out = n.on(Event::Reported { handshake: true, result: answered(1) }, at(1));
    assert!(has(&out, |a| *a == Action::Ready), "{out:?}");
    assert!(has(&out, |a| matches!(a, Action::Lease { .. })), "a lease once handshaken: {out:?}");
    assert_eq!(n.state, Some(NodeState::Running));
    // A failed heartbeat says so and does not stop the lease or undo the handshake.
    let out = n.on(Event::Reported { handshake: false, result: Err("refused".into()) }, at(40));
    assert!(has(&out, |a| matches!(a, Action::Status(s) if s.contains("plane unreachable: refused"))), "{out:?}");
    assert!(n.beat.handshaken());
}

#[test]
fn a_module_update_task_is_answered_by_the_reconcile_it_asks_for() {
    let mut n = handshaken();
    let task = Task { id: "t-1".parse().unwrap(), spec: TaskSpec::ModuleUpdate, lease_until: 20_000, deadline: None };
    let out = n.on(Event::Leased(Ok(Some(task))), at(5));
    assert!(has(&out, |a| *a == Action::FetchDesired), "the reconcile fetches the desired state: {out:?}");
    assert!(!has(&out, |a| matches!(a, Action::Post { .. })), "not answered before it ends: {out:?}");
    let desired = DesiredState {
        generation: 1,
        template: Some("base".into()),
        modules: vec![root().pinned()],
        intents: Vec::new(),
        trial_deadline_s: None,
    };
    let out = n.on(Event::Desired(Ok(desired)), at(6));
    let posted = out.iter().find_map(|a| match a {
        Action::Post { task, result } => Some((task.to_string(), result.outcome)),
        _ => None,
    });
    assert_eq!(posted, Some(("t-1".to_owned(), TaskOutcome::Succeeded)), "{out:?}");
    let journaled = out.iter().position(|a| matches!(a, Action::Record { kind, .. } if kind == "task.finished"));
    let post = out.iter().position(|a| matches!(a, Action::Post { .. }));
    assert!(journaled < post, "journaled before it is posted: {out:?}");
}

#[test]
fn a_task_reboot_that_did_not_begin_lets_leasing_go_on() {
    let mut n = handshaken();
    let task = Task { id: "t-2".parse().unwrap(), spec: TaskSpec::Reboot, lease_until: 20_000, deadline: None };
    n.on(Event::Leased(Ok(Some(task))), at(5));
    let out = n.on(Event::Posted { task: "t-2".parse().unwrap(), result: Ok(()) }, at(6));
    assert!(has(&out, |a| matches!(a, Action::Run(j) if matches!(**j, Job::Power(_)))), "{out:?}");
    // The lease still out comes back empty: leaving, the node asks for no other.
    let out = n.on(Event::Leased(Ok(None)), at(7));
    assert!(!has(&out, |a| matches!(a, Action::Lease { .. })), "leaving: no lease: {out:?}");
    let out = n.on(Event::Job(JobDone::PowerFailed("no".into())), at(8));
    assert!(has(&out, |a| matches!(a, Action::Lease { .. })), "the node stays and leases again: {out:?}");
}

#[test]
fn terminate_while_idle_exits_at_once_and_asks_for_nothing_else() {
    let mut n = handshaken();
    let out = n.on(Event::Terminate, at(5));
    assert_eq!(out, [Action::Exit]);
    let out = n.on(Event::Tick, at(500));
    assert_eq!(out, [Action::Exit], "no heartbeat, lease or renewal after SIGTERM");
}

#[test]
fn renewal_comes_due_only_for_a_handshaken_node() {
    // 67.5 % of 10,000..100,000 s is 70,750 s: the wall clock there, the monotonic 60,750 s.
    let due = Now { mono: Duration::from_secs(60_750), wall: 70_750 };
    let (mut n, _) = node();
    let out = n.on(Event::Tick, due);
    assert!(!has(&out, |a| *a == Action::Renew), "{out:?}");
    let out = n.on(Event::Reported { handshake: true, result: answered(1) }, due);
    assert!(has(&out, |a| *a == Action::Renew), "{out:?}");
    let out = n.on(Event::Tick, Now { mono: due.mono + Duration::from_secs(1), wall: due.wall + 1 });
    assert!(!has(&out, |a| *a == Action::Renew), "one renewal in flight: {out:?}");
}
