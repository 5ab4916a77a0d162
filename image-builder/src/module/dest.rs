//! Where push and sign write: a registry repository or an OCI layout directory.

use std::path::Path;

use anyhow::Context as _;
use ironroot_contract::OciDigest;
use ironroot_contract::manifest::Descriptor;
use ironroot_oci::layout::Layout;
use ironroot_oci::registry::Registry;
use ironroot_oci::{RegistryAccess, Target};

#[derive(Debug)]
#[allow(clippy::large_enum_variant, reason = "one per push; boxing buys nothing")]
pub enum Destination {
    Registry { registry: Registry, repository: String },
    Layout(Layout),
}

impl Destination {
    pub fn open(target: &Target, access: &RegistryAccess) -> anyhow::Result<Self> {
        Ok(match target {
            Target::Registry(r) => Self::Registry {
                registry: Registry::open(r.registry(), access)?,
                repository: r.repository().to_owned(),
            },
            Target::Layout { dir, .. } => Self::Layout(Layout::create(dir)?),
        })
    }

    /// Stores a blob from a file whose digest the caller knows; returns whether bytes moved.
    pub async fn put_blob_file(&self, path: &Path, digest: &OciDigest, size: u64) -> anyhow::Result<bool> {
        match self {
            Self::Registry { registry, repository } => {
                Ok(registry.push_blob_file(repository, path, digest, size).await?)
            }
            Self::Layout(l) => {
                if l.has_blob(digest) {
                    return Ok(false);
                }
                let tmp = ironroot_oci::layout::partial_path(&l.blob_path(digest));
                std::fs::copy(path, &tmp).with_context(|| format!("copying {}", path.display()))?;
                l.import_blob(&tmp, digest)?;
                Ok(true)
            }
        }
    }

    pub async fn put_blob_bytes(&self, bytes: Vec<u8>) -> anyhow::Result<OciDigest> {
        match self {
            Self::Registry { registry, repository } => Ok(registry.push_blob_bytes(repository, bytes).await?),
            Self::Layout(l) => Ok(l.write_blob(&bytes)?),
        }
    }

    /// Stores manifest `bytes` and points `tag` at it.
    pub async fn put_manifest(&self, tag: &str, bytes: Vec<u8>, media_type: &str) -> anyhow::Result<OciDigest> {
        let digest = OciDigest::of(&bytes);
        match self {
            Self::Registry { registry, repository } => {
                registry.push_manifest(repository, tag, bytes, media_type).await?
            }
            Self::Layout(l) => {
                let size = bytes.len() as u64;
                l.write_blob(&bytes)?;
                l.set_tag(tag, Descriptor::new(media_type, digest, size))?;
            }
        }
        Ok(digest)
    }
}
