//! Tier 3, the node runtime when its plane is not there: one disk-backed node booted from what
//! `just image` built, against a plane that issues 90 s certificates. The node renews them
//! twice without missing a heartbeat; a task whose answer the plane lost (its row restored from
//! before the answer, as a restore from a backup would) is delivered again and answered from the
//! node's record, not carried out twice; and with the plane stopped for three minutes, a root
//! update that fails its trial is rolled back by the node itself from its disk, and nothing the
//! node said meanwhile is lost: its journal arrives whole and in order, and `audit verify` passes.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests stop loudly on a failed setup step")]

use std::time::{Duration, Instant};

use ironroot_tests::runtime::{CHANGE, journal, nth_receipt, receipts, root_tree, root_version, task, view};
use ironroot_tests::vm::{IdentityVia, Vm, VmLab};

const BOOT: Duration = Duration::from_secs(600);
/// The lab's nodes heartbeat every 3 s (`ironroot.heartbeat=3`).
const HEARTBEAT: Duration = Duration::from_secs(3);
/// How long the plane stays away.
const AWAY: Duration = Duration::from_secs(180);

#[test]
fn a_node_renews_answers_once_and_rolls_back_by_itself_while_its_plane_is_away() {
    let mut lab = VmLab::start_with(&["--cert-ttl", "90s"]);
    let node = "vm-offline";
    let token = lab.token(node, "base", &lab.guest_reference);
    let disk = lab.work.path().join("persist.img");
    std::fs::File::create(&disk).unwrap().set_len(4 << 30).unwrap();
    let disk = disk.to_string_lossy().into_owned();
    let extra = ["--disk", disk.as_str(), "--append", "ironroot.store=disk:/dev/vda"];
    let mut vm = lab.boot_with(node, &token, IdentityVia::FwCfg, false, &extra);
    let booted = lab.wait_for(&mut vm, node, BOOT, |v| v["state"] == "running" && v["phase"] == "ready");
    assert_eq!(booted["store"], "disk+verity", "{booted}");
    let id = booted["id"].as_str().unwrap().to_owned();

    renewed_twice_without_a_missed_heartbeat(&lab, &vm, node, &id);
    // From here on certificates outlive the plane's absence: the plane comes back (same
    // address) issuing 72 h ones, and the node's next renewal gets one.
    let renewed = renewals(&lab, &id);
    lab.plane.terminate();
    lab.plane.set_flag("--cert-ttl", "72h");
    lab.plane.restart();
    wait(&vm, "a renewal from the restarted plane", Duration::from_secs(120), || renewals(&lab, &id) > renewed);

    a_redelivered_task_is_answered_from_the_record(&mut lab, &vm, node, &id);
    a_failed_root_is_rolled_back_from_disk_while_the_plane_is_stopped(&mut lab, &mut vm, node, &id);
}

/// Polls `done` every second until it holds, or fails naming `what` with the console's tail.
fn wait(vm: &Vm, what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}\nconsole tail:\n{}", vm.console_tail(60));
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// The plane's `cert.renew` records for node `id`.
fn renewals(lab: &VmLab, id: &str) -> usize {
    journal(lab).iter().filter(|e| e.kind == "cert.renew" && e.subject == id).count()
}

/// The plane's `node.handshake` records for node `id` (one per start of its agent).
fn handshakes(lab: &VmLab, id: &str) -> usize {
    journal(lab).iter().filter(|e| e.kind == "node.handshake" && e.subject == id).count()
}

/// Two renewals of a 90 s certificate (at 60–75 % of its life) while the plane counts every
/// heartbeat: no gap between two counted heartbeats spans a missed one, and the node never
/// leaves `running`.
fn renewed_twice_without_a_missed_heartbeat(lab: &VmLab, vm: &Vm, node: &str, id: &str) {
    let before = renewals(lab, id);
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut last = (Instant::now(), view(lab, node)["heartbeats"].as_i64().unwrap());
    let mut longest = Duration::ZERO;
    while renewals(lab, id) < before + 2 {
        assert!(Instant::now() < deadline, "two renewals of a 90 s certificate within 300 s: {}", vm.console_tail(40));
        std::thread::sleep(Duration::from_secs(1));
        let v = view(lab, node);
        assert_eq!(v["state"], "running", "{v}");
        let beats = v["heartbeats"].as_i64().unwrap();
        longest = longest.max(last.0.elapsed());
        if beats > last.1 {
            last = (Instant::now(), beats);
        }
    }
    // A heartbeat every 3 s ±10 %, read once a second: a missed one leaves a gap of two
    // intervals and more.
    assert!(longest < 2 * HEARTBEAT + Duration::from_secs(2), "a heartbeat gap of {longest:?} across the renewals");
    // The node's own records of them come with its journal delivery, after the plane's
    // `cert.renew` (a heartbeat or two later on a slow host).
    let journaled = || journal(lab).iter().filter(|e| e.kind == "node-journal.cert.renewed" && e.subject == id).count();
    wait(vm, "the node's journal records of both renewals", 10 * HEARTBEAT, || journaled() >= 2);
}

