//! The provider's operator routes: provision (`POST /v1/operator/nodes`), terminate and console.
//! Like every operator route: an operator certificate first, then a capped body; refusals are
//! journaled. A request is checked whole before anything is created; a machine that cannot be
//! started after its node was created takes the node down again (terminated, journaled).

use std::io::{Read as _, Seek as _, SeekFrom};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::Path;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse as _, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::{Deserialize, Serialize};

use super::machines::{Ended, Process};
use super::{ACTOR, MachineRequest, ProviderKind, clean, prepare};
use crate::api::{ApiError, ApiResult, body, refuse, run};
use crate::operator_api::operator;
use crate::server::{Conn, Plane};
use crate::store::Refusal;

/// The most of a console log one request returns: its last MiB.
const CONSOLE_MAX: u64 = 1 << 20;

pub fn router() -> Router {
    Router::new()
        .route("/v1/operator/nodes", post(provision))
        .route("/v1/operator/nodes/{id}/terminate", post(terminate))
        .route("/v1/operator/nodes/{id}/console", get(console))
}

type P = Extension<Arc<Plane>>;
type C = Extension<Conn>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProvisionRequest {
    name: String,
    template: Option<String>,
    memory_mib: Option<u32>,
    disk: Option<String>,
    #[serde(default)]
    nics: Vec<super::qemu::NicModel>,
    #[serde(default)]
    disk_bus: Option<super::qemu::DiskBus>,
    #[serde(default)]
    uefi: bool,
}

#[derive(Debug, Serialize)]
struct Provisioned {
    node_id: String,
    name: String,
    provider: &'static str,
    /// The machine's process (`timeout`, QEMU's parent), when one runs.
    pid: Option<u32>,
    /// The command line run (qemu) or recorded (recorder).
    argv: Vec<String>,
}

/// Takes a node whose machine could not be made down again, and says why.
fn failed(p: &Plane, node_id: &str, name: &str, why: String) -> Refusal {
    if let Err(e) = p.store.revoke(node_id, ACTOR) {
        tracing::error!(node.id = %node_id, error = %e, "terminating a node whose machine failed");
    }
    if let Ok(setup) = p.provider.setup() {
        clean(setup, name);
    }
    let data = serde_json::json!({"node": name, "why": why});
    if let Err(e) = p.store.journal_provider(ACTOR, "provider.failed", node_id, &data) {
        tracing::error!(node.id = %node_id, error = %e, "journaling a failed machine");
    }
    Refusal::new(500, "provider_failed", format!("machine {name}: {why}"))
}

