//! The trust chain, start to end. Resolve the reference to a digest once; verify a signature
//! over that digest with a trusted key before any module blob is fetched; then fetch only by
//! digest: the config (serial, composefs digest), the EROFS image (its fs-verity digest must be
//! the signed composefs digest), and the packs (every object's fs-verity digest checked as it
//! streams into the store). Finally every object the image references must be in the store.
//! Only this module constructs a [`VerifiedModule`].

use std::path::PathBuf;

use composefs::fsverity::{FsVerityHashValue as _, Sha256HashValue};
use futures_util::{StreamExt as _, TryStreamExt as _};
use ironroot_contract::config::ConfigError;
use ironroot_contract::manifest::{ImageManifest, ModuleManifest};
use ironroot_contract::signing::{self, MAX_PAYLOAD_SIZE, SignatureError, SignedPayload};
use ironroot_contract::{ManifestError, ModuleConfig, OciDigest, TrustedKey, VerityDigest, media};

use crate::download::{self, DownloadError, Limits};
use crate::evidence::{Evidence, Record};
use crate::registry::RegistryError;
use crate::source::{ModuleSource, SourceError};
use crate::store::ObjectStore;

/// Largest config blob read (a real one is under 1 KiB).
const MAX_CONFIG_SIZE: u64 = 64 * 1024;
/// Largest EROFS image loaded into memory to list the objects it references. Images hold
/// metadata only; a full distribution root is a few tens of MiB.
const MAX_IMAGE_SCAN: u64 = 512 << 20;

#[derive(Debug, Clone)]
pub struct VerifyOptions {
    pub trust: Vec<TrustedKey>,
    pub min_serial: Option<u64>,
    pub limits: Limits,
}

/// A module whose whole chain checked: signature, manifest, config, image and objects.
#[derive(Debug, Clone)]
pub struct VerifiedModule {
    digest: OciDigest,
    config: ModuleConfig,
    signature: SignedPayload,
    image: PathBuf,
    downloaded: u64,
    new_objects: u64,
}

impl VerifiedModule {
    /// Digest of the verified manifest.
    pub fn digest(&self) -> OciDigest {
        self.digest
    }
    pub fn config(&self) -> &ModuleConfig {
        &self.config
    }
    pub fn signature(&self) -> &SignedPayload {
        &self.signature
    }
    /// The verified EROFS image in the store's `images/`.
    pub fn image_path(&self) -> &std::path::Path {
        &self.image
    }
    /// Bytes fetched for this verification (0 when everything was already present).
    pub fn downloaded(&self) -> u64 {
        self.downloaded
    }
    pub fn new_objects(&self) -> u64 {
        self.new_objects
    }
}

