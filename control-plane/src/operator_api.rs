//! Operator routes (`/v1/operator/...`): only an operator certificate may call them; a node
//! certificate is refused as the wrong kind, and the refusal is journaled. Channels, templates,
//! rollouts and receipts are in `catalog_api`; provisioning, terminating and consoles in
//! `provider::api`.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use ironroot_contract::wire::{JournalCheckpoint, TaskSpec};
use serde::Deserialize;

use crate::api::{ApiError, ApiResult, body, refuse, run};
use crate::ca::Peer;
use crate::server::{Conn, Plane};
use crate::store::Refusal;

pub(crate) fn operator(plane: &Plane, conn: &Conn, what: &str) -> Result<String, ApiError> {
    match &conn.peer {
        Some(Peer::Operator { name }) => Ok(format!("operator:{name}")),
        Some(Peer::Node { .. }) => Err(refuse(
            plane,
            conn,
            what,
            Refusal::new(403, "wrong_certificate_kind", "a node certificate cannot act as an operator"),
        )),
        None => Err(refuse(
            plane,
            conn,
            what,
            Refusal::new(401, "no_client_certificate", "an operator client certificate is required"),
        )),
    }
}

pub fn router() -> Router {
    Router::new()
        .route("/v1/operator/tokens", post(token_create))
        .route("/v1/operator/nodes", get(nodes))
        .route("/v1/operator/nodes/{id}", get(node))
        .route("/v1/operator/nodes/{id}/template", post(assign))
        .route("/v1/operator/nodes/{id}/revoke", post(revoke))
        .route("/v1/operator/nodes/{id}/reprovision", post(reprovision))
        .route("/v1/operator/nodes/{id}/state", post(set_state))
        .route("/v1/operator/nodes/{id}/tasks", post(enqueue).get(tasks))
        .route("/v1/operator/tasks/{id}/cancel", post(cancel))
        .route("/v1/operator/audit", get(audit_list))
        .route("/v1/operator/audit/verify", get(audit_verify).post(audit_verify_against))
        .route("/v1/operator/audit/checkpoint", get(checkpoint_newest).post(checkpoint_now))
        .merge(crate::provider::router())
}

type P = Extension<Arc<Plane>>;
type C = Extension<Conn>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenRequest {
    node: Option<String>,
    mac: Option<String>,
    smbios_uuid: Option<String>,
    template: Option<String>,
    ttl_s: Option<u64>,
}

async fn token_create(Extension(plane): P, Extension(conn): C, raw: Body) -> ApiResult<serde_json::Value> {
    let actor = operator(&plane, &conn, "token_create")?;
    let req: TokenRequest = body(&plane, &conn, "token_create", raw).await?;
    run(&plane, &conn, "token_create", move |p| {
        let bind = crate::api::parse_binding(req.node, req.mac, req.smbios_uuid, req.template);
        p.store.create_token(req.ttl_s.map(Duration::from_secs), &bind, &actor)
    })
    .await
    .map(|token| Json(serde_json::json!({"token": token})))
}

async fn nodes(Extension(plane): P, Extension(conn): C) -> ApiResult<Vec<crate::store::NodeView>> {
    operator(&plane, &conn, "nodes")?;
    let mut nodes = run(&plane, &conn, "nodes", |p| p.store.nodes()).await?;
    for n in &mut nodes {
        n.long_polls = plane.waiters.waiting(&n.id);
    }
    Ok(Json(nodes))
}

