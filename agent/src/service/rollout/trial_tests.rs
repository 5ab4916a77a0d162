//! A root entered by soft reboot, on trial: gated after the live modules, committed, or
//! rolled back by staging the previous root; a soft reboot that never happened.

use ironroot_contract::config::MountRole;
use ironroot_contract::wire::{Health, Outcome};

use super::tests::{at, healthy, info, jobs, receipts, steps};
use super::*;
use crate::service::systemd::PowerOp;

fn trial(changed: Vec<(Option<ModuleInfo>, ModuleInfo)>, not_entered: Option<&str>) -> Trial {
    Trial {
        txn: "x-old-1".into(),
        started: 900,
        deadline: 1_200,
        changed,
        not_entered: not_entered.map(Into::into),
        passed: false,
        steps_ms: [("verify".to_owned(), 400), ("stage".to_owned(), 300), ("reboot".to_owned(), 3_000)].into(),
    }
}

/// A service starting in root `base2` (replacing `base1`), with `hello` live.
fn entered() -> (Rollout, Vec<Action>, ModuleInfo, ModuleInfo, ModuleInfo) {
    let base1 = info("base", 1, MountRole::Root);
    let mut base2 = info("base", 2, MountRole::Root);
    base2.units = vec!["sshd.service".into()];
    let hello = info("hello", 3, MountRole::Opt);
    let mut out = Vec::new();
    let t = trial(vec![(Some(base1.clone()), base2.clone())], None);
    let r = Rollout::new(vec![base2.clone()], vec![hello.pinned()], 4, None, vec![], "b", "0.2.0", Some(t), &mut out);
    (r, out, base1, base2, hello)
}

/// Attaches `hello` again (the soft reboot unmounted it) up to the trial's gate.
fn to_the_gate(r: &mut Rollout, out: Vec<Action>, hello: &ModuleInfo) -> Vec<Action> {
    assert_eq!(jobs(&out), [Job::Verify { module: hello.pinned() }], "the live modules first");
    assert!(!r.ready());
    let mut out = Vec::new();
    r.on_job(JobDone::Verified { name: "hello".into(), result: Ok(hello.clone()) }, at(1), &mut out);
    let t = match &jobs(&out)[..] {
        [Job::Stage { txn, .. }] => txn.clone(),
        other => panic!("{other:?}"),
    };
    for done in [
        JobDone::Staged { txn: t.clone(), result: Ok(()) },
        JobDone::Attached { txn: t.clone(), result: Ok(vec!["hello.service".into()]) },
        JobDone::Gated { txn: t.clone(), health: healthy() },
    ] {
        r.on_job(done, at(2), &mut out);
    }
    out.clear();
    r.on_job(JobDone::Committed { txn: t, result: Ok(()) }, at(3), &mut out);
    assert!(!r.ready(), "not ready before the root's own gate");
    out
}

#[test]
fn a_root_on_trial_is_gated_on_every_unit_then_committed_and_only_then_ready() {
    let (mut r, out, base1, base2, hello) = entered();
    let out = to_the_gate(&mut r, out, &hello);
    let gate = Job::GateRoot {
        txn: "x-old-1".into(),
        units: vec!["hello.service".into(), "sshd.service".into()],
        deadline: 1_200,
    };
    assert_eq!(jobs(&out).last(), Some(&gate), "{out:?}");

    let mut out = Vec::new();
    r.on_job(JobDone::Gated { txn: "x-old-1".into(), health: healthy() }, at(20), &mut out);
    assert_eq!(steps(&out), ["healthy"]);
    assert_eq!(jobs(&out), [Job::CommitRoot { txn: "x-old-1".into(), modules: vec![base2.clone()] }]);
    let mut out = Vec::new();
    r.on_job(JobDone::Committed { txn: "x-old-1".into(), result: Ok(()) }, at(21), &mut out);
    let rs = receipts(&out);
    assert_eq!(rs.len(), 1);
    let receipt = &rs[0];
    assert_eq!((receipt.outcome, receipt.module.as_str(), receipt.started), (Outcome::Committed, "base", 900));
    assert_eq!(receipt.from.as_ref().map(|v| v.digest), Some(base1.digest));
    assert_eq!(receipt.to.as_ref().map(|v| v.digest), Some(base2.digest));
    assert_eq!(receipt.agent_version, "0.2.0", "the new root's agent writes it");
    // The parts before the soft reboot come from the root's record; this service's start up
    // to its gate (hello attached again by 3 s) is `attach`, then the gate and the commit.
    let parts =
        [("attach", 3_000), ("commit", 1_000), ("gate", 17_000), ("reboot", 3_000), ("stage", 300), ("verify", 400)];
    assert_eq!(receipt.steps_ms, parts.map(|(k, v)| (k.to_owned(), v)).into());
    assert!(r.ready(), "ready once the trial passed");
}

