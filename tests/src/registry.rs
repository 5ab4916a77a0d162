//! A real distribution registry (Debian `docker-registry`) per test, on 127.0.0.1 with a port
//! the kernel picks (read back from the registry's log), filesystem storage in a temp dir,
//! killed by PID on drop. Variants: plain HTTP, TLS + htpasswd, and bearer-token auth.
//!
//! Its log (the access log on stdout, the application log on stderr) is copied by one thread
//! per pipe, behind the registry; [`TestRegistry::settled_log`] waits for the copy to catch up.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, ServerName};

use crate::http::{TOKEN_ISSUER, TOKEN_SERVICE, TokenIssuer};
use crate::tools::tool;

/// How long a registry may take to print its listening address.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// How long the copied log may lag behind a request the registry has answered: the copy is a
/// pipe read away, so this only ends a wait for a line that never comes.
const LOG_TIMEOUT: Duration = Duration::from_secs(20);

/// The query key of [`TestRegistry::settled_log`]'s own requests; their lines are left out.
const BARRIER: &str = "ironroot-log-barrier";

/// Numbers barrier requests uniquely within the test process (zero-padded, so that no marker
/// is a prefix of another).
static BARRIERS: AtomicU64 = AtomicU64::new(0);

/// The registry's output as copied so far, and a signal for every line added.
#[derive(Debug, Default)]
struct Log {
    text: Mutex<String>,
    grew: Condvar,
}

pub struct TestRegistry {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
    log: Arc<Log>,
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
    /// Bearer challenges pointing at `realm`; distribution's `token` auth, which accepts only
    /// JWTs that `issuer` signed for this registry's service (plain HTTP).
    Token {
        realm: &'a str,
        issuer: &'a TokenIssuer,
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
            Auth::Token { realm, issuer } => {
                let bundle = dir.path().join("token-issuer.pem");
                std::fs::write(&bundle, issuer.cert_pem()).expect("write token issuer certificate");
                config.push_str(&format!(
                    "auth:\n  token:\n    realm: {realm}\n    service: {TOKEN_SERVICE}\n    issuer: {TOKEN_ISSUER}\n    rootcertbundle: {}\n",
                    bundle.display()
                ));
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
        let log = Arc::new(Log::default());
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
                    if let Ok(mut l) = log.text.lock() {
                        l.push_str(&line);
                        l.push('\n');
                    }
                    log.grew.notify_all();
                }
            });
        }
        let deadline = Instant::now() + START_TIMEOUT;
        let port = loop {
            if let Ok(p) = rx.recv_timeout(Duration::from_millis(100)) {
                break p;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "docker-registry exited with {status}: {}",
                    log.text.lock().map(|l| l.clone()).unwrap_or_default()
                );
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

    /// Everything copied from the registry's log so far (includes its access log). The copy
    /// lags behind the registry: what must be complete, such as "no request for X", is read
    /// with [`TestRegistry::settled_log`].
    pub fn log(&self) -> String {
        self.log.text.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// The registry's log with every request it answered before this call in, without the
    /// barrier requests (this one's and earlier ones). The registry writes a request's
    /// access-log and application-log lines as its handler returns; this sends a request of
    /// its own with a unique marker after the caller's, and waits until both of its lines
    /// have been copied. Successive calls return growing prefixes of one text.
    pub fn settled_log(&self) -> String {
        let marker = format!("{BARRIER}={:08}", BARRIERS.fetch_add(1, Ordering::SeqCst));
        let path = format!("/v2/?{marker}");
        // Any status will do (an auth variant answers 401): the request is logged either way.
        self.get_status(&path, None);
        let access = format!("{path} HTTP/"); // "GET /v2/?… HTTP/1.1" 200 …
        let app = format!("http.request.uri=\"{path}\"");
        let text = self.log.text.lock().expect("registry log lock");
        let (text, waited) = self
            .log
            .grew
            .wait_timeout_while(text, LOG_TIMEOUT, |t| !(t.contains(&access) && t.contains(&app)))
            .expect("registry log lock");
        assert!(
            !waited.timed_out(),
            "the registry's log has no line for our request {path} after {LOG_TIMEOUT:?}:\n{}",
            *text
        );
        let end_of_line = |needle: &str| {
            let at = text.find(needle).unwrap_or(0);
            text[at..].find('\n').map_or(text.len(), |n| at + n + 1)
        };
        let end = end_of_line(&access).max(end_of_line(&app));
        text[..end].lines().filter(|l| !l.contains(BARRIER)).flat_map(|l| [l, "\n"]).collect()
    }

    /// The status of `GET path` (over TLS with the registry's CA for the TLS variants), with
    /// `authorization` as the Authorization header if given.
    pub fn get_status(&self, path: &str, authorization: Option<&str>) -> u16 {
        let mut request = format!("GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n", self.host());
        if let Some(value) = authorization {
            request.push_str(&format!("Authorization: {value}\r\n"));
        }
        request.push_str("\r\n");
        let tcp = TcpStream::connect(("127.0.0.1", self.port)).expect("connecting to the registry");
        let mut response = Vec::new();
        // The response is read to its end; a TLS peer that closes without close_notify ends it
        // with an error after the bytes that matter.
        let read = match &self.ca_pem {
            None => {
                let mut tcp = tcp;
                tcp.write_all(request.as_bytes()).expect("sending a request to the registry");
                tcp.read_to_end(&mut response)
            }
            Some(ca) => {
                let mut tls = rustls::StreamOwned::new(tls_client(ca), tcp);
                tls.write_all(request.as_bytes()).expect("sending a request to the registry");
                tls.read_to_end(&mut response)
            }
        };
        let head = String::from_utf8_lossy(&response);
        let status = head.lines().next().and_then(|l| l.split(' ').nth(1)).and_then(|c| c.parse().ok());
        status.unwrap_or_else(|| panic!("no HTTP status from the registry for {path} ({read:?}): {head}"))
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

/// A TLS client session to 127.0.0.1 that trusts only the CA at `ca`.
fn tls_client(ca: &Path) -> rustls::ClientConnection {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("registry CA") {
        roots.add(cert.expect("registry CA certificate")).expect("registry CA as a root");
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    rustls::ClientConnection::new(Arc::new(config), name).expect("TLS client")
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
