//! The reference plane as a real peer: the `ironroot-plane` binary serving on 127.0.0.1:0 with
//! its own state directory (killed by PID on drop, or with SIGKILL on purpose), operator
//! commands through its CLI, and node clients with real keys, CSRs and mTLS.

use std::path::Path;
use std::process::{Child, Command, Stdio};
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
        let child = Command::new(binary_named("ironroot-plane"))
            .args(["serve", "--state"])
            .arg(self.state.path())
            .args(["--listen", "127.0.0.1:0"])
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

    /// SIGKILLs the plane (no shutdown path runs) and starts it again on the same state.
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

    /// Journal records whose kind is `kind`.
    pub fn journal(&self, kind: &str) -> Vec<serde_json::Value> {
        let out = Command::new(binary_named("ironroot-plane"))
            .arg("--state")
            .arg(self.state.path())
            .args(["audit", "list"])
            .output()
            .expect("audit list");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.split_whitespace().nth(3) == Some(kind))
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
