//! The reference plane as a real peer: the `ironroot-plane` binary serving on 127.0.0.1:0 with
//! its own state directory (killed by PID on drop, or with SIGKILL on purpose), operator
//! commands through its CLI, and node clients with real keys, CSRs and mTLS.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cli::{Run, binary_named};

/// How long a plane may take to write its address after starting.
const START_TIMEOUT: Duration = Duration::from_secs(20);

pub struct TestPlane {
    child: Option<Child>,
    pub state: tempfile::TempDir,
    pub addr: String,
    args: Vec<String>,
}

impl std::fmt::Debug for TestPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TestPlane({})", self.addr)
    }
}

impl TestPlane {
    /// Starts a plane with extra `serve` arguments (short timings for tests).
    pub fn start(extra: &[&str]) -> Self {
        let state = tempfile::Builder::new().prefix("ironroot-plane-").tempdir().expect("state dir");
        let mut plane =
            Self { child: None, state, addr: String::new(), args: extra.iter().map(|s| s.to_string()).collect() };
        plane.spawn();
        plane
    }

    fn spawn(&mut self) {
        let address = self.state.path().join("address");
        let _stale = std::fs::remove_file(&address); // absent on first start
        // A restart listens where the plane did before: its nodes (and QEMU's forwards) know it.
        let listen = if self.addr.is_empty() { "127.0.0.1:0".to_owned() } else { self.addr.clone() };
        let child = Command::new(binary_named("ironroot-plane"))
            .args(["serve", "--state"])
            .arg(self.state.path())
            .args(["--listen", &listen])
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.state.path().join("serve.log")).expect("log"))
            .spawn()
            .expect("starting ironroot-plane");
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(a) = std::fs::read_to_string(&address) {
                self.addr = a.trim().to_owned();
                return;
            }
            assert!(Instant::now() < deadline, "plane did not start: {}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The plane process's id (for reading its memory in /proc).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// The plane's resident memory, KiB (VmRSS).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("plane status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/PID/status")
    }

    /// Stops the plane with SIGTERM (its shutdown path runs: a last journal checkpoint) and
    /// waits for it to exit; returns its exit code.
    pub fn terminate(&mut self) -> i32 {
        let mut c = self.child.take().expect("a running plane");
        let pid = rustix::process::Pid::from_raw(c.id() as i32).expect("pid");
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM");
        c.wait().expect("reap").code().unwrap_or(-1)
    }

    /// [`TestPlane::terminate`] if it is running (its shutdown powers off the machines its
    /// provider started); the exit code, if it ran.
    pub fn stop(&mut self) -> Option<i32> {
        self.child.is_some().then(|| self.terminate())
    }

    /// Sets `flag` to `value` for the next start ([`TestPlane::restart`]).
    pub fn set_flag(&mut self, flag: &str, value: &str) {
        match self.args.iter().position(|a| a == flag) {
            Some(i) if i + 1 < self.args.len() => self.args[i + 1] = value.to_owned(),
            _ => self.args.extend([flag.to_owned(), value.to_owned()]),
        }
    }

    /// Starts the plane again on the same state and address (after [`TestPlane::terminate`]).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "the plane is still running");
        self.spawn();
    }

    /// SIGKILLs the plane (no shutdown path runs) and starts it again on the same state and
    /// address.
    pub fn kill9_and_restart(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().expect("kill -9"); // Child::kill sends SIGKILL
            c.wait().expect("reap");
        }
        self.spawn();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.state.path().join("serve.log")).unwrap_or_default()
    }

    pub fn dir(&self) -> &Path {
        self.state.path()
    }

    /// Runs `ironroot-plane --state DIR ARGS…` (an operator command).
    pub fn op(&self, args: &[&str]) -> Run {
        Command::new(binary_named("ironroot-plane"))
            .arg("--state")
            .arg(self.state.path())
            .args(args)
            .output()
            .expect("operator command")
            .into()
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://{}{path}", self.addr)
    }

    fn ca(&self) -> reqwest::Certificate {
        reqwest::Certificate::from_pem(&std::fs::read(self.state.path().join("ca.pem")).expect("ca.pem")).expect("ca")
    }

    /// A client that trusts the plane CA and presents no certificate.
    pub fn anonymous(&self) -> reqwest::Client {
        reqwest::Client::builder().tls_certs_only([self.ca()]).build().expect("client")
    }

    /// A client presenting `cert_pem` + `key_pem`, trusting the plane CA.
    pub fn with_identity(&self, cert_pem: &str, key_pem: &str) -> reqwest::Client {
        let identity = reqwest::Identity::from_pem(format!("{cert_pem}{key_pem}").as_bytes()).expect("identity");
        reqwest::Client::builder().tls_certs_only([self.ca()]).identity(identity).build().expect("client")
    }

    /// The operator's client certificate, as a node would misuse it.
    pub fn operator_client(&self) -> reqwest::Client {
        let read = |f: &str| std::fs::read_to_string(self.state.path().join(f)).expect("operator material");
        self.with_identity(&read("operator.pem"), &read("operator.key"))
    }

    /// Waits (up to `within`) until the journal holds a record of `kind`; returns them all.
    pub fn wait_journal(&self, kind: &str, within: Duration) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + within;
        loop {
            let records = self.journal(kind);
            if !records.is_empty() {
                return records;
            }
            assert!(Instant::now() < deadline, "no {kind} record in the journal within {within:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Journal records whose kind is `kind`.
    pub fn journal(&self, kind: &str) -> Vec<serde_json::Value> {
        self.journal_where(|k| k == kind)
    }

    /// The journal's records whose kind passes `keep`, one string per record.
    pub fn journal_where(&self, keep: impl Fn(&str) -> bool) -> Vec<serde_json::Value> {
        let out = Command::new(binary_named("ironroot-plane"))
            .arg("--state")
            .arg(self.state.path())
            .args(["audit", "list"])
            .output()
            .expect("audit list");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.split_whitespace().nth(3).is_some_and(&keep))
            .map(|l| serde_json::Value::String(l.to_owned()))
            .collect()
    }
}

