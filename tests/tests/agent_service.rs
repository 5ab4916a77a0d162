//! `ironroot-agent serve` as the node runtime, against the real plane over mTLS (no systemd
//! here: the runtime's plane side — handshake, heartbeats, tasks, the node journal and its
//! delivery, certificate renewal — runs as on a node; module jobs run in the QEMU tier).

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests stop loudly on a failed setup step")]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ironroot_tests::cli::binary_named;
use ironroot_tests::plane::{NodeKey, PlaneNode, TestPlane, enroll};

/// A running `serve` with the run directory it reads.
struct Service {
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Service {
    fn start(p: &TestPlane, node: &PlaneNode) -> Self {
        let dir = tempfile::Builder::new().prefix("ironroot-serve-").tempdir().unwrap();
        let d = dir.path();
        std::fs::copy(p.dir().join("ca.pem"), d.join("plane-ca.pem")).unwrap();
        std::fs::write(d.join("node.crt"), &node.cert).unwrap();
        std::fs::write(d.join("node.key"), &node.key_pem).unwrap();
        std::fs::create_dir_all(d.join("store")).unwrap();
        let record = serde_json::json!({
            "schema": 1, "agent_version": "0.1.0", "boot_id": "b-serve-1",
            "identity": {"values": {}, "conflicts": [], "notes": []},
            "node_id": node.id, "plane": format!("https://{}", p.addr()), "plane_ca": d.join("plane-ca.pem"),
            "certificate": d.join("node.crt"), "key": d.join("node.key"),
            "certificate_not_after": 4_000_000_000u64, "reused_certificate": false, "generation": 1,
            "store": {"kind": "tmpfs-insecure", "path": d.join("store"), "verity": false, "persistent": false,
                      "insecure": true, "device": null},
            "modules": [], "root": {"target": "/sysroot", "verity": false, "layers": [], "upper": "/run/u"},
            "phases_ms": {}, "heartbeat_s": 1,
        });
        std::fs::write(d.join("boot.json"), record.to_string()).unwrap();
        let mut s = Self { child: None, dir };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("serve.log")).unwrap();
        let child = Command::new(binary_named("ironroot-agent"))
            .args(["serve", "--run-dir"])
            .arg(self.dir.path())
            .env("IRONROOT_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting ironroot-agent serve");
        self.child = Some(child);
    }

    /// `kill -9` (of exactly the process this test started), then start it again.
    fn kill9_and_restart(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
        self.spawn();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("serve.log")).unwrap_or_default()
    }

    /// The service's exit code once it ends by itself within `within`.
    fn exit_code(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        let child = self.child.as_mut()?;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait().unwrap() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        None
    }

    fn journal(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.path().join("journal/node.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn node_view(p: &TestPlane, id: &str) -> serde_json::Value {
    serde_json::from_str(&p.op(&["node", "show", id, "--json"]).ok()).unwrap()
}

fn wait_for(what: &str, within: Duration, service: &Service, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(Instant::now() < deadline, "{what} within {within:?}; agent log:\n{}", service.log());
        std::thread::sleep(Duration::from_millis(200));
    }
}

async fn enqueue(p: &TestPlane, node: &str, spec: serde_json::Value) -> String {
    let resp =
        p.operator_client().post(p.url(&format!("/v1/operator/nodes/{node}/tasks"))).json(&spec).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.unwrap();
    body["task"].as_str().or(body["task"]["id"].as_str()).expect("task id").to_owned()
}

fn task_result(p: &TestPlane, node: &str, task: &str) -> Option<serde_json::Value> {
    let list: serde_json::Value = serde_json::from_str(&p.op(&["task", "list", node]).ok()).ok()?;
    let tasks = list.as_array().cloned().or_else(|| list["tasks"].as_array().cloned())?;
    tasks.into_iter().find(|t| t["id"] == task).and_then(|t| t.get("result").cloned()).filter(|r| !r.is_null())
}

