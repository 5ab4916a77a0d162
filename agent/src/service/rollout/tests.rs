//! The rollout machine, event by event: every step of a transaction, its failure at each step,
//! recovery of an open transaction, removals, root changes, and what is refused.

use std::time::Duration;

use ironroot_contract::config::MountRole;
use ironroot_contract::wire::{DesiredState, Health, Outcome, RECEIPT_KIND, Receipt};

use super::*;
use crate::service::systemd::PowerOp;

pub(super) fn at(s: u64) -> Now {
    Now { mono: Duration::from_secs(s), wall: 1_000 + s }
}

pub(super) fn digest(n: u8) -> ironroot_contract::OciDigest {
    format!("sha256:{}", format!("{n:02x}").repeat(32)).parse().unwrap()
}

pub(super) fn info(name: &str, n: u8, role: MountRole) -> ModuleInfo {
    ModuleInfo {
        name: name.into(),
        reference: format!("reg/{name}@{}", digest(n)),
        digest: digest(n),
        composefs: format!("{n:02x}").repeat(32).parse().unwrap(),
        version: format!("1.{n}"),
        serial: u64::from(n),
        role,
        mount_point: role.is_live().then(|| format!("/opt/{name}")),
        units: if role.is_live() { vec![format!("{name}.service")] } else { Vec::new() },
        health: None,
    }
}

fn desired(generation: u64, modules: &[&ModuleInfo]) -> DesiredState {
    DesiredState {
        generation,
        template: Some("base".into()),
        modules: modules.iter().map(|m| m.pinned()).collect(),
        intents: Vec::new(),
        trial_deadline_s: None,
    }
}

pub(super) fn jobs(out: &[Action]) -> Vec<Job> {
    out.iter().filter_map(|a| if let Action::Run(j) = a { Some((**j).clone()) } else { None }).collect()
}

pub(super) fn receipts(out: &[Action]) -> Vec<Receipt> {
    out.iter()
        .filter_map(|a| match a {
            Action::Record { kind, data } if kind == RECEIPT_KIND => serde_json::from_value(data.clone()).ok(),
            _ => None,
        })
        .collect()
}

pub(super) fn steps(out: &[Action]) -> Vec<String> {
    out.iter()
        .filter_map(|a| match a {
            Action::Record { kind, data } if kind == "txn" => data["step"].as_str().map(str::to_owned),
            _ => None,
        })
        .collect()
}

fn txn_of(out: &[Action]) -> String {
    jobs(out)
        .iter()
        .find_map(|j| match j {
            Job::Stage { txn, .. } | Job::Detach { txn, .. } | Job::StageRoot { txn, .. } => Some(txn.clone()),
            _ => None,
        })
        .expect("a transaction started")
}

/// A rollout that booted `base` (root) at generation 1 and has nothing live.
fn booted() -> (Rollout, ModuleInfo) {
    let base = info("base", 1, MountRole::Root);
    let mut out = Vec::new();
    let r = Rollout::new(vec![base.clone()], vec![], 1, None, vec![], "boot-1", "0.1.0", None, &mut out);
    assert!(jobs(&out).is_empty(), "the booted root is what runs: {out:?}");
    assert!(r.ready(), "nothing live to attach: ready");
    assert!(receipts(&out).is_empty());
    (r, base)
}

pub(super) fn healthy() -> Health {
    Health { healthy: true, units: vec![("hello.service".into(), "active".into())], probe: None }
}

/// Runs a generation bump to `modules` up to the start of the first transaction.
fn reconcile(r: &mut Rollout, generation: u64, modules: &[&ModuleInfo], verified: &[&ModuleInfo]) -> Vec<Action> {
    let mut out = Vec::new();
    r.on_generation(generation, at(10), &mut out);
    assert_eq!(out, [Action::FetchDesired]);
    out.clear();
    r.on_desired(Ok(desired(generation, modules)), at(11), &mut out);
    for v in verified {
        assert_eq!(jobs(&out).last(), Some(&Job::Verify { module: v.pinned() }), "{out:?}");
        out.clear();
        r.on_job(JobDone::Verified { name: v.name.clone(), result: Ok((*v).clone()) }, at(12), &mut out);
    }
    out
}