async fn node(Extension(plane): P, Extension(conn): C, Path(id): Path<String>) -> ApiResult<crate::store::NodeView> {
    operator(&plane, &conn, "node")?;
    let mut node = run(&plane, &conn, "node", move |p| p.store.node(&id)).await?;
    node.long_polls = plane.waiters.waiting(&node.id);
    Ok(Json(node))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AssignRequest {
    template: String,
}

async fn assign(
    Extension(plane): P,
    Extension(conn): C,
    Path(id): Path<String>,
    raw: Body,
) -> ApiResult<serde_json::Value> {
    let actor = operator(&plane, &conn, "assign")?;
    let req: AssignRequest = body(&plane, &conn, "assign", raw).await?;
    run(&plane, &conn, "assign", move |p| p.store.template_assign(&id, &req.template, &actor)).await?;
    Ok(Json(serde_json::json!({"assigned": true})))
}

async fn revoke(Extension(plane): P, Extension(conn): C, Path(id): Path<String>) -> ApiResult<serde_json::Value> {
    let actor = operator(&plane, &conn, "revoke")?;
    run(&plane, &conn, "revoke", move |p| {
        let id = p.store.node(&id)?.id;
        p.store.revoke(&id, &actor)
    })
    .await?;
    Ok(Json(serde_json::json!({"revoked": true})))
}

async fn reprovision(Extension(plane): P, Extension(conn): C, Path(id): Path<String>) -> ApiResult<serde_json::Value> {
    let actor = operator(&plane, &conn, "reprovision")?;
    run(&plane, &conn, "reprovision", move |p| {
        let id = p.store.node(&id)?.id;
        p.store.reprovision(&id, &actor)
    })
    .await?;
    Ok(Json(serde_json::json!({"reprovisioned": true})))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateRequest {
    state: String,
}

async fn set_state(
    Extension(plane): P,
    Extension(conn): C,
    Path(id): Path<String>,
    raw: Body,
) -> ApiResult<serde_json::Value> {
    let actor = operator(&plane, &conn, "set_state")?;
    let req: StateRequest = body(&plane, &conn, "set_state", raw).await?;
    let state = run(&plane, &conn, "set_state", move |p| {
        let id = p.store.node(&id)?.id;
        p.store.set_state(&id, crate::api::parse_state(&req.state)?, &actor)
    })
    .await?;
    Ok(Json(serde_json::json!({"state": state.to_string()})))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EnqueueQuery {
    /// Seconds from now the task must be finished by (1 to 86,400).
    deadline_s: Option<u64>,
}

async fn enqueue(
    Extension(plane): P,
    Extension(conn): C,
    Path(id): Path<String>,
    Query(query): Query<EnqueueQuery>,
    raw: Body,
) -> ApiResult<serde_json::Value> {
    let actor = operator(&plane, &conn, "enqueue")?;
    let deadline = match query.deadline_s {
        None => None,
        Some(s @ 1..=86_400) => Some(crate::store::now() + s as i64),
        Some(s) => {
            let why = format!("deadline_s {s} is not 1 to 86400 seconds");
            return Err(refuse(&plane, &conn, "enqueue", Refusal::new(400, "bad_task", why)));
        }
    };
    let spec: TaskSpec = body(&plane, &conn, "enqueue", raw).await?;
    let unknown = match &spec {
        TaskSpec::Invalid { kind, reason } => Some(format!("task {kind}: {reason}")),
        TaskSpec::Unsupported { kind } => {
            Some(format!("task kind {kind:?} is not one of {}", ironroot_contract::wire::KINDS.join(", ")))
        }
        _ => None,
    };
    if let Some(why) = unknown {
        return Err(refuse(&plane, &conn, "enqueue", Refusal::new(400, "bad_task", why)));
    }
    let (task, node) = run(&plane, &conn, "enqueue", move |p| {
        let node = p.store.node(&id)?.id;
        if spec == TaskSpec::Drain {
            p.store.set_state(&node, crate::lifecycle::NodeState::Draining, &actor)?;
        }
        Ok((p.store.enqueue(&node, &spec, deadline, &actor)?, node))
    })
    .await?;
    crate::api::notify_node(&plane, &node);
    Ok(Json(serde_json::json!({"task": task})))
}

/// `POST /v1/operator/tasks/{id}/cancel`.
async fn cancel(Extension(plane): P, Extension(conn): C, Path(id): Path<String>) -> ApiResult<serde_json::Value> {
    let actor = operator(&plane, &conn, "cancel")?;
    run(&plane, &conn, "cancel", move |p| p.store.task_cancel(&id, &actor)).await?;
    Ok(Json(serde_json::json!({"state": "cancelled"})))
}

async fn tasks(
    Extension(plane): P,
    Extension(conn): C,
    Path(id): Path<String>,
) -> ApiResult<Vec<crate::work::TaskView>> {
    operator(&plane, &conn, "tasks")?;
    run(&plane, &conn, "tasks", move |p| p.store.tasks(&id)).await.map(Json)
}

#[derive(Debug, Deserialize)]
struct AuditQuery {
    after: Option<i64>,
    limit: Option<i64>,
}

async fn audit_list(
    Extension(plane): P,
    Extension(conn): C,
    Query(q): Query<AuditQuery>,
) -> ApiResult<Vec<crate::audit::Record>> {
    operator(&plane, &conn, "audit")?;
    let (after, limit) = (q.after.unwrap_or(0), q.limit.unwrap_or(1000).clamp(1, 10_000));
    run(&plane, &conn, "audit", move |p| p.store.audit_list(after, limit)).await.map(Json)
}

async fn audit_verify(Extension(plane): P, Extension(conn): C) -> ApiResult<crate::checkpoint::JournalReport> {
    operator(&plane, &conn, "audit_verify")?;
    run(&plane, &conn, "audit_verify", |p| p.store.verify_journal(&p.journal, None)).await.map(Json)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AgainstRequest {
    against: JournalCheckpoint,
}

/// Verifies the journal and that it still holds a checkpoint the operator kept elsewhere.
async fn audit_verify_against(
    Extension(plane): P,
    Extension(conn): C,
    raw: Body,
) -> ApiResult<crate::checkpoint::JournalReport> {
    operator(&plane, &conn, "audit_verify")?;
    let req: AgainstRequest = body(&plane, &conn, "audit_verify", raw).await?;
    let against = JournalCheckpoint::parse(&serde_json::to_vec(&req.against).unwrap_or_default())
        .map_err(|e| refuse(&plane, &conn, "audit_verify", Refusal::new(400, "bad_checkpoint", e.to_string())))?;
    run(&plane, &conn, "audit_verify", move |p| p.store.verify_journal(&p.journal, Some(&against))).await.map(Json)
}

async fn checkpoint_newest(Extension(plane): P, Extension(conn): C) -> ApiResult<Option<JournalCheckpoint>> {
    operator(&plane, &conn, "audit_checkpoint")?;
    run(&plane, &conn, "audit_checkpoint", |p| p.store.newest_checkpoint()).await.map(Json)
}

/// Signs a checkpoint of the journal's head now (or returns the newest, if it covers the head).
async fn checkpoint_now(Extension(plane): P, Extension(conn): C) -> ApiResult<Option<JournalCheckpoint>> {
    operator(&plane, &conn, "audit_checkpoint")?;
    run(&plane, &conn, "audit_checkpoint", |p| p.store.checkpoint(&p.journal, crate::store::now())).await.map(Json)
}