/// What kind of failure; decides exit codes and whether retrying can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// No trusted signature for this content.
    Signature,
    /// Bytes that do not match what was signed.
    Content,
    /// Refused by policy: cap, serial floor, index, urls, not a module.
    Policy,
    /// Network, registry or deadline trouble; a retry may succeed.
    Transport,
    /// Local I/O.
    Local,
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{0} has no manifest")]
    NotFound(String),
    #[error("manifest fetched by digest {expected} has digest {found}")]
    ManifestDigest { expected: OciDigest, found: OciDigest },
    #[error("signature check failed")]
    Signature(#[from] SignatureError),
    #[error("signature manifest {tag}: {source}")]
    SignatureManifest { tag: String, source: ManifestError },
    #[error("module manifest refused")]
    Module(#[from] ManifestError),
    #[error("module config refused")]
    Config(#[from] ConfigError),
    #[error("module {name} serial {serial} is below the minimum {min} (rollback refused)")]
    Serial { name: String, serial: u64, min: u64 },
    #[error("download refused or failed")]
    Download(#[from] DownloadError),
    #[error("EROFS image {digest} has fs-verity digest {found}, the signed config says {expected}")]
    ImageDigest { digest: OciDigest, expected: VerityDigest, found: VerityDigest },
    #[error("EROFS image {digest} is not a readable composefs image: {reason}")]
    Image { digest: OciDigest, reason: String },
    #[error("packs hold {found} {what}, the config declares {declared}")]
    Totals { what: &'static str, declared: u64, found: u64 },
    #[error("store lacks {missing} objects the image references (first: {first})")]
    Incomplete { missing: usize, first: VerityDigest },
    #[error("{op} {path}")]
    Io { op: &'static str, path: PathBuf, source: std::io::Error },
}

impl VerifyError {
    pub fn kind(&self) -> FailureKind {
        match self {
            Self::Signature(_) | Self::SignatureManifest { .. } => FailureKind::Signature,
            Self::ManifestDigest { .. }
            | Self::Config(_)
            | Self::ImageDigest { .. }
            | Self::Image { .. }
            | Self::Totals { .. }
            | Self::Incomplete { .. } => FailureKind::Content,
            Self::Module(_) | Self::Serial { .. } => FailureKind::Policy,
            Self::NotFound(_) => FailureKind::Transport,
            Self::Download(d) => match d {
                DownloadError::OverCap { .. }
                | DownloadError::Manifest {
                    source: SourceError::TooLarge { .. } | SourceError::Registry(RegistryError::TooLarge { .. }),
                    ..
                } => FailureKind::Policy,
                DownloadError::DeclaredSize { .. }
                | DownloadError::Oversize { .. }
                | DownloadError::Digest { .. }
                | DownloadError::Pack { .. } => FailureKind::Content,
                DownloadError::Io { .. } => FailureKind::Local,
                _ => FailureKind::Transport,
            },
            Self::Io { .. } => FailureKind::Local,
        }
    }
}

/// Step 1: the digest the reference means, and the manifest bytes (which hash to it).
async fn resolve<S: ModuleSource>(
    src: &S,
    tag: Option<&str>,
    digest: Option<OciDigest>,
    limits: &Limits,
) -> Result<(OciDigest, Vec<u8>), VerifyError> {
    let reference = match (digest, tag) {
        (Some(d), _) => d.to_string(),
        (None, Some(t)) => t.to_owned(),
        (None, None) => "latest".to_owned(),
    };
    let bytes = download::fetch_manifest(src, &reference, limits)
        .await?
        .ok_or_else(|| VerifyError::NotFound(format!("{}:{reference}", src.describe())))?;
    let found = OciDigest::of(&bytes);
    if let Some(expected) = digest
        && found != expected
    {
        return Err(VerifyError::ManifestDigest { expected, found });
    }
    Ok((found, bytes))
}

/// Step 2: some layer of the `.sig` manifest is a valid signature over `digest` by a trusted key.
async fn verify_signatures<S: ModuleSource>(
    src: &S,
    digest: OciDigest,
    opts: &VerifyOptions,
    record: &mut Record,
) -> Result<SignedPayload, VerifyError> {
    let tag = digest.signature_tag();
    let bytes = download::fetch_manifest(src, &tag, &opts.limits).await?.ok_or(SignatureError::Missing(digest))?;
    record.manifest(&tag, &bytes);
    let sig_manifest =
        ImageManifest::parse(&bytes).map_err(|source| VerifyError::SignatureManifest { tag: tag.clone(), source })?;
    let mut failures: Vec<SignatureError> = Vec::new();
    for layer in sig_manifest.layers.iter().filter(|l| l.media_type == media::COSIGN_SIMPLESIGNING) {
        let Some(sig) = layer.annotations.get(media::COSIGN_SIGNATURE_ANNOTATION) else {
            failures.push(SignatureError::NoAnnotation);
            continue;
        };
        let payload = download::fetch_small(src, layer, MAX_PAYLOAD_SIZE, &opts.limits).await?;
        match signing::verify_signature(&payload, sig, &opts.trust, digest) {
            Ok(signed) => {
                record.blob(layer.digest, &payload);
                return Ok(signed);
            }
            Err(e) => failures.push(e),
        }
    }
    // Report the most telling failure: content copied from elsewhere, else the key reasons.
    let pick = failures
        .iter()
        .position(|e| matches!(e, SignatureError::WrongDigest { .. }))
        .map(|i| failures.swap_remove(i))
        .or_else(|| failures.pop());
    Err(pick.unwrap_or(SignatureError::Missing(digest)).into())
}

/// A module whose signature and config checked, and nothing more: no image or pack was
/// fetched. What a control plane needs to publish a module (its name, serial and role); not
/// something a node may mount (only [`VerifiedModule`] is).
#[derive(Debug, Clone)]
pub struct SignedModule {
    digest: OciDigest,
    config: ModuleConfig,
    signature: SignedPayload,
}

impl SignedModule {
    /// Digest of the signed manifest.
    pub fn digest(&self) -> OciDigest {
        self.digest
    }
    pub fn config(&self) -> &ModuleConfig {
        &self.config
    }
    pub fn signature(&self) -> &SignedPayload {
        &self.signature
    }
}

/// The head of the chain, shared by both entry points: resolve, a trusted signature over the
/// digest, the manifest's module shape and caps, the config (agreeing with the signed payload)
/// and the serial floor.
async fn verify_head<S: ModuleSource>(
    src: &S,
    tag: Option<&str>,
    digest: Option<OciDigest>,
    opts: &VerifyOptions,
    record: &mut Record,
) -> Result<(SignedModule, ModuleManifest), VerifyError> {
    let limits = &opts.limits;
    let (digest, manifest_bytes) = resolve(src, tag, digest, limits).await?;
    tracing::debug!(module.digest = %digest, "resolved");
    record.manifest(&digest.to_string(), &manifest_bytes);
    let signature = verify_signatures(src, digest, opts, record).await?;
    tracing::debug!(module.digest = %digest, key = %signature.key_id, "signature verified");

    let module = ModuleManifest::parse(&manifest_bytes)?;
    if let Some(over) = module.blobs().find(|d| d.size > limits.max_blob) {
        return Err(DownloadError::OverCap { digest: over.digest, size: over.size, cap: limits.max_blob }.into());
    }
    let config_bytes = download::fetch_small(src, &module.config, MAX_CONFIG_SIZE, limits).await?;
    let config = ModuleConfig::parse(&config_bytes)?;
    record.blob(module.config.digest, &config_bytes);
    signature.check_agrees(&config.name, &config.version, config.serial)?;
    if let Some(min) = opts.min_serial
        && config.serial < min
    {
        return Err(VerifyError::Serial { name: config.name, serial: config.serial, min });
    }
    Ok((SignedModule { digest, config, signature }, module))
}

/// Verifies the signature and the config of the module at `tag`/`digest` in `src`, fetching
/// only its manifests, signature payloads and config blob.
pub async fn verify_signed_config<S: ModuleSource>(
    src: &S,
    tag: Option<&str>,
    digest: Option<OciDigest>,
    opts: &VerifyOptions,
) -> Result<SignedModule, VerifyError> {
    Ok(verify_head(src, tag, digest, opts, &mut Record::default()).await?.0)
}

/// Verifies the module at `tag`/`digest` in `src` into `store`.
pub async fn verify_module<S: ModuleSource>(
    src: &S,
    tag: Option<&str>,
    digest: Option<OciDigest>,
    store: &ObjectStore,
    opts: &VerifyOptions,
) -> Result<VerifiedModule, VerifyError> {
    let limits = &opts.limits;
    let mut record = Record::default();
    let (SignedModule { digest, config, signature }, module) = verify_head(src, tag, digest, opts, &mut record).await?;

    let image = store.images_dir().join(module.image.digest.hex());
    let mut downloaded = download::fetch_to_file(src, &module.image, &image, limits).await?;
    let image_bytes = read_image(&image, &module.image.digest)?;
    // A sealed store has the kernel measure the image as it seals it (instant when an earlier
    // boot sealed it); the measurement is the digest every later read is held to. Otherwise
    // the digest is computed here.
    let found = if store.sealed() {
        crate::store::seal_and_measure(&image).map_err(|source| VerifyError::Io {
            op: "sealing",
            path: image.clone(),
            source,
        })?
    } else {
        ironroot_contract::verity_digest(&image_bytes)
    };
    if found != config.composefs_digest {
        remove_quietly(&image);
        return Err(VerifyError::ImageDigest { digest: module.image.digest, expected: config.composefs_digest, found });
    }

    let objects: u64 = module.packs.iter().map(|p| p.objects).sum();
    let object_bytes: u64 = module.packs.iter().map(|p| p.object_bytes).sum();
    if objects != config.objects {
        return Err(VerifyError::Totals { what: "objects", declared: config.objects, found: objects });
    }
    if object_bytes != config.object_bytes {
        return Err(VerifyError::Totals { what: "object bytes", declared: config.object_bytes, found: object_bytes });
    }
    let referenced = referenced_objects(&image_bytes, module.image.digest)?;
    // A warm store already holds every object the verified image names (each was checked when
    // it entered): the packs would bring nothing, so they are not fetched.
    let missing = |store: &ObjectStore| {
        store.missing(&referenced).map_err(|source| VerifyError::Io {
            op: "listing objects in",
            path: store.root().to_owned(),
            source,
        })
    };
    let mut lacking = missing(store)?;
    let stats: Vec<_> = if lacking.is_empty() {
        tracing::debug!(module.digest = %digest, objects = referenced.len(), "store is warm; packs not fetched");
        Vec::new()
    } else {
        let stats = futures_util::stream::iter(module.packs.iter())
            .map(|pack| crate::unpack::fetch_pack(src, pack, store, limits))
            .buffer_unordered(limits.parallel.max(1))
            .try_collect()
            .await?;
        lacking = missing(store)?;
        stats
    };
    if let Some(first) = lacking.first() {
        return Err(VerifyError::Incomplete { missing: lacking.len(), first: *first });
    }
    downloaded += stats.iter().map(|s| s.downloaded).sum::<u64>();
    if store.keeps_bytes() {
        let evidence = Evidence::new(store.root());
        evidence.save(&record).map_err(|source| VerifyError::Io {
            op: "recording evidence in",
            path: store.root().to_owned(),
            source,
        })?;
    }
    Ok(VerifiedModule {
        digest,
        config,
        signature,
        image,
        downloaded,
        new_objects: stats.iter().map(|s| s.new_objects).sum(),
    })
}

fn read_image(path: &std::path::Path, digest: &OciDigest) -> Result<Vec<u8>, VerifyError> {
    let io = |source| VerifyError::Io { op: "reading", path: path.to_owned(), source };
    let len = std::fs::metadata(path).map_err(io)?.len();
    if len > MAX_IMAGE_SCAN {
        return Err(VerifyError::Image {
            digest: *digest,
            reason: format!("{len} bytes is over the {MAX_IMAGE_SCAN}-byte scan cap"),
        });
    }
    std::fs::read(path).map_err(io)
}

fn remove_quietly(path: &std::path::Path) {
    if let Err(e) = std::fs::remove_file(path) {
        tracing::warn!(path = %path.display(), error = %e, "could not remove refused image");
    }
}

/// Every object the EROFS image redirects to, sorted.
fn referenced_objects(image: &[u8], digest: OciDigest) -> Result<Vec<VerityDigest>, VerifyError> {
    let referenced = composefs::erofs::reader::collect_objects::<Sha256HashValue>(image)
        .map_err(|e| VerifyError::Image { digest, reason: e.to_string() })?;
    let mut out: Vec<VerityDigest> = referenced.iter().filter_map(|id| id.to_hex().parse().ok()).collect();
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;
    use ironroot_contract::config::MountRole;
    use ironroot_contract::manifest::Descriptor;
    use ironroot_contract::signing::SimpleSigningPayload;
    use ironroot_contract::{KeyAlgorithm, SigningKey};

    use super::*;
    use crate::layout::Layout;

    /// Parsed from JSON, not built field by field: fields a module does not use stay absent.
    fn config(serial: u64) -> ModuleConfig {
        let json = serde_json::json!({
            "schemaVersion": ironroot_contract::config::CONFIG_SCHEMA_VERSION,
            "name": "web",
            "version": format!("1.{serial}"),
            "serial": serial,
            "composefsDigest": "ab".repeat(32),
            "objects": 1,
            "objectBytes": 10,
            "role": "opt",
            "restartUnits": [],
            "created": "2024-01-01T00:00:00Z",
        });
        ModuleConfig::parse(json.to_string().as_bytes()).unwrap()
    }

    /// A module of `serial` in a layout, tagged `tag` and signed by `key` (its image and pack
    /// are described but absent: this verification must not fetch them).
    fn publish(layout: &Layout, tag: &str, serial: u64, key: Option<&SigningKey>) -> OciDigest {
        let config_bytes = config(serial).to_bytes();
        layout.write_blob(&config_bytes).unwrap();
        let mut pack = Descriptor::of(media::OBJECT_PACK, b"absent pack");
        pack.annotations.insert(media::ANNOTATION_PACK_OBJECTS.into(), "1".into());
        pack.annotations.insert(media::ANNOTATION_PACK_BYTES.into(), "10".into());
        let manifest = ImageManifest {
            schema_version: 2,
            media_type: Some(media::OCI_MANIFEST.into()),
            artifact_type: Some(media::MODULE_ARTIFACT_TYPE.into()),
            config: Descriptor::of(media::MODULE_CONFIG, &config_bytes),
            layers: vec![Descriptor::of(media::EROFS_IMAGE, b"absent image"), pack],
            subject: None,
            annotations: Default::default(),
        }
        .to_bytes();
        let digest = layout.write_blob(&manifest).unwrap();
        layout.set_tag(tag, Descriptor::of(media::OCI_MANIFEST, &manifest)).unwrap();
        let Some(key) = key else {
            return digest;
        };
        let c = config(serial);
        let payload = SimpleSigningPayload::for_module("reg/web", digest, &c.name, &c.version, serial).to_bytes();
        layout.write_blob(&payload).unwrap();
        let mut layer = Descriptor::of(media::COSIGN_SIMPLESIGNING, &payload);
        let signature = base64::engine::general_purpose::STANDARD.encode(key.sign(&payload));
        layer.annotations.insert(media::COSIGN_SIGNATURE_ANNOTATION.into(), signature);
        let empty = layout.write_blob(b"{}").unwrap();
        let sig = ImageManifest {
            schema_version: 2,
            media_type: Some(media::OCI_MANIFEST.into()),
            artifact_type: None,
            config: Descriptor::new(media::OCI_EMPTY, empty, 2),
            layers: vec![layer],
            subject: None,
            annotations: Default::default(),
        }
        .to_bytes();
        layout.write_blob(&sig).unwrap();
        layout.set_tag(&digest.signature_tag(), Descriptor::of(media::OCI_MANIFEST, &sig)).unwrap();
        digest
    }

    fn run<T>(f: impl Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
    }

    #[test]
    fn signed_config_checks_the_signature_and_serial_and_fetches_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::create(dir.path()).unwrap();
        let (key, other) = (SigningKey::generate(KeyAlgorithm::Ed25519), SigningKey::generate(KeyAlgorithm::P256));
        let digest = publish(&layout, "v3", 3, Some(&key));
        let opts = |trust: &SigningKey, min_serial| VerifyOptions {
            trust: vec![trust.trusted_key().unwrap()],
            min_serial,
            limits: Limits::standard(),
        };

        let signed = run(verify_signed_config(&layout, Some("v3"), None, &opts(&key, None))).unwrap();
        assert_eq!(signed.digest(), digest);
        assert_eq!((signed.config().name.as_str(), signed.config().serial), ("web", 3));
        assert_eq!(signed.config().role, MountRole::Opt);
        assert_eq!(signed.signature().serial, Some(3));
        let by_digest = run(verify_signed_config(&layout, None, Some(digest), &opts(&key, Some(3)))).unwrap();
        assert_eq!(by_digest.digest(), digest);

        let err = run(verify_signed_config(&layout, Some("v3"), None, &opts(&other, None))).unwrap_err();
        assert_eq!(err.kind(), FailureKind::Signature, "{err}");
        let err = run(verify_signed_config(&layout, Some("v3"), None, &opts(&key, Some(4)))).unwrap_err();
        assert!(matches!(err, VerifyError::Serial { serial: 3, min: 4, .. }), "{err}");
        let err = run(verify_signed_config(&layout, Some("v9"), None, &opts(&key, None))).unwrap_err();
        assert!(matches!(err, VerifyError::NotFound(_)), "{err}");

        let unsigned = tempfile::tempdir().unwrap();
        let bare = Layout::create(unsigned.path()).unwrap();
        publish(&bare, "v3", 3, None);
        let err = run(verify_signed_config(&bare, Some("v3"), None, &opts(&key, None))).unwrap_err();
        assert!(matches!(err, VerifyError::Signature(SignatureError::Missing(_))), "{err}");
    }
}
