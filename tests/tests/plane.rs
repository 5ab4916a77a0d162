//! The reference plane against real clients: the `ironroot-plane` binary on 127.0.0.1:0, real
//! TLS, real certificates, real CSRs. The happy path end to end; every refusal with a clear
//! error and a journal record; silence detection; durability across SIGKILL.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests stop loudly on a failed setup step"
)]

use std::time::Duration;

use ironroot_tests::plane::{NodeKey, TestPlane};
use serde_json::{Value, json};

struct Node {
    id: String,
    client: reqwest::Client,
    cert: String,
}

async fn enroll_raw(p: &TestPlane, body: &Value) -> (u16, Value) {
    let resp = p
        .anonymous()
        .post(p.url("/v1/enroll"))
        .json(body)
        .send()
        .await
        .expect("enroll request");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn enroll(p: &TestPlane, name: &str, key: &NodeKey) -> Node {
    let token = p.op(&["token", "create", "--node", name]).ok();
    let (status, body) = enroll_raw(
        p,
        &json!({"token": token, "csr": key.csr(&[]), "identity": {"name": name}}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let cert = body["certificate"].as_str().unwrap().to_owned();
    Node {
        id: body["node_id"].as_str().unwrap().to_owned(),
        client: p.with_identity(&cert, &key.key_pem()),
        cert,
    }
}

async fn call(client: &reqwest::Client, p: &TestPlane, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut req = if method == "GET" {
        client.get(p.url(path))
    } else {
        client.post(p.url(path))
    };
    if let Some(b) = body {
        req = req.json(&b);
    }
    match req.send().await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            (status, resp.json().await.unwrap_or(Value::Null))
        }
        Err(e) => (0, Value::String(format!("{e:?}"))),
    }
}

fn report(phase: &str) -> Value {
    json!({"boot_id": "boot-1", "agent_version": "0.1.0", "phase": phase,
           "phase_timings_ms": {"discover": 3, "enroll": 40}, "module_digests": [format!("sha256:{}", "ab".repeat(32))]})
}

#[tokio::test(flavor = "multi_thread")]
async fn happy_path_from_token_to_task_result() {
    let p = TestPlane::start(&[]);
    let key = NodeKey::ed25519();
    let token = p.op(&["token", "create", "--node", "rack1-n01"]).ok();
    // The CSR asks for extra names and a CA role; the certificate carries none of them.
    let csr = key.csr(&["admin.example", "urn:ironroot:operator:admin"]);
    let (status, body) = enroll_raw(
        &p,
        &json!({"token": token, "csr": csr, "identity": {"name": "rack1-n01"}}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let id = body["node_id"].as_str().unwrap().to_owned();
    let chain = body["certificate"].as_str().unwrap();
    let first = rustls_pem_first(chain);
    let text = openssl_text(&first);
    assert!(text.contains(&format!("URI:urn:ironroot:node:{id}")), "{text}");
    assert!(
        !text.contains("admin.example") && !text.contains("operator") && !text.contains("CA:TRUE"),
        "{text}"
    );
    assert!(text.contains("TLS Web Client Authentication"), "{text}");

    let node = p.with_identity(chain, &key.key_pem());
    let (s, r) = call(
        &node,
        &p,
        "POST",
        &format!("/v1/nodes/{id}/handshake"),
        Some(report("fetch")),
    )
    .await;
    assert_eq!((s, r["state"].as_str()), (200, Some("bootstrapping")), "{r}");
    for _ in 0..2 {
        let (s, r) = call(
            &node,
            &p,
            "POST",
            &format!("/v1/nodes/{id}/heartbeat"),
            Some(report("ready")),
        )
        .await;
        assert_eq!((s, r["state"].as_str()), (200, Some("running")), "{r}");
    }
    let shown: Value = serde_json::from_str(&p.op(&["node", "show", &id, "--json"]).ok()).unwrap();
    assert_eq!(shown["state"], "running");
    assert_eq!(shown["heartbeats"], 2);
    assert_eq!(shown["phase_timings_ms"]["enroll"], 40);

    let digest = format!("sha256:{}", "cd".repeat(32));
    p.op(&[
        "template",
        "create",
        "base",
        "--module",
        &format!("127.0.0.1:5000/ironroot/base@{digest},serial=7"),
    ])
    .ok();
    p.op(&["template", "assign", "rack1-n01", "base"]).ok();
    let (s, d) = call(&node, &p, "GET", &format!("/v1/nodes/{id}/desired"), None).await;
    assert_eq!(s, 200, "{d}");
    assert_eq!(d["generation"], 2);
    assert_eq!(d["modules"][0]["digest"], digest.as_str());
    assert_eq!(d["modules"][0]["serial"], 7);
    let (_, hb) = call(
        &node,
        &p,
        "POST",
        &format!("/v1/nodes/{id}/heartbeat"),
        Some(report("ready")),
    )
    .await;
    assert_eq!(hb["generation"], 2, "the heartbeat tells the node to fetch");

    // A long-poll that is waiting when the task is enqueued gets it.
    let waiter = {
        let (node, url) = (node.clone(), p.url(&format!("/v1/nodes/{id}/tasks?wait=20")));
        tokio::spawn(async move { node.get(url).send().await.unwrap().json::<Value>().await.unwrap() })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let task_id = p.op(&["task", "exec", "rack1-n01", "--", "uname", "-r"]).ok();
    let task = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("long-poll answered")
        .unwrap();
    assert_eq!(task["id"], task_id.as_str());
    assert_eq!(task["spec"], json!({"kind": "exec", "argv": ["uname", "-r"]}));
    let result = json!({"exit_code": 0, "output": "6.12.0"});
    let (s, r) = call(
        &node,
        &p,
        "POST",
        &format!("/v1/tasks/{task_id}/result"),
        Some(result.clone()),
    )
    .await;
    assert_eq!((s, &r["recorded"]), (200, &json!(true)));
    let (s, r) = call(&node, &p, "POST", &format!("/v1/tasks/{task_id}/result"), Some(result)).await;
    assert_eq!(
        (s, &r["recorded"]),
        (200, &json!(false)),
        "a repeated result is idempotent"
    );
    let tasks: Value = serde_json::from_str(&p.op(&["task", "list", "rack1-n01"]).ok()).unwrap();
    assert_eq!(tasks[0]["state"], "done");
    assert_eq!(tasks[0]["result"]["output"], "6.12.0");

    // Node audit batches are journaled once per sequence number.
    let batch = json!({"records": [{"seq": 1, "time": 1, "kind": "exec", "data": {"argv": ["uname"]}}, {"seq": 2, "time": 2, "kind": "exec"}]});
    let (_, a) = call(&node, &p, "POST", &format!("/v1/nodes/{id}/audit"), Some(batch.clone())).await;
    assert_eq!(a["accepted"], 2);
    let (_, a) = call(&node, &p, "POST", &format!("/v1/nodes/{id}/audit"), Some(batch)).await;
    assert_eq!(a["accepted"], 0);
    assert_eq!(p.journal("node.exec").len(), 2);

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
