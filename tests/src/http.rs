//! Tiny HTTP/1.1 servers on 127.0.0.1 that tests control completely: a bearer-token endpoint
//! (with the issuer that signs its tokens) and a registry front that serves a module from an OCI layout but misbehaves on one blob
//! (endless, or a byte every two seconds). One thread per connection; stopped on drop.

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub headers: HashMap<String, String>,
}

type Handler = dyn Fn(&Request, &mut TcpStream) + Send + Sync;

pub struct Server {
    port: u16,
    stop: Arc<AtomicBool>,
    pub requests: Arc<Mutex<Vec<String>>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Server(127.0.0.1:{})", self.port)
    }
}

impl Server {
    pub fn start(handler: impl Fn(&Request, &mut TcpStream) + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local addr").port();
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let handler: Arc<Handler> = Arc::new(handler);
        let (stop2, requests2) = (Arc::clone(&stop), Arc::clone(&requests));
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut conn) = conn else { continue };
                let (handler, requests) = (Arc::clone(&handler), Arc::clone(&requests2));
                std::thread::spawn(move || {
                    while let Some(req) = read_request(&mut conn) {
                        if let Ok(mut r) = requests.lock() {
                            r.push(format!("{} {}", req.method, req.path));
                        }
                        handler(&req, &mut conn);
                        if req.headers.get("connection").is_some_and(|c| c.eq_ignore_ascii_case("close")) {
                            break;
                        }
                    }
                });
            }
        });
        Self { port, stop, requests }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop so it sees the flag.
        let _wake = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn read_request(conn: &mut TcpStream) -> Option<Request> {
    let mut reader = BufReader::new(conn.try_clone().ok()?);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next()?.to_owned(), parts.next()?.to_owned());
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).ok()? == 0 {
            return None;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
    }
    if let Some(len) = headers.get("content-length").and_then(|l| l.parse::<u64>().ok()) {
        std::io::copy(&mut (&mut reader).take(len), &mut std::io::sink()).ok()?;
    }
    Some(Request { method, path, headers })
}

pub fn respond(conn: &mut TcpStream, status: &str, content_type: &str, body: &[u8]) {
    let head = format!("HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n", body.len());
    // A client that hung up is not the server's failure.
    let _client_gone = conn.write_all(head.as_bytes()).and_then(|()| conn.write_all(body));
}

/// The `iss` of the tokens a [`TokenIssuer`] signs, and the one a token registry trusts.
pub const TOKEN_ISSUER: &str = "ironroot-test-issuer";
/// The `aud` of those tokens: the service name a token registry announces and accepts.
pub const TOKEN_SERVICE: &str = "ironroot-test";

/// How long an issued token is valid.
const TOKEN_LIFETIME: Duration = Duration::from_secs(300);

/// The signing side of distribution's `token` auth: an ECDSA P-256 key and its self-signed
/// certificate, which a registry started with [`crate::registry::Auth::Token`] trusts
/// (`rootcertbundle`). Tokens are ES256 JWTs carrying that certificate (`x5c`).
pub struct TokenIssuer {
    key: rcgen::KeyPair,
    cert: rcgen::Certificate,
}

impl std::fmt::Debug for TokenIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenIssuer({TOKEN_ISSUER})")
    }
}

impl TokenIssuer {
    pub fn generate() -> Self {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("token signing key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("certificate params");
        params.distinguished_name.push(rcgen::DnType::CommonName, TOKEN_ISSUER);
        let cert = params.self_signed(&key).expect("token issuer certificate");
        Self { key, cert }
    }

    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    /// A token for `subject` granting `scopes` as clients ask for them
    /// (`repository:NAME:ACTION[,ACTION…]`), valid for [`TOKEN_LIFETIME`].
    pub fn issue(&self, subject: &str, scopes: &[String]) -> String {
        use base64::Engine as _;
        use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
        use rcgen::SigningKey as _;
        static ISSUED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs();
        let access: Vec<_> = scopes
            .iter()
            .filter_map(|scope| {
                let (kind, rest) = scope.split_once(':')?;
                let (name, actions) = rest.rsplit_once(':')?;
                Some(serde_json::json!({"type": kind, "name": name, "actions": actions.split(',').collect::<Vec<_>>()}))
            })
            .collect();
        let header = serde_json::json!({"typ": "JWT", "alg": "ES256", "x5c": [STANDARD.encode(self.cert.der())]});
        let claims = serde_json::json!({
            "iss": TOKEN_ISSUER, "sub": subject, "aud": TOKEN_SERVICE,
            "iat": now, "nbf": now, "exp": now + TOKEN_LIFETIME.as_secs(),
            "jti": format!("ironroot-test-{}", ISSUED.fetch_add(1, Ordering::SeqCst)),
            "access": access,
        });
        let signed =
            format!("{}.{}", URL_SAFE_NO_PAD.encode(header.to_string()), URL_SAFE_NO_PAD.encode(claims.to_string()));
        let der = self.key.sign(signed.as_bytes()).expect("signing a token");
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(ecdsa_fixed(&der)))
    }
}

/// An ECDSA signature's DER `SEQUENCE { INTEGER r, INTEGER s }` as JWS wants it: r ‖ s, 32
/// bytes each (P-256).
fn ecdsa_fixed(der: &[u8]) -> [u8; 64] {
    assert_eq!(der.first(), Some(&0x30), "ECDSA signature is not a DER sequence");
    let mut out = [0; 64];
    let mut at = 2; // the sequence's tag and (short) length: a P-256 signature is ≤ 72 bytes
    for half in out.chunks_mut(32) {
        assert_eq!(der[at], 0x02, "ECDSA signature: expected an integer");
        let len = usize::from(der[at + 1]);
        let int = &der[at + 2..at + 2 + len];
        let int = &int[int.len().saturating_sub(32)..]; // without DER's sign byte
        half[32 - int.len()..].copy_from_slice(int);
        at += 2 + len;
    }
    out
}

