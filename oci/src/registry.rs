//! A distribution registry over HTTP(S). Reads are ours and bounded (every body is size-capped,
//! every request deadline-bound, redirects limited); pushes go through `oci-client`. TLS is
//! rustls only. Plain HTTP is used only for loopback registries, and only when no CA was given
//! and TLS was not asked for.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine as _;
use futures_util::{StreamExt as _, TryStreamExt as _};
use ironroot_contract::OciDigest;
use oci_client::Reference;
use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderValue, WWW_AUTHENTICATE};
use reqwest::{Response, StatusCode};

/// Cap on a token-endpoint response; real ones are a few KiB.
const MAX_TOKEN_RESPONSE: u64 = 64 * 1024;
/// Cap on an error body we keep for a message.
const MAX_ERROR_BODY: u64 = 4 * 1024;
/// Connecting to a registry that does not answer the handshake in this long is a failure.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Storage backends redirect blob reads once or twice; more is a loop.
const MAX_REDIRECTS: usize = 5;

#[derive(Clone, Default)]
pub enum Credentials {
    #[default]
    Anonymous,
    Basic {
        user: String,
        password: String,
    },
    Bearer(String),
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Anonymous => f.write_str("Anonymous"),
            Self::Basic { user, .. } => write!(f, "Basic({user}, <redacted>)"),
            Self::Bearer(_) => f.write_str("Bearer(<redacted>)"),
        }
    }
}

/// How to reach registries: extra CA certificates (PEM), credentials, and whether to insist on
/// TLS for loopback registries.
#[derive(Debug, Clone, Default)]
pub struct RegistryAccess {
    pub ca_pem: Vec<Vec<u8>>,
    pub credentials: Credentials,
    pub force_tls: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("building the registry client")]
    Client(#[source] reqwest::Error),
    #[error("request to {url} failed")]
    Request { url: String, source: reqwest::Error },
    #[error("{url} answered {status}: {body}")]
    Status { url: String, status: StatusCode, body: String },
    #[error("registry authentication for {repository}: {reason}")]
    Auth { repository: String, reason: String },
    #[error("{what} is {size} bytes, over the {cap}-byte cap")]
    TooLarge { what: String, size: u64, cap: u64 },
    #[error("pushing to {reference}: {reason}")]
    Push { reference: String, reason: String },
    #[error("reading {path}")]
    File { path: String, source: std::io::Error },
}

