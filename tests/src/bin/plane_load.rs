//! `ironroot-plane-load`: the plane's heartbeat fan-in and desired-state fan-out benchmark
//! (`just bench`).
//!
//! Starts `ironroot-plane` on a loopback port with a fresh state directory, enrolls N nodes
//! through the real API, holds one persistent mTLS connection per node, and has each node
//! heartbeat once per interval (spread evenly) for the measured window: prints p50/p99/max
//! latency and the plane's CPU use. Each node acts on its answers as an agent does: a new
//! `generation` makes it fetch its desired state. With `FANOUT_REPO` (a registry repository
//! holding a signed module at tags `1` and `2`) and `FANOUT_TRUST` (its public key), every node
//! is on template `fleet`, which follows channel `stable` of that repository; one interval into
//! the window, `candidate` (tag 2) is promoted to `stable`, and the benchmark reports how long
//! until every node has fetched the new desired state, and the plane's CPU meanwhile. Then it
//! SIGKILLs and restarts the plane and measures how long all N nodes take to reconnect and
//! re-handshake, counting authentication failures.
//!
//! usage: ironroot-plane-load PLANE_BIN [NODES] [SECONDS] [INTERVAL_SECONDS]

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "a benchmark stops loudly on a failed setup step")]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::json;
use tokio_rustls::TlsConnector;

/// The plane process; killed when the benchmark ends, however it ends.
struct PlaneProcess(Child);

impl Drop for PlaneProcess {
    fn drop(&mut self) {
        let _already_gone = self.0.kill();
        let _reaped = self.0.wait();
    }
}

struct Node {
    id: String,
    tls: Arc<rustls::ClientConfig>,
}

type Sender = SendRequest<Full<Bytes>>;

fn start_plane(bin: &Path, state: &Path, port: u16, extra: &[String]) -> PlaneProcess {
    let _stale = std::fs::remove_file(state.join("address"));
    let child = Command::new(bin)
        .args(["serve", "--state"])
        .arg(state)
        .args(["--listen", &format!("127.0.0.1:{port}"), "--enroll-burst", "1000000", "--enroll-rate", "100000"])
        .args(extra)
        .env("IRONROOT_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting the plane");
    while !state.join("address").exists() {
        std::thread::sleep(Duration::from_millis(20));
    }
    PlaneProcess(child)
}

/// utime + stime of `pid`, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|u| u.parse::<f64>().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    ticks / 100.0
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn client_config(ca: &[u8], chain: &str, key: &str) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca) {
        roots.add(c.unwrap()).unwrap();
    }
    let certs: Vec<_> = CertificateDer::pem_slice_iter(chain.as_bytes()).map(Result::unwrap).collect();
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)
            .unwrap(),
    )
}

async fn connect(addr: SocketAddr, tls: Arc<rustls::ClientConfig>) -> std::io::Result<Sender> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let stream = TlsConnector::from(tls).connect(ServerName::IpAddress(addr.ip().into()), tcp).await?;
    let (sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(std::io::Error::other)?;
    tokio::spawn(conn);
    Ok(sender)
}

async fn post(sender: &mut Sender, path: &str, body: &serde_json::Value) -> Result<u16, String> {
    exchange(sender, Some(body), path).await.map(|(status, _)| status)
}

/// One request on the node's connection: a POST of `body`, or a GET without one; the status
/// and the answer's JSON (`null` when it has none).
async fn exchange(
    sender: &mut Sender,
    body: Option<&serde_json::Value>,
    path: &str,
) -> Result<(u16, serde_json::Value), String> {
    sender.ready().await.map_err(|e| e.to_string())?;
    let req = match body {
        Some(b) => hyper::Request::post(path)
            .header("content-type", "application/json")
            .header("host", "127.0.0.1")
            .body(Full::new(Bytes::from(b.to_string()))),
        None => hyper::Request::get(path).header("host", "127.0.0.1").body(Full::new(Bytes::new())),
    }
    .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    if status != 200 && std::env::var_os("PLANE_LOAD_DEBUG").is_some() {
        eprintln!("{path}: {status} {}", String::from_utf8_lossy(&body));
    }
    Ok((status, serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null)))
}