impl Drop for TestPlane {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // Ends exactly the plane this harness started.
            if let Err(e) = c.kill() {
                eprintln!("stopping ironroot-plane: {e}");
            }
            let _reaped = c.wait();
        }
    }
}

/// A node's key pair and CSRs (Ed25519 or P-256).
#[derive(Debug)]
pub struct NodeKey {
    pub key: rcgen::KeyPair,
}

impl NodeKey {
    pub fn ed25519() -> Self {
        Self { key: rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("ed25519 key") }
    }

    pub fn p256() -> Self {
        Self { key: rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("p256 key") }
    }

    /// A CSR asking for `sans` and a CA role (which the plane must ignore).
    pub fn csr(&self, sans: &[&str]) -> String {
        let mut params =
            rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).expect("params");
        params.distinguished_name.push(rcgen::DnType::CommonName, "please-make-me-admin");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.serialize_request(&self.key).expect("csr").pem().expect("pem")
    }

    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }
}

/// An enrolled node: its id, a client presenting its certificate, and its key material.
#[derive(Debug)]
pub struct PlaneNode {
    pub id: String,
    pub client: reqwest::Client,
    pub cert: String,
    pub key_pem: String,
}

/// `POST /v1/enroll` with `body` from an anonymous client: (status, JSON answer).
pub async fn enroll_raw(p: &TestPlane, body: &serde_json::Value) -> (u16, serde_json::Value) {
    let resp = p.anonymous().post(p.url("/v1/enroll")).json(body).send().await.expect("enroll request");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(serde_json::Value::Null))
}

/// Enrolls a node named `name` with `key` through a fresh token.
pub async fn enroll(p: &TestPlane, name: &str, key: &NodeKey) -> PlaneNode {
    let token = p.op(&["token", "create", "--node", name]).ok();
    let body = serde_json::json!({"token": token, "csr": key.csr(&[]), "identity": {"name": name}});
    let (status, body) = enroll_raw(p, &body).await;
    assert_eq!(status, 200, "{body}");
    let cert = body["certificate"].as_str().expect("certificate").to_owned();
    PlaneNode {
        id: body["node_id"].as_str().expect("node id").to_owned(),
        client: p.with_identity(&cert, &key.key_pem()),
        cert,
        key_pem: key.key_pem(),
    }
}

/// One request: (status, JSON answer), or (0, the error) when the request did not get an answer.
pub async fn call(
    client: &reqwest::Client,
    p: &TestPlane,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let mut req = if method == "GET" { client.get(p.url(path)) } else { client.post(p.url(path)) };
    if let Some(b) = body {
        req = req.json(&b);
    }
    match req.send().await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            (status, resp.json().await.unwrap_or(serde_json::Value::Null))
        }
        Err(e) => (0, serde_json::Value::String(format!("{e:?}"))),
    }
}