#[test]
fn an_attach_goes_through_every_step_and_ends_committed() {
    let (mut r, base) = booted();
    let hello = info("hello", 2, MountRole::Opt);
    let out = reconcile(&mut r, 2, &[&base, &hello], &[&hello]);
    assert_eq!(steps(&out), ["planned"]);
    let txn = txn_of(&out);
    let mut out = Vec::new();
    r.on_job(JobDone::Staged { txn: txn.clone(), result: Ok(()) }, at(13), &mut out);
    assert_eq!(jobs(&out), [Job::Attach { txn: txn.clone(), to: hello.clone(), from: None }]);
    assert_eq!(steps(&out), ["staged"], "journaled before the attach runs");
    out.clear();
    r.on_job(JobDone::Attached { txn: txn.clone(), result: Ok(vec!["hello.service".into()]) }, at(15), &mut out);
    assert_eq!(jobs(&out), [Job::Gate { txn: txn.clone(), module: hello.clone() }]);
    out.clear();
    r.on_job(JobDone::Gated { txn: txn.clone(), health: healthy() }, at(18), &mut out);
    assert_eq!(jobs(&out), [Job::Commit { txn: txn.clone(), to: hello.clone(), from: None }]);
    assert_eq!(steps(&out), ["healthy"]);
    out.clear();
    r.on_job(JobDone::Committed { txn: txn.clone(), result: Ok(()) }, at(22), &mut out);
    let rs = receipts(&out);
    assert_eq!(rs.len(), 1);
    assert_eq!(
        (rs[0].outcome, rs[0].to.as_ref().map(|v| v.serial), rs[0].from.is_none()),
        (Outcome::Committed, Some(2), true)
    );
    assert_eq!(rs[0].units, ["hello.service"]);
    assert_eq!((rs[0].started, rs[0].finished), (1_012, 1_022));
    // Each part as long as the machine saw it: verified 11 → 12, staged → 13, swapped → 15,
    // gated → 18, committed → 22.
    let parts = [("commit", 4_000), ("gate", 3_000), ("stage", 1_000), ("swap", 2_000), ("verify", 1_000)];
    assert_eq!(rs[0].steps_ms, parts.map(|(k, v)| (k.to_owned(), v)).into());
    assert!(r.live().any(|m| m == &hello));
    assert_eq!(r.take_reconciled(), Some(Reconciled { ok: true, summary: "ok: generation 2".into() }));
    // The outcome is journaled after the receipt, as the next report will say it.
    let reports = records_of(&out, REPORT_KIND);
    let mut digests = [base.digest.to_string(), hello.digest.to_string()];
    digests.sort();
    let said = serde_json::json!({"generation": 2, "last_reconcile": "ok: generation 2", "module_digests": digests});
    assert_eq!(reports, [said]);
    let kinds: Vec<&str> = out
        .iter()
        .filter_map(|a| if let Action::Record { kind, .. } = a { Some(kind.as_str()) } else { None })
        .collect();
    assert_eq!(kinds.last(), Some(&REPORT_KIND), "{kinds:?}");
    assert!(r.is_idle());
    let mut out = Vec::new();
    r.on_generation(2, at(20), &mut out);
    assert!(out.is_empty(), "generation 2 is applied");
    // Asked to reconcile again with nothing to change: the same outcome is not journaled twice.
    r.reconcile_now(at(30), &mut out);
    let out = reconcile_again(&mut r, &[&base, &hello], &[]);
    assert_eq!(r.take_reconciled().map(|d| d.summary), Some("ok: generation 2".into()), "{out:?}");
    assert!(records_of(&out, REPORT_KIND).is_empty(), "{out:?}");
    // One the journal refused is written with the next outcome, equal or not.
    let mut out = Vec::new();
    r.on_not_journaled(REPORT_KIND, None, "the node journal is full", at(40), &mut out);
    assert!(out.is_empty() && r.is_idle(), "a report refused stops nothing: {out:?}");
    r.reconcile_now(at(41), &mut out);
    let out = reconcile_again(&mut r, &[&base, &hello], &[]);
    assert_eq!(records_of(&out, REPORT_KIND).len(), 1, "{out:?}");
}

fn records_of(out: &[Action], wanted: &str) -> Vec<serde_json::Value> {
    out.iter()
        .filter_map(|a| match a {
            Action::Record { kind, data } if kind == wanted => Some(data.clone()),
            _ => None,
        })
        .collect()
}

