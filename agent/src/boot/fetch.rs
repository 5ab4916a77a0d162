//! Phases 3 and 4, fetch and verify. Fetch asks the plane (over mTLS) which modules this node
//! runs, each pinned by digest. Verify runs the whole trust chain of `ironroot-oci` for each,
//! into the prepared store, refusing a serial below this node's floor for that module name (the
//! highest it ever accepted, kept on `/persist`; the plane's floor otherwise). A module the
//! store already verified is re-verified offline from the store's evidence first; only when
//! that fails does the registry get asked. Transport trouble is retried with backoff; a bad
//! signature, wrong bytes or a rollback never are.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ironroot_oci::evidence::Evidence;
use ironroot_oci::source::AnySource;
use ironroot_oci::verify::{FailureKind, verify_module};
use ironroot_oci::{Limits, RegistryAccess, Target, VerifiedModule, VerifyError, VerifyOptions};
use ironroot_spec::OciDigest;
use ironroot_spec::wire::DesiredModule;

use super::enroll::EnrolledIdentity;
use super::retry::Backoff;
use super::settings::BootSettings;
use super::store::PreparedStore;
use crate::external::{self, Links};
use crate::plane::PlaneError;

/// Highest serial accepted per module name.
pub const SERIALS_FILE: &str = "serials.json";

/// What the plane assigned.
#[derive(Debug, Clone)]
pub struct Assignment {
    pub generation: u64,
    pub modules: Vec<DesiredModule>,
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("desired state")]
    Plane(#[from] PlaneError),
    #[error("the plane assigns no modules and ironroot.module names none")]
    Nothing,
    #[error("module reference {0:?} is not pinned by a digest")]
    Unpinned(String),
}

impl FetchError {
    pub fn transient(&self) -> bool {
        matches!(self, Self::Plane(e) if e.transient())
    }
}

/// Asks the plane for this node's modules.
pub async fn fetch(
    enrolled: &EnrolledIdentity,
    settings: &BootSettings,
    backoff: &Backoff,
) -> Result<Assignment, FetchError> {
    let desired =
        backoff.run("desired state", PlaneError::transient, || enrolled.client.desired(&enrolled.node_id)).await?;
    let mut modules = desired.modules;
    if modules.is_empty()
        && let Some(reference) = &settings.module
    {
        let digest = reference.rsplit_once('@').and_then(|(_, d)| d.parse::<OciDigest>().ok());
        let digest = digest.ok_or_else(|| FetchError::Unpinned(reference.clone()))?;
        modules.push(DesiredModule { name: String::new(), reference: reference.clone(), digest, serial: 0 });
    }
    if modules.is_empty() {
        return Err(FetchError::Nothing);
    }
    Ok(Assignment { generation: desired.generation, modules })
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyPhaseError {
    #[error("module {reference}")]
    Module { reference: String, source: VerifyError },
    #[error("module {reference}: {reason}")]
    Reference { reference: String, reason: String },
    #[error("{op} {path}")]
    Io { op: &'static str, path: PathBuf, source: std::io::Error },
}

impl VerifyPhaseError {
    pub fn kind(&self) -> FailureKind {
        match self {
            Self::Module { source, .. } => source.kind(),
            Self::Reference { .. } => FailureKind::Policy,
            Self::Io { .. } => FailureKind::Local,
        }
    }
}

/// How verification reaches registries and how much it may fetch.
#[derive(Debug, Clone)]
pub struct FetchPolicy {
    pub access: RegistryAccess,
    pub limits: Limits,
    pub backoff: Backoff,
}

/// Verifies every assigned module into the store; all or nothing.
pub async fn verify(
    assignment: &Assignment,
    store: &PreparedStore,
    settings: &BootSettings,
    policy: &FetchPolicy,
) -> Result<Vec<VerifiedModule>, VerifyPhaseError> {
    let serials_path = store.state_dir.join(SERIALS_FILE);
    let mut floors = if store.persistent { read_floors(&serials_path) } else { BTreeMap::new() };
    let mut verified = Vec::new();
    for module in &assignment.modules {
        let kept = floors.get(&module.name).copied().unwrap_or(0);
        let opts = VerifyOptions {
            trust: settings.trust.clone(),
            min_serial: Some(kept.max(module.serial)),
            limits: policy.limits.clone(),
        };
        let v = verify_one(module, store, &opts, policy).await?;
        tracing::info!(
            module.name = %v.config().name, module.digest = %v.digest(), serial = v.config().serial,
            downloaded = v.downloaded(), "module verified"
        );
        let floor = floors.entry(v.config().name.clone()).or_insert(0);
        *floor = (*floor).max(v.config().serial);
        verified.push(v);
    }
    if store.persistent {
        let json = serde_json::to_vec_pretty(&floors).unwrap_or_default();
        ironroot_oci::layout::write_atomic(&serials_path, &json).map_err(|source| VerifyPhaseError::Io {
            op: "writing",
            path: serials_path.clone(),
            source,
        })?;
    }
    Ok(verified)
}

async fn verify_one(
    module: &DesiredModule,
    store: &PreparedStore,
    opts: &VerifyOptions,
    policy: &FetchPolicy,
) -> Result<VerifiedModule, VerifyPhaseError> {
    let reference = module.reference.clone();
    let evidence = Evidence::new(store.objects.root());
    if evidence.has(&module.digest) {
        match verify_module(&evidence, None, Some(module.digest), &store.objects, opts).await {
            Ok(v) => return Ok(v),
            // A rollback stays refused whichever source says it.
            Err(e @ VerifyError::Serial { .. }) => return Err(VerifyPhaseError::Module { reference, source: e }),
            Err(e) => tracing::info!(error = %e, "offline re-verification failed; asking the registry"),
        }
    }
    let target = Target::parse(&reference)
        .map_err(|e| VerifyPhaseError::Reference { reference: reference.clone(), reason: e.to_string() })?;
    if target.digest().is_some_and(|d| d != module.digest) {
        return Err(VerifyPhaseError::Reference {
            reference,
            reason: format!("names another digest than {}", module.digest),
        });
    }
    let source = AnySource::open(&target, &policy.access)
        .map_err(|e| VerifyPhaseError::Reference { reference: reference.clone(), reason: e.to_string() })?;
    policy
        .backoff
        .run(
            "module verification",
            |e: &VerifyError| e.kind() == FailureKind::Transport,
            || verify_module(&source, None, Some(module.digest), &store.objects, opts),
        )
        .await
        .map_err(|source| VerifyPhaseError::Module { reference, source })
}

/// Largest serial-floor record read back (a line per module name).
const MAX_FLOORS: u64 = 64 * 1024;

/// The kept serial floors; an unreadable file means none (the plane's floor still applies).
fn read_floors(path: &Path) -> BTreeMap<String, u64> {
    // Written by this agent and replaced by rename: a symlink there is not ours.
    let parsed = match external::read_if_present(path, MAX_FLOORS, Links::Refuse) {
        Ok(None) => return BTreeMap::new(),
        Ok(Some(bytes)) => serde_json::from_slice(&bytes).map_err(|e| e.to_string()),
        Err(e) => Err(crate::exit::describe(&e)),
    };
    parsed.unwrap_or_else(|error| {
        tracing::warn!(path = %path.display(), %error, "serial floors unreadable; using the plane's");
        BTreeMap::new()
    })
}
