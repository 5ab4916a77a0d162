//! OCI image manifests as ironroot reads and writes them. Parsing is strict where the trust
//! chain depends on it: image indexes are refused (never resolved silently), descriptors with
//! `urls` are refused (never followed), and a module manifest must have exactly the layer shape
//! of the module artifact.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::digest::OciDigest;
use crate::media;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: OciDigest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub urls: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl Descriptor {
    pub fn new(media_type: &str, digest: OciDigest, size: u64) -> Self {
        Self {
            media_type: media_type.to_owned(),
            digest,
            size,
            urls: None,
            artifact_type: None,
            annotations: BTreeMap::new(),
        }
    }

    /// Describes `bytes` as a blob of `media_type`.
    pub fn of(media_type: &str, bytes: &[u8]) -> Self {
        Self::new(media_type, OciDigest::of(bytes), bytes.len() as u64)
    }
}

/// An OCI 1.1 image manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageManifest {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error("manifest is not valid JSON: {0}")]
    Json(String),
    #[error("reference resolves to an image index ({0}); ironroot never picks a manifest from an index")]
    ImageIndex(String),
    #[error("manifest media type {0:?} is not an OCI image manifest")]
    MediaType(String),
    #[error("manifest schemaVersion {0} is not 2")]
    SchemaVersion(u32),
    #[error("descriptor {digest} carries urls; ironroot never fetches from descriptor urls")]
    Urls { digest: OciDigest },
    #[error("not an ironroot module: {0}")]
    NotModule(String),
    #[error("pack layer {digest}: annotation {key} is missing or not a number")]
    PackAnnotation { digest: OciDigest, key: &'static str },
}

impl ImageManifest {
    /// Parses any OCI image manifest, refusing indexes, other media types and `urls`.
    pub fn parse(bytes: &[u8]) -> Result<Self, ManifestError> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Peek {
            media_type: Option<String>,
            manifests: Option<serde_json::Value>,
        }
        let peek: Peek = serde_json::from_slice(bytes).map_err(|e| ManifestError::Json(e.to_string()))?;
        match peek.media_type.as_deref() {
            Some(t @ (media::OCI_INDEX | media::DOCKER_MANIFEST_LIST)) => {
                return Err(ManifestError::ImageIndex(t.to_owned()));
            }
            None if peek.manifests.is_some() => {
                return Err(ManifestError::ImageIndex("manifests without mediaType".into()));
            }
            Some(media::OCI_MANIFEST) | None => {}
            Some(other) => return Err(ManifestError::MediaType(other.to_owned())),
        }
        let m: Self = serde_json::from_slice(bytes).map_err(|e| ManifestError::Json(e.to_string()))?;
        if m.schema_version != 2 {
            return Err(ManifestError::SchemaVersion(m.schema_version));
        }
        for d in std::iter::once(&m.config).chain(&m.layers).chain(&m.subject) {
            if d.urls.as_ref().is_some_and(|u| !u.is_empty()) {
                return Err(ManifestError::Urls { digest: d.digest });
            }
        }
        Ok(m)
    }

    /// Canonical bytes: struct field order, sorted annotation maps, no whitespace.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// A pack layer with the totals its annotations declare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackDescriptor {
    pub descriptor: Descriptor,
    pub objects: u64,
    pub object_bytes: u64,
}

/// A manifest with the shape of an ironroot module: module config, one EROFS image, packs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleManifest {
    pub manifest: ImageManifest,
    pub config: Descriptor,
    pub image: Descriptor,
    pub packs: Vec<PackDescriptor>,
}

impl ModuleManifest {
    pub fn parse(bytes: &[u8]) -> Result<Self, ManifestError> {
        Self::from_manifest(ImageManifest::parse(bytes)?)
    }

