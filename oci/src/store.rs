//! The object store: a directory of objects named by fs-verity digest in the flat layout
//! (`ab/cdef…`) that `mkcomposefs --digest-store` writes and composefs images point into, plus
//! `images/` for verified EROFS images. Objects arrive through a staging directory inside the
//! store and are renamed into place only once the whole pack that carried them checked out, so
//! the store never holds an object from an unverified pack.
//!
//! A check-only store keeps no object bytes: objects are verified as they stream past and only
//! their digests are remembered (`module verify` without `--store`).

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ironroot_contract::VerityDigest;

#[derive(Debug, Clone)]
pub struct ObjectStore {
    root: PathBuf,
    objects: Objects,
    /// Enable fs-verity on every object and image that enters (the filesystem supports it).
    seal: bool,
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
    /// Every accepted object was sealed and measured equal to its name while staged.
    sealed: bool,
    objects: Vec<VerityDigest>,
}

impl ObjectStore {
    /// A store of object files under `root` (created if missing).
    pub fn open(root: &Path) -> io::Result<Self> {
        fs::create_dir_all(root.join("images"))?;
        Ok(Self { root: root.to_owned(), objects: Objects::Files, seal: false })
    }

    /// A store of object files under `root` on a filesystem with fs-verity: each object and
    /// image gets verity enabled before it is renamed into place, and the kernel's measurement
    /// must equal the digest it was checked against.
    pub fn open_sealed(root: &Path) -> io::Result<Self> {
        Ok(Self { seal: true, ..Self::open(root)? })
    }

    /// Whether entries are sealed with fs-verity (so the kernel enforces their digests).
    pub fn sealed(&self) -> bool {
        self.seal
    }

    /// A store that checks objects and keeps only their digests; images go under `scratch`.
    pub fn check_only(scratch: &Path) -> io::Result<Self> {
        fs::create_dir_all(scratch.join("images"))?;
        Ok(Self { root: scratch.to_owned(), objects: Objects::Seen(Arc::default()), seal: false })
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

    /// The digests in `wanted` that the store lacks, in their order. For object files this
    /// reads each shard directory the digests fall in once (a warm store answers for a whole
    /// image in a few hundred directory reads instead of one path lookup per object).
    pub fn missing(&self, wanted: &[VerityDigest]) -> io::Result<Vec<VerityDigest>> {
        if let Objects::Seen(seen) = &self.objects {
            let seen = seen.lock().map_err(|_| io::Error::other("object set poisoned"))?;
            return Ok(wanted.iter().filter(|d| !seen.contains(d)).copied().collect());
        }
        let mut by_shard: HashMap<String, Vec<&VerityDigest>> = HashMap::new();
        for digest in wanted {
            by_shard.entry(digest.hex()[..2].to_owned()).or_default().push(digest);
        }
        let mut present: HashSet<&VerityDigest> = HashSet::new();
        for (shard, digests) in by_shard {
            let files = self.shard_files(&shard)?;
            present.extend(digests.into_iter().filter(|d| files.contains(&d.hex()[2..])));
        }
        Ok(wanted.iter().filter(|d| !present.contains(d)).copied().collect())
    }

    /// The names of the regular files in the shard directory `shard` (none if it is absent).
    fn shard_files(&self, shard: &str) -> io::Result<HashSet<String>> {
        let entries = match fs::read_dir(self.root.join(shard)) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(HashSet::new()),
            Err(e) => return Err(e),
        };
        let mut files = HashSet::new();
        for entry in entries {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                files.insert(entry.file_name().to_string_lossy().into_owned());
            }
        }
        Ok(files)
    }

    /// Whether object bytes are kept (else only their digests).
    pub fn keeps_bytes(&self) -> bool {
        matches!(self.objects, Objects::Files)
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
        Ok(Staging { dir, keeps_bytes, sealed: false, objects: Vec::new() })
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
            let staged = staging.dir.join(digest.hex());
            if self.seal && !staging.sealed {
                seal(&staged, digest)?;
            }
            fs::rename(staged, &dst)?;
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

    /// Declares that every object this staging accepts is sealed and its kernel measurement
    /// was compared with its name before `accept` (the unpacker on a sealed store), so
    /// [`ObjectStore::commit`] renames without measuring again.
    pub fn mark_sealed(&mut self) {
        self.sealed = true;
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

/// Enables fs-verity on the file at `path` and checks the kernel measures `expected`. A file
/// already sealed is only measured.
pub fn seal(path: &Path, expected: &VerityDigest) -> io::Result<()> {
    let found = seal_and_measure(path)?;
    if found != *expected {
        return Err(io::Error::other(format!("kernel measures {} as {found}, expected {expected}", path.display())));
    }
    Ok(())
}

/// Enables fs-verity on `path` (if an earlier boot has not) and returns the kernel's
/// measurement: the digest every later read of the file is checked against. Instant for a
/// sealed file; otherwise one pass in the kernel.
pub fn seal_and_measure(path: &Path) -> io::Result<VerityDigest> {
    use composefs::fsverity::{self, EnableVerityError, FsVerityHashValue as _, Sha256HashValue};
    let file = fs::File::open(path)?;
    match fsverity::enable_verity_with_retry::<Sha256HashValue>(&file) {
        Ok(()) | Err(EnableVerityError::AlreadyEnabled) => {}
        Err(e) => return Err(io::Error::other(format!("enabling fs-verity on {}: {e}", path.display()))),
    }
    let found = fsverity::measure_verity::<Sha256HashValue>(&file)
        .map_err(|e| io::Error::other(format!("measuring fs-verity of {}: {e}", path.display())))?;
    found.to_hex().parse().map_err(|e| io::Error::other(format!("kernel measurement of {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(byte: u8, tail: u8) -> VerityDigest {
        let mut hex = format!("{byte:02x}").repeat(31);
        hex.push_str(&format!("{tail:02x}"));
        hex.parse().expect("digest")
    }

    #[test]
    fn missing_lists_only_absent_object_files_in_order() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = ObjectStore::open(dir.path())?;
        let (a, b, c, d, e) = (digest(0xab, 1), digest(0xab, 2), digest(0xcd, 3), digest(0xef, 4), digest(0xab, 5));
        for present in [&a, &c] {
            let path = store.object_path(present);
            fs::create_dir_all(path.parent().expect("shard"))?;
            fs::write(path, b"x")?;
        }
        // Neither a directory with an object's name nor a partial download counts as the object.
        fs::create_dir_all(store.object_path(&b))?;
        fs::write(dir.path().join(format!("ab/{}.partial", &e.hex()[2..])), b"x")?;
        // `d`'s shard does not exist at all.
        assert_eq!(store.missing(&[e, a, b, c, d])?, vec![e, b, d]);
        assert_eq!(store.missing(&[a, c])?, Vec::<VerityDigest>::new());
        for digest in [a, b, c, d, e] {
            assert_eq!(store.contains(&digest), !store.missing(&[digest])?.contains(&digest), "{digest}");
        }
        Ok(())
    }

    #[test]
    fn a_check_only_store_answers_from_the_digests_it_saw() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = ObjectStore::check_only(dir.path())?;
        let (a, b) = (digest(1, 1), digest(2, 2));
        let mut staging = store.stage("t")?;
        staging.accept(a)?;
        store.commit(staging)?;
        assert_eq!(store.missing(&[a, b])?, vec![b]);
        Ok(())
    }
}
