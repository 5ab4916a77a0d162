//! The store's own record of what it verified: the module manifest, the signature manifest and
//! the small blobs (config, signature payloads) of every module verified into it, kept under
//! `evidence/` beside the objects. A warm boot runs the whole trust chain again from this record
//! (signature against today's trust roots, digests, serial floor, image, completeness) without
//! touching the network; any failure there sends the caller back to the registry.
//!
//! Nothing here is trusted for what it says: every byte is re-hashed by the verifier, exactly as
//! when it came from a registry. It is a third real [`ModuleSource`], not a cache in front of one.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use futures_util::StreamExt as _;
use ironroot_contract::OciDigest;

use crate::layout::write_atomic;
use crate::source::{BlobStream, ModuleSource, SourceError, file_chunks};

/// Largest small blob recorded: configs and signature payloads are a few hundred bytes.
const MAX_RECORDED_BLOB: usize = 64 * 1024;

/// The evidence directory of a store.
#[derive(Debug, Clone)]
pub struct Evidence {
    dir: PathBuf,
}

/// What one verification read, to be recorded once it succeeded.
#[derive(Debug, Clone, Default)]
pub struct Record {
    /// (reference, manifest bytes): the module manifest by digest and the `.sig` manifest.
    pub manifests: Vec<(String, Vec<u8>)>,
    /// Small blobs by digest.
    pub blobs: Vec<(OciDigest, Vec<u8>)>,
}

impl Record {
    pub fn manifest(&mut self, reference: &str, bytes: &[u8]) {
        self.manifests.push((reference.to_owned(), bytes.to_vec()));
    }

    pub fn blob(&mut self, digest: OciDigest, bytes: &[u8]) {
        if bytes.len() <= MAX_RECORDED_BLOB {
            self.blobs.push((digest, bytes.to_vec()));
        }
    }
}

/// Writes `bytes` to `path` atomically unless it already holds exactly them (no rewrite and
/// no fsync for an unchanged record).
fn write_if_changed(path: &Path, bytes: &[u8]) -> io::Result<()> {
    match fs::metadata(path) {
        Ok(m) if m.len() == bytes.len() as u64 && fs::read(path)? == bytes => Ok(()),
        _ => write_atomic(path, bytes),
    }
}

/// Tags and digests become file names: `sha256:…` → `sha256-…`; nothing else is accepted.
fn file_name(reference: &str) -> Option<String> {
    let name = reference.replace(':', "-");
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    ok.then_some(name)
}

impl Evidence {
    /// The evidence kept under the store at `store_root`.
    pub fn new(store_root: &Path) -> Self {
        Self { dir: store_root.join("evidence") }
    }

    fn manifest_path(&self, reference: &str) -> Option<PathBuf> {
        file_name(reference).map(|n| self.dir.join("manifests").join(n))
    }

    fn blob_path(&self, digest: &OciDigest) -> PathBuf {
        self.dir.join("blobs").join(digest.hex())
    }

    /// Whether anything was recorded for the module `digest`.
    pub fn has(&self, digest: &OciDigest) -> bool {
        self.manifest_path(&digest.to_string()).is_some_and(|p| p.is_file())
    }

    /// Writes a successful verification's record (each file atomically). A file that already
    /// holds the same bytes (a warm boot re-verifying from this record) is left as it is.
    pub fn save(&self, record: &Record) -> io::Result<()> {
        fs::create_dir_all(self.dir.join("manifests"))?;
        fs::create_dir_all(self.dir.join("blobs"))?;
        for (digest, bytes) in &record.blobs {
            write_if_changed(&self.blob_path(digest), bytes)?;
        }
        // Manifests last: `has` answers yes only once every blob they need is in place.
        for (reference, bytes) in &record.manifests {
            if let Some(path) = self.manifest_path(reference) {
                write_if_changed(&path, bytes)?;
            }
        }
        Ok(())
    }
}

impl ModuleSource for Evidence {
    fn describe(&self) -> String {
        format!("evidence:{}", self.dir.display())
    }

    async fn manifest(&self, reference: &str, cap: u64) -> Result<Option<Vec<u8>>, SourceError> {
        let Some(path) = self.manifest_path(reference) else { return Ok(None) };
        match fs::metadata(&path) {
            Ok(m) if m.len() > cap => {
                Err(SourceError::TooLarge { reference: reference.to_owned(), size: m.len(), cap })
            }
            Ok(_) => fs::read(&path).map(Some).map_err(|source| SourceError::Local { op: "reading", path, source }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(SourceError::Local { op: "reading", path, source }),
        }
    }

    async fn blob(&self, digest: &OciDigest) -> Result<BlobStream, SourceError> {
        let path = self.blob_path(digest);
        let file = tokio::fs::File::open(&path).await.map_err(|source| SourceError::Local {
            op: "opening",
            path: path.clone(),
            source,
        })?;
        let declared_len = file.metadata().await.ok().map(|m| m.len());
        Ok(BlobStream { declared_len, stream: file_chunks(file, 64 * 1024).boxed() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_names_become_files() {
        assert_eq!(file_name("sha256:ab12").as_deref(), Some("sha256-ab12"));
        assert_eq!(file_name("sha256-ab12.sig").as_deref(), Some("sha256-ab12.sig"));
        for bad in ["", "../x", "a/b", ".hidden", "x\0y"] {
            assert_eq!(file_name(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn an_unchanged_record_is_not_rewritten_and_a_changed_one_is() -> io::Result<()> {
        use std::os::unix::fs::MetadataExt as _;
        let dir = tempfile::tempdir()?;
        let evidence = Evidence::new(dir.path());
        let digest: OciDigest = format!("sha256:{}", "ab".repeat(32)).parse().expect("digest");
        let mut record = Record::default();
        record.manifest("sha256:cd", b"manifest");
        record.blob(digest, b"config");
        evidence.save(&record)?;
        let blob = evidence.blob_path(&digest);
        let manifest = evidence.manifest_path("sha256:cd").expect("name");
        let inodes = |paths: [&PathBuf; 2]| -> io::Result<Vec<u64>> {
            paths.iter().map(|p| fs::metadata(p).map(|m| m.ino())).collect()
        };
        let first = inodes([&blob, &manifest])?;
        evidence.save(&record)?;
        assert_eq!(inodes([&blob, &manifest])?, first, "same bytes: the files stay as they are");

        // Same length, other bytes (a damaged file): written again.
        fs::write(&blob, b"CONFIG")?;
        evidence.save(&record)?;
        assert_eq!(fs::read(&blob)?, b"config");
        assert_ne!(fs::metadata(&blob)?.ino(), first[0]);
        Ok(())
    }
}
