//! `module push LAYOUT REF`: copies a module (and any signatures the layout holds for it) from
//! an OCI layout to a registry or another layout, blobs first, manifest last, so a reader never
//! sees a manifest whose blobs are missing.

use anyhow::{Context as _, bail};
use ironroot_contract::manifest::ImageManifest;
use ironroot_contract::{OciDigest, media};
use ironroot_oci::layout::Layout;
use ironroot_oci::{RegistryAccess, Target};
use serde::Serialize;

use super::dest::Destination;
use crate::progress::Progress;

#[derive(Debug, Serialize)]
pub struct PushOutput {
    /// `REPOSITORY@sha256:…` — the reference to sign and to assign to nodes.
    pub reference: String,
    pub digest: OciDigest,
    pub tag: String,
    pub blobs_uploaded: usize,
    pub blobs_present: usize,
    pub signatures: usize,
}

/// Parses the LAYOUT argument: a directory, or `oci:DIR[:TAG]`.
pub fn layout_target(arg: &str) -> anyhow::Result<(Layout, Option<String>)> {
    let target = if arg.starts_with("oci:") {
        Target::parse(arg)?
    } else {
        Target::Layout { dir: arg.into(), tag: None, digest: None }
    };
    let Target::Layout { dir, tag, .. } = target else { bail!("{arg} is not a layout") };
    Ok((Layout::open(&dir)?, tag))
}

pub async fn push(
    layout_arg: &str,
    dest_ref: &str,
    access: &RegistryAccess,
    progress: &Progress,
) -> anyhow::Result<PushOutput> {
    let (layout, tag) = layout_target(layout_arg)?;
    let (tag, desc) = match tag {
        Some(t) => {
            let d = layout.resolve(&t)?.with_context(|| format!("layout {} has no tag {t}", layout.dir().display()))?;
            (t, d)
        }
        None => {
            let mut tags = layout.module_tags()?;
            if tags.len() != 1 {
                let names: Vec<_> = tags.iter().map(|(t, _)| t.as_str()).collect();
                bail!(
                    "layout {} holds {} manifests ({}); name one as oci:DIR:TAG",
                    layout.dir().display(),
                    tags.len(),
                    names.join(", ")
                );
            }
            tags.remove(0)
        }
    };
    let target = Target::parse(dest_ref)?;
    if target.digest().is_some() {
        bail!("push destination {dest_ref} pins a digest; give a repository or repository:tag");
    }
    let dest_tag = target.tag().map_or_else(|| tag.clone(), str::to_owned);
    let dest = Destination::open(&target, access)?;

    let mut out = PushOutput {
        reference: format!("{}@{}", target.repository(), desc.digest),
        digest: desc.digest,
        tag: dest_tag.clone(),
        blobs_uploaded: 0,
        blobs_present: 0,
        signatures: 0,
    };
    copy_manifest(&layout, &dest, desc.digest, &dest_tag, &mut out, progress).await?;
    let sig_tag = desc.digest.signature_tag();
    if let Some(sig) = layout.resolve(&sig_tag)? {
        copy_manifest(&layout, &dest, sig.digest, &sig_tag, &mut out, progress).await?;
        out.signatures = 1;
    }
    progress.finish();
    Ok(out)
}

async fn copy_manifest(
    layout: &Layout,
    dest: &Destination,
    digest: OciDigest,
    tag: &str,
    out: &mut PushOutput,
    progress: &Progress,
) -> anyhow::Result<()> {
    let path = layout.blob_path(&digest);
    let bytes = std::fs::read(&path).with_context(|| format!("reading manifest {}", path.display()))?;
    if OciDigest::of(&bytes) != digest {
        bail!("layout blob {} does not match its digest", path.display());
    }
    let manifest = ImageManifest::parse(&bytes).with_context(|| format!("manifest {digest}"))?;
    let total: u64 = std::iter::once(&manifest.config).chain(&manifest.layers).map(|d| d.size).sum();
    progress.bytes(&format!("pushing {tag}"), total);
    for blob in std::iter::once(&manifest.config).chain(&manifest.layers) {
        let path = layout.blob_path(&blob.digest);
        if dest
            .put_blob_file(&path, &blob.digest, blob.size)
            .await
            .with_context(|| format!("pushing blob {}", blob.digest))?
        {
            out.blobs_uploaded += 1;
        } else {
            out.blobs_present += 1;
        }
        progress.advance(blob.size);
    }
    dest.put_manifest(tag, bytes, media::OCI_MANIFEST).await.with_context(|| format!("pushing manifest {tag}"))?;
    Ok(())
}