/// A change whose first record the journal refused never began: nothing ran, the reconcile
/// ends saying why, and it is tried again after a backoff. A step of a change under way that
/// cannot be written down ends the service (to be finished from the journal on restart).
#[test]
fn a_change_the_journal_cannot_take_waits_and_a_step_it_cannot_take_ends_the_service() {
    let (mut r, base) = booted();
    let hello = info("hello", 2, MountRole::Opt);
    let out = reconcile(&mut r, 2, &[&base, &hello], &[&hello]);
    assert_eq!(steps(&out), ["planned"]);
    let mut out = Vec::new();
    r.on_not_journaled("txn", Some("planned"), "the node journal is full", at(13), &mut out);
    assert!(out.is_empty(), "{out:?}");
    let done = r.take_reconciled().unwrap();
    assert!(!done.ok && done.summary.contains("changes refused: the node journal is full"), "{done:?}");
    assert!(r.is_idle() && !r.live().any(|m| m.name == "hello"));
    let mut out = Vec::new();
    r.due(at(13), &mut out);
    assert!(out.is_empty(), "not before the backoff: {out:?}");
    r.due(at(60), &mut out);
    assert_eq!(out, [Action::FetchDesired], "tried again");

    let out = reconcile_again(&mut r, &[&base, &hello], &[&hello]);
    let txn = txn_of(&out);
    let mut out = Vec::new();
    r.on_job(JobDone::Staged { txn, result: Ok(()) }, at(62), &mut out);
    assert_eq!(steps(&out), ["staged"]);
    let mut out = Vec::new();
    r.on_not_journaled("txn", Some("staged"), "No space left on device", at(62), &mut out);
    assert_eq!(out, [Action::Exit]);
}

/// The desired state (generation 2 still) answered again, and `verified` verified.
fn reconcile_again(r: &mut Rollout, modules: &[&ModuleInfo], verified: &[&ModuleInfo]) -> Vec<Action> {
    let mut out = Vec::new();
    r.on_desired(Ok(desired(2, modules)), at(61), &mut out);
    for v in verified {
        out.clear();
        r.on_job(JobDone::Verified { name: v.name.clone(), result: Ok((*v).clone()) }, at(61), &mut out);
    }
    out
}

#[test]
fn an_unhealthy_update_is_rolled_back_with_the_reason_and_not_retried() {
    let (mut r, base) = booted();
    let (v1, v2) = (info("hello", 2, MountRole::Opt), info("hello", 3, MountRole::Opt));
    // Attach v1 quickly.
    let out = reconcile(&mut r, 2, &[&base, &v1], &[&v1]);
    let t = txn_of(&out);
    let mut out = Vec::new();
    for done in [
        JobDone::Staged { txn: t.clone(), result: Ok(()) },
        JobDone::Attached { txn: t.clone(), result: Ok(vec![]) },
        JobDone::Gated { txn: t.clone(), health: healthy() },
        JobDone::Committed { txn: t.clone(), result: Ok(()) },
    ] {
        r.on_job(done, at(13), &mut out);
    }
    r.take_reconciled();
    let out = reconcile(&mut r, 3, &[&base, &v2], &[&v2]);
    let t = txn_of(&out);
    let mut out = Vec::new();
    r.on_job(JobDone::Staged { txn: t.clone(), result: Ok(()) }, at(13), &mut out);
    r.on_job(JobDone::Attached { txn: t.clone(), result: Ok(vec!["hello.service".into()]) }, at(14), &mut out);
    out.clear();
    let sick = Health { healthy: false, units: vec![("hello.service".into(), "failed".into())], probe: None };
    r.on_job(JobDone::Gated { txn: t.clone(), health: sick }, at(15), &mut out);
    assert_eq!(jobs(&out), [Job::Restore { txn: t.clone(), to: v2.clone(), from: Some(v1.clone()) }]);
    assert_eq!(steps(&out), ["restoring"]);
    out.clear();
    r.on_job(JobDone::Restored { txn: t.clone(), result: Ok(()) }, at(16), &mut out);
    let rs = receipts(&out);
    assert_eq!(rs[0].outcome, Outcome::RolledBack);
    assert_eq!((rs[0].from.as_ref().unwrap().serial, rs[0].to.as_ref().unwrap().serial), (2, 3));
    assert!(rs[0].reason.as_deref().unwrap().contains("hello.service is failed"), "{:?}", rs[0].reason);
    assert!(r.live().any(|m| m == &v1), "the old version is live again");
    assert!(!r.take_reconciled().unwrap().ok);
    // Heartbeats at the same generation do not try v2 again.
    let mut out = Vec::new();
    r.on_generation(3, at(20), &mut out);
    assert!(out.is_empty(), "{out:?}");
    // An operator's explicit module-update does (a redelivered one is answered by tasks).
    r.reconcile_now(at(21), &mut out);
    assert!(matches!(out[..], [Action::FetchDesired]), "{out:?}");
    out.clear();
    r.on_desired(Ok(desired(3, &[&base, &v2])), at(22), &mut out);
    assert!(matches!(jobs(&out)[..], [Job::Verify { .. }]), "{out:?}");
}

