//! Verifying assigned modules into the object store, for the boot pipeline and the service
//! alike: the whole trust chain of `ironroot-oci` for each, refusing a serial below this node's
//! floor for that module name (the highest it ever accepted, kept on `/persist`; the plane's
//! floor otherwise). A module the store already verified is re-verified offline from the
//! store's evidence first; only when that fails does the registry get asked. Transport trouble
//! is retried with backoff; a bad signature, wrong bytes or a rollback never are.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ironroot_contract::TrustedKey;
use ironroot_contract::run_state::ModuleRecord;
use ironroot_contract::wire::DesiredModule;
use ironroot_oci::evidence::Evidence;
use ironroot_oci::source::AnySource;
use ironroot_oci::verify::{FailureKind, verify_module};
use ironroot_oci::{Limits, RegistryAccess, Target, VerifiedModule, VerifyError, VerifyOptions};

use crate::backoff::Backoff;
use crate::external::{self, Links};
use crate::store::PreparedStore;

/// Highest serial accepted per module name.
pub const SERIALS_FILE: &str = "serials.json";

#[derive(Debug, thiserror::Error)]
pub enum VerifyPhaseError {
    #[error("module {reference}")]
    Module { reference: String, source: VerifyError },
    #[error("module {reference}: {reason}")]
    Reference { reference: String, reason: String },
}

impl VerifyPhaseError {
    pub fn kind(&self) -> FailureKind {
        match self {
            Self::Module { source, .. } => source.kind(),
            Self::Reference { .. } => FailureKind::Policy,
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

/// Verifies every module into the store; all or nothing. Serial floors are read, not raised:
/// the caller raises them with [`raise_floors`] once it commits to the modules (the boot right
/// after verification, the service at a transaction's commit).
pub async fn verify(
    modules: &[DesiredModule],
    store: &PreparedStore,
    trust: &[TrustedKey],
    policy: &FetchPolicy,
) -> Result<Vec<VerifiedModule>, VerifyPhaseError> {
    let floors = kept_floors(store);
    let mut verified = Vec::new();
    for module in modules {
        let kept = floors.get(&module.name).copied().unwrap_or(0);
        let opts = VerifyOptions {
            trust: trust.to_vec(),
            min_serial: Some(kept.max(module.serial)),
            limits: policy.limits.clone(),
        };
        let v = verify_one(module, store, &opts, policy).await?;
        tracing::info!(
            module.name = %v.config().name, module.digest = %v.digest(), serial = v.config().serial,
            downloaded = v.downloaded(), "module verified"
        );
        verified.push(v);
    }
    Ok(verified)
}

/// A verified module as the run state records it; `reference` is where it was asked for.
pub fn record(m: &VerifiedModule, reference: Option<&str>) -> ModuleRecord {
    let c = m.config();
    ModuleRecord {
        name: c.name.clone(),
        version: c.version.clone(),
        serial: c.serial,
        digest: m.digest(),
        composefs_digest: c.composefs_digest,
        role: c.role,
        image: m.image_path().to_owned(),
        signed_by: m.signature().key_id.clone(),
        downloaded_bytes: m.downloaded(),
        new_objects: m.new_objects(),
        reference: reference.map(str::to_owned),
        units: c.units.clone(),
    }
}

/// The serial floors this node keeps (none on a store that does not survive a reboot: the
/// plane's floor applies there).
pub fn kept_floors(store: &PreparedStore) -> BTreeMap<String, u64> {
    if store.persistent { read_floors(&store.state_dir.join(SERIALS_FILE)) } else { BTreeMap::new() }
}

/// The kept serial floors could not be written.
#[derive(Debug, thiserror::Error)]
#[error("writing the serial floors {path}")]
pub struct FloorError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

/// Raises the kept floor of each module's name to its serial (never lowers one).
pub fn raise_floors(store: &PreparedStore, modules: &[VerifiedModule]) -> Result<(), FloorError> {
    if !store.persistent {
        return Ok(());
    }
    let serials_path = store.state_dir.join(SERIALS_FILE);
    let mut floors = read_floors(&serials_path);
    for v in modules {
        let floor = floors.entry(v.config().name.clone()).or_insert(0);
        *floor = (*floor).max(v.config().serial);
    }
    let json = serde_json::to_vec_pretty(&floors).unwrap_or_default();
    ironroot_oci::layout::write_atomic(&serials_path, &json).map_err(|source| FloorError { path: serials_path, source })
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
