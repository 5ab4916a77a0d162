//! The plane API's routes (docs/interfaces/plane-api.md). Every handler checks who is calling
//! first, then reads a size-capped, deadline-bound body, calls the store on a blocking thread,
//! and turns a refusal into a JSON error body and a journal record — at a bounded rate per
//! caller, so unauthenticated traffic cannot bury the journal (what was not journaled is
//! counted in the next record).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use ironroot_contract::wire::{self, AuditBatch, EnrollRequest, ErrorBody, NodeReport, RenewRequest, TaskResult};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use tokio::sync::Notify;

use crate::admission::Admit;
use crate::ca::Peer;
use crate::enroll::TokenBinding;
use crate::lifecycle::NodeState;
use crate::server::{Conn, Plane};
use crate::store::Refusal;

/// Longest a task long-poll waits.
const MAX_WAIT: Duration = Duration::from_secs(30);

/// Longest a request body may take to arrive (a trickled body is a slow-loris, not a client).
const BODY_DEADLINE: Duration = Duration::from_secs(30);

/// Long-polling nodes wait here for a task enqueued for them. Only authenticated nodes get an
/// entry, and it goes away with its last waiter.
#[derive(Debug, Default)]
pub struct Waiters(Mutex<HashMap<String, (Arc<Notify>, usize)>>);

/// One long-poll's registration; dropping it unregisters.
struct Waiting<'a> {
    waiters: &'a Waiters,
    node: String,
    notify: Arc<Notify>,
}

impl Waiters {
    fn wait(&self, node: &str) -> Waiting<'_> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let entry = map.entry(node.to_owned()).or_insert_with(|| (Arc::default(), 0));
        entry.1 += 1;
        Waiting { waiters: self, node: node.to_owned(), notify: Arc::clone(&entry.0) }
    }

    fn notify(&self, node: &str) {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((notify, _)) = map.get(node) {
            notify.notify_waiters();
        }
    }

    /// Long-polls waiting now for `node`.
    pub fn waiting(&self, node: &str) -> usize {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).get(node).map_or(0, |(_, n)| *n)
    }

    /// Nodes with at least one long-poll waiting.
    pub fn nodes(&self) -> usize {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut map = self.waiters.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = map.get_mut(&self.node) {
            entry.1 = entry.1.saturating_sub(1);
            if entry.1 == 0 {
                map.remove(&self.node);
            }
        }
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

/// Journals a refusal at a bounded rate per caller (per address before authentication, per
/// certificate holder after), naming how many were not journaled since the last record.
pub(crate) fn refuse(plane: &Plane, conn: &Conn, what: &str, r: Refusal) -> ApiError {
    if r.status >= 400 {
        let admit = match &conn.peer {
            None => plane.noise_journal_limiter.admit(&conn.remote.ip()),
            Some(_) => plane.peer_journal_limiter.admit(&actor(conn)),
        };
        if let Admit::Yes { refused_before } = admit {
            plane.store.journal_refusal(
                &actor(conn),
                &format!("refused.{what}"),
                &conn.remote.to_string(),
                &r,
                refused_before,
            );
        }
    }
    ApiError(r)
}

/// Journals a refusal of an unauthenticated connection (TLS, connection caps) at the bounded
/// per-address rate.
pub fn journal_noise(plane: &Plane, remote: SocketAddr, kind: &str, code: &'static str, message: &str) {
    if let Admit::Yes { refused_before } = plane.noise_journal_limiter.admit(&remote.ip()) {
        let r = Refusal::new(401, code, message);
        plane.store.journal_refusal(&format!("remote:{}", remote.ip()), kind, &remote.to_string(), &r, refused_before);
    }
}

/// Reads a body of at most `wire::MAX_BODY` bytes and parses it as JSON.
pub(crate) async fn body<T: DeserializeOwned>(
    plane: &Plane,
    conn: &Conn,
    what: &str,
    body: Body,
) -> Result<T, ApiError> {
    let bytes: Bytes = match tokio::time::timeout(BODY_DEADLINE, axum::body::to_bytes(body, wire::MAX_BODY)).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(_)) => {
            let r = Refusal::new(413, "body_too_large", format!("request body is over {} bytes", wire::MAX_BODY));
            return Err(refuse(plane, conn, what, r));
        }
        Err(_) => {
            let r = Refusal::new(408, "body_timeout", format!("request body took over {} s", BODY_DEADLINE.as_secs()));
            return Err(refuse(plane, conn, what, r));
        }
    };
    serde_json::from_slice(&bytes)
        .map_err(|e| refuse(plane, conn, what, Refusal::new(400, "bad_json", format!("request body: {e}"))))
}

