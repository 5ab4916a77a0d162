//! The audit journal proves completeness and authorship, not only order: signed checkpoints
//! catch deleted and rewritten records that the hash chain alone lets through, an exported
//! checkpoint kept elsewhere catches a journal rolled back wholesale, and a node's own records
//! can never pass for the plane's.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests stop loudly on a failed setup step")]

use std::time::Duration;

use ironroot_tests::plane::{NodeKey, TestPlane, call, enroll};
use rusqlite::params;
use serde_json::{Value, json};

fn db(p: &TestPlane) -> rusqlite::Connection {
    rusqlite::Connection::open(p.dir().join("plane.db")).unwrap()
}

fn checkpoint(p: &TestPlane, args: &[&str]) -> Value {
    let mut argv = vec!["audit", "checkpoint"];
    argv.extend(args);
    serde_json::from_str(&p.op(&argv).ok()).unwrap()
}

/// Rewrites record `seq`'s actor and recomputes every later hash, as someone with write access
/// to the database (but not the journal key) would.
fn rewrite(p: &TestPlane, seq: i64) {
    let db = db(p);
    db.execute("UPDATE audit SET actor = 'operator:mallory' WHERE seq = ?1", [seq]).unwrap();
    let mut prev: String = db.query_row("SELECT prev_hash FROM audit WHERE seq = ?1", [seq], |r| r.get(0)).unwrap();
    let last: i64 = db.query_row("SELECT MAX(seq) FROM audit", [], |r| r.get(0)).unwrap();
    for s in seq..=last {
        let (time, actor, kind, subject, data): (i64, String, String, String, String) = db
            .query_row("SELECT time, actor, kind, subject, data FROM audit WHERE seq = ?1", [s], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })
            .unwrap();
        let hash = ironroot_plane::audit::hash_of(&prev, s, time, &actor, &kind, &subject, &data);
        db.execute("UPDATE audit SET prev_hash = ?1, hash = ?2 WHERE seq = ?3", params![prev, hash, s]).unwrap();
        prev = hash;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn checkpoints_anchor_the_journal_and_catch_deletion_and_rewriting() {
    let p = TestPlane::start(&["--checkpoint-interval", "1h"]);
    for _ in 0..4 {
        p.op(&["token", "create"]).ok();
    }
    let c = checkpoint(&p, &[]);
    assert_eq!(c["seq"], 4, "{c}");
    assert_eq!(checkpoint(&p, &["--export"]), c, "export prints the newest");
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(p.dir().join("journal.key")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the journal key is the plane's alone");

    p.op(&["token", "create"]).ok();
    p.op(&["token", "create"]).ok();
    let ok = p.op(&["audit", "verify"]).ok();
    assert!(ok.contains("1-4 anchored") && ok.contains("5-6 not yet anchored (2)"), "{ok}");

    // Deleting the newest records is caught by the checkpoint that names them.
    let p2 = TestPlane::start(&["--checkpoint-interval", "1h"]);
    for _ in 0..4 {
        p2.op(&["token", "create"]).ok();
    }
    checkpoint(&p2, &[]);
    db(&p2).execute("DELETE FROM audit WHERE seq >= 3", []).unwrap();
    p2.op(&["audit", "verify"]).refused(5, "records were deleted");

    // Editing a record and recomputing every later hash passes the chain, not the checkpoint.
    rewrite(&p, 2);
    let out = p.op(&["audit", "verify"]);
    out.refused(5, "record 4 is not the record a checkpoint signed");
    assert!(out.stderr.contains("rewritten"), "{}", out.stderr);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_exported_checkpoint_catches_a_journal_rolled_back_wholesale() {
    let p = TestPlane::start(&["--checkpoint-interval", "1h"]);
    for _ in 0..3 {
        p.op(&["token", "create"]).ok();
    }
    let kept = p.dir().join("kept-elsewhere.json");
    checkpoint(&p, &[]);
    std::fs::write(&kept, p.op(&["audit", "checkpoint", "--export"]).ok()).unwrap();
    let intact = p.op(&["audit", "verify", "--against", kept.to_str().unwrap()]).ok();
    assert!(intact.starts_with("audit chain intact"), "{intact}");

    // Someone removes the newest records, every checkpoint row and the checkpoint file: what is
    // left is a consistent, shorter journal, and only the copy kept elsewhere can tell.
    let db = db(&p);
    db.execute("DELETE FROM audit WHERE seq >= 2", []).unwrap();
    db.execute("DELETE FROM checkpoints", []).unwrap();
    std::fs::remove_file(p.dir().join("journal.checkpoint")).unwrap();
    assert!(p.op(&["audit", "verify"]).ok().contains("none anchored"));
    p.op(&["audit", "verify", "--against", kept.to_str().unwrap()]).refused(5, "records were deleted");

    // A checkpoint file edited to claim another head is not the plane's.
    let mut forged: Value = serde_json::from_str(&std::fs::read_to_string(&kept).unwrap()).unwrap();
    forged["seq"] = json!(1);
    std::fs::write(&kept, forged.to_string()).unwrap();
    p.op(&["audit", "verify", "--against", kept.to_str().unwrap()])
        .refused(5, "not signed by this plane's journal key");
    std::fs::write(&kept, "{\"seq\": 1}").unwrap();
    p.op(&["audit", "verify", "--against", kept.to_str().unwrap()]).refused(1, "checkpoint");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_checkpoint_is_signed_at_shutdown_and_at_its_interval() {
    let mut p = TestPlane::start(&["--checkpoint-interval", "1h"]);
    for _ in 0..3 {
        p.op(&["token", "create"]).ok();
    }
    assert_eq!(p.terminate(), 0, "SIGTERM is a clean shutdown: {}", p.log());
    let on_disk: Value = serde_json::from_str(&std::fs::read_to_string(p.dir().join("journal.checkpoint")).unwrap())
        .expect("the shutdown wrote a checkpoint");
    assert_eq!(on_disk["seq"], 3);
    p.restart();
    assert!(p.op(&["audit", "verify"]).ok().contains("1-3 anchored"));

    let p = TestPlane::start(&["--checkpoint-interval", "1s"]);
    p.op(&["token", "create"]).ok();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !p.op(&["audit", "verify"]).ok().contains("1-1 anchored") {
        assert!(std::time::Instant::now() < deadline, "no checkpoint at the interval");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn node_records_keep_to_their_own_namespace_and_alphabet() {
    let p = TestPlane::start(&[]);
    let n = enroll(&p, "claimant", &NodeKey::ed25519()).await;
    let path = format!("/v1/nodes/{}/audit", n.id);
    // A node claiming to record a state change is stored as its own record, not the plane's.
    let claim = json!({"records": [{"seq": 1, "time": 1, "kind": "node.transition", "data": {"from": "running", "to": "terminated"}}]});
    let (s, a) = call(&n.client, &p, "POST", &path, Some(claim)).await;
    assert_eq!((s, &a["accepted"]), (200, &json!(1)), "{a}");
    let own = p.journal("node-journal.node.transition");
    assert_eq!(own.len(), 1, "{own:?}");
    assert!(
        p.journal("node.transition").iter().all(|r| !r.as_str().unwrap().contains("terminated")),
        "a node's claim reads as the plane's own transition"
    );

    // Kinds outside [a-z0-9_.-]{1,64} and control characters anywhere are refused, and a
    // refused batch writes nothing (the good record before the bad one included).
    for bad in [
        json!({"seq": 3, "time": 1, "kind": "Transition"}),
        json!({"seq": 3, "time": 1, "kind": "a b"}),
        json!({"seq": 3, "time": 1, "kind": "k".repeat(65)}),
        json!({"seq": 3, "time": 1, "kind": "exec", "data": {"out": "\u{1b}[2Jcleared"}}),
        json!({"seq": 3, "time": 1, "kind": "exec", "data": {"key\nline": 1}}),
    ] {
        let batch = json!({"records": [{"seq": 2, "time": 1, "kind": "fine"}, bad]});
        let (s, body) = call(&n.client, &p, "POST", &path, Some(batch)).await;
        assert_eq!((s, body["error"].as_str()), (400, Some("bad_audit")), "{body}");
    }
    assert!(p.journal("node-journal.fine").is_empty(), "part of a refused batch was written");
    assert!(p.op(&["audit", "verify"]).ok().starts_with("audit chain intact"));
}