async fn provision(Extension(plane): P, Extension(conn): C, raw: Body) -> ApiResult<Provisioned> {
    let what = "provision";
    let actor = operator(&plane, &conn, what)?;
    let req: ProvisionRequest = body(&plane, &conn, what, raw).await?;
    plane.provider.setup().map_err(|r| refuse(&plane, &conn, what, r))?;
    let hardware = super::Hardware { nics: req.nics, disk_bus: req.disk_bus, uefi: req.uefi };
    let req = MachineRequest::check(&req.name, req.template, req.memory_mib, req.disk.as_deref(), hardware)
        .map_err(|r| refuse(&plane, &conn, what, r))?;
    let reservation = plane.provider.machines.reserve(&req.name).map_err(|r| refuse(&plane, &conn, what, r))?;
    let name = req.name.clone();
    let (node, launch) = run(&plane, &conn, what, move |p| {
        let setup = p.provider.setup()?;
        let shape = serde_json::json!({
            "memory_mib": req.memory_mib, "disk_bytes": req.disk_bytes, "nics": req.hardware.nics,
            "disk_bus": req.hardware.disk_bus, "uefi": req.hardware.uefi,
        });
        let node = p.store.provision_node(&req.name, req.template.as_deref(), &shape, &actor)?;
        match prepare(setup, &req, &node.token) {
            Ok(launch) => Ok((node, launch)),
            Err(e) => Err(failed(p, &node.id, &req.name, format!("preparing its directory: {e:#}"))),
        }
    })
    .await?;
    let setup = plane.provider.setup().map_err(|r| refuse(&plane, &conn, what, r))?;
    let argv = launch.argv(&setup.tools);
    let pid = match plane.provider.kind() {
        ProviderKind::Qemu => {
            let stderr = setup.dir.join(&name).join("qemu.err");
            let process = Process {
                argv: argv.clone(),
                console: launch.console.clone(),
                stderr,
                identity: launch.identity.clone(),
            };
            match plane.provider.machines.start(&plane, reservation, &node.id, process) {
                Ok(pid) => Some(pid),
                Err(e) => {
                    let (id, n) = (node.id.clone(), name.clone());
                    let why = format!("starting QEMU: {e}");
                    let refusal = run(&plane, &conn, what, move |p| Ok(failed(p, &id, &n, why))).await?;
                    return Err(refuse(&plane, &conn, what, refusal));
                }
            }
        }
        ProviderKind::Recorder | ProviderKind::Disabled => {
            plane.provider.machines.record(reservation);
            None
        }
    };
    let data = serde_json::json!({"node": name, "argv": argv, "pid": pid, "recorded": pid.is_none()});
    let id = node.id.clone();
    run(&plane, &conn, what, move |p| p.store.journal_provider(ACTOR, "provider.start", &id, &data)).await?;
    let provider = match plane.provider.kind() {
        ProviderKind::Qemu => "qemu",
        ProviderKind::Recorder | ProviderKind::Disabled => "recorder",
    };
    tracing::info!(node.id = %node.id, node.name = %name, ?pid, "provisioned");
    Ok(Json(Provisioned { node_id: node.id, name, provider, pid, argv }))
}

async fn terminate(Extension(plane): P, Extension(conn): C, Path(id): Path<String>) -> ApiResult<serde_json::Value> {
    let what = "terminate";
    let actor = operator(&plane, &conn, what)?;
    let node = run(&plane, &conn, what, move |p| p.store.node(&id)).await?;
    let ended: Option<Ended> = match &node.name {
        Some(name) => plane.provider.machines.stop(name).await.map_err(|r| refuse(&plane, &conn, what, r))?,
        None => None,
    };
    let (id, name, machine) = (node.id.clone(), node.name.clone(), ended.clone());
    run(&plane, &conn, what, move |p| {
        if let (Some(name), Some(ended)) = (&name, &machine) {
            let data = serde_json::json!({"node": name, "ended": ended});
            p.store.journal_provider(&actor, "provider.stop", &id, &data)?;
            if let Ok(setup) = p.provider.setup() {
                clean(setup, name);
            }
        }
        p.store.revoke(&id, &actor)
    })
    .await?;
    Ok(Json(serde_json::json!({"node_id": node.id, "revoked": true, "machine": ended})))
}

/// The node's serial console log (its last MiB), as text.
async fn console(Extension(plane): P, Extension(conn): C, Path(id): Path<String>) -> Result<Response, ApiError> {
    let what = "console";
    operator(&plane, &conn, what)?;
    let node = run(&plane, &conn, what, move |p| p.store.node(&id)).await?;
    let bytes = run(&plane, &conn, what, move |p| {
        let log = node.name.as_deref().and_then(|name| p.provider.console_log(name)).ok_or_else(|| {
            Refusal::new(
                404,
                "no_console",
                format!("node {} has no console log: this plane did not provision it", node.id),
            )
        })?;
        read_tail(&log).map_err(|e| {
            tracing::error!(path = %log.display(), error = %e, "reading a console log");
            Refusal::new(500, "internal", "the console log could not be read")
        })
    })
    .await?;
    Ok(([(CONTENT_TYPE, "text/plain; charset=utf-8")], bytes).into_response())
}

fn read_tail(path: &std::path::Path) -> std::io::Result<Vec<u8>> {
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(CONSOLE_MAX)))?;
    let mut out = Vec::new();
    f.take(CONSOLE_MAX).read_to_end(&mut out)?;
    Ok(out)
}