pub fn journal_tls_refusal(plane: &Plane, remote: SocketAddr, error: &str) {
    journal_noise(plane, remote, "refused.tls", "tls", &format!("TLS handshake refused: {error}"));
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
        .merge(crate::catalog_api::router())
        .layer(axum::extract::DefaultBodyLimit::disable())
        .layer(Extension(plane))
}

async fn enroll(
    Extension(plane): Extension<Arc<Plane>>,
    Extension(conn): Extension<Conn>,
    raw: Body,
) -> ApiResult<wire::EnrollResponse> {
    if !plane.limiter.allow(&conn.remote.ip()) {
        let r = Refusal::new(429, "rate_limited", "too many enrollment attempts; slow down");
        return Err(refuse(&plane, &conn, "enroll", r));
    }
    let req: EnrollRequest = body(&plane, &conn, "enroll", raw).await?;
    let remote = conn.remote.to_string();
    run(&plane, &conn, "enroll", move |p| p.store.enroll(&req, &remote)).await.map(Json)
}

/// Whether the caller holds a valid certificate for node `id`. The path's id is not looked at
/// before the certificate names it, so nothing is kept for ids nobody proved.
async fn authorize(plane: &Arc<Plane>, conn: &Conn, id: &str, what: &'static str) -> Result<(), ApiError> {
    let (peer, id) = (conn.peer.clone(), id.to_owned());
    run(plane, conn, what, move |p| p.store.authorize_node(peer.as_ref(), &id)).await
}

/// A node call: authorization, then `f`, in one blocking-thread hop (a certificate revoked
/// between two hops is still refused).
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
    authorize(&plane, &conn, &id, "renew").await?;
    let req: RenewRequest = body(&plane, &conn, "renew", raw).await?;
    node_call(&plane, &conn, &id, "renew", move |p, id| {
        let certificate = p.store.renew(id, &req.csr)?;
        Ok(wire::EnrollResponse { node_id: crate::store::wire_id(id)?, certificate })
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
    authorize(&plane, &conn, &id, "handshake").await?;
    let report: NodeReport = body(&plane, &conn, "handshake", raw).await?;
    let (phase, boot) = (report.phase, report.boot_id.clone());
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
    authorize(&plane, &conn, &id, "heartbeat").await?;
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
    let wait = Duration::from_secs(q.wait.unwrap_or(0).min(MAX_WAIT.as_secs()));
    let deadline = tokio::time::Instant::now() + wait;
    // The first lease authorizes; only then does this node get a place among the waiters.
    if let Some(task) = node_call(&plane, &conn, &id, "lease", |p, id| p.store.lease(id)).await? {
        return Ok(Json(task).into_response());
    }
    if wait.is_zero() {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    let waiting = plane.waiters.wait(&id);
    loop {
        let notified = waiting.notify.notified();
        // A task enqueued between the first lease and the registration is found here.
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
    authorize(&plane, &conn, &id, "audit").await?;
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
    let node = match &conn.peer {
        Some(Peer::Node { id, .. }) => id.clone(),
        _ => String::new(),
    };
    authorize(&plane, &conn, &node, "task_result").await?;
    let result: TaskResult = body(&plane, &conn, "task_result", raw).await?;
    node_call(&plane, &conn, &node, "task_result", move |p, id| p.store.task_result(id, &task, &result))
        .await
        .map(|recorded| Json(serde_json::json!({"recorded": recorded})))
}

pub(crate) fn notify_node(plane: &Plane, node: &str) {
    plane.waiters.notify(node);
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