/// The values of `key` in `path`'s query string, percent-decoded.
fn query_values(path: &str, key: &str) -> Vec<String> {
    let query = path.split_once('?').map_or("", |(_, q)| q);
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .filter(|(k, _)| *k == key)
        .map(|(_, v)| percent_decode(v))
        .collect()
}

fn percent_decode(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len());
    let mut rest = s.as_bytes();
    while let Some((&b, tail)) = rest.split_first() {
        let hex = tail
            .get(..2)
            .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
            .and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok());
        match (b, hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                rest = &tail[2..];
            }
            (b'+', _) => {
                out.push(b' ');
                rest = tail;
            }
            _ => {
                out.push(b);
                rest = tail;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A token endpoint that gives `user:password` basic auth a token from `issuer` for the
/// scopes it asks, with the user as the token's subject, and refuses anyone else.
pub fn token_server(user: &str, password: &str, issuer: Arc<TokenIssuer>) -> Server {
    use base64::Engine as _;
    let expected = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")));
    let user = user.to_owned();
    Server::start(move |req, conn| {
        if req.headers.get("authorization") == Some(&expected) {
            let scopes: Vec<String> = query_values(&req.path, "scope")
                .iter()
                .flat_map(|s| s.split(' ').map(str::to_owned).collect::<Vec<_>>())
                .collect();
            let token = issuer.issue(&user, &scopes);
            let body = serde_json::json!({"token": token, "expires_in": TOKEN_LIFETIME.as_secs()});
            respond(conn, "200 OK", "application/json", body.to_string().as_bytes());
        } else {
            respond(conn, "401 Unauthorized", "application/json", br#"{"errors":[{"code":"UNAUTHORIZED"}]}"#);
        }
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Misbehaviour {
    /// Sends the blob's real bytes, then more bytes forever; no Content-Length.
    Endless,
    /// Declares the right length, then sends one byte every two seconds.
    Trickle,
}

fn victim_size(layout: &std::path::Path, digest: &str) -> u64 {
    std::fs::metadata(layout.join("blobs/sha256").join(digest.trim_start_matches("sha256:"))).map_or(0, |m| m.len())
}

/// A read-only registry front for the OCI layout at `layout` that misbehaves on `victim`: a
/// blob digest, or a manifest tag or digest.
pub fn hostile_registry(layout: PathBuf, victim: String, how: Misbehaviour) -> Server {
    Server::start(move |req, conn| {
        let path = req.path.split('?').next().unwrap_or("");
        if path == "/v2/" {
            return respond(conn, "200 OK", "application/json", b"{}");
        }
        let Some(rest) = path.strip_prefix("/v2/") else {
            return respond(conn, "404 Not Found", "text/plain", b"");
        };
        let (kind, reference) = match rest.rsplit_once("/manifests/") {
            Some((_, r)) => ("manifests", r.to_owned()),
            None => match rest.rsplit_once("/blobs/") {
                Some((_, r)) => ("blobs", r.to_owned()),
                None => return respond(conn, "404 Not Found", "text/plain", b""),
            },
        };
        let digest = if reference.starts_with("sha256:") {
            reference.clone()
        } else {
            let index: serde_json::Value =
                serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap_or_default())
                    .unwrap_or_default();
            let found = index["manifests"].as_array().and_then(|ms| {
                ms.iter()
                    .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == reference.as_str())
                    .and_then(|m| m["digest"].as_str().map(str::to_owned))
            });
            match found {
                Some(d) => d,
                None => {
                    return respond(
                        conn,
                        "404 Not Found",
                        "application/json",
                        br#"{"errors":[{"code":"MANIFEST_UNKNOWN"}]}"#,
                    );
                }
            }
        };
        if digest == victim || reference == victim {
            return misbehave(conn, &layout, &digest, how);
        }
        match std::fs::read(layout.join("blobs/sha256").join(digest.trim_start_matches("sha256:"))) {
            Ok(bytes) => {
                let ct = if kind == "manifests" {
                    "application/vnd.oci.image.manifest.v1+json"
                } else {
                    "application/octet-stream"
                };
                respond(conn, "200 OK", ct, &bytes)
            }
            Err(_) => respond(conn, "404 Not Found", "application/json", br#"{"errors":[{"code":"BLOB_UNKNOWN"}]}"#),
        }
    })
}

fn misbehave(conn: &mut TcpStream, layout: &std::path::Path, digest: &str, how: Misbehaviour) {
    match how {
        Misbehaviour::Endless => {
            if conn
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n")
                .is_err()
            {
                return;
            }
            let real = std::fs::read(layout.join("blobs/sha256").join(digest.trim_start_matches("sha256:")))
                .unwrap_or_default();
            if conn.write_all(&real).is_err() {
                return;
            }
            let chunk = vec![0x5a_u8; 64 * 1024];
            while conn.write_all(&chunk).is_ok() {}
        }
        Misbehaviour::Trickle => {
            let size = victim_size(layout, digest);
            let head =
                format!("HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {size}\r\n\r\n");
            if conn.write_all(head.as_bytes()).is_err() {
                return;
            }
            for _ in 0..size {
                if conn.write_all(b"\0").and_then(|()| conn.flush()).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_secs(2));
            }
        }
    }
}
