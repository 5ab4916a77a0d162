//! Phase 3, fetch: ask the plane (over mTLS) which modules this node runs, each pinned by
//! digest; `ironroot.module` when the plane assigns none. Verifying them is
//! [`crate::modules`]'s business.

use ironroot_contract::OciDigest;
use ironroot_contract::wire::DesiredModule;

use super::settings::BootSettings;
use crate::backoff::Backoff;
use crate::identity::enroll::EnrolledIdentity;
use crate::plane::PlaneError;

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
