//! The plane API's routes (docs/interfaces/plane-api.md). Every handler reads a size-capped
//! body, checks who is calling, calls the store on a blocking thread, and turns a refusal into
//! a JSON error body and a journal record.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use ironroot_spec::wire::{self, AuditBatch, EnrollRequest, ErrorBody, NodeReport, RenewRequest, TaskResult};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use tokio::sync::Notify;

use crate::ca::Peer;
use crate::enroll::TokenBinding;
use crate::lifecycle::NodeState;
use crate::server::{Conn, Plane};
use crate::store::Refusal;

/// Longest a task long-poll waits.
const MAX_WAIT: Duration = Duration::from_secs(30);

/// A token bucket per remote address.
#[derive(Debug)]
pub struct RateLimiter {
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
    burst: f64,
    per_second: f64,
}

impl RateLimiter {
    pub fn new(burst: u32, per_second: f64) -> Self {
        Self { buckets: Mutex::default(), burst: f64::from(burst.max(1)), per_second }
    }

    fn allow(&self, ip: IpAddr) -> bool {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() > 100_000 {
            buckets.clear(); // bounded memory; a reset only ever lets more through
        }
        let now = Instant::now();
        let (tokens, last) = buckets.entry(ip).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * self.per_second).min(self.burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Long-polling nodes wait here for a task enqueued for them.
#[derive(Debug, Default)]
pub struct Waiters(Mutex<HashMap<String, Arc<Notify>>>);

impl Waiters {
    fn get(&self, node: &str) -> Arc<Notify> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(map.entry(node.to_owned()).or_default())
    }
}

pub(crate) struct ApiError(Refusal);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(ErrorBody { error: self.0.code.to_owned(), message: self.0.message })).into_response()
    }
}

pub(crate) type ApiResult<T> = Result<Json<T>, ApiError>;

fn actor(conn: &Conn) -> String {
    match &conn.peer {
        Some(Peer::Node { id, .. }) => format!("node:{id}"),
        Some(Peer::Operator { name }) => format!("operator:{name}"),
        None => format!("remote:{}", conn.remote.ip()),
    }
}

/// Runs a store call on a blocking thread; journals and reports a refusal.
pub(crate) async fn run<T: Send + 'static>(
    plane: &Arc<Plane>,
    conn: &Conn,
    what: &'static str,
    f: impl FnOnce(&Plane) -> Result<T, Refusal> + Send + 'static,
) -> Result<T, ApiError> {
    let p = Arc::clone(plane);
    let out = tokio::task::spawn_blocking(move || f(&p))
        .await
        .unwrap_or_else(|_| Err(Refusal::new(500, "internal", "request handler failed")));
    out.map_err(|r| refuse(plane, conn, what, r))
}

pub(crate) fn refuse(plane: &Plane, conn: &Conn, what: &str, r: Refusal) -> ApiError {
    if r.status >= 400 {
        plane.store.journal_refusal(&actor(conn), &format!("refused.{what}"), &conn.remote.to_string(), &r);
    }
    ApiError(r)
}

/// Reads a body of at most `wire::MAX_BODY` bytes and parses it as JSON.
pub(crate) async fn body<T: DeserializeOwned>(
    plane: &Plane,
    conn: &Conn,
    what: &str,
    body: Body,
) -> Result<T, ApiError> {
    let bytes: Bytes = axum::body::to_bytes(body, wire::MAX_BODY).await.map_err(|_| {
        refuse(
            plane,
            conn,
            what,
            Refusal::new(413, "body_too_large", format!("request body is over {} bytes", wire::MAX_BODY)),
        )
    })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| refuse(plane, conn, what, Refusal::new(400, "bad_json", format!("request body: {e}"))))
}

pub fn journal_tls_refusal(plane: &Plane, remote: SocketAddr, error: &str) {
    // Bounded per address, so a scanner cannot flood the journal.
    if plane.noise_journal_limiter.allow(remote.ip()) {
        let r = Refusal::new(401, "tls", format!("TLS handshake refused: {error}"));
        plane.store.journal_refusal(&format!("remote:{}", remote.ip()), "refused.tls", &remote.to_string(), &r);
    }
}

pub fn router(plane: Arc<Plane>) -> Router {
    Router::new()
        .route("/v1/enroll", post(enroll))
        .route("/v1/nodes/{id}/renew", post(renew))
        .route("/v1/nodes/{id}/handshake", post(handshake))
        .route("/v1/nodes/{id}/heartbeat", post(heartbeat))
        .route("/v1/nodes/{id}/desired", get(desired))
        .route("/v1/nodes/{id}/tasks", get(lease))
        .route("/v1/nodes/{id}/audit", post(node_audit))
        .route("/v1/tasks/{id}/result", post(task_result))
        .merge(crate::operator_api::router())
        .layer(axum::extract::DefaultBodyLimit::disable())
        .layer(Extension(plane))
}

async fn enroll(
    Extension(plane): Extension<Arc<Plane>>,
    Extension(conn): Extension<Conn>,
    raw: Body,
) -> ApiResult<wire::EnrollResponse> {
    if !plane.limiter.allow(conn.remote.ip()) {
        let r = Refusal::new(429, "rate_limited", "too many enrollment attempts; slow down");
        // Journaled at most about once a second per address: a flood must not flood the journal.
        if plane.noise_journal_limiter.allow(conn.remote.ip()) {
            return Err(refuse(&plane, &conn, "enroll", r));
        }
        return Err(ApiError(r));
    }
    let req: EnrollRequest = body(&plane, &conn, "enroll", raw).await?;
    let remote = conn.remote.to_string();
    run(&plane, &conn, "enroll", move |p| p.store.enroll(&req, &remote)).await.map(Json)
}