#[tokio::test(flavor = "multi_thread")]
async fn tasks_run_once_are_journaled_delivered_and_survive_kill_9() {
    let p = TestPlane::start(&[]);
    let node = enroll(&p, "svc1", &NodeKey::ed25519()).await;
    let mut service = Service::start(&p, &node);
    wait_for("the node running and heartbeating", Duration::from_secs(60), &service, || {
        let v = node_view(&p, &node.id);
        v["state"] == "running" && v["heartbeats"].as_u64().unwrap_or(0) >= 2
    });

    let update = enqueue(&p, &node.id, serde_json::json!({"kind": "module-update"})).await;
    wait_for("the module-update answered", Duration::from_secs(60), &service, || {
        task_result(&p, &node.id, &update).is_some()
    });
    let r = task_result(&p, &node.id, &update).unwrap();
    assert_eq!(r["outcome"], "succeeded", "{r}");
    assert!(r["reason"].as_str().unwrap_or_default().contains("ok: generation"), "{r}");

    let exec = enqueue(&p, &node.id, serde_json::json!({"kind": "exec", "argv": ["/bin/true"]})).await;
    wait_for("the exec answered", Duration::from_secs(60), &service, || task_result(&p, &node.id, &exec).is_some());
    assert_eq!(task_result(&p, &node.id, &exec).unwrap()["outcome"], "unsupported");

    // Both are in the node journal, chained, and reach the plane's journal once each.
    let finished: Vec<_> = service.journal().into_iter().filter(|r| r["kind"] == "task.finished").collect();
    assert_eq!(finished.len(), 2, "{finished:?}");
    let delivered = |p: &TestPlane| p.journal("node-journal.task.finished").len();
    wait_for("both delivered", Duration::from_secs(60), &service, || delivered(&p) == 2);

    // kill -9 and a restart: the journal is read back, nothing runs or is delivered twice.
    service.kill9_and_restart();
    let before = node_view(&p, &node.id)["heartbeats"].as_u64().unwrap();
    wait_for("heartbeats again after the restart", Duration::from_secs(60), &service, || {
        node_view(&p, &node.id)["heartbeats"].as_u64().unwrap_or(0) >= before + 3
    });
    assert_eq!(delivered(&p), 2, "a restart delivers nothing again");
    let records = service.journal();
    assert_eq!(records.iter().filter(|r| r["kind"] == "task.finished").count(), 2);
    for pair in records.windows(2) {
        assert_eq!(pair[0]["hash"], pair[1]["prev"], "one chain across the restart");
    }
    assert!(service.log().contains("serving"), "{}", service.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn certificates_of_90_seconds_are_renewed_twice_without_a_missed_heartbeat() {
    let p = TestPlane::start(&["--cert-ttl", "90s", "--heartbeat-interval", "2s"]);
    let node = enroll(&p, "svc2", &NodeKey::ed25519()).await;
    let service = Service::start(&p, &node);
    wait_for("the handshake", Duration::from_secs(30), &service, || node_view(&p, &node.id)["state"] == "running");
    let cert_path = service.dir.path().join("node.crt");
    let key_path = service.dir.path().join("node.key");
    let mut certs = vec![std::fs::read_to_string(&cert_path).unwrap()];
    let mut keys = vec![std::fs::read_to_string(&key_path).unwrap()];
    let started = Instant::now();
    let mut states = std::collections::BTreeSet::new();
    while certs.len() < 3 {
        assert!(started.elapsed() < Duration::from_secs(200), "two renewals within 200 s:\n{}", service.log());
        let view = node_view(&p, &node.id);
        states.insert(view["state"].as_str().unwrap_or("?").to_owned());
        let cert = std::fs::read_to_string(&cert_path).unwrap();
        if &cert != certs.last().unwrap() {
            certs.push(cert);
            keys.push(std::fs::read_to_string(&key_path).unwrap());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let elapsed = started.elapsed().as_secs();
    assert!((90..200).contains(&elapsed), "renewed at 60-75 % of the lifetime, twice: {elapsed} s");
    assert!(keys[0] != keys[1] && keys[1] != keys[2], "a new key each time");
    // Heartbeats every second the whole time: the plane never saw the node go quiet.
    assert!(states.iter().all(|s| s == "running"), "{states:?}");
    let beats = node_view(&p, &node.id)["heartbeats"].as_u64().unwrap();
    assert!(beats + 10 >= elapsed, "{beats} heartbeats in {elapsed} s");
    wait_for("both renewals delivered", Duration::from_secs(30), &service, || {
        p.journal("node-journal.cert.renewed").len() == 2
    });
}

/// A certificate that runs out while the plane is away cannot be renewed: the service says so
/// (a `cert.expired` record, and why on its way out) and ends with the node-identity code,
/// which its unit does not restart.
#[tokio::test(flavor = "multi_thread")]
async fn a_certificate_that_expires_while_the_plane_is_away_ends_the_service_asking_for_re_provisioning() {
    let mut p = TestPlane::start(&["--cert-ttl", "60s", "--heartbeat-interval", "2s"]);
    let node = enroll(&p, "svc3", &NodeKey::ed25519()).await;
    let mut service = Service::start(&p, &node);
    wait_for("the handshake", Duration::from_secs(30), &service, || node_view(&p, &node.id)["state"] == "running");
    p.terminate();
    let code = service.exit_code(Duration::from_secs(120));
    assert_eq!(code, Some(31), "{}", service.log());
    let log = service.log();
    assert!(log.contains("expired") && log.contains("re-provision the node"), "{log}");
    let expired: Vec<_> = service.journal().into_iter().filter(|r| r["kind"] == "cert.expired").collect();
    assert_eq!(expired.len(), 1, "{expired:?}");
}
