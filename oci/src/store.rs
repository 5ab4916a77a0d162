//! The object store: a directory of objects named by fs-verity digest in the flat layout
//! (`ab/cdef…`) that `mkcomposefs --digest-store` writes and composefs images point into, plus
//! `images/` for verified EROFS images. Objects arrive through a staging directory inside the
//! store and are renamed into place only once the whole pack that carried them checked out, so
//! the store never holds an object from an unverified pack.
//!
//! A check-only store keeps no object bytes: objects are verified as they stream past and only
//! their digests are remembered (`module verify` without `--store`).

use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ironroot_spec::VerityDigest;

#[derive(Debug, Clone)]
pub struct ObjectStore {
    root: PathBuf,
    objects: Objects,
}

#[derive(Debug, Clone)]
enum Objects {
    /// Object files under the root.
    Files,
    /// Digests of objects verified and discarded.
    Seen(Arc<Mutex<HashSet<VerityDigest>>>),
}

/// Objects unpacked from one pack, not yet in the store.
#[derive(Debug)]
pub struct Staging {
    dir: PathBuf,
    keeps_bytes: bool,
    objects: Vec<VerityDigest>,
}

impl ObjectStore {
    /// A store of object files under `root` (created if missing).
    pub fn open(root: &Path) -> io::Result<Self> {
        fs::create_dir_all(root.join("images"))?;
        Ok(Self { root: root.to_owned(), objects: Objects::Files })
    }

    /// A store that checks objects and keeps only their digests; images go under `scratch`.
    pub fn check_only(scratch: &Path) -> io::Result<Self> {
        fs::create_dir_all(scratch.join("images"))?;
        Ok(Self { root: scratch.to_owned(), objects: Objects::Seen(Arc::default()) })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn object_path(&self, digest: &VerityDigest) -> PathBuf {
        self.root.join(digest.object_path())
    }

    pub fn contains(&self, digest: &VerityDigest) -> bool {
        match &self.objects {
            Objects::Files => self.object_path(digest).is_file(),
            Objects::Seen(seen) => seen.lock().is_ok_and(|s| s.contains(digest)),
        }
    }

    pub fn images_dir(&self) -> PathBuf {
        self.root.join("images")
    }

    /// A fresh staging directory on the store's filesystem (so commit is a rename).
    pub fn stage(&self, label: &str) -> io::Result<Staging> {
        let dir = self.root.join(format!(".staging-{label}-{}", std::process::id()));
        let keeps_bytes = matches!(self.objects, Objects::Files);
        if keeps_bytes {
            if dir.exists() {
                fs::remove_dir_all(&dir)?;
            }
            fs::create_dir_all(&dir)?;
        }
        Ok(Staging { dir, keeps_bytes, objects: Vec::new() })
    }

    /// Moves every staged object into place and removes the staging directory.
    pub fn commit(&self, staging: Staging) -> io::Result<usize> {
        if let Objects::Seen(seen) = &self.objects {
            let mut seen = seen.lock().map_err(|_| io::Error::other("object set poisoned"))?;
            return Ok(staging.objects.into_iter().filter(|d| seen.insert(*d)).count());
        }
        let mut moved = 0;
        for digest in &staging.objects {
            let dst = self.object_path(digest);
            if dst.exists() {
                continue;
            }
            if let Some(parent) = dst.parent() {
                fs::create_dir_all(parent)?;
            }
            fs::rename(staging.dir.join(digest.hex()), &dst)?;
            moved += 1;
        }
        fs::remove_dir_all(&staging.dir)?;
        Ok(moved)
    }

    /// Drops a staging directory and everything in it.
    pub fn discard(&self, staging: Staging) {
        if !staging.keeps_bytes {
            return;
        }
        // Best effort: a leftover staging directory is invisible to readers of the store and
        // is replaced by the next stage() of the same label.
        if let Err(e) = fs::remove_dir_all(&staging.dir) {
            tracing::warn!(dir = %staging.dir.display(), error = %e, "could not remove staging directory");
        }
    }
}

impl Staging {
    /// Where the object `digest` is written before its digest is checked.
    pub fn partial_path(&self, digest: &VerityDigest) -> PathBuf {
        self.dir.join(format!("{}.partial", digest.hex()))
    }

    /// Whether object bytes are written (else they are only checked).
    pub fn keeps_bytes(&self) -> bool {
        self.keeps_bytes
    }

    /// Records a checked object: renames its `.partial` file to its name.
    pub fn accept(&mut self, digest: VerityDigest) -> io::Result<()> {
        if self.keeps_bytes {
            fs::rename(self.partial_path(&digest), self.dir.join(digest.hex()))?;
        }
        self.objects.push(digest);
        Ok(())
    }
}
