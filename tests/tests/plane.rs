//! The reference plane against real clients: the `ironroot-plane` binary on 127.0.0.1:0, real
//! TLS, real certificates, real CSRs. The happy path end to end; every refusal with a clear
//! error and a journal record; silence detection; durability across SIGKILL.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests stop loudly on a failed setup step")]

use std::time::Duration;

use ironroot_tests::plane::{NodeKey, TestPlane, call, enroll, enroll_raw, report};
use serde_json::{Value, json};

/// A `ready` heartbeat from `client` for node `id`.
async fn heartbeat(client: &reqwest::Client, p: &TestPlane, id: &str) -> (u16, Value) {
    call(client, p, "POST", &format!("/v1/nodes/{id}/heartbeat"), Some(report("ready"))).await
}

#[tokio::test(flavor = "multi_thread")]
async fn happy_path_from_token_to_task_result() {
    let p = TestPlane::start(&[]);
    let key = NodeKey::ed25519();
    let token = p.op(&["token", "create", "--node", "rack1-n01"]).ok();
    // The CSR asks for extra names and a CA role; the certificate carries none of them.
    let csr = key.csr(&["admin.example", "urn:ironroot:operator:admin"]);
    let (status, body) = enroll_raw(&p, &json!({"token": token, "csr": csr, "identity": {"name": "rack1-n01"}})).await;
    assert_eq!(status, 200, "{body}");
    let id = body["node_id"].as_str().unwrap().to_owned();
    let chain = body["certificate"].as_str().unwrap();
    let first = rustls_pem_first(chain);
    let text = openssl_text(&first);
    assert!(text.contains(&format!("URI:urn:ironroot:node:{id}")), "{text}");
    assert!(!text.contains("admin.example") && !text.contains("operator") && !text.contains("CA:TRUE"), "{text}");
    assert!(text.contains("TLS Web Client Authentication"), "{text}");

    let node = p.with_identity(chain, &key.key_pem());
    let (s, r) = call(&node, &p, "POST", &format!("/v1/nodes/{id}/handshake"), Some(report("fetch"))).await;
    assert_eq!((s, r["state"].as_str()), (200, Some("bootstrapping")), "{r}");
    for _ in 0..2 {
        let (s, r) = call(&node, &p, "POST", &format!("/v1/nodes/{id}/heartbeat"), Some(report("ready"))).await;
        assert_eq!((s, r["state"].as_str()), (200, Some("running")), "{r}");
    }
    let shown: Value = serde_json::from_str(&p.op(&["node", "show", &id, "--json"]).ok()).unwrap();
    assert_eq!(shown["state"], "running");
    assert_eq!(shown["heartbeats"], 2);
    assert_eq!(shown["phase_timings_ms"]["enroll"], 40);

    let digest = format!("sha256:{}", "cd".repeat(32));
    p.op(&["template", "create", "base", "--module", &format!("127.0.0.1:5000/ironroot/base@{digest},serial=7")]).ok();
    p.op(&["template", "assign", "rack1-n01", "base"]).ok();
    let (s, d) = call(&node, &p, "GET", &format!("/v1/nodes/{id}/desired"), None).await;
    assert_eq!(s, 200, "{d}");
    assert_eq!(d["generation"], 2);
    assert_eq!(d["modules"][0]["digest"], digest.as_str());
    assert_eq!(d["modules"][0]["serial"], 7);
    let (_, hb) = call(&node, &p, "POST", &format!("/v1/nodes/{id}/heartbeat"), Some(report("ready"))).await;
    assert_eq!(hb["generation"], 2, "the heartbeat tells the node to fetch");

    // A long-poll that is waiting when the task is enqueued gets it.
    let waiter = {
        let (node, url) = (node.clone(), p.url(&format!("/v1/nodes/{id}/tasks?wait=20")));
        tokio::spawn(async move { node.get(url).send().await.unwrap().json::<Value>().await.unwrap() })
    };
    // Enqueue only once the plane shows the long-poll waiting, so the wake-up is what answers it.
    wait_for_long_polls(&p, &id, 1).await;
    let task_id = p.op(&["task", "exec", "rack1-n01", "--", "uname", "-r"]).ok();
    let task = tokio::time::timeout(Duration::from_secs(10), waiter).await.expect("long-poll answered").unwrap();
    assert_eq!(task["id"], task_id.as_str());
    wait_for_long_polls(&p, &id, 0).await;
    assert_eq!(task["spec"], json!({"kind": "exec", "argv": ["uname", "-r"]}));
    // A reason that would drive the operator's terminal is refused, and records nothing.
    let escape = json!({"outcome": "failed", "reason": "clear\u{1b}[2J"});
    let (s, r) = call(&node, &p, "POST", &format!("/v1/tasks/{task_id}/result"), Some(escape)).await;
    assert_eq!((s, r["error"].as_str()), (400, Some("bad_result")), "{r}");
    let result = json!({"outcome": "succeeded", "exit_code": 0, "output": "6.12.0"});
    let (s, r) = call(&node, &p, "POST", &format!("/v1/tasks/{task_id}/result"), Some(result.clone())).await;
    assert_eq!((s, &r["recorded"]), (200, &json!(true)));
    let (s, r) = call(&node, &p, "POST", &format!("/v1/tasks/{task_id}/result"), Some(result)).await;
    assert_eq!((s, &r["recorded"]), (200, &json!(false)), "a repeated result is idempotent");
    let tasks: Value = serde_json::from_str(&p.op(&["task", "list", "rack1-n01"]).ok()).unwrap();
    assert_eq!(tasks[0]["state"], "done");
    assert_eq!(tasks[0]["result"]["output"], "6.12.0");

    // Node audit batches are journaled once per sequence number, under the node's own namespace.
    let batch = json!({"records": [{"seq": 1, "time": 1, "kind": "exec", "data": {"argv": ["uname"]}}, {"seq": 2, "time": 2, "kind": "exec"}]});
    let (_, a) = call(&node, &p, "POST", &format!("/v1/nodes/{id}/audit"), Some(batch.clone())).await;
    assert_eq!(a["accepted"], 2);
    let (_, a) = call(&node, &p, "POST", &format!("/v1/nodes/{id}/audit"), Some(batch)).await;
    assert_eq!(a["accepted"], 0);
    assert_eq!(p.journal("node-journal.exec").len(), 2);

    let verified = p.op(&["audit", "verify"]).ok();
    assert!(verified.starts_with("audit chain intact"), "{verified}");
}

