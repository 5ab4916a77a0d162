//! The agent's side of the plane API (docs/interfaces/plane-api.md): HTTP/JSON over rustls,
//! trusting only the plane CA. Enrollment goes over server-authenticated TLS with a bootstrap
//! token; everything else uses the node's client certificate. Every answer is size-capped and
//! every call deadline-bound. Errors say whether retrying can help.

use std::time::Duration;

use futures_util::StreamExt as _;
use ironroot_contract::wire::{
    self, AuditBatch, DesiredState, EnrollRequest, EnrollResponse, ErrorBody, NodeId, NodeReport, RenewRequest,
    ReportResponse, Task, TaskId, TaskResult,
};
use serde::de::DeserializeOwned;

/// Largest answer read from the plane (desired state and certificates are a few KiB).
const MAX_ANSWER: usize = 1 << 20;
/// One plane call, connection included; the plane answers in milliseconds when healthy.
const CALL_DEADLINE: Duration = Duration::from_secs(20);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum PlaneError {
    #[error("building the TLS client: {0}")]
    Client(String),
    #[error("reaching the plane at {base}")]
    Unreachable { base: String, source: reqwest::Error },
    #[error("the plane refused {op} (HTTP {status}, {code}): {message}")]
    Refused { op: &'static str, status: u16, code: String, message: String },
    #[error("the plane's answer to {op} is not usable: {reason}")]
    Answer { op: &'static str, reason: String },
}

impl PlaneError {
    /// Whether trying again later can succeed: network trouble, rate limits, plane errors.
    pub fn transient(&self) -> bool {
        match self {
            Self::Unreachable { .. } => true,
            Self::Refused { status, .. } => *status == 429 || *status >= 500,
            Self::Client(_) | Self::Answer { .. } => false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct PlaneClient {
    http: reqwest::Client,
    base: String,
}

impl PlaneClient {
    /// A client that authenticates the plane only (for enrollment).
    pub fn anonymous(base: &str, ca_pem: &str) -> Result<Self, PlaneError> {
        Self::build(base, ca_pem, None)
    }

    /// A client presenting the node certificate `cert_pem` (chain) with `key_pem`.
    pub fn with_identity(base: &str, ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<Self, PlaneError> {
        Self::build(base, ca_pem, Some(format!("{cert_pem}\n{key_pem}")))
    }

    fn build(base: &str, ca_pem: &str, identity: Option<String>) -> Result<Self, PlaneError> {
        let client = |e: reqwest::Error| PlaneError::Client(e.to_string());
        let mut builder = reqwest::Client::builder()
            .tls_certs_only(reqwest::Certificate::from_pem_bundle(ca_pem.as_bytes()).map_err(client)?)
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(CALL_DEADLINE)
            .redirect(reqwest::redirect::Policy::none());
        if let Some(pem) = identity {
            builder = builder.identity(reqwest::Identity::from_pem(pem.as_bytes()).map_err(client)?);
        }
        Ok(Self { http: builder.build().map_err(client)?, base: base.trim_end_matches('/').to_owned() })
    }

    pub async fn enroll(&self, req: &EnrollRequest) -> Result<EnrollResponse, PlaneError> {
        self.call("enroll", self.http.post(format!("{}/v1/enroll", self.base)).json(req)).await
    }

    pub async fn desired(&self, node: &NodeId) -> Result<DesiredState, PlaneError> {
        self.call("desired", self.http.get(format!("{}/v1/nodes/{node}/desired", self.base))).await
    }

    /// Once per boot (`phase` = `ready` under systemd, `failed:<phase>` from a failed boot).
    pub async fn handshake(&self, node: &NodeId, report: &NodeReport) -> Result<ReportResponse, PlaneError> {
        self.call("handshake", self.http.post(format!("{}/v1/nodes/{node}/handshake", self.base)).json(report)).await
    }

    pub async fn heartbeat(&self, node: &NodeId, report: &NodeReport) -> Result<ReportResponse, PlaneError> {
        self.call("heartbeat", self.http.post(format!("{}/v1/nodes/{node}/heartbeat", self.base)).json(report)).await
    }

    /// Leases the next task, waiting up to `wait` at the plane for one (`None`: none came).
    pub async fn lease(&self, node: &NodeId, wait: Duration) -> Result<Option<Task>, PlaneError> {
        let req = self
            .http
            .get(format!("{}/v1/nodes/{node}/tasks?wait={}", self.base, wait.as_secs()))
            .timeout(CALL_DEADLINE + wait);
        self.call_maybe("lease", req).await
    }

    pub async fn post_result(&self, task: &TaskId, result: &TaskResult) -> Result<(), PlaneError> {
        let req = self.http.post(format!("{}/v1/tasks/{task}/result", self.base)).json(result);
        self.call::<serde_json::Value>("task result", req).await.map(drop)
    }

    /// A certificate for a new key, while the current one is valid.
    pub async fn renew(&self, node: &NodeId, req: &RenewRequest) -> Result<EnrollResponse, PlaneError> {
        self.call("renew", self.http.post(format!("{}/v1/nodes/{node}/renew", self.base)).json(req)).await
    }

    /// Delivers journal records; the plane keeps each (node, seq) once.
    pub async fn audit(&self, node: &NodeId, batch: &AuditBatch) -> Result<(), PlaneError> {
        let req = self.http.post(format!("{}/v1/nodes/{node}/audit", self.base)).json(batch);
        self.call::<serde_json::Value>("audit", req).await.map(drop)
    }

    async fn call<T: DeserializeOwned>(&self, op: &'static str, req: reqwest::RequestBuilder) -> Result<T, PlaneError> {
        self.call_maybe(op, req).await?.ok_or(PlaneError::Answer { op, reason: "no content".into() })
    }

    /// A call whose empty answer (204) is `None`.
    async fn call_maybe<T: DeserializeOwned>(
        &self,
        op: &'static str,
        req: reqwest::RequestBuilder,
    ) -> Result<Option<T>, PlaneError> {
        let unreachable =
            |e: reqwest::Error| PlaneError::Unreachable { base: self.base.clone(), source: e.without_url() };
        let resp = req.send().await.map_err(unreachable)?;
        let status = resp.status();
        let mut body = Vec::new();
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            body.extend_from_slice(&chunk.map_err(unreachable)?);
            if body.len() > MAX_ANSWER {
                return Err(PlaneError::Answer { op, reason: format!("over {MAX_ANSWER} bytes") });
            }
        }
        if !status.is_success() {
            let (code, message) = match serde_json::from_slice::<ErrorBody>(&body) {
                Ok(e) => (e.error, e.message),
                Err(_) => ("unknown".to_owned(), String::from_utf8_lossy(&body).chars().take(200).collect()),
            };
            return Err(PlaneError::Refused { op, status: status.as_u16(), code, message });
        }
        if status == reqwest::StatusCode::NO_CONTENT {
            return Ok(None);
        }
        serde_json::from_slice(&body).map(Some).map_err(|e| PlaneError::Answer { op, reason: e.to_string() })
    }
}

/// The URI SAN the plane puts in node certificates.
pub fn node_uri(id: &str) -> String {
    format!("{}{id}", wire::NODE_URI_PREFIX)
}
