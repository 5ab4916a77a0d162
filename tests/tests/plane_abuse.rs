//! The reference plane under unauthenticated and malformed load, as an attacker would try it:
//! callers without a certificate cost the plane no memory and bounded journal space, slow and
//! idle connections are closed, connections without a certificate are capped, bodies are read
//! only after authorization, and every number a caller sends is bounded.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests stop loudly on a failed setup step")]

use std::time::Duration;

use futures_util::StreamExt as _;
use ironroot_tests::plane::{NodeKey, TestPlane, call, enroll, report, tls_connect};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Reads until the plane closes the connection; the deadline only guards against a hang.
async fn closed_by_plane(stream: &mut (impl tokio::io::AsyncRead + Unpin), within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let until = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(until, stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
            Err(_) => return false,
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn long_polls_without_a_certificate_cost_no_memory_and_bounded_journal() {
    let p = TestPlane::start(&[]);
    let anon = p.anonymous();
    let before = p.rss_kib();
    // 4,000 long-polls for distinct 8 KiB node ids: before the fix each left a waiter behind.
    let refused: Vec<u16> = futures_util::stream::iter(0..4000)
        .map(|i| {
            let (anon, url) = (anon.clone(), p.url(&format!("/v1/nodes/{i:08}{}/tasks?wait=30", "x".repeat(8192))));
            async move { anon.get(url).send().await.map(|r| r.status().as_u16()).unwrap_or(0) }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    assert!(refused.iter().all(|s| *s == 401), "every long-poll refused at once: {:?}", &refused[..10]);
    let grown = p.rss_kib().saturating_sub(before);
    assert!(grown < 16 * 1024, "the plane grew by {grown} KiB for 4,000 refused long-polls");

    // Refusals before authentication are journaled at a bounded rate, the rest counted: the
    // first refusal once the budget refills names how many were only counted. The budget is
    // per address and shared by every kind of refusal (a connection over the anonymous cap may
    // take the token that names the count), so the count is looked for in all of them.
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    let last = anon.get(p.url("/v1/nodes/00000000/tasks")).send().await.unwrap();
    assert_eq!(last.status().as_u16(), 401);
    let records = p.journal("refused.lease");
    assert!(!records.is_empty() && records.len() < 200, "{} refusal records for 4,000 refusals", records.len());
    let all = p.journal_where(|k| k.starts_with("refused."));
    assert!(all.len() < 200, "{} refusal records of any kind for 4,000 refusals", all.len());
    assert!(all.iter().any(|r| r.as_str().unwrap().contains("unjournaled_before")), "the count is not named: {all:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_body_is_read_only_after_its_caller_is_authorized() {
    let p = TestPlane::start(&[]);
    let n = enroll(&p, "body", &NodeKey::ed25519()).await;
    // Malformed JSON from a caller without a certificate: refused for who it is, not parsed.
    let r = p
        .anonymous()
        .post(p.url(&format!("/v1/nodes/{}/heartbeat", n.id)))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "no_client_certificate");
    // The same body from the node itself is parsed, and refused for what it is.
    let r = n
        .client
        .post(p.url(&format!("/v1/nodes/{}/heartbeat", n.id)))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    // A report with a control character is refused.
    let mut bad = report("ready");
    bad["boot_id"] = json!("boot\u{1b}[2J");
    let (s, body) = call(&n.client, &p, "POST", &format!("/v1/nodes/{}/heartbeat", n.id), Some(bad)).await;
    assert_eq!((s, body["error"].as_str()), (400, Some("bad_report")), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_and_idle_connections_are_closed_but_a_node_keeps_its_connection() {
    let p = TestPlane::start(&["--header-timeout", "2s", "--idle-timeout", "8s", "--heartbeat-interval", "4s"]);
    let n = enroll(&p, "keeper", &NodeKey::ed25519()).await;

    // Without a certificate, a connection that sends nothing is closed after the header timeout.
    let mut silent = tls_connect(&p, None).await.unwrap();
    assert!(closed_by_plane(&mut silent, Duration::from_secs(20)).await, "an idle anonymous connection was kept");

    // A node trickling its headers (a byte every 300 ms, so never idle) is cut off at the
    // header timeout, long before the idle timeout.
    let mut slow = tls_connect(&p, Some((&n.cert, &n.key_pem))).await.unwrap();
    let head = format!("POST /v1/nodes/{}/heartbeat HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ", n.id);
    slow.write_all(head.as_bytes()).await.unwrap();
    let started = tokio::time::Instant::now();
    let mut cut = false;
    while started.elapsed() < Duration::from_secs(20) {
        if slow.write_all(b"a").await.is_err() || slow.flush().await.is_err() {
            cut = true;
            break;
        }
        let mut byte = [0u8; 1];
        if let Ok(Ok(0) | Err(_)) = tokio::time::timeout(Duration::from_millis(300), slow.read(&mut byte)).await {
            cut = true;
            break;
        }
    }
    assert!(cut, "a trickled request head was never cut off");

    // A node's connection survives a pause shorter than the idle timeout between two requests
    // on the same connection, with a client certificate.
    let mut kept = tls_connect(&p, Some((&n.cert, &n.key_pem))).await.unwrap();
    for i in 0..2 {
        let body = report("ready").to_string();
        let req = format!(
            "POST /v1/nodes/{}/heartbeat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            n.id,
            body.len()
        );
        kept.write_all(req.as_bytes()).await.unwrap();
        let mut answer = vec![0u8; 4096];
        let got = tokio::time::timeout(Duration::from_secs(10), kept.read(&mut answer)).await.unwrap().unwrap();
        let text = String::from_utf8_lossy(&answer[..got]);
        assert!(text.starts_with("HTTP/1.1 200"), "heartbeat {i} on the kept connection: {text}");
        if i == 0 {
            tokio::time::sleep(Duration::from_secs(4)).await; // a heartbeat interval, below the idle timeout
        }
    }
    // ... and is closed once it stays idle past the idle timeout.
    assert!(closed_by_plane(&mut kept, Duration::from_secs(30)).await, "an idle node connection was kept forever");
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_without_a_certificate_are_capped_and_nodes_are_not() {
    let p =
        TestPlane::start(&["--max-anonymous-per-address", "4", "--max-anonymous", "8", "--handshake-timeout", "30s"]);
    let n = enroll(&p, "capped", &NodeKey::p256()).await;
    // An authenticated connection, established first, is not counted.
    let mut node_conn = tls_connect(&p, Some((&n.cert, &n.key_pem))).await.unwrap();

    // Four TCP connections that never start TLS fill this address's anonymous slots.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(tokio::net::TcpStream::connect(p.addr()).await.unwrap());
    }
    // Wait for the plane to have accepted them: a fifth is then closed at once, without TLS.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut fifth = tokio::net::TcpStream::connect(p.addr()).await.unwrap();
        if closed_by_plane(&mut fifth, Duration::from_secs(1)).await {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "a connection over the cap was kept");
    }
    assert!(tls_connect(&p, None).await.is_err(), "a TLS client over the cap got a handshake");

    // The node's connection still works.
    let body = report("ready").to_string();
    let req = format!(
        "POST /v1/nodes/{}/heartbeat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        n.id,
        body.len()
    );
    node_conn.write_all(req.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 4096];
    let got = tokio::time::timeout(Duration::from_secs(10), node_conn.read(&mut answer)).await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&answer[..got]).starts_with("HTTP/1.1 200"));

    // A slot given back is free again.
    drop(held.pop());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while tls_connect(&p, None).await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "a freed slot never became usable");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The refusals were journaled (read once the operator's own connection fits under the cap:
    // before its handshake, it is one more connection without a certificate from this address).
    drop(held);
    let records = p.wait_journal("refused.connection", Duration::from_secs(10));
    assert!(records[0].as_str().unwrap().contains("connection_cap"), "{records:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn numbers_out_of_range_are_refused() {
    let p = TestPlane::start(&[]);
    // The token TTL that used to overflow into an expired token with a 200 answer.
    let op = p.operator_client();
    for ttl in [u64::MAX, 30 * 86_400 + 1, 0] {
        let (s, body) = call(&op, &p, "POST", "/v1/operator/tokens", Some(json!({"ttl_s": ttl}))).await;
        assert_eq!((s, body["error"].as_str()), (400, Some("bad_ttl")), "ttl {ttl}: {body}");
    }
    p.op(&["token", "create", "--ttl", "31d"]).refused(3, "bad_ttl");
    p.op(&["token", "create", "--ttl", "18446744073709551615d"]).refused(2, "too long");
    assert!(p.op(&["token", "create", "--ttl", "30d"]).ok().starts_with("irt_"));
    // A node's journal sequence number that SQLite cannot hold.
    let n = enroll(&p, "counter", &NodeKey::ed25519()).await;
    let batch = json!({"records": [{"seq": u64::MAX, "time": 1, "kind": "x"}]});
    let (s, body) = call(&n.client, &p, "POST", &format!("/v1/nodes/{}/audit", n.id), Some(batch)).await;
    assert_eq!((s, body["error"].as_str()), (400, Some("bad_audit")), "{body}");
    // The serve flags are checked before the plane starts.
    let out = std::process::Command::new(ironroot_tests::cli::binary_named("ironroot-plane"))
        .args(["serve", "--state"])
        .arg(p.dir().join("other"))
        .args(["--idle-timeout", "10s", "--heartbeat-interval", "30s"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--idle-timeout must be above --heartbeat-interval"));
}