pub fn is_loopback(host: &str) -> bool {
    let bare = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    bare == "localhost" || bare.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// A connection to one registry host.
pub struct Registry {
    host: String,
    scheme: &'static str,
    http: reqwest::Client,
    /// oci-client (pushes only), built on first use: building it loads the system's CA roots
    /// and panics when there are none, as in an initramfs that only ever pulls.
    push: std::sync::OnceLock<oci_client::Client>,
    push_config: PushConfig,
    credentials: Credentials,
    auth: Mutex<HashMap<String, HeaderValue>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Registry({}://{})", self.scheme, self.host)
    }
}

#[derive(Clone)]
struct PushConfig {
    tls: bool,
    ca_pem: Vec<Vec<u8>>,
}

impl Registry {
    fn pusher(&self) -> &oci_client::Client {
        self.push.get_or_init(|| {
            oci_client::Client::new(ClientConfig {
                protocol: if self.push_config.tls { ClientProtocol::Https } else { ClientProtocol::Http },
                extra_root_certificates: self
                    .push_config
                    .ca_pem
                    .iter()
                    .map(|pem| Certificate { encoding: CertificateEncoding::Pem, data: pem.clone() })
                    .collect(),
                connect_timeout: Some(CONNECT_TIMEOUT),
                platform_resolver: None,
                ..ClientConfig::default()
            })
        })
    }

    pub fn open(host: &str, access: &RegistryAccess) -> Result<Self, RegistryError> {
        let tls = access.force_tls || !access.ca_pem.is_empty() || !is_loopback(host);
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .connect_timeout(CONNECT_TIMEOUT)
            .redirect(reqwest::redirect::Policy::limited(MAX_REDIRECTS));
        for pem in &access.ca_pem {
            for cert in reqwest::Certificate::from_pem_bundle(pem).map_err(RegistryError::Client)? {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder.build().map_err(RegistryError::Client)?;
        let push_config = PushConfig { tls, ca_pem: access.ca_pem.clone() };
        Ok(Self {
            host: host.to_owned(),
            scheme: if tls { "https" } else { "http" },
            http,
            push: std::sync::OnceLock::new(),
            push_config,
            credentials: access.credentials.clone(),
            auth: Mutex::new(HashMap::new()),
        })
    }

    fn url(&self, repository: &str, kind: &str, reference: &str) -> String {
        format!("{}://{}/v2/{repository}/{kind}/{reference}", self.scheme, self.host)
    }

    fn cached_auth(&self, repository: &str) -> Option<HeaderValue> {
        if let Credentials::Bearer(t) = &self.credentials {
            return HeaderValue::from_str(&format!("Bearer {t}")).ok();
        }
        self.auth.lock().ok()?.get(repository).cloned()
    }

    /// GET with the cached authorization; on 401, answers the challenge once and retries.
    async fn get(&self, url: &str, repository: &str, accept: &[&str]) -> Result<Response, RegistryError> {
        let mut answered = false;
        loop {
            let mut req = self.http.get(url);
            if !accept.is_empty() {
                req = req.header(ACCEPT, accept.join(", "));
            }
            if let Some(auth) = self.cached_auth(repository) {
                req = req.header(AUTHORIZATION, auth);
            }
            let resp = req.send().await.map_err(|source| RegistryError::Request { url: url.to_owned(), source })?;
            if resp.status() != StatusCode::UNAUTHORIZED || answered {
                return Ok(resp);
            }
            let challenge = resp.headers().get(WWW_AUTHENTICATE).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
            let header = self.answer_challenge(&challenge, repository).await?;
            if let Ok(mut cache) = self.auth.lock() {
                cache.insert(repository.to_owned(), header);
            }
            answered = true;
        }
    }

    async fn answer_challenge(&self, challenge: &str, repository: &str) -> Result<HeaderValue, RegistryError> {
        let fail = |reason: String| RegistryError::Auth { repository: repository.to_owned(), reason };
        let (scheme, params) = challenge.split_once(' ').unwrap_or((challenge, ""));
        let params = parse_challenge_params(params);
        let basic = match &self.credentials {
            Credentials::Basic { user, password } => Some(format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
            )),
            _ => None,
        };
        match scheme.to_ascii_lowercase().as_str() {
            "basic" => {
                let b = basic.ok_or_else(|| fail("the registry asks for a user name and password".into()))?;
                HeaderValue::from_str(&b).map_err(|e| fail(e.to_string()))
            }
            "bearer" => {
                let realm = params.get("realm").ok_or_else(|| fail("bearer challenge without realm".into()))?;
                let mut req = self.http.get(realm).query(&[("scope", format!("repository:{repository}:pull"))]);
                if let Some(service) = params.get("service") {
                    req = req.query(&[("service", service)]);
                }
                if let Some(b) = basic {
                    req = req.header(AUTHORIZATION, b);
                }
                let resp = req.send().await.map_err(|source| RegistryError::Request { url: realm.clone(), source })?;
                if !resp.status().is_success() {
                    return Err(fail(format!("token endpoint answered {}", resp.status())));
                }
                let body = read_capped(resp, MAX_TOKEN_RESPONSE, "token response").await?;
                #[derive(serde::Deserialize)]
                struct Token {
                    token: Option<String>,
                    access_token: Option<String>,
                }
                let t: Token = serde_json::from_slice(&body).map_err(|e| fail(format!("token response: {e}")))?;
                let token = t.token.or(t.access_token).ok_or_else(|| fail("token response has no token".into()))?;
                HeaderValue::from_str(&format!("Bearer {token}")).map_err(|e| fail(e.to_string()))
            }
            other => Err(fail(format!("unsupported challenge scheme {other:?}"))),
        }
    }

    /// The manifest at `reference` (tag or digest) with its content type; `None` if absent.
    /// Refuses before reading when Content-Length is over `cap`, and stops reading past it.
    pub async fn get_manifest(
        &self,
        repository: &str,
        reference: &str,
        accept: &[&str],
        cap: u64,
    ) -> Result<Option<(Vec<u8>, Option<String>)>, RegistryError> {
        let url = self.url(repository, "manifests", reference);
        let resp = self.get(&url, repository, accept).await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let resp = check_status(resp, &url).await?;
        let content_type = resp.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let body = read_capped(resp, cap, &format!("manifest {repository}:{reference}")).await?;
        Ok(Some((body, content_type)))
    }

    /// An open response for the blob `digest`; the caller applies size caps and deadlines.
    pub async fn get_blob(&self, repository: &str, digest: &OciDigest) -> Result<Response, RegistryError> {
        let url = self.url(repository, "blobs", &digest.to_string());
        let resp = self.get(&url, repository, &[]).await?;
        check_status(resp, &url).await
    }

    fn push_auth(&self) -> RegistryAuth {
        match &self.credentials {
            Credentials::Anonymous => RegistryAuth::Anonymous,
            Credentials::Basic { user, password } => RegistryAuth::Basic(user.clone(), password.clone()),
            Credentials::Bearer(t) => RegistryAuth::Bearer(t.clone()),
        }
    }

    fn reference(&self, repository: &str) -> Reference {
        Reference::with_tag(self.host.clone(), repository.to_owned(), "latest".to_owned())
    }

    fn push_error(&self, repository: &str, reason: String) -> RegistryError {
        RegistryError::Push { reference: format!("{}/{repository}", self.host), reason }
    }

    /// Authorizes a push to `repository` and says whether blob `digest` is already there.
    async fn blob_present(&self, repository: &str, digest: &OciDigest) -> Result<bool, RegistryError> {
        let image = self.reference(repository);
        self.pusher()
            .auth(&image, &self.push_auth(), oci_client::RegistryOperation::Push)
            .await
            .map_err(|e| self.push_error(repository, e.to_string()))?;
        self.pusher()
            .blob_exists(&image, &digest.to_string())
            .await
            .map_err(|e| self.push_error(repository, e.to_string()))
    }

    /// Uploads the file at `path` as blob `digest` unless the registry already has it.
    /// Returns whether bytes were sent.
    pub async fn push_blob_file(
        &self,
        repository: &str,
        path: &Path,
        digest: &OciDigest,
        size: u64,
    ) -> Result<bool, RegistryError> {
        if self.blob_present(repository, digest).await? {
            return Ok(false);
        }
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|source| RegistryError::File { path: path.display().to_string(), source })?;
        let stream =
            crate::source::file_chunks(file, 1 << 20).map_err(oci_client::errors::OciDistributionError::IoError);
        self.pusher()
            .push_blob_stream(&self.reference(repository), stream, &digest.to_string(), Some(size))
            .await
            .map_err(|e| self.push_error(repository, format!("blob {digest}: {e}")))?;
        Ok(true)
    }

    /// Uploads a small blob held in memory unless the registry already has it.
    pub async fn push_blob_bytes(&self, repository: &str, bytes: Vec<u8>) -> Result<OciDigest, RegistryError> {
        let digest = OciDigest::of(&bytes);
        if !self.blob_present(repository, &digest).await? {
            self.pusher()
                .push_blob(&self.reference(repository), bytes, &digest.to_string())
                .await
                .map_err(|e| self.push_error(repository, format!("blob {digest}: {e}")))?;
        }
        Ok(digest)
    }

    /// Puts manifest bytes at `reference` (a tag or the bytes' own digest).
    pub async fn push_manifest(
        &self,
        repository: &str,
        reference: &str,
        bytes: Vec<u8>,
        media_type: &str,
    ) -> Result<(), RegistryError> {
        let image = if reference.starts_with("sha256:") {
            Reference::with_digest(self.host.clone(), repository.to_owned(), reference.to_owned())
        } else {
            Reference::with_tag(self.host.clone(), repository.to_owned(), reference.to_owned())
        };
        let fail = |e: String| RegistryError::Push { reference: image.whole(), reason: e };
        self.pusher()
            .auth(&image, &self.push_auth(), oci_client::RegistryOperation::Push)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let content_type = HeaderValue::from_str(media_type).map_err(|e| fail(e.to_string()))?;
        self.pusher().push_manifest_raw(&image, bytes, content_type).await.map_err(|e| fail(e.to_string()))?;
        Ok(())
    }
}

async fn check_status(resp: Response, url: &str) -> Result<Response, RegistryError> {
    if resp.status().is_success() {
        return Ok(resp);
    }
    let status = resp.status();
    let body = read_capped(resp, MAX_ERROR_BODY, "error body").await.unwrap_or_default();
    Err(RegistryError::Status {
        url: url.to_owned(),
        status,
        body: String::from_utf8_lossy(&body).chars().filter(|c| !c.is_control()).take(300).collect(),
    })
}

/// Reads a whole body of at most `cap` bytes: refused before reading when the declared length
/// is over the cap, and cut off as soon as the received bytes pass it.
pub async fn read_capped(resp: Response, cap: u64, what: &str) -> Result<Vec<u8>, RegistryError> {
    if let Some(len) = resp.content_length()
        && len > cap
    {
        return Err(RegistryError::TooLarge { what: what.to_owned(), size: len, cap });
    }
    let url = resp.url().to_string();
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|source| RegistryError::Request { url: url.clone(), source })?;
        if body.len() as u64 + chunk.len() as u64 > cap {
            return Err(RegistryError::TooLarge {
                what: what.to_owned(),
                size: body.len() as u64 + chunk.len() as u64,
                cap,
            });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// `key="value", key2=value2` pairs of a WWW-Authenticate challenge.
fn parse_challenge_params(s: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        let Some((key, after)) = rest.split_once('=') else {
            break;
        };
        let (value, after) = if let Some(quoted) = after.strip_prefix('"') {
            match quoted.find('"') {
                Some(end) => (&quoted[..end], &quoted[end + 1..]),
                None => (quoted, ""),
            }
        } else {
            after.split_once(',').map_or((after, ""), |(v, r)| (v, r))
        };
        out.insert(key.trim().to_ascii_lowercase(), value.to_owned());
        rest = after.trim_start_matches([',', ' ']);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenge_params() {
        let p = parse_challenge_params(
            r#"realm="https://auth.example/token",service="registry",scope="repository:a/b:pull,push""#,
        );
        assert_eq!(p["realm"], "https://auth.example/token");
        assert_eq!(p["service"], "registry");
        assert_eq!(p["scope"], "repository:a/b:pull,push");
    }

    #[test]
    fn loopback_hosts() {
        for h in ["127.0.0.1:5000", "localhost:80", "[::1]:5000", "127.8.9.1"] {
            assert!(is_loopback(h), "{h}");
        }
        for h in ["10.0.2.2:5000", "registry.example:443", "[2001:db8::1]:5000", "localhost.evil"] {
            assert!(!is_loopback(h), "{h}");
        }
    }
}
