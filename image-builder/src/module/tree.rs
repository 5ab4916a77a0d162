//! Reading a source tree into a composefs filesystem, and making it reproducible.
//!
//! The tree comes from a directory, or from a tar archive (any compression GNU tar detects)
//! unpacked by GNU tar into a scratch directory first — as root, with ownership, modes, xattrs
//! and device nodes intact. Normalisation knobs:
//! - mtimes: every inode gets one fixed time (`--mtime`, default `SOURCE_DATE_EPOCH` or 0), or
//!   the tree's own times are kept (`--mtime source`);
//! - ownership: kept, or forced to one `UID:GID` (`--owner`);
//! - hard links: kept as links (`--hardlinks keep`, default) or broken into separate inodes as
//!   `mkcomposefs` does (`--hardlinks break`);
//! - ordering: always sorted by name (composefs does this; directory read order never leaks).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use composefs::fs::{HardlinkBehavior, ReadFilesystemOpts, read_filesystem_with_opts};
use composefs::fsverity::{FsVerityHashValue as _, Sha256HashValue};
use composefs::generic_tree::{Inode, LeafContent};
use composefs::tree::{Directory, FileSystem, RegularFile};
use ironroot_contract::VerityDigest;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MtimePolicy {
    Fixed(i64),
    Source,
}

#[derive(Debug, Clone, Copy)]
pub struct Normalise {
    pub mtime: MtimePolicy,
    pub owner: Option<(u32, u32)>,
    pub hardlinks: HardlinkBehavior,
}

/// Where the tree comes from; a tar source keeps its scratch directory alive.
#[derive(Debug)]
pub struct SourceTree {
    root: PathBuf,
    _scratch: Option<tempfile::TempDir>,
}

impl SourceTree {
    /// A directory as is, or a tar archive unpacked into a scratch directory.
    pub fn open(from: &Path) -> anyhow::Result<Self> {
        let meta = std::fs::metadata(from).with_context(|| format!("reading source {}", from.display()))?;
        if meta.is_dir() {
            let root = from.canonicalize().with_context(|| format!("resolving {}", from.display()))?;
            return Ok(Self { root, _scratch: None });
        }
        let scratch =
            tempfile::Builder::new().prefix("ironroot-tree-").tempdir().context("creating scratch directory")?;
        // GNU tar, not the `tar` crate: the crate unpacks fifos and device nodes as regular
        // files and drops directory xattrs, which silently changes a root filesystem.
        let out = std::process::Command::new("tar")
            .args([
                "--extract",
                "--preserve-permissions",
                "--numeric-owner",
                "--xattrs",
                "--xattrs-include=*",
                "--no-overwrite-dir",
            ])
            .arg(if rustix::process::geteuid().is_root() { "--same-owner" } else { "--no-same-owner" })
            .arg("--file")
            .arg(from)
            .arg("--directory")
            .arg(scratch.path())
            .output()
            .with_context(|| format!("running tar to unpack {}", from.display()))?;
        if !out.status.success() {
            bail!("unpacking {}: {}", from.display(), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(Self { root: scratch.path().to_owned(), _scratch: Some(scratch) })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
}

/// Scans `root` into a composefs tree (files over 64 bytes become fs-verity-named external
/// objects; hashing runs on every core) and applies `norm`.
pub fn scan(root: &Path, norm: &Normalise) -> anyhow::Result<FileSystem<Sha256HashValue>> {
    let slash = rustix::fs::open(
        "/",
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .context("opening /")?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting scan runtime")?;
    let opts = ReadFilesystemOpts { hardlinks: norm.hardlinks, ..ReadFilesystemOpts::default() };
    let mut fs = runtime
        .block_on(read_filesystem_with_opts(slash, root.to_owned(), opts))
        .with_context(|| format!("reading tree {}", root.display()))?;
    fs.for_each_stat_mut(|st| {
        if let MtimePolicy::Fixed(t) = norm.mtime {
            st.st_mtim_sec = t;
            st.st_mtim_nsec = 0;
        }
        if let Some((uid, gid)) = norm.owner {
            st.st_uid = uid;
            st.st_gid = gid;
        }
    });
    Ok(fs)
}

/// One content object: its size and a source path holding its bytes.
#[derive(Debug, Clone)]
pub struct ObjectSource {
    pub size: u64,
    pub path: PathBuf,
}

/// Every distinct external object of `fs`, by digest, with the first path that holds it.
pub fn external_objects(
    fs: &FileSystem<Sha256HashValue>,
    root: &Path,
) -> anyhow::Result<BTreeMap<VerityDigest, ObjectSource>> {
    let mut out = BTreeMap::new();
    walk(fs, &fs.root, root, &mut out)?;
    Ok(out)
}

fn walk(
    fs: &FileSystem<Sha256HashValue>,
    dir: &Directory<Sha256HashValue>,
    path: &Path,
    out: &mut BTreeMap<VerityDigest, ObjectSource>,
) -> anyhow::Result<()> {
    for (name, inode) in dir.entries() {
        let child = path.join(name);
        match inode {
            Inode::Directory(d) => walk(fs, d, &child, out)?,
            Inode::Leaf(id, _) => {
                if let LeafContent::Regular(RegularFile::External(id, size) | RegularFile::ExternalNoVerity(id, size)) =
                    &fs.leaf(*id).content
                {
                    let digest: VerityDigest = id.to_hex().parse().context("composefs produced a malformed digest")?;
                    out.entry(digest).or_insert(ObjectSource { size: *size, path: child });
                }
            }
        }
    }
    Ok(())
}

/// Parses `--owner UID:GID` or `keep`.
pub fn parse_owner(s: &str) -> anyhow::Result<Option<(u32, u32)>> {
    if s == "keep" {
        return Ok(None);
    }
    let Some((u, g)) = s.split_once(':') else { bail!("owner {s:?} is not UID:GID or keep") };
    Ok(Some((u.parse().context("owner uid")?, g.parse().context("owner gid")?)))
}

/// Parses `--mtime EPOCH` or `source`; the default is `SOURCE_DATE_EPOCH` or 0.
pub fn parse_mtime(arg: Option<&str>) -> anyhow::Result<MtimePolicy> {
    let env = std::env::var("SOURCE_DATE_EPOCH").ok();
    match arg.or(env.as_deref()) {
        None => Ok(MtimePolicy::Fixed(0)),
        Some("source") => Ok(MtimePolicy::Source),
        Some(n) => Ok(MtimePolicy::Fixed(
            n.parse().with_context(|| format!("mtime {n:?} is not seconds since the epoch or 'source'"))?,
        )),
    }
}
