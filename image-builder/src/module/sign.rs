//! `module sign REF@DIGEST --key KEY`: a cosign-compatible signature. The payload is cosign's
//! simple-signing JSON naming the manifest digest, with the module's name, version and serial in
//! `optional`; the signature goes into the `sha256-<hex>.sig` manifest as one more layer, so
//! signatures already there (ours or cosign's) are kept.

use anyhow::Context as _;
use base64::Engine as _;
use ironroot_contract::config::ConfigError;
use ironroot_contract::manifest::{Descriptor, ImageManifest, ManifestError, ModuleManifest};
use ironroot_contract::{ModuleConfig, OciDigest, SigningKey, SimpleSigningPayload, media};
use ironroot_oci::download::{self, Limits};
use ironroot_oci::source::AnySource;
use ironroot_oci::{RegistryAccess, Target};
use serde::Serialize;

use super::dest::Destination;
use crate::exit::Exit;

/// Why `sign` refused what it found at the reference (transport failures come through as the
/// registry's own errors, classified by [`crate::exit::classify`]).
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("sign needs REF@sha256:<digest>: sign exactly what you pushed, never a tag")]
    Unpinned,
    #[error("{0} has no manifest")]
    NotFound(String),
    #[error("manifest served for {expected} has digest {found}")]
    ManifestDigest { expected: OciDigest, found: OciDigest },
    #[error("{0} is not an ironroot module")]
    NotModule(String, #[source] ManifestError),
    #[error("module config of {0}")]
    Config(String, #[source] ConfigError),
}

impl SignError {
    /// The exit class, as `module verify` would class the same finding.
    pub fn exit(&self) -> Option<Exit> {
        match self {
            Self::Unpinned => None,
            Self::NotFound(_) => Some(Exit::Transport),
            Self::ManifestDigest { .. } | Self::Config(..) => Some(Exit::Content),
            Self::NotModule(..) => Some(Exit::Policy),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct SignOutput {
    pub digest: OciDigest,
    pub signature_tag: String,
    pub key_id: String,
    /// Signature layers in the `.sig` manifest after this call.
    pub signatures: usize,
    /// False when this key had already signed this payload.
    pub added: bool,
}

/// Signs the module `target` (which must pin a digest) with `key`.
pub async fn sign(target: &Target, key: &SigningKey, access: &RegistryAccess) -> anyhow::Result<SignOutput> {
    let Some(digest) = target.digest() else {
        return Err(SignError::Unpinned.into());
    };
    let limits = Limits::standard();
    let src = AnySource::open(target, access)?;
    let bytes = download::fetch_manifest(&src, &digest.to_string(), &limits)
        .await?
        .ok_or_else(|| SignError::NotFound(target.to_string()))?;
    let found = OciDigest::of(&bytes);
    if found != digest {
        return Err(SignError::ManifestDigest { expected: digest, found }.into());
    }
    let module = ModuleManifest::parse(&bytes).map_err(|e| SignError::NotModule(target.to_string(), e))?;
    let config_bytes = download::fetch_small(&src, &module.config, 64 * 1024, &limits).await?;
    let config = ModuleConfig::parse(&config_bytes).map_err(|e| SignError::Config(target.to_string(), e))?;
    let payload =
        SimpleSigningPayload::for_module(&target.repository(), digest, &config.name, &config.version, config.serial);
    attach_signature(target, &src, access, digest, &payload.to_bytes(), key).await
}

/// Adds a signature by `key` over `payload` to the `.sig` manifest of `digest` at `target`.
/// Exposed so tests can sign arbitrary content (an index, a manifest with urls) the same way.
pub async fn attach_signature(
    target: &Target,
    src: &AnySource,
    access: &RegistryAccess,
    digest: OciDigest,
    payload: &[u8],
    key: &SigningKey,
) -> anyhow::Result<SignOutput> {
    let tag = digest.signature_tag();
    let key_id = key.trusted_key()?.id().to_owned();
    let existing = match download::fetch_manifest(src, &tag, &Limits::standard()).await? {
        Some(b) => ImageManifest::parse(&b).with_context(|| format!("existing signature manifest {tag}"))?.layers,
        None => Vec::new(),
    };
    let trusted = key.trusted_key()?;
    let payload_digest = OciDigest::of(payload);
    let already = existing.iter().any(|l| {
        l.digest == payload_digest
            && l.annotations
                .get(media::COSIGN_SIGNATURE_ANNOTATION)
                .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
                .is_some_and(|sig| trusted.verify(payload, &sig).is_ok())
    });
    if already {
        return Ok(SignOutput { digest, signature_tag: tag, key_id, signatures: existing.len(), added: false });
    }
    let mut layer = Descriptor::of(media::COSIGN_SIMPLESIGNING, payload);
    layer.annotations.insert(
        media::COSIGN_SIGNATURE_ANNOTATION.into(),
        base64::engine::general_purpose::STANDARD.encode(key.sign(payload)),
    );
    let mut layers = existing;
    layers.push(layer);

    let dest = Destination::open(target, access)?;
    dest.put_blob_bytes(payload.to_vec()).await.context("uploading signature payload")?;
    let config = cosign_config(&layers);
    let config_desc = Descriptor::of(media::OCI_CONFIG, &config);
    dest.put_blob_bytes(config).await.context("uploading signature config")?;
    let count = layers.len();
    let manifest = ImageManifest {
        schema_version: 2,
        media_type: Some(media::OCI_MANIFEST.into()),
        artifact_type: None,
        config: config_desc,
        layers,
        subject: None,
        annotations: Default::default(),
    };
    dest.put_manifest(&tag, manifest.to_bytes(), media::OCI_MANIFEST).await.context("uploading signature manifest")?;
    Ok(SignOutput { digest, signature_tag: tag, key_id, signatures: count, added: true })
}

/// The image config cosign writes for a signature manifest (an empty image whose layers are
/// the payloads).
fn cosign_config(layers: &[Descriptor]) -> Vec<u8> {
    let diff_ids: Vec<String> = layers.iter().map(|l| l.digest.to_string()).collect();
    serde_json::json!({
        "architecture": "",
        "config": {},
        "created": "0001-01-01T00:00:00Z",
        "history": [{"created": "0001-01-01T00:00:00Z"}],
        "os": "",
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    })
    .to_string()
    .into_bytes()
}
