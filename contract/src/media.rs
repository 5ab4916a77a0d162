//! Media types and annotation keys of the module artifact and of cosign signatures.
//! docs/interfaces/module-artifact.md is the prose form of this file.

/// `artifactType` of a module manifest.
pub const MODULE_ARTIFACT_TYPE: &str = "application/vnd.ironroot.module.v1";
/// The module config blob (JSON, [`crate::ModuleConfig`]).
pub const MODULE_CONFIG: &str = "application/vnd.ironroot.module.config.v1+json";
/// Layer 0: the composefs EROFS image (format V1).
pub const EROFS_IMAGE: &str = "application/vnd.ironroot.composefs.erofs.v1";
/// Layers 1..n: object packs (ustar; regular files named by fs-verity digest, ascending).
pub const OBJECT_PACK: &str = "application/vnd.ironroot.objects.v1.tar";

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// Layer media type of a cosign signature payload.
pub const COSIGN_SIMPLESIGNING: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// Layer annotation holding the base64 signature over the payload.
pub const COSIGN_SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
/// `critical.type` of every cosign container image signature.
pub const COSIGN_SIGNATURE_TYPE: &str = "cosign container image signature";

/// Pack layer annotations: how many objects and how many object bytes the pack holds.
pub const ANNOTATION_PACK_OBJECTS: &str = "io.ironroot.pack.objects";
pub const ANNOTATION_PACK_BYTES: &str = "io.ironroot.pack.bytes";
/// Manifest annotations (informational; the config is authoritative).
pub const ANNOTATION_TITLE: &str = "org.opencontainers.image.title";
pub const ANNOTATION_VERSION: &str = "org.opencontainers.image.version";
pub const ANNOTATION_CREATED: &str = "org.opencontainers.image.created";
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Keys of the signed payload's `optional` object.
pub const PAYLOAD_NAME: &str = "io.ironroot.module.name";
pub const PAYLOAD_VERSION: &str = "io.ironroot.module.version";
pub const PAYLOAD_SERIAL: &str = "io.ironroot.module.serial";