/// A `soft-reboot` task is answered, then carried out (the agent of the new start
/// handshakes). The plane then loses the answer; its lease runs out and the task comes again:
/// the node answers it from its record and does not restart userspace a second time.
fn a_redelivered_task_is_answered_from_the_record(lab: &mut VmLab, vm: &Vm, node: &str, id: &str) {
    let before = handshakes(lab, id);
    let task_id = lab.plane.op(&["task", "soft-reboot", node]).ok();
    wait(vm, "the soft reboot done and the agent back", CHANGE, || {
        task(lab, node, &task_id)["state"] == "done" && handshakes(lab, id) == before + 1
    });
    let first = task(lab, node, &task_id);
    assert_eq!(first["result"]["outcome"], "succeeded", "{first}");

    lab.plane.terminate();
    let db = rusqlite::Connection::open(lab.plane.dir().join("plane.db")).unwrap();
    let restored = db
        .execute(
            "UPDATE tasks SET state = 'leased', lease_until = 0, result = NULL, finished_at = NULL WHERE id = ?1",
            [&task_id],
        )
        .unwrap();
    assert_eq!(restored, 1);
    drop(db);
    lab.plane.restart();

    wait(vm, "the task delivered again and answered", CHANGE, || task(lab, node, &task_id)["state"] == "done");
    let again = task(lab, node, &task_id);
    assert_eq!((again["deliveries"].as_i64(), &again["result"]), (Some(2), &first["result"]), "{again}");
    assert!(
        journal(lab).iter().any(|e| e.kind == "task.redeliver" && e.subject == task_id),
        "the plane journaled the second delivery"
    );
    std::thread::sleep(10 * HEARTBEAT);
    assert_eq!(handshakes(lab, id), before + 1, "userspace restarted once");
    let finished = journal(lab)
        .into_iter()
        .filter(|e| e.kind == "node-journal.task.finished" && e.data["data"]["task"] == task_id.as_str())
        .count();
    assert_eq!(finished, 1, "the node finished the task once");
}

/// The plane stops once it has served the node a root whose own unit fails. Alone, the node
/// soft-reboots into it, fails the trial, and goes back to the root it ran from its disk store.
/// The plane comes back after three minutes: the rolled-back receipt arrives, the node's whole
/// journal is there in order, `audit verify` passes, and the node runs the old root, ready.
fn a_failed_root_is_rolled_back_from_disk_while_the_plane_is_stopped(
    lab: &mut VmLab,
    vm: &mut Vm,
    node: &str,
    id: &str,
) {
    let tree = root_tree(lab, "root-tree");
    let failing = root_version(lab, &tree, 2, true);
    let seen = receipts(lab, node).len();
    let before = view(lab, node)["generation"].as_i64().unwrap();
    lab.plane.op(&["template", "add", "base", "--module", &format!("{failing},serial=2")]).ok();
    wait(vm, "the new desired state served to the node", CHANGE, || {
        view(lab, node)["served_generation"].as_i64() > Some(before)
    });
    lab.plane.terminate();
    let away = Instant::now();
    wait(vm, "the failing root entered with the plane away", AWAY, || vm.console().contains("ROOT version=2"));
    std::thread::sleep(AWAY.saturating_sub(away.elapsed()));
    lab.plane.restart();

    let r = nth_receipt(lab, vm, node, seen + 1);
    assert_eq!((r["module"].as_str(), r["outcome"].as_str()), (Some("base"), Some("rolled-back")), "{r}");
    assert!(r["reason"].as_str().unwrap_or_default().contains("root-hello.service is failed"), "{r}");
    let back = lab.wait_for(vm, node, CHANGE, |v| {
        v["phase"] == "ready"
            && v["module_digests"].as_array().is_some_and(|d| d.iter().any(|x| x == lab.digest.as_str()))
    });
    assert_eq!(back["state"], "running", "{back}");

    // Everything the node journaled arrived once and in order: its sequence numbers, in the
    // plane's journal order, rise by one from the first.
    let seqs: Vec<u64> = journal(lab)
        .iter()
        .filter(|e| e.kind.starts_with("node-journal.") && e.subject == id)
        .map(|e| e.data["seq"].as_u64().unwrap())
        .collect();
    assert!(seqs.len() > 3, "{seqs:?}");
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "the node's records out of order or missing: {seqs:?}");
    // Its reports among them: a reconcile's outcome at the generation that named root 2 (the
    // root it went back to reconciles it once the plane answers again).
    wait(vm, "the node's report of the generation that named root 2", CHANGE, || {
        journal(lab).iter().filter(|e| e.kind == "node-journal.report" && e.subject == id).any(|e| {
            let r = &e.data["data"];
            r["generation"].as_i64() > Some(before) && r["last_reconcile"].is_string()
        })
    });
    lab.plane.op(&["audit", "verify"]).ok();
    std::thread::sleep(10 * HEARTBEAT);
    assert_eq!(receipts(lab, node).len(), seen + 1, "root 2 is not tried again");
}
