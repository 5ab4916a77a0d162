//! A real distribution registry (Debian `docker-registry`) per test, on 127.0.0.1 with a port
//! the kernel picks (read back from the registry's log), filesystem storage in a temp dir,
//! killed by PID on drop. Variants: plain HTTP, TLS + htpasswd, and bearer-token auth.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::tools::tool;

/// How long a registry may take to print its listening address.
const START_TIMEOUT: Duration = Duration::from_secs(20);

pub struct TestRegistry {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
    log: Arc<Mutex<String>>,
    /// For the TLS variant: the CA certificate that signed the registry's certificate.
    pub ca_pem: Option<PathBuf>,
    pub credentials: Option<(String, String)>,
}

impl std::fmt::Debug for TestRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TestRegistry(127.0.0.1:{})", self.port)
    }
}

#[derive(Debug)]
pub enum Auth<'a> {
    None,
    /// TLS with a fresh CA, and htpasswd basic auth for this user and password.
    TlsBasic(&'a str, &'a str),
    /// TLS with a fresh CA, anonymous (the QEMU guest's registry).
    Tls,
    /// Bearer challenges pointing at `realm` (distribution's "silly" token auth).
    Token {
        realm: &'a str,
    },
}

impl TestRegistry {
    pub fn start() -> Self {
        Self::start_with(Auth::None)
    }

    pub fn start_with(auth: Auth<'_>) -> Self {
        let dir = tempfile::Builder::new().prefix("ironroot-registry-").tempdir().expect("registry temp dir");
        let storage = dir.path().join("storage");
        std::fs::create_dir_all(&storage).expect("storage dir");
        let mut config = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:0\n",
            storage.display()
        );
        let mut ca_pem = None;
        let mut credentials = None;
        match auth {
            Auth::None => {}
            Auth::Tls => {
                let (ca, cert, key) = make_tls(dir.path());
                config.push_str(&format!("  tls:\n    certificate: {}\n    key: {}\n", cert.display(), key.display()));
                ca_pem = Some(ca);
            }
            Auth::TlsBasic(user, pass) => {
                let (ca, cert, key) = make_tls(dir.path());
                config.push_str(&format!("  tls:\n    certificate: {}\n    key: {}\n", cert.display(), key.display()));
                let htpasswd = dir.path().join("htpasswd");
                let out = Command::new(tool("htpasswd")).args(["-Bbn", user, pass]).output().expect("htpasswd");
                assert!(out.status.success(), "htpasswd failed");
                std::fs::write(&htpasswd, out.stdout).expect("write htpasswd");
                config.push_str(&format!(
                    "auth:\n  htpasswd:\n    realm: ironroot-test\n    path: {}\n",
                    htpasswd.display()
                ));
                ca_pem = Some(ca);
                credentials = Some((user.to_owned(), pass.to_owned()));
            }
            Auth::Token { realm } => {
                config.push_str(&format!("auth:\n  silly:\n    realm: {realm}\n    service: ironroot-test\n"));
            }
        }
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).expect("write registry config");
        let mut child = Command::new(tool("docker-registry"))
            .args(["serve", &config_path.to_string_lossy()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting docker-registry (run `just deps`)");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        for pipe in [
            child.stderr.take().map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
            child.stdout.take().map(|p| Box::new(p) as _),
        ]
        .into_iter()
        .flatten()
        {
            let log = Arc::clone(&log);
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    if let Some(port) = line
                        .split("listening on 127.0.0.1:")
                        .nth(1)
                        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
                        .and_then(|p| p.parse::<u16>().ok())
                    {
                        let _unused_if_test_ended = tx.send(port);
                    }
                    if let Ok(mut l) = log.lock() {
                        l.push_str(&line);
                        l.push('\n');
                    }
                }
            });
        }
        let deadline = Instant::now() + START_TIMEOUT;
        let port = loop {
            if let Ok(p) = rx.recv_timeout(Duration::from_millis(100)) {
                break p;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("docker-registry exited with {status}: {}", log.lock().map(|l| l.clone()).unwrap_or_default());
            }
            assert!(Instant::now() < deadline, "docker-registry did not report its address in time");
        };
        Self { child, port, dir, log, ca_pem, credentials }
    }

    /// `127.0.0.1:PORT`
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The registry's file for blob `digest` (`sha256:…`), to corrupt content behind its back.
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.dir.path().join(format!("storage/docker/registry/v2/blobs/sha256/{}/{hex}/data", &hex[..2]))
    }

    /// Everything the registry logged so far (includes its access log).
    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        // Ends exactly the process this harness started.
        if let Err(e) = self.child.kill() {
            eprintln!("stopping docker-registry: {e}");
        }
        if let Err(e) = self.child.wait() {
            eprintln!("reaping docker-registry: {e}");
        }
    }
}

/// A CA and a server certificate for 127.0.0.1 and 10.0.2.100 signed by it (P-256), made with openssl.
fn make_tls(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let run = |args: &[&str]| {
        let out = Command::new(tool("openssl")).args(args).current_dir(dir).output().expect("openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=ironroot test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign",
    ]);
    run(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(
        dir.join("ext.cnf"),
        // 10.0.2.100: the host's loopback as a QEMU guest sees it (qemu/boot.sh --forward).
        "subjectAltName=IP:127.0.0.1,IP:10.0.2.100\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .expect("ext.cnf");
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
    (dir.join("ca.pem"), dir.join("server.pem"), dir.join("server.key"))
}