fn rustls_pem_first(chain: &str) -> String {
    let end = "-----END CERTIFICATE-----";
    chain.split_inclusive(end).next().unwrap().trim().to_owned() + "\n"
}

fn openssl_text(pem: &str) -> String {
    use std::io::Write as _;
    let mut child = std::process::Command::new(ironroot_tests::tools::tool("openssl"))
        .args(["x509", "-noout", "-text"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(pem.as_bytes()).unwrap();
    String::from_utf8_lossy(&child.wait_with_output().unwrap().stdout).into_owned()
}

/// Asserts a refusal: status, error code, and a journal record of kind `refused.<what>`.
fn refused(p: &TestPlane, (status, body): (u16, Value), want_status: u16, code: &str, what: &str) {
    assert_eq!(status, want_status, "{code}: {body}");
    assert_eq!(body["error"], code, "{body}");
    assert!(!body["message"].as_str().unwrap_or("").is_empty(), "{body}");
    let records = p.journal(&format!("refused.{what}"));
    assert!(
        records.iter().any(|r| r.as_str().unwrap_or("").contains(code)),
        "no journal record for {code}: {records:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn every_refusal_is_clear_and_journaled() {
    let p = TestPlane::start(&["--enroll-burst", "1000"]);
    let anon = p.anonymous();

    // Malformed JSON, and a body over the cap.
    let r = anon
        .post(p.url("/v1/enroll"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    refused(&p, (r.status().as_u16(), r.json().await.unwrap()), 400, "bad_json", "enroll");
    let huge = json!({"token": "x".repeat(100 * 1024), "csr": ""});
    refused(&p, enroll_raw(&p, &huge).await, 413, "body_too_large", "enroll");

    // A CSR whose self-signature does not verify.
    let key = NodeKey::ed25519();
    let csr = key.csr(&[]);
    let mut der = rustls_pki_der(&csr);
    let last = der.len() - 3;
    der[last] ^= 0x55;
    let bad = pem_encode("CERTIFICATE REQUEST", &der);
    let token = p.op(&["token", "create"]).ok();
    refused(&p, enroll_raw(&p, &json!({"token": token, "csr": bad})).await, 400, "bad_csr", "enroll");
    // The token was not consumed by a refused enrollment.
    let (s, _) = enroll_raw(&p, &json!({"token": token, "csr": key.csr(&[]), "identity": {"name": "n-ok"}})).await;
    assert_eq!(s, 200);
    // Replayed.
    refused(&p, enroll_raw(&p, &json!({"token": token, "csr": key.csr(&[])})).await, 401, "token_used", "enroll");
    // Expired.
    let short = p.op(&["token", "create", "--ttl", "1s"]).ok();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    refused(&p, enroll_raw(&p, &json!({"token": short, "csr": key.csr(&[])})).await, 401, "token_expired", "enroll");
    // Unknown, and bound to another identity.
    refused(
        &p,
        enroll_raw(&p, &json!({"token": "irt_nope", "csr": key.csr(&[])})).await,
        401,
        "token_unknown",
        "enroll",
    );
    let bound = p.op(&["token", "create", "--node", "n-bound", "--mac", "52:54:00:12:34:56"]).ok();
    let wrong =
        json!({"token": bound, "csr": key.csr(&[]), "identity": {"name": "n-bound", "mac": "52:54:00:00:00:01"}});
    refused(&p, enroll_raw(&p, &wrong).await, 403, "identity_mismatch", "enroll");
    // An RSA key is not accepted.
    let rsa_csr = openssl_rsa_csr();
    let t = p.op(&["token", "create"]).ok();
    refused(&p, enroll_raw(&p, &json!({"token": t, "csr": rsa_csr})).await, 400, "bad_csr", "enroll");

    // The same token in two concurrent enrollments: exactly one succeeds.
    let t = p.op(&["token", "create"]).ok();
    let (k1, k2) = (NodeKey::ed25519(), NodeKey::p256());
    let b1 = json!({"token": t, "csr": k1.csr(&[]), "identity": {"name": "race-1"}});
    let b2 = json!({"token": t, "csr": k2.csr(&[]), "identity": {"name": "race-2"}});
    let (r1, r2) = tokio::join!(enroll_raw(&p, &b1), enroll_raw(&p, &b2));
    let mut statuses = [r1.0, r2.0];
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 401], "{r1:?} {r2:?}");

    // A second enrollment for an active node is refused until the operator re-provisions it.
    let a = enroll(&p, "n-active", &NodeKey::ed25519()).await;
    let t = p.op(&["token", "create", "--node", "n-active"]).ok();
    let again = json!({"token": t, "csr": NodeKey::ed25519().csr(&[]), "identity": {"name": "n-active"}});
    refused(&p, enroll_raw(&p, &again).await, 409, "already_enrolled", "enroll");

    // Node certificates: on another node's path, as an operator, and after revocation.
    let b = enroll(&p, "n-other", &NodeKey::ed25519()).await;
    refused(&p, heartbeat(&a.client, &p, &b.id).await, 403, "wrong_node", "heartbeat");
    refused(&p, call(&a.client, &p, "GET", "/v1/operator/nodes", None).await, 403, "wrong_certificate_kind", "nodes");
    refused(&p, heartbeat(&p.operator_client(), &p, &a.id).await, 403, "wrong_certificate_kind", "heartbeat");
    refused(&p, heartbeat(&anon, &p, &a.id).await, 401, "no_client_certificate", "heartbeat");
    assert_eq!(heartbeat(&a.client, &p, &a.id).await.0, 200);
    p.op(&["node", "revoke", &a.id]).ok();
    refused(&p, heartbeat(&a.client, &p, &a.id).await, 403, "revoked", "heartbeat");
    // Re-provisioned, it enrolls again; the old certificate stays dead.
    p.op(&["node", "reprovision", &a.id]).ok();
    let t = p.op(&["token", "create", "--node", "n-active"]).ok();
    let (s, body) =
        enroll_raw(&p, &json!({"token": t, "csr": NodeKey::ed25519().csr(&[]), "identity": {"name": "n-active"}}))
            .await;
    assert_eq!((s, body["node_id"].as_str()), (200, Some(a.id.as_str())), "{body}");
    assert_eq!(heartbeat(&a.client, &p, &a.id).await.0, 403);
    let _ = &a.cert;

    // A client certificate from another CA never gets past TLS, and the attempt is journaled.
    let (foreign_cert, foreign_key) = foreign_node_cert(&b.id);
    let foreign = p.with_identity(&foreign_cert, &foreign_key);
    let (s, e) = heartbeat(&foreign, &p, &b.id).await;
    assert_eq!(s, 0, "a foreign certificate was accepted: {e}");
    p.wait_journal("refused.tls", Duration::from_secs(10));

    // A name full of SQL metacharacters is stored and returned verbatim.
    let evil = "x'); DROP TABLE nodes;-- \"%_\\";
    let n = enroll(&p, evil, &NodeKey::ed25519()).await;
    let shown: Value = serde_json::from_str(&p.op(&["node", "show", &n.id, "--json"]).ok()).unwrap();
    assert_eq!(shown["name"], evil);
    assert!(p.op(&["node", "list"]).ok().contains("n-other"));

    // An invalid lifecycle move is refused with the current state and reason.
    let out = p.op(&["node", "state", &b.id, "provisioning"]);
    assert_eq!(out.code, 3, "refused by the plane: {}", out.stderr);
    assert!(out.stderr.contains("node is bootstrapping; provisioning is not reachable"), "{}", out.stderr);
    assert!(p.op(&["audit", "verify"]).ok().starts_with("audit chain intact"));
}

fn rustls_pki_der(pem: &str) -> Vec<u8> {
    use base64::Engine as _;
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD.decode(body).unwrap()
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b64.as_bytes().chunks(64).map(|c| std::str::from_utf8(c).unwrap()).collect();
    format!("-----BEGIN {label}-----\n{}\n-----END {label}-----\n", lines.join("\n"))
}

fn openssl_rsa_csr() -> String {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("rsa.key");
    let ok = std::process::Command::new(ironroot_tests::tools::tool("openssl"))
        .args(["req", "-new", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=rsa", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(dir.path().join("rsa.csr"))
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap()
        .success();
    assert!(ok, "openssl req");
    std::fs::read_to_string(dir.path().join("rsa.csr")).unwrap()
}

/// A certificate naming node `id`, signed by a CA the plane has never seen.
fn foreign_node_cert(id: &str) -> (String, String) {
    let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut leaf = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    leaf.subject_alt_names = vec![rcgen::SanType::URI(format!("urn:ironroot:node:{id}").try_into().unwrap())];
    leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    (leaf.signed_by(&key, &issuer).unwrap().pem(), key.serialize_pem())
}

#[tokio::test(flavor = "multi_thread")]
async fn enrollment_attempts_are_rate_limited() {
    let p = TestPlane::start(&["--enroll-burst", "5", "--enroll-rate", "0.1"]);
    let mut codes = Vec::new();
    for _ in 0..8 {
        codes.push(enroll_raw(&p, &json!({"token": "irt_spam", "csr": ""})).await.0);
    }
    assert_eq!(codes, [401, 401, 401, 401, 401, 429, 429, 429], "burst of 5, then refused");
    refused(&p, enroll_raw(&p, &json!({"token": "irt_spam", "csr": ""})).await, 429, "rate_limited", "enroll");
}

/// Waits until the plane shows exactly `n` task long-polls waiting for node `id`.
async fn wait_for_long_polls(p: &TestPlane, id: &str, n: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let shown: Value = serde_json::from_str(&p.op(&["node", "show", id, "--json"]).ok()).unwrap();
        if shown["long_polls"] == n {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "node {id} never had {n} long-polls waiting: {shown}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn node_state(p: &TestPlane, id: &str) -> String {
    let shown: Value = serde_json::from_str(&p.op(&["node", "show", id, "--json"]).ok()).unwrap();
    shown["state"].as_str().unwrap_or("").to_owned()
}

async fn wait_for_state(p: &TestPlane, id: &str, want: &str, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let s = node_state(p, id);
        if s == want {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "node {id} is {s}, never became {want}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_node_becomes_suspect_then_silent() {
    let p = TestPlane::start(&["--heartbeat-interval", "1s", "--suspect-after", "2s", "--silent-after", "4s"]);
    let n = enroll(&p, "quiet", &NodeKey::ed25519()).await;
    let (s, _) = call(&n.client, &p, "POST", &format!("/v1/nodes/{}/handshake", n.id), Some(report("ready"))).await;
    assert_eq!(s, 200);
    assert_eq!(node_state(&p, &n.id), "running");
    wait_for_state(&p, &n.id, "suspect", Duration::from_secs(10)).await;
    wait_for_state(&p, &n.id, "silent", Duration::from_secs(10)).await;
    let sweeps: Vec<_> =
        p.journal("node.transition").into_iter().filter(|r| r.as_str().unwrap_or("").contains("plane:sweep")).collect();
    assert_eq!(sweeps.len(), 2, "{sweeps:?}");
    // A heartbeat brings it back.
    let (_, r) = call(&n.client, &p, "POST", &format!("/v1/nodes/{}/heartbeat", n.id), Some(report("ready"))).await;
    assert_eq!(r["state"], "running");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unfinished_lease_is_redelivered() {
    let p = TestPlane::start(&["--task-lease", "1s"]);
    let n = enroll(&p, "worker", &NodeKey::p256()).await;
    let task = p.op(&["task", "vet", "worker"]).ok();
    let path = format!("/v1/nodes/{}/tasks", n.id);
    let (_, first) = call(&n.client, &p, "GET", &path, None).await;
    assert_eq!(first["id"], task.as_str());
    // Leased: nothing else to hand out right now.
    let r = n.client.get(p.url(&path)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 204);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_, again) = call(&n.client, &p, "GET", &path, None).await;
    assert_eq!(again["id"], task.as_str(), "an expired lease is redelivered");
    let tasks: Value = serde_json::from_str(&p.op(&["task", "list", "worker"]).ok()).unwrap();
    assert_eq!(tasks[0]["deliveries"], 2);
    assert_eq!(p.journal("task.redeliver").len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_task_carries_its_deadline_and_a_cancelled_one_is_not_delivered() {
    let p = TestPlane::start(&[]);
    let n = enroll(&p, "busy", &NodeKey::ed25519()).await;
    let path = format!("/v1/nodes/{}/tasks", n.id);
    let before = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let update = p.op(&["task", "module-update", "busy", "--deadline", "120"]).ok();
    let (_, leased) = call(&n.client, &p, "GET", &path, None).await;
    assert_eq!((leased["id"].as_str(), &leased["spec"]), (Some(update.as_str()), &json!({"kind": "module-update"})));
    let deadline = leased["deadline"].as_u64().expect("the deadline is delivered");
    assert!((before + 119..=before + 122).contains(&deadline), "{leased}");
    p.op(&["task", "module-update", "busy", "--deadline", "0"]).refused(3, "deadline_s 0 is not 1 to 86400 seconds");

    // A queued task cancelled: never delivered, its result `cancelled`; a leased one too, and
    // the node's late answer changes nothing.
    let reboot = p.op(&["task", "reboot", "busy"]).ok();
    assert_eq!(p.op(&["task", "cancel", &reboot]).ok(), format!("{reboot} cancelled"));
    let r = n.client.get(p.url(&path)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 204, "the cancelled reboot is not handed out");
    assert_eq!(p.op(&["task", "cancel", &update]).ok(), format!("{update} cancelled"));
    let late = json!({"outcome": "succeeded", "output": "ok"});
    let (s, r) = call(&n.client, &p, "POST", &format!("/v1/tasks/{update}/result"), Some(late)).await;
    assert_eq!((s, &r["recorded"]), (200, &json!(false)));
    p.op(&["task", "cancel", &update]).refused(3, "already finished");
    let tasks: Value = serde_json::from_str(&p.op(&["task", "list", "busy"]).ok()).unwrap();
    for t in tasks.as_array().unwrap() {
        assert_eq!((t["state"].as_str(), t["result"]["outcome"].as_str()), (Some("done"), Some("cancelled")), "{t}");
    }
    assert_eq!(p.journal("task.cancel").len(), 2);

    // A template's trial deadline reaches its nodes' desired state; out of range is refused whole.
    let digest = format!("sha256:{}", "ab".repeat(32));
    let module = format!("127.0.0.1:5000/ironroot/base@{digest},serial=1");
    p.op(&["template", "create", "slow", "--module", &module, "--trial-deadline", "10"]).refused(3, "30 to 3600");
    p.op(&["template", "show", "slow"]).refused(3, "unknown_template");
    p.op(&["template", "create", "slow", "--module", &module, "--trial-deadline", "900"]).ok();
    p.op(&["template", "assign", "busy", "slow"]).ok();
    let (_, d) = call(&n.client, &p, "GET", &format!("/v1/nodes/{}/desired", n.id), None).await;
    assert_eq!(d["trial_deadline_s"], 900, "{d}");
}

#[tokio::test(flavor = "multi_thread")]
async fn acknowledged_writes_survive_kill_9() {
    let mut p = TestPlane::start(&["--enroll-burst", "100"]);
    let mut nodes = Vec::new();
    for i in 0..4 {
        nodes.push(enroll(&p, &format!("durable-{i}"), &NodeKey::ed25519()).await);
    }
    let mut tasks = Vec::new();
    for n in &nodes {
        for _ in 0..5 {
            tasks.push((n.id.clone(), p.op(&["task", "exec", &n.id, "--", "true"]).ok()));
        }
    }
    // Load: every node heartbeats, submits audit records and finishes tasks as fast as it can;
    // each loop remembers what the plane acknowledged.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let acknowledged = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut loops = Vec::new();
    for n in &nodes {
        let (client, id, url, stop) = (n.client.clone(), n.id.clone(), p.url(""), std::sync::Arc::clone(&stop));
        let acknowledged = std::sync::Arc::clone(&acknowledged);
        loops.push(tokio::spawn(async move {
            let (mut beats, mut audited, mut results) = (0u64, Vec::new(), Vec::new());
            let mut seq = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let ok = |r: Result<reqwest::Response, reqwest::Error>| r.ok().filter(|r| r.status().is_success());
                if ok(client.post(format!("{url}/v1/nodes/{id}/heartbeat")).json(&report("ready")).send().await)
                    .is_some()
                {
                    beats += 1;
                    acknowledged.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                seq += 1;
                let batch = json!({"records": [{"seq": seq, "time": seq, "kind": "load", "data": {"n": seq}}]});
                if ok(client.post(format!("{url}/v1/nodes/{id}/audit")).json(&batch).send().await).is_some() {
                    audited.push(seq);
                }
                if let Some(r) = ok(client.get(format!("{url}/v1/nodes/{id}/tasks")).send().await)
                    && r.status().as_u16() == 200
                    && let Ok(task) = r.json::<Value>().await
                {
                    let tid = task["id"].as_str().unwrap_or("").to_owned();
                    let res = client
                        .post(format!("{url}/v1/tasks/{tid}/result"))
                        .json(&json!({"outcome": "succeeded", "exit_code": 0, "output": "ok"}))
                        .send()
                        .await;
                    if ok(res).is_some() {
                        results.push(tid);
                    }
                }
            }
            (id, beats, audited, results)
        }));
    }
    // Kill once the load is real: enough acknowledged writes that losing one would show.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while acknowledged.load(std::sync::atomic::Ordering::SeqCst) < 40 {
        assert!(tokio::time::Instant::now() < deadline, "the load never reached 40 acknowledged heartbeats");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    p.kill9_and_restart();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut acked = Vec::new();
    for l in loops {
        acked.push(l.await.unwrap());
    }
    let journal = p.op(&["audit", "list"]).ok();
    let mut total_beats = 0;
    for (id, beats, audited, results) in &acked {
        total_beats += beats;
        let shown: Value = serde_json::from_str(&p.op(&["node", "show", id, "--json"]).ok()).unwrap();
        assert!(
            shown["heartbeats"].as_u64().unwrap() >= *beats,
            "{id}: {} stored, {beats} acknowledged",
            shown["heartbeats"]
        );
        for seq in audited {
            let needle = format!("\"seq\":{seq}}}");
            assert!(
                journal
                    .lines()
                    .any(|l| l.contains(id.as_str()) && l.contains("node-journal.load") && l.contains(&needle)),
                "{id}: audit record {seq} lost"
            );
        }
        let listed: Value = serde_json::from_str(&p.op(&["task", "list", id]).ok()).unwrap();
        for tid in results {
            let t = listed.as_array().unwrap().iter().find(|t| t["id"] == tid.as_str()).unwrap();
            assert_eq!(t["state"], "done", "{id}: acknowledged result for {tid} lost");
        }
    }
    assert!(total_beats >= 40, "the load was too light to mean anything: {total_beats} heartbeats");
    assert!(p.op(&["audit", "verify"]).ok().starts_with("audit chain intact"));
}

#[tokio::test(flavor = "multi_thread")]
async fn renewal_and_drain() {
    let p = TestPlane::start(&[]);
    let n = enroll(&p, "renewer", &NodeKey::ed25519()).await;
    let (s, _) = call(&n.client, &p, "POST", &format!("/v1/nodes/{}/handshake", n.id), Some(report("ready"))).await;
    assert_eq!(s, 200);

    // Renewal: a new key, authenticated by the current certificate; the new certificate works.
    let fresh = NodeKey::p256();
    let (s, body) = call(
        &n.client,
        &p,
        "POST",
        &format!("/v1/nodes/{}/renew", n.id),
        Some(json!({"csr": fresh.csr(&["other.example"])})),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let renewed = p.with_identity(body["certificate"].as_str().unwrap(), &fresh.key_pem());
    let (s, _) = call(&renewed, &p, "POST", &format!("/v1/nodes/{}/heartbeat", n.id), Some(report("ready"))).await;
    assert_eq!(s, 200);
    assert_eq!(p.journal("cert.renew").len(), 1);
    // Renewing needs a node certificate: the anonymous client is refused.
    let r =
        call(&p.anonymous(), &p, "POST", &format!("/v1/nodes/{}/renew", n.id), Some(json!({"csr": fresh.csr(&[])})))
            .await;
    refused(&p, r, 401, "no_client_certificate", "renew");

    // Drain: the node is draining, its desired state says so, and a heartbeat does not undo it.
    let task = p.op(&["task", "drain", "renewer"]).ok();
    assert!(task.starts_with("t-"), "{task}");
    assert_eq!(node_state(&p, &n.id), "draining");
    let (_, d) = call(&renewed, &p, "GET", &format!("/v1/nodes/{}/desired", n.id), None).await;
    assert_eq!(d["intents"], json!(["drain"]));
    let (_, r) = call(&renewed, &p, "POST", &format!("/v1/nodes/{}/heartbeat", n.id), Some(report("ready"))).await;
    assert_eq!(r["state"], "draining");
    let (_, t) = call(&renewed, &p, "GET", &format!("/v1/nodes/{}/tasks", n.id), None).await;
    assert_eq!(t["spec"], json!({"kind": "drain"}));
    p.op(&["node", "state", &n.id, "terminated"]).ok();
    assert_eq!(node_state(&p, &n.id), "terminated");
}

#[tokio::test(flavor = "multi_thread")]
async fn audit_verify_names_the_first_edited_record() {
    let p = TestPlane::start(&[]);
    for _ in 0..3 {
        p.op(&["token", "create"]).ok();
    }
    assert!(p.op(&["audit", "verify"]).ok().starts_with("audit chain intact: 3 records"));
    // Someone with access to the database file rewrites history behind the plane's back.
    let db = rusqlite::Connection::open(p.dir().join("plane.db")).unwrap();
    db.execute("UPDATE audit SET actor = 'operator:someone-else' WHERE seq = 2", []).unwrap();
    drop(db);
    let out = p.op(&["audit", "verify"]);
    assert_eq!(out.code, 5, "a broken journal has its own exit code: {}", out.stderr);
    assert!(
        out.stderr.contains("audit chain broken at record 2: hash does not match the record's contents (edited)"),
        "{}",
        out.stderr
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_carries_its_template_and_reports_carry_the_store_kind() {
    let p = TestPlane::start(&[]);
    let err = p.op(&["token", "create", "--node", "t1", "--template", "nope"]);
    err.refused(3, "unknown_template");
    let digest = format!("sha256:{}", "cd".repeat(32));
    p.op(&["template", "create", "web", "--module", &format!("127.0.0.1:5000/ironroot/web@{digest},serial=4")]).ok();
    let token = p.op(&["token", "create", "--node", "t1", "--template", "web"]).ok();
    let key = NodeKey::ed25519();
    let (status, body) =
        enroll_raw(&p, &json!({"token": token, "csr": key.csr(&[]), "identity": {"name": "t1"}})).await;
    assert_eq!(status, 200, "{body}");
    let id = body["node_id"].as_str().unwrap().to_owned();
    let client = p.with_identity(body["certificate"].as_str().unwrap(), &key.key_pem());
    let (status, desired) = call(&client, &p, "GET", &format!("/v1/nodes/{id}/desired"), None).await;
    assert_eq!(status, 200);
    assert_eq!(desired["template"], "web", "assigned at enrollment: {desired}");
    assert_eq!(desired["modules"][0]["serial"], 4);

    let mut r = report("ready");
    r["store"] = json!("tmpfs-insecure");
    let (status, _) = call(&client, &p, "POST", &format!("/v1/nodes/{id}/heartbeat"), Some(r)).await;
    assert_eq!(status, 200);
    let shown: Value = serde_json::from_str(&p.op(&["node", "show", "t1", "--json"]).ok()).unwrap();
    assert_eq!(shown["store"], "tmpfs-insecure", "{shown}");
    // A report without the field keeps what was reported before.
    heartbeat(&client, &p, &id).await;
    let shown: Value = serde_json::from_str(&p.op(&["node", "show", "t1", "--json"]).ok()).unwrap();
    assert_eq!(shown["store"], "tmpfs-insecure");
}