#[test]
fn a_failed_trial_stages_the_previous_root_writes_the_receipt_and_soft_reboots_back() {
    let (mut r, out, base1, base2, hello) = entered();
    to_the_gate(&mut r, out, &hello);
    let failed = Health {
        healthy: false,
        units: vec![("hello.service".into(), "active".into()), ("sshd.service".into(), "failed".into())],
        probe: None,
    };
    let mut out = Vec::new();
    r.on_job(JobDone::Gated { txn: "x-old-1".into(), health: failed }, at(30), &mut out);
    assert_eq!(steps(&out), ["restoring"]);
    assert_eq!(jobs(&out), [Job::StagePrevious { txn: "x-old-1".into(), started: 900 }]);
    assert!(receipts(&out).is_empty(), "not before the previous root is staged");

    let mut out = Vec::new();
    r.on_job(JobDone::RootStaged { txn: "x-old-1".into(), result: Ok(()) }, at(31), &mut out);
    let rs = receipts(&out);
    assert_eq!(rs.len(), 1);
    assert_eq!(rs[0].outcome, Outcome::RolledBack);
    assert_eq!(rs[0].wanted, Some(base2.digest));
    assert_eq!(rs[0].from.as_ref().map(|v| v.digest), Some(base1.digest));
    assert!(rs[0].reason.as_deref().unwrap().contains("sshd.service is failed"), "{:?}", rs[0].reason);
    assert_eq!(jobs(&out), [Job::Power(PowerOp::SoftReboot)]);
    assert!(!r.ready() && !r.is_idle());
}

#[test]
fn a_trial_root_that_cannot_go_back_stays_and_says_so() {
    let (mut r, out, _, _, hello) = entered();
    to_the_gate(&mut r, out, &hello);
    let mut out = Vec::new();
    let failed = Health { healthy: false, units: vec![("sshd.service".into(), "failed".into())], probe: None };
    r.on_job(JobDone::Gated { txn: "x-old-1".into(), health: failed }, at(30), &mut out);
    let mut out = Vec::new();
    r.on_job(JobDone::RootStaged { txn: "x-old-1".into(), result: Err("no boot.prev.json".into()) }, at(31), &mut out);
    let rs = receipts(&out);
    assert_eq!(rs[0].outcome, Outcome::Failed);
    assert!(rs[0].reason.as_deref().unwrap().contains("going back to the previous root failed too: no boot.prev.json"));
    assert!(jobs(&out).is_empty());
    assert!(r.ready(), "it keeps heartbeating, failed, rather than going dark");
}

#[test]
fn a_staged_root_that_was_not_entered_ends_failed_and_is_not_tried_again() {
    let base1 = info("base", 1, MountRole::Root);
    let base2 = info("base", 2, MountRole::Root);
    let mut out = Vec::new();
    let t = trial(vec![(Some(base1.clone()), base2.clone())], Some("the soft reboot did not happen"));
    // The root it was staged from still runs, at the generation it booted.
    let mut r = Rollout::new(vec![base1.clone()], vec![], 2, None, vec![], "b", "0.1.0", Some(t), &mut out);
    let rs = receipts(&out);
    assert_eq!(rs.len(), 1);
    assert_eq!((rs[0].outcome, rs[0].transaction.as_str()), (Outcome::Failed, "x-old-1"));
    assert_eq!(rs[0].reason.as_deref(), Some("the soft reboot did not happen"));
    assert!(r.ready());
    // The plane still wants base2 at generation 3: refused until the desired state moves.
    let mut out = Vec::new();
    r.on_generation(3, at(40), &mut out);
    assert_eq!(out, [Action::FetchDesired]);
    let mut out = Vec::new();
    let desired = DesiredState {
        generation: 3,
        template: None,
        modules: vec![base2.pinned()],
        intents: Vec::new(),
        trial_deadline_s: None,
    };
    r.on_desired(Ok(desired), at(41), &mut out);
    assert!(jobs(&out).is_empty(), "{out:?}");
}

#[test]
fn a_service_restarted_after_the_gate_passed_commits_without_gating_again() {
    let base1 = info("base", 1, MountRole::Root);
    let base2 = info("base", 2, MountRole::Root);
    let mut t = trial(vec![(Some(base1), base2.clone())], None);
    t.passed = true;
    let mut out = Vec::new();
    let mut r = Rollout::new(vec![base2.clone()], vec![], 4, None, vec![], "b", "0.2.0", Some(t), &mut out);
    assert_eq!(jobs(&out), [Job::CommitRoot { txn: "x-old-1".into(), modules: vec![base2] }]);
    let mut out = Vec::new();
    r.on_job(JobDone::Committed { txn: "x-old-1".into(), result: Ok(()) }, at(5), &mut out);
    assert_eq!(receipts(&out)[0].outcome, Outcome::Committed);
    assert!(r.ready());
}

#[test]
fn a_refused_root_module_holds_back_the_rest_of_a_root_change() {
    // base 2 was rolled back; the plane still names it, with a new usr layer: staging base 1
    // with usr 2 would make a root nobody asked for.
    let base1 = info("base", 1, MountRole::Root);
    let (base2, tools1, tools2) =
        (info("base", 2, MountRole::Root), info("tools", 5, MountRole::Usr), info("tools", 6, MountRole::Usr));
    let mut out = Vec::new();
    let mut r = Rollout::new(
        vec![base1.clone(), tools1.clone()],
        vec![],
        2,
        None,
        vec![base2.digest],
        "b",
        "0.1.0",
        None,
        &mut out,
    );
    let mut out = Vec::new();
    r.on_generation(3, at(1), &mut out);
    assert_eq!(out, [Action::FetchDesired]);
    let desired = DesiredState {
        generation: 3,
        template: None,
        modules: vec![base2.pinned(), tools2.pinned()],
        intents: Vec::new(),
        trial_deadline_s: None,
    };
    let mut out = Vec::new();
    r.on_desired(Ok(desired), at(2), &mut out);
    assert_eq!(jobs(&out), [Job::Verify { module: tools2.pinned() }], "base 2 stays refused");
    let mut out = Vec::new();
    r.on_job(JobDone::Verified { name: "tools".into(), result: Ok(tools2) }, at(3), &mut out);
    assert!(jobs(&out).is_empty(), "no root change: {out:?}");
    assert!(r.is_idle());
}