#[test]
fn a_refused_module_leaves_nothing_half_applied() {
    let (mut r, base) = booted();
    let hello = info("hello", 2, MountRole::Opt);
    let mut out = Vec::new();
    r.on_generation(2, at(10), &mut out);
    out.clear();
    r.on_desired(Ok(desired(2, &[&base, &hello])), at(11), &mut out);
    out.clear();
    r.on_job(
        JobDone::Verified { name: "hello".into(), result: Err("serial 2 is below the floor 5".into()) },
        at(12),
        &mut out,
    );
    let rs = receipts(&out);
    assert_eq!((rs[0].outcome, rs[0].module.as_str()), (Outcome::Failed, "hello"));
    assert!(rs[0].reason.as_deref().unwrap().contains("below the floor"));
    assert!(jobs(&out).is_empty(), "nothing staged, attached or mounted");
    assert!(!r.live().any(|m| m.name == "hello"));
    // A failing stage is a failed change with nothing changed, too.
    let mut r2 = booted().0;
    let out = reconcile(&mut r2, 2, &[&base, &hello], &[&hello]);
    let t = txn_of(&out);
    let mut out = Vec::new();
    r2.on_job(JobDone::Staged { txn: t, result: Err("EROFS mount refused".into()) }, at(13), &mut out);
    assert_eq!(receipts(&out)[0].outcome, Outcome::Failed);
    assert!(jobs(&out).is_empty());
}

#[test]
fn a_removed_module_is_detached_and_a_busy_one_reported() {
    let (mut r, base) = booted();
    let hello = info("hello", 2, MountRole::Opt);
    let out = reconcile(&mut r, 2, &[&base, &hello], &[&hello]);
    let t = txn_of(&out);
    let mut out = Vec::new();
    for done in [
        JobDone::Staged { txn: t.clone(), result: Ok(()) },
        JobDone::Attached { txn: t.clone(), result: Ok(vec![]) },
        JobDone::Gated { txn: t.clone(), health: healthy() },
        JobDone::Committed { txn: t.clone(), result: Ok(()) },
    ] {
        r.on_job(done, at(13), &mut out);
    }
    let out = reconcile(&mut r, 3, &[&base], &[]);
    assert_eq!(jobs(&out).len(), 1);
    let t = txn_of(&out);
    assert!(matches!(&jobs(&out)[0], Job::Detach { module, .. } if module == &hello));
    let mut out = Vec::new();
    r.on_job(JobDone::Detached { txn: t, result: Err("/opt/hello is busy".into()) }, at(14), &mut out);
    let rs = receipts(&out);
    assert_eq!(rs[0].outcome, Outcome::Failed);
    assert!(r.live().any(|m| m.name == "hello"), "a busy module stays, reported, not half-removed");
}

#[test]
fn a_changed_root_is_staged_and_entered_by_soft_reboot() {
    let (mut r, base) = booted();
    let base2 = info("base", 9, MountRole::Root);
    let out = reconcile(&mut r, 2, &[&base2], &[&base2]);
    let t = txn_of(&out);
    assert_eq!(
        jobs(&out),
        [Job::StageRoot {
            txn: t.clone(),
            modules: vec![base2.clone()],
            generation: Some(2),
            started: 1_012,
            deadline_s: 300,
            verify_ms: 1_000, // verified from 11 s to 12 s, carried across the soft reboot
        }]
    );
    let mut out = Vec::new();
    r.on_job(JobDone::RootStaged { txn: t.clone(), result: Ok(()) }, at(13), &mut out);
    assert_eq!(jobs(&out), [Job::Power(PowerOp::SoftReboot)]);
    assert_eq!(steps(&out), ["staged"]);
    assert!(!r.is_idle(), "this userspace is ending");

    // systemd refused: the change failed, named, and is not tried again at this generation.
    let mut out = Vec::new();
    r.on_job(JobDone::PowerFailed("SoftReboot is not supported".into()), at(14), &mut out);
    let rs = receipts(&out);
    assert_eq!(rs.len(), 1);
    assert_eq!((rs[0].outcome, rs[0].module.as_str()), (Outcome::Failed, "base"));
    assert_eq!(rs[0].from.as_ref().map(|v| v.digest), Some(base.digest));
    assert_eq!(rs[0].wanted, Some(base2.digest));
    assert!(rs[0].reason.as_deref().unwrap().contains("SoftReboot is not supported"), "{:?}", rs[0].reason);
    assert!(r.is_idle());
    let mut out = Vec::new();
    r.on_generation(2, at(20), &mut out);
    assert!(out.is_empty(), "the same generation is not applied again: {out:?}");
}

