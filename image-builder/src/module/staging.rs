//! Where `module build` writes before anything reaches `--out`: a directory beside it,
//! `.NAME.build-XXXXXX` (the same filesystem, so moving the result in is a rename), locked with
//! flock for as long as its build runs. `--out` is touched only when the module is complete:
//! a missing or empty `--out` becomes the staging directory by one rename; an existing layout
//! receives the new blobs first and the tag last. A failed build removes its staging directory;
//! an interrupted one is removed by the signal handler (`cli`), and one whose process was
//! killed outright is removed by the next build into the same `--out`, its lock being free.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use ironroot_contract::OciDigest;
use ironroot_contract::manifest::Descriptor;
use ironroot_oci::layout::Layout;
use rustix::fs::FlockOperation;

/// What `--out` is before the module moves in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OutState {
    Missing,
    EmptyDir,
    Layout,
    /// A file, or a directory holding something other than a layout: never written into.
    Other,
}

fn out_state(out: &Path) -> anyhow::Result<OutState> {
    let meta = match fs::symlink_metadata(out) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(OutState::Missing),
        Err(e) => return Err(e).with_context(|| format!("reading {}", out.display())),
    };
    if !meta.is_dir() {
        return Ok(OutState::Other);
    }
    if out.join("oci-layout").is_file() {
        return Ok(OutState::Layout);
    }
    let mut entries = fs::read_dir(out).with_context(|| format!("reading {}", out.display()))?;
    Ok(if entries.next().is_none() { OutState::EmptyDir } else { OutState::Other })
}

/// This build's directory beside `--out`, removed on drop unless it became `--out`.
#[derive(Debug)]
pub struct Staging {
    dir: PathBuf,
    out: PathBuf,
    /// Holds the flock that tells other builds this directory is in use.
    _lock: File,
}

