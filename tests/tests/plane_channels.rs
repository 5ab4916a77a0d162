//! Release channels, role catalogs (templates), rollouts and receipts on the reference plane,
//! against real peers: modules built, signed and pushed by `ironroot-build` to a loopback
//! registry, the plane verifying them there (`serve --trust`), nodes with real certificates.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests stop loudly on a failed setup step")]

use ironroot_tests::plane::{NodeKey, PlaneNode, Shelf, TestPlane, call, enroll, heartbeat_with, receipt_record};
use serde_json::{Value, json};

fn plane(shelf: &Shelf) -> TestPlane {
    TestPlane::start(&["--trust", &shelf.trust()])
}

fn json_of(p: &TestPlane, args: &[&str]) -> Value {
    serde_json::from_str(&p.op(args).ok()).unwrap()
}

/// Where `repo:channel` stands (`channel list --json`).
fn channel(p: &TestPlane, repo: &str, channel: &str) -> Value {
    json_of(p, &["channel", "list", "--json"])
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["repo"] == repo && c["channel"] == channel)
        .cloned()
        .unwrap_or(Value::Null)
}

async fn desired(p: &TestPlane, node: &PlaneNode) -> Value {
    let (status, d) = call(&node.client, p, "GET", &format!("/v1/nodes/{}/desired", node.id), None).await;
    assert_eq!(status, 200, "{d}");
    d
}

/// An enrolled node following `template`.
async fn node_on(p: &TestPlane, name: &str, template: &str) -> PlaneNode {
    let node = enroll(p, name, &NodeKey::ed25519()).await;
    p.op(&["template", "assign", name, template]).ok();
    node
}

