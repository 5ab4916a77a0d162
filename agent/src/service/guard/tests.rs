//! Every record state the guard can find, before and after its time, in the trial root and
//! elsewhere.

use ironroot_contract::run_state::TrialRecord;

use super::{GRACE_S, Look, Verdict, decide, fire_at, unit_name};

const TRIAL_ROOT: u64 = 77;
const OTHER_ROOT: u64 = 12;

fn trial(rollback: bool) -> TrialRecord {
    TrialRecord {
        txn: "t-1".into(),
        started: 1_000,
        deadline_s: 300,
        root_dev: TRIAL_ROOT,
        rollback,
        steps_ms: Default::default(),
        staged_mono_us: 0,
    }
}

/// The records as they stand at each point of a trial.
#[derive(Debug, Clone, Copy)]
enum Records {
    /// Staged, not promoted: before the soft reboot, or a trial root whose agent never ran.
    Staged,
    /// Promoted by the trial root's agent, which has not ended the trial.
    Promoted,
    /// The trial root's agent staged the way back (its record promoted first).
    GoingBack,
    /// Committed, or back in the root before, or discarded: no trial of this transaction.
    Ended,
}

fn look(records: Records, root_dev: u64, now: u64) -> Look {
    let (promoted, staged) = match records {
        Records::Staged => (None, Some(trial(false))),
        Records::Promoted => (Some(trial(false)), None),
        Records::GoingBack => (Some(trial(false)), Some(TrialRecord { root_dev: 99, ..trial(true) })),
        Records::Ended => (None, None),
    };
    Look { promoted, staged, root_dev, now }
}

#[test]
fn every_record_state_before_and_after_the_deadline_in_every_root() {
    let at = fire_at(&trial(false), GRACE_S);
    assert_eq!(at, 1_000 + 300 + 60);
    let done = |v: &Verdict| matches!(v, Verdict::Done(_));
    for (records, root, now, want) in [
        // Before its time the guard waits on every open trial, wherever PID 1 runs.
        (Records::Staged, OTHER_ROOT, at - 1, Verdict::Wait),
        (Records::Staged, TRIAL_ROOT, at - 1, Verdict::Wait),
        (Records::Promoted, TRIAL_ROOT, at - 1, Verdict::Wait),
        (Records::GoingBack, TRIAL_ROOT, at - 1, Verdict::Wait),
        // At its time: a trial root whose agent never promoted its record goes back from
        // boot.json; one promoted goes back from boot.prev.json.
        (Records::Staged, TRIAL_ROOT, at, Verdict::GoBack { promoted: false }),
        (Records::Promoted, TRIAL_ROOT, at, Verdict::GoBack { promoted: true }),
        (Records::Promoted, TRIAL_ROOT, at + 10_000, Verdict::GoBack { promoted: true }),
        // The agent staged the way back and no soft reboot followed: the guard finishes it.
        (Records::GoingBack, TRIAL_ROOT, at, Verdict::Finish),
        (Records::GoingBack, OTHER_ROOT, at, Verdict::Finish),
    ] {
        assert_eq!(decide(&look(records, root, now), at), want, "{records:?} root {root} at {now}");
    }
    // Never entered (PID 1 still in the root that staged it): the staging agent's business.
    for records in [Records::Staged, Records::Promoted] {
        assert!(done(&decide(&look(records, OTHER_ROOT, at), at)), "{records:?}");
    }
    // Nothing open: done at any time, in any root.
    for (root, now) in [(TRIAL_ROOT, 0), (TRIAL_ROOT, at), (OTHER_ROOT, at + 1)] {
        assert!(done(&decide(&look(Records::Ended, root, now), at)), "root {root} at {now}");
    }
}

#[test]
fn a_way_back_is_never_an_open_trial() {
    let going_back = look(Records::GoingBack, TRIAL_ROOT, 0);
    assert_eq!(going_back.open_trial(), Some(&trial(false)), "the promoted record is the open trial");
    let only_back = Look { promoted: None, ..going_back };
    assert_eq!(only_back.open_trial(), None);
    assert_eq!(decide(&only_back, 5), Verdict::Wait, "the way back staged: the agent soft-reboots");
}

#[test]
fn the_deadline_sum_saturates() {
    let t = TrialRecord { started: u64::MAX - 5, ..trial(false) };
    assert_eq!(fire_at(&t, GRACE_S), u64::MAX);
}

#[test]
fn unit_names_keep_only_what_systemd_allows() {
    assert_eq!(unit_name("ab12-cd34-3"), "ironroot-trial-guard-ab12-cd34-3.service");
    assert_eq!(unit_name("a/b c;\n."), "ironroot-trial-guard-abc.service");
    assert_eq!(unit_name(&"x".repeat(200)).len(), "ironroot-trial-guard-.service".len() + 64);
}
