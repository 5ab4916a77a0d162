//! The contracts both sides of ironroot share: the module artifact format (media types, config
//! schema, annotations, manifests), digests that cannot be confused with each other, the cosign
//! "simple signing" envelope and its verification, and the object pack format.
//!
//! This crate does no I/O beyond `Read`/`Write` streams handed to it and depends on nothing else
//! in the workspace but `sha256x2` (SHA-256 two messages per core, the workspace's one crate
//! with unsafe code). Fetching, storing and mounting live with their consumers.

pub mod config;
pub mod digest;
pub mod keys;
pub mod kmod;
pub mod manifest;
pub mod media;
pub mod pack;
pub mod run_state;
pub mod signing;
pub mod verity;
pub mod wire;

pub use config::{ModuleConfig, MountRole};
pub use digest::{DigestError, OciDigest, VerityDigest};
pub use keys::{KeyAlgorithm, KeyError, SigningKey, TrustedKey};
pub use manifest::{Descriptor, ManifestError, ModuleManifest};
pub use signing::{SignatureError, SignedPayload, SimpleSigningPayload};
pub use verity::{VerityHasher, verity_digest};