impl Staging {
    /// Checks that `out` can take a module, removes what killed builds into it left behind,
    /// and creates this build's staging directory.
    pub fn create(out: &Path) -> anyhow::Result<Self> {
        let name = out
            .file_name()
            .with_context(|| format!("--out {} does not name a directory", out.display()))?
            .to_string_lossy()
            .into_owned();
        if out_state(out)? == OutState::Other {
            bail!("{} exists and is not an OCI layout; refusing to write into it", out.display());
        }
        let parent = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
        let prefix = format!(".{name}.build-");
        remove_stale(&parent, &prefix);
        // Created under another name and locked before it gets the name other builds look
        // for, so none of them can take it for a dead build's leftover.
        // 0777 less the umask, as a directory made by `mkdir` (it may become --out itself).
        let new_prefix = format!(".{name}.new-");
        let fresh = tempfile::Builder::new()
            .prefix(&new_prefix)
            .permissions(fs::Permissions::from_mode(0o777))
            .tempdir_in(&parent)
            .with_context(|| format!("creating a staging directory in {}", parent.display()))?;
        let lock = lock(fresh.path(), FlockOperation::LockExclusive)
            .with_context(|| format!("locking {}", fresh.path().display()))?;
        let fresh_name = fresh.path().file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let dir = parent.join(format!("{prefix}{}", fresh_name.trim_start_matches(&new_prefix)));
        fs::rename(fresh.path(), &dir).with_context(|| format!("renaming {}", fresh.path().display()))?;
        // The directory now lives under its new name and is ours to remove (see Drop).
        let _moved: PathBuf = fresh.keep();
        Ok(Self { dir, out: out.to_owned(), _lock: lock })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Moves the complete layout in the staging directory to `--out`, whose tag `tag` then
    /// points at `desc`. `blobs` are the blobs the build wrote.
    pub fn finish(self, tag: &str, desc: Descriptor, blobs: &[OciDigest]) -> anyhow::Result<()> {
        let state = out_state(&self.out)?;
        if matches!(state, OutState::Missing | OutState::EmptyDir) && fs::rename(&self.dir, &self.out).is_ok() {
            return Ok(());
        }
        // An existing layout, or an empty mount point (rename cannot cross into it): blobs
        // first, so the tag never points at a missing one; each blob is renamed when the
        // filesystems allow, copied otherwise.
        if out_state(&self.out)? == OutState::Other {
            bail!("{} exists and is not an OCI layout; refusing to write into it", self.out.display());
        }
        let staged = Layout::open(&self.dir)?;
        let layout = Layout::create(&self.out)?;
        for digest in blobs {
            layout.import_blob(&staged.blob_path(digest), digest)?;
        }
        layout.set_tag(tag, desc)?;
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        // Best effort, and not logged (no logging from Drop): a leftover is removed by the
        // next build into the same --out, whose lock check finds it abandoned. Absent after
        // `finish` renamed it to --out.
        let _ignored = fs::remove_dir_all(&self.dir);
    }
}

fn lock(dir: &Path, op: FlockOperation) -> io::Result<File> {
    let f = File::open(dir)?;
    rustix::fs::flock(&f, op)?;
    Ok(f)
}

/// Removes staging directories under `parent` named `prefix*` whose lock nobody holds:
/// their builds were killed before they could clean up.
fn remove_stale(parent: &Path, prefix: &str) {
    let Ok(entries) = fs::read_dir(parent) else { return };
    for entry in entries.filter_map(Result::ok) {
        if !entry.file_name().to_string_lossy().starts_with(prefix) {
            continue;
        }
        let path = entry.path();
        // Held by a running build: WouldBlock. Ours to remove once we hold the lock.
        let Ok(_held) = lock(&path, FlockOperation::NonBlockingLockExclusive) else { continue };
        match fs::remove_dir_all(&path) {
            Ok(()) => tracing::info!(dir = %path.display(), "removed the staging directory of an interrupted build"),
            Err(e) => {
                tracing::warn!(dir = %path.display(), error = %e, "could not remove an abandoned staging directory")
            }
        }
    }
}

/// Removes the staging directory `dir` of a build being interrupted, while its build may
/// still be writing: renamed away first, so no new entry can appear in it (every writer uses
/// paths under the old name), then removed.
pub fn abandon(dir: &Path) -> io::Result<()> {
    let mut doomed = dir.as_os_str().to_owned();
    doomed.push("-interrupted");
    let doomed = PathBuf::from(doomed);
    match fs::rename(dir, &doomed) {
        Ok(()) => fs::remove_dir_all(&doomed),
        // Already gone: renamed to --out or removed by the build itself.
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing(dir: &Path) -> Vec<String> {
        let mut names: Vec<_> =
            fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    }

    #[test]
    fn a_dropped_staging_leaves_nothing_and_out_is_untouched() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("layout");
        let staging = Staging::create(&out).unwrap();
        fs::write(staging.path().join("blob"), b"x").unwrap();
        drop(staging);
        assert!(listing(tmp.path()).is_empty(), "{:?}", listing(tmp.path()));
    }

    #[test]
    fn stale_directories_are_removed_and_live_ones_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("layout");
        let stale = tmp.path().join(".layout.build-dead");
        let live = tmp.path().join(".layout.build-alive");
        let other = tmp.path().join(".other.build-dead");
        for d in [&stale, &live, &other] {
            fs::create_dir_all(d.join("blobs")).unwrap();
        }
        let _held = lock(&live, FlockOperation::LockExclusive).unwrap();
        let staging = Staging::create(&out).unwrap();
        let names = listing(tmp.path());
        assert!(!names.contains(&".layout.build-dead".to_owned()), "{names:?}");
        assert!(names.contains(&".layout.build-alive".to_owned()), "{names:?}");
        assert!(names.contains(&".other.build-dead".to_owned()), "another --out's directory: {names:?}");
        assert!(staging.path().file_name().unwrap().to_string_lossy().starts_with(".layout.build-"));
    }

    #[test]
    fn a_directory_that_is_not_a_layout_is_refused_before_anything_is_written() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("home");
        fs::create_dir(&out).unwrap();
        fs::write(out.join("notes.txt"), b"mine").unwrap();
        let err = Staging::create(&out).unwrap_err();
        assert!(format!("{err:#}").contains("is not an OCI layout"), "{err:#}");
        assert_eq!(listing(tmp.path()), ["home"]);
        assert_eq!(listing(&out), ["notes.txt"]);
    }

    #[test]
    fn abandon_removes_a_directory_a_writer_still_uses() {
        let tmp = tempfile::tempdir().unwrap();
        let staging = Staging::create(&tmp.path().join("layout")).unwrap();
        let path = staging.path().to_owned();
        fs::create_dir_all(path.join("blobs/sha256")).unwrap();
        let open = File::create(path.join("blobs/sha256/pack-0.partial")).unwrap();
        abandon(&path).unwrap();
        assert!(listing(tmp.path()).is_empty());
        // The writer's next file under the old path cannot appear anywhere.
        assert!(File::create(path.join("blobs/sha256/pack-1.partial")).is_err());
        drop(open);
        drop(staging);
        assert!(listing(tmp.path()).is_empty());
    }
}
