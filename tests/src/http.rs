//! Tiny HTTP/1.1 servers on 127.0.0.1 that tests control completely: a bearer-token endpoint
//! and a registry front that serves a module from an OCI layout but misbehaves on one blob
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

/// A token endpoint that issues `{"token": …}` only to `user:password` basic auth.
pub fn token_server(user: &str, password: &str) -> Server {
    use base64::Engine as _;
    let expected = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")));
    Server::start(move |req, conn| {
        if req.headers.get("authorization") == Some(&expected) {
            respond(conn, "200 OK", "application/json", br#"{"token":"ironroot-test-token","expires_in":300}"#);
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
