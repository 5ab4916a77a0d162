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
use std::os::unix::fs::OpenOptionsExt as _;
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
        // The store's own file: opened without following a link and without waiting on a FIFO,
        // read only when it is a regular file, and never past the cap.
        let flags = (rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK).bits() as i32;
        let file = match fs::OpenOptions::new().read(true).custom_flags(flags).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(SourceError::Local { op: "opening", path, source }),
        };
        let local = |op, source| SourceError::Local { op, path: path.clone(), source };
        let meta = file.metadata().map_err(|e| local("reading", e))?;
        if !meta.is_file() {
            return Err(local("reading", io::Error::other("not a regular file")));
        }
        if meta.len() > cap {
            return Err(SourceError::TooLarge { reference: reference.to_owned(), size: meta.len(), cap });
        }
        let mut bytes = Vec::new();
        io::Read::read_to_end(&mut io::Read::take(file, cap.saturating_add(1)), &mut bytes)
            .map_err(|e| local("reading", e))?;
        if bytes.len() as u64 > cap {
            return Err(SourceError::TooLarge { reference: reference.to_owned(), size: bytes.len() as u64, cap });
        }
        Ok(Some(bytes))
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

    /// A FIFO or a link where a manifest is kept is refused at once (not waited on, not
    /// followed); an oversized one costs the cap, not its size.
    #[tokio::test]
    async fn a_fifo_a_link_or_an_oversized_manifest_is_refused_without_waiting() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let evidence = Evidence::new(dir.path());
        let manifests = dir.path().join("evidence/manifests");
        fs::create_dir_all(&manifests)?;
        let fifo = manifests.join("sha256-f1f0");
        rustix::fs::mknodat(rustix::fs::CWD, &fifo, rustix::fs::FileType::Fifo, rustix::fs::Mode::RUSR, 0)?;
        let refused = evidence.manifest("sha256:f1f0", 4096).await;
        assert!(
            matches!(&refused, Err(SourceError::Local { source, .. }) if source.to_string().contains("not a regular")),
            "{refused:?}"
        );
        std::os::unix::fs::symlink("/etc/hostname", manifests.join("sha256-11"))?;
        assert!(evidence.manifest("sha256:11", 4096).await.is_err(), "a link is not followed");
        fs::write(manifests.join("sha256-b1"), vec![b'{'; 5000])?;
        let big = evidence.manifest("sha256:b1", 4096).await;
        assert!(matches!(big, Err(SourceError::TooLarge { cap: 4096, .. })), "{big:?}");
        assert!(matches!(evidence.manifest("sha256:00", 4096).await, Ok(None)), "absent is not an error");
        Ok(())
    }

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