async fn node_call<T: Send + 'static>(
    plane: &Arc<Plane>,
    conn: &Conn,
    id: &str,
    what: &'static str,
    f: impl FnOnce(&Plane, &str) -> Result<T, Refusal> + Send + 'static,
) -> Result<T, ApiError> {
    let (peer, id) = (conn.peer.clone(), id.to_owned());
    run(plane, conn, what, move |p| {
        p.store.authorize_node(peer.as_ref(), &id)?;
        f(p, &id)
    })
    .await
}

async fn renew(
    Extension(plane): Extension<Arc<Plane>>,
    Extension(conn): Extension<Conn>,
    Path(id): Path<String>,
    raw: Body,
) -> ApiResult<wire::EnrollResponse> {
    let req: RenewRequest = body(&plane, &conn, "renew", raw).await?;
    node_call(&plane, &conn, &id, "renew", move |p, id| {
        p.store.renew(id, &req.csr).map(|certificate| wire::EnrollResponse { node_id: id.to_owned(), certificate })
    })
    .await
    .map(Json)
}

async fn handshake(
    Extension(plane): Extension<Arc<Plane>>,
    Extension(conn): Extension<Conn>,
    Path(id): Path<String>,
    raw: Body,
) -> ApiResult<wire::ReportResponse> {
    let report: NodeReport = body(&plane, &conn, "handshake", raw).await?;
    let (phase, boot) = (report.phase.clone(), report.boot_id.clone());
    let answer = node_call(&plane, &conn, &id, "handshake", move |p, id| p.store.report(id, &report, true)).await?;
    // Once per boot: the operator's log shows each boot's arrival (heartbeats stay quiet).
    tracing::info!(node = %id, phase = %phase, boot = %boot, state = %answer.state, "node handshake");
    Ok(Json(answer))
}

async fn heartbeat(
    Extension(plane): Extension<Arc<Plane>>,
    Extension(conn): Extension<Conn>,
    Path(id): Path<String>,
    raw: Body,
) -> ApiResult<wire::ReportResponse> {
    let report: NodeReport = body(&plane, &conn, "heartbeat", raw).await?;
    node_call(&plane, &conn, &id, "heartbeat", move |p, id| p.store.report(id, &report, false)).await.map(Json)
}

async fn desired(
    Extension(plane): Extension<Arc<Plane>>,
    Extension(conn): Extension<Conn>,
    Path(id): Path<String>,
) -> ApiResult<wire::DesiredState> {
    node_call(&plane, &conn, &id, "desired", |p, id| p.store.desired(id)).await.map(Json)
}

#[derive(Debug, Deserialize)]
struct WaitQuery {
    wait: Option<u64>,
}

/// Leases the next task, waiting up to `wait` seconds (at most 30) for one to arrive.
async fn lease(
    Extension(plane): Extension<Arc<Plane>>,
    Extension(conn): Extension<Conn>,
    Path(id): Path<String>,
    Query(q): Query<WaitQuery>,
) -> Result<Response, ApiError> {
    let wait = Duration::from_secs(q.wait.unwrap_or(0)).min(MAX_WAIT);
    let deadline = tokio::time::Instant::now() + wait;
    let notify = plane.waiters.get(&id);
    loop {
        let notified = notify.notified();
        if let Some(task) = node_call(&plane, &conn, &id, "lease", |p, id| p.store.lease(id)).await? {
            return Ok(Json(task).into_response());
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return Ok(StatusCode::NO_CONTENT.into_response());
        }
    }
}

async fn node_audit(
    Extension(plane): Extension<Arc<Plane>>,
    Extension(conn): Extension<Conn>,
    Path(id): Path<String>,
    raw: Body,
) -> ApiResult<serde_json::Value> {
    let batch: AuditBatch = body(&plane, &conn, "audit", raw).await?;
    node_call(&plane, &conn, &id, "audit", move |p, id| p.store.node_audit(id, &batch.records))
        .await
        .map(|added| Json(serde_json::json!({"accepted": added})))
}

async fn task_result(
    Extension(plane): Extension<Arc<Plane>>,
    Extension(conn): Extension<Conn>,
    Path(task): Path<String>,
    raw: Body,
) -> ApiResult<serde_json::Value> {
    let result: TaskResult = body(&plane, &conn, "task_result", raw).await?;
    let node = match &conn.peer {
        Some(Peer::Node { id, .. }) => id.clone(),
        _ => String::new(),
    };
    node_call(&plane, &conn, &node, "task_result", move |p, id| p.store.task_result(id, &task, &result))
        .await
        .map(|recorded| Json(serde_json::json!({"recorded": recorded})))
}

pub(crate) fn notify_node(plane: &Plane, node: &str) {
    plane.waiters.get(node).notify_waiters();
}

pub(crate) fn parse_binding(
    node: Option<String>,
    mac: Option<String>,
    smbios_uuid: Option<String>,
    template: Option<String>,
) -> TokenBinding {
    TokenBinding { node_name: node, mac, smbios_uuid, template }
}

pub(crate) fn parse_state(s: &str) -> Result<NodeState, Refusal> {
    s.parse().map_err(|e: String| Refusal::new(400, "bad_state", e))
}