    pub fn from_manifest(manifest: ImageManifest) -> Result<Self, ManifestError> {
        let not = |s: String| ManifestError::NotModule(s);
        if let Some(t) = &manifest.artifact_type
            && t != media::MODULE_ARTIFACT_TYPE
        {
            return Err(not(format!("artifactType is {t:?}")));
        }
        if manifest.config.media_type != media::MODULE_CONFIG {
            return Err(not(format!("config media type is {:?}", manifest.config.media_type)));
        }
        let Some((image, packs)) = manifest.layers.split_first() else {
            return Err(not("manifest has no layers".into()));
        };
        if image.media_type != media::EROFS_IMAGE {
            return Err(not(format!("layer 0 media type is {:?}, not the EROFS image", image.media_type)));
        }
        let packs = packs
            .iter()
            .map(|d| {
                if d.media_type != media::OBJECT_PACK {
                    return Err(not(format!(
                        "layer {} media type is {:?}, not an object pack",
                        d.digest, d.media_type
                    )));
                }
                let num = |key: &'static str| {
                    d.annotations
                        .get(key)
                        .and_then(|v| v.parse::<u64>().ok())
                        .ok_or(ManifestError::PackAnnotation { digest: d.digest, key })
                };
                Ok(PackDescriptor {
                    descriptor: d.clone(),
                    objects: num(media::ANNOTATION_PACK_OBJECTS)?,
                    object_bytes: num(media::ANNOTATION_PACK_BYTES)?,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { config: manifest.config.clone(), image: image.clone(), packs, manifest })
    }

    /// Every blob the module needs, config first, with its declared size.
    pub fn blobs(&self) -> impl Iterator<Item = &Descriptor> {
        std::iter::once(&self.config).chain(&self.manifest.layers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module() -> ImageManifest {
        let mut pack = Descriptor::of(media::OBJECT_PACK, b"pack");
        pack.annotations.insert(media::ANNOTATION_PACK_OBJECTS.into(), "1".into());
        pack.annotations.insert(media::ANNOTATION_PACK_BYTES.into(), "100".into());
        ImageManifest {
            schema_version: 2,
            media_type: Some(media::OCI_MANIFEST.into()),
            artifact_type: Some(media::MODULE_ARTIFACT_TYPE.into()),
            config: Descriptor::of(media::MODULE_CONFIG, b"{}"),
            layers: vec![Descriptor::of(media::EROFS_IMAGE, b"erofs"), pack],
            subject: None,
            annotations: BTreeMap::new(),
        }
    }

    #[test]
    fn module_round_trips() {
        let m = module();
        let parsed = ModuleManifest::parse(&m.to_bytes()).unwrap();
        assert_eq!(parsed.packs.len(), 1);
        assert_eq!(parsed.packs[0].object_bytes, 100);
        assert_eq!(parsed.blobs().count(), 3);
    }

    #[test]
    fn refuses_indexes_urls_and_wrong_shapes() {
        let index = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#;
        assert!(matches!(ImageManifest::parse(index), Err(ManifestError::ImageIndex(_))));
        let bare_index = br#"{"schemaVersion":2,"manifests":[]}"#;
        assert!(matches!(ImageManifest::parse(bare_index), Err(ManifestError::ImageIndex(_))));

        let mut m = module();
        m.layers[1].urls = Some(vec!["http://elsewhere/blob".into()]);
        let err = ModuleManifest::parse(&m.to_bytes()).unwrap_err();
        assert!(matches!(err, ManifestError::Urls { .. }), "{err}");

        let mut m = module();
        m.layers.swap(0, 1);
        assert!(matches!(ModuleManifest::parse(&m.to_bytes()), Err(ManifestError::NotModule(_))));

        let mut m = module();
        m.layers[1].annotations.clear();
        assert!(matches!(ModuleManifest::parse(&m.to_bytes()), Err(ManifestError::PackAnnotation { .. })));

        let mut m = module();
        m.schema_version = 1;
        assert!(matches!(ImageManifest::parse(&m.to_bytes()), Err(ManifestError::SchemaVersion(1))));
    }
}