/// A node report in `phase`.
pub fn report(phase: &str) -> serde_json::Value {
    serde_json::json!({"boot_id": "boot-1", "agent_version": "0.1.0", "phase": phase,
           "phase_timings_ms": {"discover": 3, "enroll": 40}, "module_digests": [format!("sha256:{}", "ab".repeat(32))]})
}

/// A raw TLS connection to the plane (no HTTP on top), presenting `identity` (chain PEM, key
/// PEM) if given: for tests of what the plane does with slow, idle and half-open connections.
pub async fn tls_connect(
    p: &TestPlane,
    identity: Option<(&str, &str)>,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(p.dir().join("ca.pem")).expect("ca.pem") {
        roots.add(c.expect("CA certificate")).expect("trusting the CA");
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots);
    let config = match identity {
        Some((chain, key)) => {
            let certs: Vec<_> = CertificateDer::pem_slice_iter(chain.as_bytes()).map(|c| c.expect("cert")).collect();
            builder
                .with_client_auth_cert(certs, PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("key"))
                .expect("client certificate")
        }
        None => builder.with_no_client_auth(),
    };
    let tcp = tokio::net::TcpStream::connect(p.addr()).await?;
    let name = ServerName::try_from("127.0.0.1").expect("server name").to_owned();
    tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await
}

/// A registry holding modules the real `ironroot-build` built, signed and pushed, and the keys
/// that signed them: what a plane publishing channels reads (`serve --trust Shelf::trust()`).
pub struct Shelf {
    pub registry: crate::registry::TestRegistry,
    pub work: tempfile::TempDir,
}

impl std::fmt::Debug for Shelf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Shelf({:?})", self.registry)
    }
}

impl Shelf {
    /// A plain loopback registry, and two key pairs: `keys` (trusted) and `other-keys`.
    pub fn start() -> Self {
        Self::start_with(crate::registry::Auth::None)
    }

    /// As [`Shelf::start`], the registry served with `auth` (TLS under a fresh CA, say).
    pub fn start_with(auth: crate::registry::Auth<'_>) -> Self {
        let registry = crate::registry::TestRegistry::start_with(auth);
        let work = tempfile::Builder::new().prefix("ironroot-shelf-").tempdir().expect("shelf dir");
        for keys in ["keys", "other-keys"] {
            let out = work.path().join(keys);
            crate::cli::build_cmd(&["keys", "generate", "--out", &out.to_string_lossy()]).ok();
        }
        Self { registry, work }
    }

    /// The public key of `keys`, for `serve --trust`.
    pub fn trust(&self) -> String {
        self.work.path().join("keys/ironroot.pub").to_string_lossy().into_owned()
    }

    /// `127.0.0.1:PORT/ironroot/NAME`.
    pub fn repo(&self, name: &str) -> String {
        format!("{}/ironroot/{name}", self.registry.host())
    }

    fn layout(&self, name: &str, serial: u64) -> std::path::PathBuf {
        self.work.path().join(format!("layout-{name}-{serial}"))
    }

    /// Builds module `name` at `serial` (role `opt`, version `1.SERIAL`) from a one-file tree,
    /// signs it with the key pair in `keys` (`None`: unsigned) and pushes it as `tag`; returns
    /// its manifest digest.
    pub fn publish(&self, name: &str, serial: u64, tag: &str, keys: Option<&str>) -> String {
        let tree = self.work.path().join(format!("tree-{name}"));
        std::fs::create_dir_all(&tree).expect("tree");
        std::fs::write(tree.join("README"), format!("module {name}\n")).expect("tree file");
        let layout = self.layout(name, serial);
        let (version, serial_s) = (format!("1.{serial}"), serial.to_string());
        let printed = crate::cli::build_cmd(&[
            "module",
            "build",
            "--from",
            &tree.to_string_lossy(),
            "--name",
            name,
            "--version",
            &version,
            "--serial",
            &serial_s,
            "--role",
            "opt",
            "--out",
            &layout.to_string_lossy(),
        ])
        .ok();
        let digest = printed.rsplit('@').next().expect("digest").to_owned();
        let local = format!("oci:{}@{digest}", layout.display());
        if let Some(keys) = keys {
            let key = self.work.path().join(keys).join("ironroot.key");
            crate::cli::build_cmd(&["module", "sign", &local, "--key", &key.to_string_lossy()]).ok();
        }
        self.push(name, serial, &digest, tag);
        digest
    }