#[test]
fn channel_set_resolves_tags_to_signed_serials_and_refuses_what_it_cannot_verify() {
    let shelf = Shelf::start();
    let repo = shelf.repo("web");
    let v2 = shelf.publish("web", 2, "v2", Some("keys"));
    let v3 = shelf.publish("web", 3, "v3", Some("keys"));
    let rogue = shelf.publish("web", 7, "rogue", Some("other-keys"));
    shelf.publish("web", 8, "bare", None);
    shelf.publish_with_role("web", 9, "crafted", "sidecar");
    let p = plane(&shelf);

    p.op(&["channel", "set", &repo, "stable", "v2"]).ok();
    let stable = channel(&p, &repo, "stable");
    assert_eq!(
        (stable["digest"].as_str(), &stable["serial"], &stable["name"]),
        (Some(v2.as_str()), &json!(2), &json!("web"))
    );
    assert_eq!(stable["role"], "opt");

    // Each refusal names its cause and leaves the channel where it was.
    p.op(&["channel", "set", &repo, "stable", "nope"]).refused(3, "unknown_reference");
    p.op(&["channel", "set", &repo, "stable", "rogue"]).refused(3, "bad_signature");
    p.op(&["channel", "set", &repo, "stable", "bare"]).refused(3, "no signature found");
    p.op(&["channel", "set", &repo, "stable", &rogue]).refused(3, "bad_signature");
    p.op(&["channel", "set", &repo, "nope:x", "v2"]).refused(3, "bad_channel");
    // Signed by a trusted key, but of a kind no node knows: refused by what it says.
    p.op(&["channel", "set", &repo, "stable", "crafted"]).refused(3, "unknown variant `sidecar`");
    assert_eq!(channel(&p, &repo, "stable"), stable, "refusals changed nothing");

    // Forward, then promote; an older serial is refused on set and on promote.
    p.op(&["channel", "set", &repo, "candidate", "v3"]).ok();
    p.op(&["channel", "promote", &repo, "--from", "candidate", "--to", "stable"]).ok();
    assert_eq!(channel(&p, &repo, "stable")["digest"], v3.as_str());
    p.op(&["channel", "set", &repo, "old", "v2"]).ok();
    let refused = p.op(&["channel", "promote", &repo, "--from", "old", "--to", "stable"]);
    refused.refused(3, "serial_rollback");
    assert!(refused.stderr.contains("serial 3") && refused.stderr.contains("--allow-rollback"), "{}", refused.stderr);
    // The registry now serves an older serial under v3: refused the same way.
    shelf.push("web", 2, &v2, "v3");
    p.op(&["channel", "set", &repo, "stable", "v3"]).refused(3, "serial_rollback");
    assert_eq!(channel(&p, &repo, "stable")["digest"], v3.as_str());
    // An explicit rollback goes through, journaled as one.
    p.op(&["channel", "set", &repo, "stable", "v3", "--allow-rollback"]).ok();
    assert_eq!(channel(&p, &repo, "stable")["serial"], 2);
    let journal = p.journal("channel.set");
    assert!(journal.last().unwrap().as_str().unwrap().contains(r#""rollback":true"#), "{journal:?}");

    // Without trust keys, nothing is published by channel.
    let bare = TestPlane::start(&[]);
    bare.op(&["channel", "set", &repo, "stable", "v2"]).refused(3, "no_trust");
    let pinned = bare.op(&["template", "create", "t", "--module", &format!("{repo}@{v2}")]);
    pinned.refused(3, "no_trust");
}

#[tokio::test(flavor = "multi_thread")]
async fn templates_render_deterministically_and_serve_exactly_their_rendering() {
    let shelf = Shelf::start();
    let (base_repo, web_repo, extra_repo) = (shelf.repo("base"), shelf.repo("web"), shelf.repo("extra"));
    let base = shelf.publish("base", 2, "b2", Some("keys"));
    let web = shelf.publish("web", 3, "w3", Some("keys"));
    let web2 = shelf.publish("web", 2, "w2", Some("keys"));
    let unsigned = shelf.publish("web", 4, "w4", None);
    shelf.publish("extra", 1, "e1", Some("keys"));
    let p = plane(&shelf);
    p.op(&["channel", "set", &base_repo, "stable", "b2"]).ok();
    p.op(&["channel", "set", &extra_repo, "stable", "e1"]).ok();

    p.op(&[
        "template",
        "create",
        "role",
        "--module",
        &format!("{web_repo}@{web}"),
        "--module",
        &format!("{base_repo}:stable"),
    ])
    .ok();
    let shown = json_of(&p, &["template", "show", "role", "--json"]);
    let entries = shown["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 2);
    assert_eq!(
        (&entries[0]["module"], &entries[0]["channel"], &entries[0]["serial"]),
        (&json!("base"), &json!("stable"), &json!(2))
    );
    assert_eq!(
        (&entries[1]["module"], &entries[1]["digest"], &entries[1]["verified"]),
        (&json!("web"), &json!(web), &json!(true))
    );

    // The rendering is the golden file's, byte for byte, every time.
    let golden =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../control-plane/tests/golden/render.json"))
            .unwrap()
            .trim_end()
            .replace("{{REGISTRY}}", &shelf.registry.host())
            .replace("{{BASE}}", &base)
            .replace("{{WEB}}", &web);
    assert_eq!(p.op(&["template", "render", "role"]).ok(), golden);
    assert_eq!(p.op(&["template", "render", "role"]).ok(), golden);

    // A node of the template is served exactly what render --node says, bytes included.
    let node = node_on(&p, "n1", "role").await;
    let raw =
        node.client.get(p.url(&format!("/v1/nodes/{}/desired", node.id))).send().await.unwrap().text().await.unwrap();
    assert_eq!(p.op(&["template", "render", "role", "--node", "n1"]).ok(), raw);

    // Entries change one at a time.
    p.op(&["template", "add", "role", "--module", &format!("{extra_repo}:stable")]).ok();
    let names = |p: &TestPlane| -> Vec<String> {
        json_of(p, &["template", "show", "role", "--json"])["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["module"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(names(&p), ["base", "extra", "web"]);
    assert_eq!(desired(&p, &node).await["modules"].as_array().unwrap().len(), 3);
    p.op(&["template", "remove", "role", "extra"]).ok();
    assert_eq!(names(&p), ["base", "web"]);
    p.op(&["template", "remove", "role", "extra"]).refused(3, "unknown_module");
    assert_eq!(p.op(&["template", "render", "role"]).ok(), golden, "back to the same inputs, back to the same bytes");

    // Pins are verified like channels; the signed serial is what counts.
    p.op(&["template", "add", "role", "--module", &format!("{web_repo}@{unsigned}")]).refused(3, "bad_signature");
    p.op(&["template", "add", "role", "--module", &format!("{web_repo}@{web},serial=9")]).refused(3, "below 9");
    p.op(&["template", "add", "role", "--module", &format!("{web_repo}@{web2}")]).refused(3, "serial_rollback");
    p.op(&["template", "add", "role", "--module", &format!("{base_repo}:nope")]).refused(3, "unknown_channel");
    assert_eq!(p.op(&["template", "render", "role"]).ok(), golden, "refused changes changed nothing");
    p.op(&["template", "add", "role", "--module", &format!("{web_repo}@{web2}"), "--allow-rollback"]).ok();
    let d = desired(&p, &node).await;
    assert_eq!((&d["modules"][1]["digest"], &d["modules"][1]["serial"]), (&json!(web2), &json!(2)));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_promote_moves_every_node_of_the_templates_that_follow_the_channel() {
    let shelf = Shelf::start();
    let repo = shelf.repo("web");
    let v2 = shelf.publish("web", 2, "v2", Some("keys"));
    let v3 = shelf.publish("web", 3, "v3", Some("keys"));
    let p = plane(&shelf);
    p.op(&["channel", "set", &repo, "stable", "v2"]).ok();
    p.op(&["channel", "set", &repo, "candidate", "v3"]).ok();
    p.op(&["template", "create", "front", "--module", &format!("{repo}:stable")]).ok();
    p.op(&["template", "create", "back", "--module", &format!("{repo}:stable")]).ok();
    p.op(&["template", "create", "pinned", "--module", &format!("{repo}@{v2}")]).ok();
    let nodes = [node_on(&p, "a", "front").await, node_on(&p, "b", "back").await, node_on(&p, "c", "pinned").await];
    let mut before = Vec::new();
    for n in &nodes {
        let (_, hb) = heartbeat_with(&p, n, &[&v2]).await;
        assert_eq!(desired(&p, n).await["modules"][0]["digest"], v2.as_str());
        before.push(hb["generation"].as_u64().unwrap());
    }

    let out = p.op(&["channel", "promote", &repo, "--from", "candidate", "--to", "stable"]).ok();
    assert!(out.contains("template front") && out.contains("template back") && !out.contains("pinned"), "{out}");
    for (n, gen_before) in nodes[..2].iter().zip(&before) {
        let (_, hb) = heartbeat_with(&p, n, &[&v2]).await;
        assert_eq!(hb["generation"].as_u64().unwrap(), gen_before + 1, "{} is told to fetch", n.id);
        let d = desired(&p, n).await;
        assert_eq!((&d["modules"][0]["digest"], &d["modules"][0]["serial"]), (&json!(v3), &json!(3)));
    }
    let (_, hb) = heartbeat_with(&p, &nodes[2], &[&v2]).await;
    assert_eq!(hb["generation"].as_u64().unwrap(), before[2], "a pinned template does not follow the channel");
    assert_eq!(desired(&p, &nodes[2]).await["modules"][0]["digest"], v2.as_str());
    // Promoting to where the channel already is renders nothing new.
    let again = p.op(&["channel", "promote", &repo, "--from", "candidate", "--to", "stable"]).ok();
    assert!(!again.contains("rendered as revision"), "{again}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rollout_moves_in_batches_halts_on_a_rollback_and_resumes() {
    let shelf = Shelf::start();
    let repo = shelf.repo("web");
    let v2 = shelf.publish("web", 2, "v2", Some("keys"));
    let v3 = shelf.publish("web", 3, "v3", Some("keys"));
    let v4 = shelf.publish("web", 4, "v4", Some("keys"));
    let v5 = shelf.publish("web", 5, "v5", Some("keys"));
    let p = plane(&shelf);
    p.op(&["channel", "set", &repo, "stable", "v2"]).ok();
    p.op(&["template", "create", "web", "--module", &format!("{repo}:stable")]).ok();
    p.op(&["rollout", "set", "web", "--batch", "1"]).ok();
    let mut nodes = vec![node_on(&p, "r1", "web").await, node_on(&p, "r2", "web").await];
    nodes.sort_by(|a, b| a.id.cmp(&b.id)); // batches go in node id order
    let (first, second) = (&nodes[0], &nodes[1]);
    for n in &nodes {
        heartbeat_with(&p, n, &[&v2]).await;
    }
    let generation = |hb: &Value| hb["generation"].as_u64().unwrap();
    let g2 = generation(&heartbeat_with(&p, second, &[&v2]).await.1);

    // v3: the first node moves; the second keeps v2 until the first reports v3.
    p.op(&["channel", "set", &repo, "stable", "v3"]).ok();
    assert_eq!(desired(&p, first).await["modules"][0]["digest"], v3.as_str());
    let (_, hb) = heartbeat_with(&p, second, &[&v2]).await;
    assert_eq!(generation(&hb), g2, "the second batch waits");
    assert_eq!(desired(&p, second).await["modules"][0]["digest"], v2.as_str());
    let status = json_of(&p, &["rollout", "status", "web", "--json"]);
    assert_eq!(status["nodes"]["waiting"], json!([first.id]), "{status}");
    assert_eq!(status["nodes"]["pending"], json!([second.id]), "{status}");
    heartbeat_with(&p, first, &[&v3]).await;
    let (_, hb) = heartbeat_with(&p, second, &[&v2]).await;
    assert_eq!(generation(&hb), g2 + 1, "the first node reported v3: the second batch starts");
    assert_eq!(desired(&p, second).await["modules"][0]["digest"], v3.as_str());
    heartbeat_with(&p, second, &[&v3]).await;

    // v4: the first node rolls it back; the rollout halts and says who and why.
    p.op(&["channel", "set", &repo, "stable", "v4"]).ok();
    assert_eq!(desired(&p, first).await["modules"][0]["digest"], v4.as_str());
    let rolled_back =
        receipt_record(1, "web", Some(("1.3", 3, &v3)), ("1.4", 4, &v4), "rolled-back", Some("web.service failed"));
    let (s, r) = call(
        &first.client,
        &p,
        "POST",
        &format!("/v1/nodes/{}/audit", first.id),
        Some(json!({"records": [rolled_back]})),
    )
    .await;
    assert_eq!((s, &r["accepted"]), (200, &json!(1)), "{r}");
    let status = p.op(&["rollout", "status", "web"]).ok();
    assert!(
        status.contains("HALTED") && status.contains(&first.id) && status.contains("web.service failed"),
        "{status}"
    );
    heartbeat_with(&p, first, &[&v3]).await;
    let (_, hb) = heartbeat_with(&p, second, &[&v3]).await;
    assert_eq!(generation(&hb), g2 + 1, "a halted rollout moves no one");
    assert_eq!(desired(&p, second).await["modules"][0]["digest"], v3.as_str());
    // The first node is pinned to the rendering it last ran whole (v3), its generation raised:
    // its desired state names what it went back to, not what it refused.
    let pinned = desired(&p, first).await;
    assert_eq!(pinned["modules"][0]["digest"], v3.as_str(), "{pinned}");
    let receipts = json_of(&p, &["node", "receipts", &first.id, "--json"]);
    assert_eq!((&receipts[0]["outcome"], &receipts[0]["to"]["digest"]), (&json!("rolled-back"), &json!(v4)));
    assert_eq!(receipts[0]["reason"], "web.service failed");

    // Resume: the second node moves, and a committed receipt completes it.
    p.op(&["rollout", "resume", "web"]).ok();
    p.op(&["rollout", "resume", "web"]).refused(3, "not_halted");
    let (_, hb) = heartbeat_with(&p, second, &[&v3]).await;
    assert_eq!(generation(&hb), g2 + 2);
    assert_eq!(desired(&p, second).await["modules"][0]["digest"], v4.as_str());
    let committed = receipt_record(1, "web", Some(("1.3", 3, &v3)), ("1.4", 4, &v4), "committed", None);
    let (s, _) = call(
        &second.client,
        &p,
        "POST",
        &format!("/v1/nodes/{}/audit", second.id),
        Some(json!({"records": [committed]})),
    )
    .await;
    assert_eq!(s, 200);
    let status = json_of(&p, &["rollout", "status", "web", "--json"]);
    assert_eq!((&status["counts"]["done"], &status["counts"]["failed"]), (&json!(1), &json!(1)), "{status}");
    assert!(status["halted"].is_null(), "{status}");

    // v5: the node refuses it at verification, before its config is read (no `to`): the
    // receipt names the digest it was asked for, and that halts the rollout too.
    p.op(&["channel", "set", &repo, "stable", "v5"]).ok();
    let mover = if desired(&p, first).await["modules"][0]["digest"] == v5.as_str() { first } else { second };
    let mut refused = receipt_record(2, "web", Some(("1.4", 4, &v4)), ("1.5", 5, &v5), "failed", Some("refused"));
    refused["data"].as_object_mut().unwrap().remove("to");
    refused["data"]["wanted"] = json!(v5);
    let path = format!("/v1/nodes/{}/audit", mover.id);
    let (s, r) = call(&mover.client, &p, "POST", &path, Some(json!({"records": [refused]}))).await;
    assert_eq!((s, &r["accepted"]), (200, &json!(1)), "{r}");
    let status = json_of(&p, &["rollout", "status", "web", "--json"]);
    assert!(status["halted"].to_string().contains(&mover.id), "{status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_receipt_that_does_not_parse_is_refused_and_nothing_of_its_batch_is_kept() {
    let p = TestPlane::start(&[]);
    let node = enroll(&p, "rx", &NodeKey::ed25519()).await;
    let digest = format!("sha256:{}", "cd".repeat(32));
    let good = receipt_record(1, "web", None, ("1.1", 1, &digest), "committed", None);
    let mut bad = receipt_record(2, "web", None, ("1.2", 2, &digest), "committed", None);
    bad["data"]["outcome"] = json!("applied");
    let path = format!("/v1/nodes/{}/audit", node.id);
    let (s, r) = call(&node.client, &p, "POST", &path, Some(json!({"records": [good.clone(), bad]}))).await;
    assert_eq!((s, r["error"].as_str()), (400, Some("bad_audit")), "{r}");
    assert!(r["message"].as_str().unwrap().contains("record 2: receipt does not parse"), "{r}");
    let mut nameless = receipt_record(3, "web", None, ("1.3", 3, &digest), "failed", None);
    nameless["data"]["module"] = json!("../etc");
    let (s, r) = call(&node.client, &p, "POST", &path, Some(json!({"records": [nameless]}))).await;
    assert_eq!(s, 400, "{r}");
    let mut parts = receipt_record(4, "web", None, ("1.4", 4, &digest), "committed", None);
    parts["data"]["steps_ms"] = json!({"verify": 1, "Gate-1": 2});
    let (s, r) = call(&node.client, &p, "POST", &path, Some(json!({"records": [parts]}))).await;
    assert!(s == 400 && r["message"].as_str().unwrap().contains("steps_ms"), "{s} {r}");
    assert_eq!(json_of(&p, &["node", "receipts", "rx", "--json"]), json!([]));
    assert!(p.journal("node-journal.receipt").is_empty(), "nothing of a refused batch is journaled");

    let (s, _) = call(&node.client, &p, "POST", &path, Some(json!({"records": [good.clone(), good]}))).await;
    assert_eq!(s, 200);
    let receipts = json_of(&p, &["node", "receipts", "rx", "--json"]);
    assert_eq!(receipts.as_array().unwrap().len(), 1, "{receipts}");
    assert_eq!(
        (&receipts[0]["seq"], &receipts[0]["outcome"], &receipts[0]["transaction"]),
        (&json!(1), &json!("committed"), &json!("tx-1"))
    );
    let listed = p.op(&["node", "receipts", "rx"]).ok();
    assert!(listed.contains("committed") && listed.contains("web") && listed.contains("-> 1.1"), "{listed}");
}

/// A node that took the new rendering (it was served it) and reports neither it nor a receipt
/// by the template's trial deadline and the grace — a root whose agent never came up, a node
/// that went dark mid-change — fails and halts the rollout, as a rollback would; a node never
/// served the rendering is not overdue.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_that_takes_a_rendering_and_never_reports_it_halts_the_rollout_after_the_deadline() {
    let shelf = Shelf::start();
    let repo = shelf.repo("web");
    let v2 = shelf.publish("web", 2, "v2", Some("keys"));
    let v3 = shelf.publish("web", 3, "v3", Some("keys"));
    let p = TestPlane::start(&["--trust", &shelf.trust(), "--heartbeat-interval", "3s", "--rollout-grace", "2s"]);
    p.op(&["channel", "set", &repo, "stable", "v2"]).ok();
    p.op(&["template", "create", "web", "--module", &format!("{repo}:stable"), "--trial-deadline", "30"]).ok();
    let (taker, quiet) = (node_on(&p, "o1", "web").await, node_on(&p, "o2", "web").await);
    for n in [&taker, &quiet] {
        heartbeat_with(&p, n, &[&v2]).await;
    }

    p.op(&["channel", "set", &repo, "stable", "v3"]).ok();
    let taken = std::time::Instant::now();
    assert_eq!(desired(&p, &taker).await["modules"][0]["digest"], v3.as_str());
    let status = loop {
        let status = json_of(&p, &["rollout", "status", "web", "--json"]);
        if !status["halted"].is_null() {
            break status;
        }
        assert!(taken.elapsed() < std::time::Duration::from_secs(120), "never halted: {status}");
        // The taker goes on heartbeating with what it had: it is alive, just not on v3.
        heartbeat_with(&p, &taker, &[&v2]).await;
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    };
    assert!(taken.elapsed() >= std::time::Duration::from_secs(32), "not before the deadline and the grace");
    assert_eq!(status["halted"]["node"], taker.id.as_str(), "{status}");
    let reason = status["halted"]["reason"].as_str().unwrap();
    assert!(reason.contains("not reported within") && reason.contains("trial deadline 30 s + 2 s"), "{reason}");
    assert_eq!(status["nodes"]["failed"], json!([taker.id]), "{status}");
    assert_eq!(status["nodes"]["waiting"], json!([quiet.id]), "never served v3, so not overdue: {status}");
    // Pinned to the rendering it last ran whole.
    assert_eq!(desired(&p, &taker).await["modules"][0]["digest"], v2.as_str());
    let journal = p.op(&["audit", "list"]).ok();
    assert!(journal.contains("rollout.halt") && journal.contains("overdue"), "{journal}");
}

/// A registry behind TLS under its own CA: a plane not given that CA cannot publish from it,
/// saying why, and changes nothing; `serve --registry-ca` makes
/// the same `channel set` go through.
#[test]
fn the_plane_reads_a_tls_registry_only_with_its_ca() {
    let shelf = Shelf::start_with(ironroot_tests::registry::Auth::Tls);
    let repo = shelf.repo("web");
    let v2 = shelf.publish("web", 2, "v2", Some("keys"));
    let ca = shelf.registry.ca_pem.clone().unwrap().to_string_lossy().into_owned();

    let untrusting = TestPlane::start(&["--trust", &shelf.trust()]);
    let refused = untrusting.op(&["channel", "set", &repo, "stable", "v2"]);
    assert_ne!(refused.code, 0, "{refused:?}");
    // Without a CA a loopback registry is read over plain HTTP, which this one refuses.
    assert!(
        refused.stderr.contains(&repo) && refused.stderr.contains("HTTP request to an HTTPS server"),
        "the registry and the failure are named: {}",
        refused.stderr
    );
    assert!(json_of(&untrusting, &["channel", "list", "--json"]).as_array().unwrap().is_empty(), "nothing published");

    let trusting = TestPlane::start(&["--trust", &shelf.trust(), "--registry-ca", &ca]);
    trusting.op(&["channel", "set", &repo, "stable", "v2"]).ok();
    let stable = channel(&trusting, &repo, "stable");
    assert_eq!((stable["digest"].as_str(), &stable["serial"]), (Some(v2.as_str()), &json!(2)), "{stable}");
}

/// `serve --registry-alias NAME=ADDR`: nodes know the registry as NAME (here `localhost:PORT`,
/// which the registry's certificate does not name), the plane reads it at ADDR (127.0.0.1:PORT,
/// which it does: TLS is checked against the address read); channels and desired state keep
/// NAME.
#[test]
fn the_plane_reads_a_registry_at_its_alias_and_serves_the_nodes_name() {
    let shelf = Shelf::start_with(ironroot_tests::registry::Auth::Tls);
    let v2 = shelf.publish("web", 2, "v2", Some("keys"));
    let ca = shelf.registry.ca_pem.clone().unwrap().to_string_lossy().into_owned();
    let addr = shelf.repo("web").split_once('/').unwrap().0.to_owned();
    let name = addr.replace("127.0.0.1", "localhost");
    let repo = shelf.repo("web").replacen(&addr, &name, 1);

    let plain = TestPlane::start(&["--trust", &shelf.trust(), "--registry-ca", &ca]);
    let refused = plain.op(&["channel", "set", &repo, "stable", "v2"]);
    assert!(refused.code != 0 && refused.stderr.contains(&repo), "read as {name}, refused: {}", refused.stderr);
    assert!(refused.stderr.to_lowercase().contains("certificate"), "for its certificate: {}", refused.stderr);

    let alias = format!("{name}={addr}");
    let p = TestPlane::start(&["--trust", &shelf.trust(), "--registry-ca", &ca, "--registry-alias", &alias]);
    let missing = p.op(&["channel", "set", &repo, "stable", "v9"]);
    assert!(
        missing.stderr.contains(&format!("{repo}:v9 (read at {addr})")) && missing.stderr.contains("no such tag"),
        "a refusal names both: {}",
        missing.stderr
    );
    p.op(&["channel", "set", &repo, "stable", "v2"]).ok();
    let stable = channel(&p, &repo, "stable");
    assert_eq!((stable["digest"].as_str(), &stable["serial"]), (Some(v2.as_str()), &json!(2)), "{stable}");
    p.op(&["template", "create", "t", "--module", &format!("{repo}:stable")]).ok();
    let rendered = json_of(&p, &["template", "render", "t"]);
    assert!(rendered.to_string().contains(&format!("{repo}@{v2}")), "nodes are served the name they know: {rendered}");

    for (alias, why) in [("localhost:1", "is not NAME=HOST:PORT"), ("localhost:1=http://x", "is not a registry host")] {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new(ironroot_tests::cli::binary_named("ironroot-plane"))
            .args(["serve", "--state"])
            .arg(dir.path())
            .args(["--listen", "127.0.0.1:0", "--registry-alias", alias])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.code() == Some(2) && stderr.contains(why), "{alias}: {stderr}");
    }
}
