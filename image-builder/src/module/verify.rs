//! `module verify REF --trust PUB…`: the whole trust chain from `ironroot_oci::verify`, into a
//! store directory with `--store`, else checking every object without keeping it.

use std::path::PathBuf;

use ironroot_contract::{OciDigest, VerityDigest};
use ironroot_oci::source::AnySource;
use ironroot_oci::store::ObjectStore;
use ironroot_oci::verify::{self, VerifiedModule, VerifyError, VerifyOptions};
use ironroot_oci::{RegistryAccess, Target};
use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct VerifyOutput {
    pub reference: String,
    pub digest: OciDigest,
    pub name: String,
    pub version: String,
    pub serial: u64,
    pub composefs_digest: VerityDigest,
    pub objects: u64,
    pub object_bytes: u64,
    pub key_id: String,
    pub downloaded_bytes: u64,
}

impl VerifyOutput {
    pub fn new(target: &Target, m: &VerifiedModule) -> Self {
        let c = m.config();
        Self {
            reference: format!("{}@{}", target.repository(), m.digest()),
            digest: m.digest(),
            name: c.name.clone(),
            version: c.version.clone(),
            serial: c.serial,
            composefs_digest: c.composefs_digest,
            objects: c.objects,
            object_bytes: c.object_bytes,
            key_id: m.signature().key_id.clone(),
            downloaded_bytes: m.downloaded(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyCommandError {
    #[error("opening {0}")]
    Open(String, #[source] anyhow::Error),
    #[error("verifying {0}")]
    Verify(String, #[source] VerifyError),
}

/// Verifies `target`; objects land in `store` or a scratch directory.
pub async fn verify(
    target: &Target,
    store: Option<PathBuf>,
    opts: &VerifyOptions,
    access: &RegistryAccess,
) -> Result<VerifyOutput, VerifyCommandError> {
    let open = |e: anyhow::Error| VerifyCommandError::Open(target.to_string(), e);
    let src = AnySource::open(target, access).map_err(|e| open(e.into()))?;
    // Without --store nothing is installed: objects are checked as they stream and only their
    // digests are kept; the scratch directory holds the (small) image while it is checked.
    let scratch;
    let store = match store {
        Some(p) => ObjectStore::open(&p),
        None => {
            scratch = tempfile::Builder::new().prefix("ironroot-verify-").tempdir().map_err(|e| open(e.into()))?;
            ObjectStore::check_only(scratch.path())
        }
    }
    .map_err(|e| open(e.into()))?;
    let module = verify::verify_module(&src, target.tag(), target.digest(), &store, opts)
        .await
        .map_err(|e| VerifyCommandError::Verify(target.to_string(), e))?;
    Ok(VerifyOutput::new(target, &module))
}
