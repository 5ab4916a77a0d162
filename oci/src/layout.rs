//! An OCI image layout directory (`oci-layout`, `index.json`, `blobs/sha256/…`): where
//! `module build` writes, and a source and destination for offline push, sign and verify.
//! Every write lands in a `.partial` file first and is renamed into place, so a crash leaves
//! either the old state or the new one.

use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

use ironroot_contract::manifest::Descriptor;
use ironroot_contract::{OciDigest, media};
use serde::{Deserialize, Serialize};

const LAYOUT_FILE: &str = "oci-layout";
const LAYOUT_CONTENT: &str = r#"{"imageLayoutVersion":"1.0.0"}"#;

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Index {
    schema_version: u32,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("{path} is not an OCI image layout (no oci-layout file)")]
    NotLayout { path: PathBuf },
    #[error("{op} {path}")]
    Io { op: &'static str, path: PathBuf, source: io::Error },
    #[error("{path} is not a valid index.json: {reason}")]
    Index { path: PathBuf, reason: String },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> LayoutError + use<'a> {
    move |source| LayoutError::Io { op, path: path.to_owned(), source }
}

/// Writes `bytes` to `path` through `path.partial` and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let partial = partial_path(path);
    let mut f = fs::File::create(&partial)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&partial, path)
}

pub fn partial_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".partial");
    PathBuf::from(p)
}

#[derive(Debug, Clone)]
pub struct Layout {
    dir: PathBuf,
}

impl Layout {
    /// Opens `dir` as a layout, creating an empty one if the directory is missing or empty.
    pub fn create(dir: &Path) -> Result<Self, LayoutError> {
        fs::create_dir_all(dir.join("blobs/sha256")).map_err(io_err("creating", dir))?;
        let marker = dir.join(LAYOUT_FILE);
        if !marker.exists() {
            write_atomic(&marker, LAYOUT_CONTENT.as_bytes()).map_err(io_err("writing", &marker))?;
        }
        let layout = Self { dir: dir.to_owned() };
        if !dir.join("index.json").exists() {
            layout.write_index(&Index {
                schema_version: 2,
                media_type: Some(media::OCI_INDEX.into()),
                manifests: vec![],
            })?;
        }
        Ok(layout)
    }

    pub fn open(dir: &Path) -> Result<Self, LayoutError> {
        if !dir.join(LAYOUT_FILE).is_file() {
            return Err(LayoutError::NotLayout { path: dir.to_owned() });
        }
        Ok(Self { dir: dir.to_owned() })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn blob_path(&self, digest: &OciDigest) -> PathBuf {
        self.dir.join("blobs/sha256").join(digest.hex())
    }

    pub fn has_blob(&self, digest: &OciDigest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// Stores `bytes` as a blob and returns its digest.
    pub fn write_blob(&self, bytes: &[u8]) -> Result<OciDigest, LayoutError> {
        let digest = OciDigest::of(bytes);
        let path = self.blob_path(&digest);
        if !path.exists() {
            write_atomic(&path, bytes).map_err(io_err("writing", &path))?;
        }
        Ok(digest)
    }

    /// Moves (or, across filesystems, copies) a file whose digest the caller has checked.
    pub fn import_blob(&self, src: &Path, digest: &OciDigest) -> Result<(), LayoutError> {
        let dst = self.blob_path(digest);
        if dst.exists() {
            return Ok(());
        }
        if fs::rename(src, &dst).is_err() {
            let partial = partial_path(&dst);
            fs::copy(src, &partial).map_err(io_err("copying", src))?;
            fs::rename(&partial, &dst).map_err(io_err("renaming", &partial))?;
        }
        Ok(())
    }

    fn index_path(&self) -> PathBuf {
        self.dir.join("index.json")
    }

    fn read_index(&self) -> Result<Index, LayoutError> {
        let path = self.index_path();
        let bytes = fs::read(&path).map_err(io_err("reading", &path))?;
        serde_json::from_slice(&bytes).map_err(|e| LayoutError::Index { path, reason: e.to_string() })
    }

    fn write_index(&self, index: &Index) -> Result<(), LayoutError> {
        let path = self.index_path();
        let bytes =
            serde_json::to_vec(index).map_err(|e| LayoutError::Index { path: path.clone(), reason: e.to_string() })?;
        write_atomic(&path, &bytes).map_err(io_err("writing", &path))
    }

    /// Points `tag` at `descriptor` (replacing an earlier entry of that tag). Entries stay
    /// sorted by tag so the index is reproducible.
    pub fn set_tag(&self, tag: &str, mut descriptor: Descriptor) -> Result<(), LayoutError> {
        let mut index = self.read_index()?;
        index.manifests.retain(|d| d.annotations.get(media::ANNOTATION_REF_NAME).map(String::as_str) != Some(tag));
        descriptor.annotations.insert(media::ANNOTATION_REF_NAME.into(), tag.into());
        index.manifests.push(descriptor);
        index.manifests.sort_by(|a, b| {
            a.annotations.get(media::ANNOTATION_REF_NAME).cmp(&b.annotations.get(media::ANNOTATION_REF_NAME))
        });
        self.write_index(&index)
    }

    /// The descriptor tagged `tag`.
    pub fn resolve(&self, tag: &str) -> Result<Option<Descriptor>, LayoutError> {
        Ok(self
            .read_index()?
            .manifests
            .into_iter()
            .find(|d| d.annotations.get(media::ANNOTATION_REF_NAME).map(String::as_str) == Some(tag)))
    }

    /// Every tagged manifest except cosign signature tags: what `push` copies by default.
    pub fn module_tags(&self) -> Result<Vec<(String, Descriptor)>, LayoutError> {
        Ok(self
            .read_index()?
            .manifests
            .into_iter()
            .filter_map(|d| {
                let tag = d.annotations.get(media::ANNOTATION_REF_NAME)?.clone();
                (!tag.ends_with(".sig")).then_some((tag, d))
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_blobs_and_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = Layout::create(tmp.path()).unwrap();
        let d = layout.write_blob(b"manifest").unwrap();
        assert!(layout.has_blob(&d));
        let desc = Descriptor::new(media::OCI_MANIFEST, d, 8);
        layout.set_tag("1.0", desc.clone()).unwrap();
        layout.set_tag("sha256-abc.sig", desc.clone()).unwrap();
        layout.set_tag("1.0", desc).unwrap();
        let again = Layout::open(tmp.path()).unwrap();
        assert_eq!(again.resolve("1.0").unwrap().unwrap().digest, d);
        assert_eq!(again.module_tags().unwrap().len(), 1);
        assert!(Layout::open(&tmp.path().join("blobs")).is_err());
    }
}