/// The desired-state generation in an answer.
fn generation(answer: &serde_json::Value) -> Option<u64> {
    answer["generation"].as_u64()
}

fn report() -> serde_json::Value {
    json!({"boot_id": "bench", "agent_version": "bench", "phase": "ready"})
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Lets this process (and the plane it starts, which inherits it) hold one descriptor per node
/// connection: the soft limit goes to the hard limit, and as root to at least 65536. Only the
/// benchmark does this; the product's defaults are untouched.
fn raise_fd_limit(nodes: usize) {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let current = getrlimit(Resource::Nofile);
    let want = (nodes as u64 * 2 + 1024).max(current.maximum.unwrap_or(0));
    let raised = Rlimit { current: Some(want), maximum: Some(want.max(current.maximum.unwrap_or(want))) };
    if setrlimit(Resource::Nofile, raised).is_err() {
        let soft = Rlimit { current: current.maximum, maximum: current.maximum };
        let _best_effort = setrlimit(Resource::Nofile, soft);
    }
    let now = getrlimit(Resource::Nofile).current.unwrap_or(0);
    assert!(
        now >= nodes as u64 + 256,
        "descriptor limit {now} is too low for {nodes} connections; raise it (ulimit -n) or use fewer nodes"
    );
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let bin = PathBuf::from(args.get(1).expect("usage: ironroot-plane-load PLANE_BIN [NODES] [SECONDS] [INTERVAL]"));
    let nodes: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let seconds: u64 = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(60);
    let interval: u64 = args.get(4).and_then(|a| a.parse().ok()).unwrap_or(30);
    raise_fd_limit(nodes);

    let state = tempfile::Builder::new().prefix("ironroot-plane-bench-").tempdir_in("/var/tmp").unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let fanout = std::env::var("FANOUT_REPO").ok().zip(std::env::var("FANOUT_TRUST").ok());
    let extra: Vec<String> = fanout.iter().flat_map(|(_, key)| ["--trust".to_owned(), key.clone()]).collect();
    let plane = start_plane(&bin, state.path(), port, &extra);
    let ca = std::fs::read(state.path().join("ca.pem")).unwrap();
    let read = |f: &str| std::fs::read_to_string(state.path().join(f)).unwrap();
    let operator = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&ca).unwrap()])
        .identity(
            reqwest::Identity::from_pem(format!("{}{}", read("operator.pem"), read("operator.key")).as_bytes())
                .unwrap(),
        )
        .build()
        .unwrap();
    let anon =
        reqwest::Client::builder().tls_certs_only([reqwest::Certificate::from_pem(&ca).unwrap()]).build().unwrap();
    let base = format!("https://{addr}");
    let template = if let Some((repo, _)) = &fanout {
        // The plane resolves each tag in the registry and checks its signature and serial.
        for (channel, tag) in [("stable", "1"), ("candidate", "2")] {
            let body = json!({"repo": repo, "channel": channel, "at": tag});
            let r = operator.post(format!("{base}/v1/operator/channels")).json(&body).send().await.unwrap();
            assert!(r.status().is_success(), "channel set {channel}: {}", r.text().await.unwrap_or_default());
        }
        let body = json!({"name": "fleet", "modules": [format!("{repo}:stable")]});
        let r = operator.post(format!("{base}/v1/operator/templates")).json(&body).send().await.unwrap();
        assert!(r.status().is_success(), "template create: {}", r.text().await.unwrap_or_default());
        Some("fleet")
    } else {
        None
    };

    eprintln!("plane-load: enrolling {nodes} nodes");
    let t = Instant::now();
    let enrolled: Vec<Node> = futures_util::stream::iter(0..nodes)
        .map(|i| {
            let (operator, anon, base, ca) = (operator.clone(), anon.clone(), base.clone(), ca.clone());
            async move {
                let name = format!("load-{i:05}");
                let tok: serde_json::Value = operator
                    .post(format!("{base}/v1/operator/tokens"))
                    .json(&json!({"node": name, "template": template}))
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
                let csr = rcgen::CertificateParams::new(Vec::<String>::new())
                    .unwrap()
                    .serialize_request(&key)
                    .unwrap()
                    .pem()
                    .unwrap();
                let body = json!({"token": tok["token"], "csr": csr, "identity": {"name": name}});
                let r: serde_json::Value =
                    anon.post(format!("{base}/v1/enroll")).json(&body).send().await.unwrap().json().await.unwrap();
                let chain = r["certificate"].as_str().unwrap_or_else(|| panic!("enrollment refused: {r}")).to_owned();
                Node {
                    id: r["node_id"].as_str().unwrap().to_owned(),
                    tls: client_config(&ca, &chain, &key.serialize_pem()),
                }
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    eprintln!("plane-load: enrolled in {:.1} s; connecting", t.elapsed().as_secs_f64());

    let enrolled = Arc::new(enrolled);
    let mut senders: Vec<Sender> = futures_util::stream::iter(enrolled.iter().map(|n| Arc::clone(&n.tls)))
        .map(|tls| async move { connect(addr, tls).await.expect("connecting") })
        .buffered(256)
        .collect()
        .await;
    let mut known = Vec::with_capacity(nodes);
    for (s, n) in senders.iter_mut().zip(enrolled.iter()) {
        let answer = exchange(s, Some(&report()), &format!("/v1/nodes/{}/handshake", n.id)).await;
        let answer =
            answer.ok().filter(|(status, _)| *status == 200).unwrap_or_else(|| panic!("handshake of {}", n.id));
        known.push(generation(&answer.1).unwrap_or(0));
    }

    // With a fan-out, the window holds the promote (one interval in) and two intervals after it.
    let seconds = if fanout.is_some() { seconds.max(3 * interval + 10) } else { seconds };
    eprintln!("plane-load: {nodes} persistent connections; heartbeating every {interval} s for {seconds} s");
    let cpu0 = cpu_seconds(plane.0.id());
    let start = Instant::now();
    let end = start + Duration::from_secs(seconds);
    let promoted_at = start + Duration::from_secs(interval);
    let mut tasks = Vec::new();
    for (i, (mut sender, mut known)) in senders.into_iter().zip(known).enumerate() {
        let id = enrolled[i].id.clone();
        let offset = Duration::from_secs_f64(interval as f64 * i as f64 / nodes as f64);
        tasks.push(tokio::spawn(async move {
            let (mut lat, mut errors, mut fetched) = (Vec::new(), 0u64, None);
            let mut next = start + offset;
            while next < end {
                tokio::time::sleep_until(next.into()).await;
                let t0 = Instant::now();
                match exchange(&mut sender, Some(&report()), &format!("/v1/nodes/{id}/heartbeat")).await {
                    Ok((200, answer)) => {
                        lat.push(t0.elapsed().as_secs_f64() * 1000.0);
                        // As an agent: a new generation is fetched at once.
                        if let Some(g) = generation(&answer).filter(|g| *g != known) {
                            match exchange(&mut sender, None, &format!("/v1/nodes/{id}/desired")).await {
                                Ok((200, desired)) if generation(&desired) == Some(g) => {
                                    known = g;
                                    fetched = Some(Instant::now());
                                }
                                _ => errors += 1,
                            }
                        }
                    }
                    _ => errors += 1,
                }
                next += Duration::from_secs(interval);
            }
            (lat, errors, fetched)
        }));
    }
    let promote = fanout.as_ref().map(|(repo, _)| {
        let (operator, base, repo) = (operator.clone(), base.clone(), repo.clone());
        let pid = plane.0.id();
        tokio::spawn(async move {
            tokio::time::sleep_until(promoted_at.into()).await;
            let cpu = cpu_seconds(pid);
            let body = json!({"repo": repo, "from": "candidate", "to": "stable"});
            let r = operator.post(format!("{base}/v1/operator/channels/promote")).json(&body).send().await.unwrap();
            assert!(r.status().is_success(), "channel promote: {}", r.text().await.unwrap_or_default());
            cpu
        })
    });
    let (mut lat, mut errors, mut fetches) = (Vec::new(), 0, Vec::new());
    for t in tasks {
        let (l, e, f) = t.await.unwrap();
        lat.extend(l);
        errors += e;
        fetches.push(f);
    }
    let window = start.elapsed().as_secs_f64();
    let cpu = (cpu_seconds(plane.0.id()) - cpu0) / window;
    lat.sort_by(f64::total_cmp);
    println!(
        "heartbeat fan-in: {nodes} mTLS connections, {} heartbeats in {window:.0} s ({:.0}/s), {errors} errors; latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; plane CPU {cpu:.2} cores (targets: p99 <= 20 ms, <= 0.5 core)",
        lat.len(),
        lat.len() as f64 / window,
        percentile(&lat, 0.50),
        percentile(&lat, 0.99),
        lat.last().copied().unwrap_or(0.0)
    );

    if let Some(promote) = promote {
        let cpu_at_promote = promote.await.unwrap();
        let mut reached: Vec<f64> = fetches
            .iter()
            .flatten()
            .filter(|at| **at >= promoted_at)
            .map(|at| at.duration_since(promoted_at).as_secs_f64())
            .collect();
        reached.sort_by(f64::total_cmp);
        let last = reached.last().copied().unwrap_or(f64::NAN);
        // The plane's CPU from the promote to the end of the window (fan-in included).
        let cpu = (cpu_seconds(plane.0.id()) - cpu_at_promote) / promoted_at.elapsed().as_secs_f64();
        println!(
            "desired-state fan-out: channel promote reached {}/{nodes} nodes (desired state fetched) in p50 {:.1} s, max {last:.1} s = {:.2} heartbeat intervals; plane CPU {cpu:.2} cores meanwhile (targets: all within 2 intervals, <= 0.5 core)",
            reached.len(),
            percentile(&reached, 0.5),
            last / interval as f64
        );
    }

    // Restart: SIGKILL, start again on the same state and port; every node reconnects.
    drop(plane);
    let t = Instant::now();
    let plane = start_plane(&bin, state.path(), port, &extra);
    let outcomes: Vec<Result<u16, String>> =
        futures_util::stream::iter(enrolled.iter().map(|n| (Arc::clone(&n.tls), n.id.clone())))
            .map(|(tls, id)| async move {
                let deadline = Instant::now() + Duration::from_secs(180);
                loop {
                    match connect(addr, Arc::clone(&tls)).await {
                        Ok(mut s) => return post(&mut s, &format!("/v1/nodes/{id}/handshake"), &report()).await,
                        Err(e) if Instant::now() > deadline => return Err(e.to_string()),
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
            })
            .buffer_unordered(512)
            .collect()
            .await;
    let elapsed = t.elapsed().as_secs_f64();
    let ok = outcomes.iter().filter(|o| **o == Ok(200)).count();
    let auth_failures = outcomes.iter().filter(|o| matches!(o, Ok(s) if *s == 401 || *s == 403)).count();
    println!(
        "reconnect after SIGKILL + restart: {ok}/{nodes} nodes re-handshaked in {elapsed:.1} s, {auth_failures} authentication failures, {} other failures (target: <= 60 s, none failing)",
        nodes - ok - auth_failures
    );
    drop(plane);
}
