//! Operator routes for channels, templates, rollouts and receipts (docs/interfaces/plane-api.md).
//! A change that publishes a module verifies it first (registry reads, off the database), then
//! applies in one transaction; a refusal at either step changes nothing.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query};
use axum::routing::{delete, get, post};
use axum::{Extension, Json, Router};
use ironroot_contract::wire::DesiredState;
use serde::Deserialize;

use crate::api::{ApiError, ApiResult, body, refuse, run};
use crate::catalog::{ChannelChange, ChannelView, EntrySpec, TemplateView};
use crate::operator_api::operator;
use crate::publish::{At, ModuleRef, parse_module_ref, split_repo};
use crate::server::{Conn, Plane};
use crate::store::Refusal;

pub fn router() -> Router {
    Router::new()
        .route("/v1/operator/channels", get(channels).post(channel_set))
        .route("/v1/operator/channels/promote", post(channel_promote))
        .route("/v1/operator/templates", post(template_create))
        .route("/v1/operator/templates/{name}", get(template_show))
        .route("/v1/operator/templates/{name}/modules", post(template_add))
        .route("/v1/operator/templates/{name}/modules/{module}", delete(template_remove))
        .route("/v1/operator/templates/{name}/render", get(template_render))
        .route("/v1/operator/templates/{name}/rollout", get(rollout_status).post(rollout_set))
        .route("/v1/operator/templates/{name}/rollout/resume", post(rollout_resume))
        .route("/v1/operator/nodes/{id}/receipts", get(receipts))
}

type P = Extension<Arc<Plane>>;
type C = Extension<Conn>;