    /// Builds module `name` at `serial` as [`Shelf::publish`] does, then rewrites its signed
    /// config to say `role` (a role no ironroot knows, say), signs the new manifest with `keys`
    /// and pushes it as `tag`: a validly signed module whose content is wrong. Its digest.
    pub fn publish_with_role(&self, name: &str, serial: u64, tag: &str, role: &str) -> String {
        let built = self.publish(name, serial, &format!("{tag}-built"), None);
        let layout = ironroot_oci::layout::Layout::open(&self.layout(name, serial)).expect("layout");
        let digest: ironroot_contract::OciDigest = built.parse().expect("digest");
        let bytes = std::fs::read(layout.blob_path(&digest)).expect("manifest blob");
        let mut manifest = ironroot_contract::manifest::ImageManifest::parse(&bytes).expect("manifest");
        let config = std::fs::read(layout.blob_path(&manifest.config.digest)).expect("config blob");
        let mut config: serde_json::Value = serde_json::from_slice(&config).expect("config json");
        config["role"] = serde_json::json!(role);
        let config = serde_json::to_vec(&config).expect("config");
        manifest.config.digest = layout.write_blob(&config).expect("config blob");
        manifest.config.size = config.len() as u64;
        let crafted = crate::craft::store(&layout, tag, &manifest);
        // `ironroot-build module sign` refuses a config it cannot read; the signature is made
        // the way it would have been.
        let target = ironroot_oci::Target::Layout { dir: self.layout(name, serial), tag: None, digest: Some(crafted) };
        crate::craft::sign_digest(&target, crafted, &self.work.path().join("keys/ironroot.key"));
        let local = format!("oci:{}:{tag}", self.layout(name, serial).display());
        let to = format!("{}:{tag}", self.repo(name));
        match &self.registry.ca_pem {
            Some(ca) => crate::cli::build_cmd(&["module", "push", "--registry-ca", &ca.to_string_lossy(), &local, &to]),
            None => crate::cli::build_cmd(&["module", "push", &local, &to]),
        }
        .ok();
        crafted.to_string()
    }

    /// Pushes the build of `name` at `serial` (manifest `digest`, with its signatures) as `tag`.
    pub fn push(&self, name: &str, serial: u64, digest: &str, tag: &str) {
        let local = format!("oci:{}@{digest}", self.layout(name, serial).display());
        let to = format!("{}:{tag}", self.repo(name));
        match &self.registry.ca_pem {
            Some(ca) => crate::cli::build_cmd(&["module", "push", "--registry-ca", &ca.to_string_lossy(), &local, &to]),
            None => crate::cli::build_cmd(&["module", "push", &local, &to]),
        }
        .ok();
    }
}

/// `POST /v1/nodes/{id}/heartbeat` (`ready`) reporting `digests` as the node's modules:
/// (status, answer).
pub async fn heartbeat_with(p: &TestPlane, node: &PlaneNode, digests: &[&str]) -> (u16, serde_json::Value) {
    let mut body = report("ready");
    body["module_digests"] = serde_json::json!(digests);
    call(&node.client, p, "POST", &format!("/v1/nodes/{}/heartbeat", node.id), Some(body)).await
}

/// A node journal record of kind `receipt`: module `module` changed from `from` to `to`
/// (`(version, serial, digest)`) with `outcome` (`committed`, `rolled-back`, `failed`).
pub fn receipt_record(
    seq: u64,
    module: &str,
    from: Option<(&str, u64, &str)>,
    to: (&str, u64, &str),
    outcome: &str,
    reason: Option<&str>,
) -> serde_json::Value {
    let side = |(version, serial, digest): (&str, u64, &str)| serde_json::json!({"version": version, "serial": serial, "digest": digest, "composefs_digest": "ab".repeat(32)});
    let mut receipt = serde_json::json!({
        "transaction": format!("tx-{seq}"), "module": module, "role": "opt", "to": side(to),
        "units": [], "started": 100, "finished": 120, "outcome": outcome, "agent_version": "0.1.0",
    });
    if let Some(from) = from {
        receipt["from"] = side(from);
    }
    if let Some(reason) = reason {
        receipt["reason"] = reason.into();
    }
    serde_json::json!({"seq": seq, "time": 120, "kind": "receipt", "data": receipt})
}