#[test]
fn an_open_transaction_is_finished_before_anything_else() {
    let base = info("base", 1, MountRole::Root);
    let (v1, v2) = (info("hello", 2, MountRole::Opt), info("hello", 3, MountRole::Opt));
    // Every step a `kill -9` can leave a transaction at: only a passed gate is committed.
    let steps = [
        (Step::Planned, false),
        (Step::Staged, false),
        (Step::Attached, false),
        (Step::Unhealthy, false),
        (Step::Restoring, false),
        (Step::Healthy, true),
    ];
    for (step, commit) in steps {
        let open = OpenTxn { id: "x-old-1".into(), step, to: v2.clone(), from: Some(v1.clone()), started: 900 };
        let mut out = Vec::new();
        let mut r = Rollout::new(
            vec![base.clone()],
            vec![v1.pinned()],
            1,
            Some(open),
            vec![],
            "boot-1",
            "0.1.0",
            None,
            &mut out,
        );
        let expected = if commit {
            Job::Commit { txn: "x-old-1".into(), to: v2.clone(), from: Some(v1.clone()) }
        } else {
            Job::Restore { txn: "x-old-1".into(), to: v2.clone(), from: Some(v1.clone()) }
        };
        assert_eq!(jobs(&out), [expected], "{step:?}");
        assert!(!r.ready());
        out.clear();
        let done = if commit {
            JobDone::Committed { txn: "x-old-1".into(), result: Ok(()) }
        } else {
            JobDone::Restored { txn: "x-old-1".into(), result: Ok(()) }
        };
        r.on_job(done, at(1), &mut out);
        let rs = receipts(&out);
        assert_eq!(rs[0].outcome, if commit { Outcome::Committed } else { Outcome::RolledBack });
        assert!(rs[0].reason.as_deref().unwrap().contains("the agent stopped"), "{:?}", rs[0].reason);
        assert_eq!(jobs(&out), [Job::Verify { module: v1.pinned() }], "then the live modules of this boot");
        assert!(!r.ready());
        out.clear();
        r.on_job(JobDone::Verified { name: "hello".into(), result: Ok(v1.clone()) }, at(2), &mut out);
        if commit {
            assert_eq!(jobs(&out), [Job::Stage { txn: txn_of(&out), to: v1.clone() }], "the boot's version again");
        } else {
            assert!(jobs(&out).is_empty(), "already live: {out:?}");
            assert!(r.ready());
        }
    }
}

#[test]
fn the_desired_state_is_fetched_again_with_backoff_when_the_plane_fails() {
    let (mut r, _) = booted();
    let mut out = Vec::new();
    r.on_generation(2, at(10), &mut out);
    out.clear();
    r.on_desired(Err("plane unreachable".into()), at(11), &mut out);
    r.due(at(12), &mut out);
    assert!(out.is_empty(), "backing off");
    assert!(r.next_wake().is_some());
    r.due(at(30), &mut out);
    assert_eq!(out, [Action::FetchDesired]);
    assert!(r.last_result().unwrap().contains("plane unreachable"));
}

#[test]
fn what_an_earlier_run_rolled_back_is_not_tried_again_until_the_desired_state_moves() {
    let base = info("base", 1, MountRole::Root);
    let v2 = info("hello", 3, MountRole::Opt);
    let mut out = Vec::new();
    let mut r = Rollout::new(vec![base.clone()], vec![], 1, None, vec![v2.digest], "boot-2", "0.1.0", None, &mut out);
    assert!(r.ready());
    assert_eq!(records_of(&out, REPORT_KIND).len(), 1, "what the node starts on, journaled: {out:?}");
    out.clear();
    r.on_generation(3, at(1), &mut out);
    assert_eq!(out, [Action::FetchDesired], "the first generation this run sees");
    out.clear();
    r.on_desired(Ok(desired(3, &[&base, &v2])), at(2), &mut out);
    assert!(jobs(&out).is_empty(), "the digest that crashed the earlier run is left alone: {out:?}");
    out.clear();
    r.on_generation(4, at(3), &mut out);
    r.on_desired(Ok(desired(4, &[&base, &v2])), at(4), &mut out);
    assert!(matches!(jobs(&out)[..], [Job::Verify { .. }]), "the desired state moved: tried again: {out:?}");
}