async fn channels(Extension(plane): P, Extension(conn): C) -> ApiResult<Vec<ChannelView>> {
    operator(&plane, &conn, "channels")?;
    run(&plane, &conn, "channels", |p| p.store.channels()).await.map(Json)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChannelSet {
    repo: String,
    channel: String,
    /// A tag (resolved by the plane, once) or `sha256:…`.
    at: String,
    #[serde(default)]
    allow_rollback: bool,
}

async fn channel_set(Extension(plane): P, Extension(conn): C, raw: Body) -> ApiResult<ChannelChange> {
    let actor = operator(&plane, &conn, "channel_set")?;
    let req: ChannelSet = body(&plane, &conn, "channel_set", raw).await?;
    let checked = split_repo(&req.repo)
        .and_then(|_| crate::publish::check_channel(&req.channel))
        .and_then(|()| At::parse(&req.at));
    let at = checked.map_err(|r| refuse(&plane, &conn, "channel_set", r))?;
    let module = plane.publisher.verify(&req.repo, &at).await.map_err(|r| refuse(&plane, &conn, "channel_set", r))?;
    run(&plane, &conn, "channel_set", move |p| {
        p.store.channel_set(&req.channel, &module, None, req.allow_rollback, &actor)
    })
    .await
    .map(Json)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChannelPromote {
    repo: String,
    from: String,
    to: String,
    #[serde(default)]
    allow_rollback: bool,
}

/// Points `to` where `from` is, verifying the module again (trust keys may have changed since
/// `from` was set).
async fn channel_promote(Extension(plane): P, Extension(conn): C, raw: Body) -> ApiResult<ChannelChange> {
    let actor = operator(&plane, &conn, "channel_promote")?;
    let req: ChannelPromote = body(&plane, &conn, "channel_promote", raw).await?;
    crate::publish::check_channel(&req.to).map_err(|r| refuse(&plane, &conn, "channel_promote", r))?;
    let (repo, from) = (req.repo.clone(), req.from.clone());
    let source = run(&plane, &conn, "channel_promote", move |p| p.store.channel(&repo, &from)).await?;
    let digest = source.digest.parse().map_err(|_| {
        refuse(&plane, &conn, "channel_promote", Refusal::new(500, "internal", "a stored channel digest is broken"))
    })?;
    let module = plane
        .publisher
        .verify(&req.repo, &At::Digest(digest))
        .await
        .map_err(|r| refuse(&plane, &conn, "channel_promote", r))?;
    run(&plane, &conn, "channel_promote", move |p| {
        p.store.channel_set(&req.to, &module, Some(&req.from), req.allow_rollback, &actor)
    })
    .await
    .map(Json)
}

/// Module references as entries: channels as named; digest pins verified when the plane has
/// trust keys (`,serial=N` then a floor the signed serial must reach), else taken with the
/// serial the operator typed.
async fn resolve(plane: &Arc<Plane>, conn: &Conn, what: &str, modules: &[String]) -> Result<Vec<EntrySpec>, ApiError> {
    let mut specs = Vec::with_capacity(modules.len());
    for m in modules {
        let spec = match parse_module_ref(m).map_err(|r| refuse(plane, conn, what, r))? {
            ModuleRef::Channel { repo, channel } => EntrySpec::Channel { repo, channel },
            ModuleRef::Digest { repo, digest, serial } if plane.publisher.verifies() => {
                let p = plane
                    .publisher
                    .verify(&repo, &At::Digest(digest))
                    .await
                    .map_err(|r| refuse(plane, conn, what, r))?;
                if let Some(floor) = serial
                    && p.serial < floor
                {
                    let r = Refusal::new(
                        400,
                        "bad_module",
                        format!("{m}: the signed serial is {}, below {floor}", p.serial),
                    );
                    return Err(refuse(plane, conn, what, r));
                }
                EntrySpec::Digest { repo, digest: digest.to_string(), name: p.name, serial: p.serial, verified: true }
            }
            ModuleRef::Digest { repo, digest, serial: Some(serial) } => {
                let name = repo.rsplit('/').next().unwrap_or(&repo).to_owned();
                EntrySpec::Digest { repo, digest: digest.to_string(), name, serial, verified: false }
            }
            ModuleRef::Digest { serial: None, .. } => {
                let r = Refusal::new(
                    409,
                    "no_trust",
                    format!(
                        "{m}: the plane has no trust keys (serve --trust KEY.pub) to read its signed serial; give ,serial=N"
                    ),
                );
                return Err(refuse(plane, conn, what, r));
            }
        };
        specs.push(spec);
    }
    Ok(specs)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TemplateRequest {
    name: String,
    modules: Vec<String>,
    #[serde(default)]
    allow_rollback: bool,
    /// Seconds a root entered by soft reboot has to pass its trial (absent: the node's 300).
    #[serde(default)]
    trial_deadline_s: Option<u64>,
}

/// Creates or replaces a template with exactly these modules.
async fn template_create(Extension(plane): P, Extension(conn): C, raw: Body) -> ApiResult<serde_json::Value> {
    let actor = operator(&plane, &conn, "template_create")?;
    let req: TemplateRequest = body(&plane, &conn, "template_create", raw).await?;
    let specs = resolve(&plane, &conn, "template_create", &req.modules).await?;
    let revision = run(&plane, &conn, "template_create", move |p| {
        // Checked first: a refused request changes nothing.
        crate::catalog::check_trial_deadline(req.trial_deadline_s)?;
        let revision = p.store.template_put(&req.name, &specs, true, req.allow_rollback, &actor)?;
        p.store.template_trial_deadline(&req.name, req.trial_deadline_s, &actor)?;
        Ok(revision)
    })
    .await?;
    Ok(Json(serde_json::json!({"created": true, "revision": revision})))
}

async fn template_show(Extension(plane): P, Extension(conn): C, Path(name): Path<String>) -> ApiResult<TemplateView> {
    operator(&plane, &conn, "template_show")?;
    run(&plane, &conn, "template_show", move |p| p.store.template_show(&name)).await.map(Json)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AddRequest {
    modules: Vec<String>,
    #[serde(default)]
    allow_rollback: bool,
}

/// Adds modules to a template, or replaces the entries of their module names.
async fn template_add(
    Extension(plane): P,
    Extension(conn): C,
    Path(name): Path<String>,
    raw: Body,
) -> ApiResult<serde_json::Value> {
    let actor = operator(&plane, &conn, "template_add")?;
    let req: AddRequest = body(&plane, &conn, "template_add", raw).await?;
    let specs = resolve(&plane, &conn, "template_add", &req.modules).await?;
    let revision = run(&plane, &conn, "template_add", move |p| {
        p.store.template_put(&name, &specs, false, req.allow_rollback, &actor)
    })
    .await?;
    Ok(Json(serde_json::json!({"revision": revision})))
}

async fn template_remove(
    Extension(plane): P,
    Extension(conn): C,
    Path((name, module)): Path<(String, String)>,
) -> ApiResult<serde_json::Value> {
    let actor = operator(&plane, &conn, "template_remove")?;
    let revision =
        run(&plane, &conn, "template_remove", move |p| p.store.template_remove(&name, &module, &actor)).await?;
    Ok(Json(serde_json::json!({"revision": revision})))
}

#[derive(Debug, Deserialize)]
struct RenderQuery {
    node: Option<String>,
}

/// The desired state the template's newest rendering gives (to a node, if named): a dry run.
async fn template_render(
    Extension(plane): P,
    Extension(conn): C,
    Path(name): Path<String>,
    Query(q): Query<RenderQuery>,
) -> ApiResult<DesiredState> {
    operator(&plane, &conn, "template_render")?;
    run(&plane, &conn, "template_render", move |p| p.store.template_render(&name, q.node.as_deref())).await.map(Json)
}

async fn rollout_status(
    Extension(plane): P,
    Extension(conn): C,
    Path(name): Path<String>,
) -> ApiResult<crate::rollout::RolloutStatus> {
    operator(&plane, &conn, "rollout")?;
    run(&plane, &conn, "rollout", move |p| p.store.rollout_status(&name)).await.map(Json)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RolloutSet {
    /// Nodes per batch; `null`: all at once.
    batch: Option<u32>,
}

async fn rollout_set(
    Extension(plane): P,
    Extension(conn): C,
    Path(name): Path<String>,
    raw: Body,
) -> ApiResult<crate::rollout::RolloutStatus> {
    let actor = operator(&plane, &conn, "rollout_set")?;
    let req: RolloutSet = body(&plane, &conn, "rollout_set", raw).await?;
    run(&plane, &conn, "rollout_set", move |p| {
        p.store.rollout_set(&name, req.batch, &actor)?;
        p.store.rollout_status(&name)
    })
    .await
    .map(Json)
}

async fn rollout_resume(
    Extension(plane): P,
    Extension(conn): C,
    Path(name): Path<String>,
) -> ApiResult<serde_json::Value> {
    let actor = operator(&plane, &conn, "rollout_resume")?;
    let moved = run(&plane, &conn, "rollout_resume", move |p| p.store.rollout_resume(&name, &actor)).await?;
    Ok(Json(serde_json::json!({"resumed": true, "moved": moved})))
}

async fn receipts(
    Extension(plane): P,
    Extension(conn): C,
    Path(id): Path<String>,
) -> ApiResult<Vec<crate::receipts::ReceiptView>> {
    operator(&plane, &conn, "receipts")?;
    run(&plane, &conn, "receipts", move |p| p.store.receipts(&id)).await.map(Json)
}
