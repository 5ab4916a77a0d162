//! Live modules (`opt`, `ext`): each is its own read-only composefs mount — its EROFS image under
//! `/run/ironroot/layers/<digest>` as the overlay's lower layer, the object store as its data-only
//! layer, `verity=require` on a sealed store — at its mount point (`/opt/<name>`, or the
//! declared one). An update prepares the new version as a detached mount and swaps it in
//! atomically: `move_mount` beneath the old mount, then the old one is detached, so a path lookup
//! sees either version and never neither. Not systemd-sysext's merge over `/usr` (its refresh
//! unmounts and remounts), not an overlay remount with new lower layers (overlayfs refuses).
//!
//! Every mount is named `ironroot:<name>@<composefs digest>` in the mount table, so after a crash
//! the runtime reads which version is live from `/proc/self/mountinfo`, not from memory.

use std::os::fd::{AsFd as _, OwnedFd};
use std::path::{Path, PathBuf};

use ironroot_contract::VerityDigest;
use ironroot_oci::VerifiedModule;
use rustix::fs::CWD;
use rustix::mount::{MoveMountFlags, UnmountFlags, move_mount, unmount};

use super::{MountError, OverlayDirs, mount_image, overlay};
use crate::store::PreparedStore;

/// A live module version mounted but not attached anywhere yet.
#[derive(Debug)]
pub struct Prepared {
    fd: OwnedFd,
    /// The EROFS layer it stands on (kept mounted while any version uses it).
    pub layer: PathBuf,
    pub name: String,
    pub composefs: VerityDigest,
}

/// The mount-table name of a live module version.
pub fn source_name(name: &str, composefs: &VerityDigest) -> String {
    format!("ironroot:{name}@{composefs}")
}

/// Mounts `module`'s image and a read-only overlay over it, detached. Nothing is visible yet.
pub fn prepare(module: &VerifiedModule, store: &PreparedStore, run_dir: &Path) -> Result<Prepared, MountError> {
    let layer = run_dir.join("layers").join(module.digest().hex());
    if !is_mount_point(&layer) {
        mount_image(module, &layer)?;
    }
    let config = module.config();
    let lower = [layer.as_path()];
    let dirs = OverlayDirs { lower: &lower, data: store.objects.root(), upper: None };
    let source = source_name(&config.name, &config.composefs_digest);
    let fd = overlay(&source, &dirs, store.verity, &layer)?;
    Ok(Prepared { fd, layer, name: config.name.clone(), composefs: config.composefs_digest })
}

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("creating the mount point {path}")]
    MountPoint { path: PathBuf, source: std::io::Error },
    #[error("attaching {name} at {path}")]
    Attach { name: String, path: PathBuf, source: std::io::Error },
    #[error("detaching the previous version at {path}")]
    DetachOld { path: PathBuf, source: std::io::Error },
    #[error("{path} is busy: something still uses the module there")]
    Busy { path: PathBuf },
    #[error("unmounting {path}")]
    Unmount { path: PathBuf, source: std::io::Error },
}

/// Puts `prepared` at `mount_point` (under `root`): as the first version when nothing is
/// mounted there, else beneath the live one, which is then detached.
pub fn attach(prepared: Prepared, root: &Path, mount_point: &str) -> Result<(), AttachError> {
    let path = root.join(mount_point.trim_start_matches('/'));
    let attach_err = |source: rustix::io::Errno| AttachError::Attach {
        name: prepared.name.clone(),
        path: path.clone(),
        source: source.into(),
    };
    if live_source(&path).is_none() {
        std::fs::create_dir_all(&path).map_err(|source| AttachError::MountPoint { path: path.clone(), source })?;
        move_mount(prepared.fd.as_fd(), "", CWD, &path, MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH).map_err(attach_err)?;
        return Ok(());
    }
    let beneath = MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_BENEATH;
    move_mount(prepared.fd.as_fd(), "", CWD, &path, beneath).map_err(attach_err)?;
    unmount(&path, UnmountFlags::DETACH | UnmountFlags::NOFOLLOW)
        .map_err(|e| AttachError::DetachOld { path: path.clone(), source: e.into() })
}

/// Unmounts the live module at `mount_point`; a mount still in use is reported, not detached
/// lazily (a half-removed module would keep running from a vanished path).
pub fn detach(root: &Path, mount_point: &str) -> Result<(), AttachError> {
    let path = root.join(mount_point.trim_start_matches('/'));
    match unmount(&path, UnmountFlags::NOFOLLOW) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::BUSY) => Err(AttachError::Busy { path }),
        Err(e) => Err(AttachError::Unmount { path, source: e.into() }),
    }
}

/// Lets go of a module version's EROFS layer once no version mounted over it is live (lazily:
/// the swapped-out overlay may still be draining).
pub fn release_layer(run_dir: &Path, digest: &ironroot_contract::OciDigest) {
    let layer = run_dir.join("layers").join(digest.hex());
    if is_mount_point(&layer)
        && let Err(e) = unmount(&layer, UnmountFlags::DETACH | UnmountFlags::NOFOLLOW)
    {
        tracing::warn!(layer = %layer.display(), error = %e, "releasing an old module layer");
    }
}

/// The mount-table name of what is mounted on top at `path` (`ironroot:<name>@<digest>`), if
/// an ironroot live module is.
pub fn live_source(path: &Path) -> Option<String> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    top_source(&table, path)
}

/// From a mountinfo table: the source of the last (topmost) mount at `path` if it is ours.
pub fn top_source(table: &str, path: &Path) -> Option<String> {
    let want = path.to_str()?;
    let tops: Vec<String> = table
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let mount_point = fields.get(4)?;
            let dash = fields.iter().position(|f| *f == "-")?;
            let source = fields.get(dash + 2)?;
            (unescape(mount_point) == want).then(|| (*source).to_owned())
        })
        .collect();
    tops.into_iter().next_back().filter(|s| s.starts_with("ironroot:"))
}

fn is_mount_point(path: &Path) -> bool {
    let Some(want) = path.to_str() else { return false };
    std::fs::read_to_string("/proc/self/mountinfo")
        .is_ok_and(|t| t.lines().any(|l| l.split(' ').nth(4).is_some_and(|m| unescape(m) == want)))
}

/// mountinfo escapes space, tab, newline and backslash as octal (`\040`).
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v as char);
            i += 4;
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "\
22 1 0:21 / / rw,relatime shared:1 - overlay composefs:base rw,lowerdir+=x
80 22 0:45 / /opt/hello ro,nodev shared:40 - overlay ironroot:hello@aa rw
81 80 0:46 / /opt/hello ro,nodev shared:41 - overlay ironroot:hello@bb rw
90 22 0:47 / /srv/my\\040app ro shared:42 - overlay ironroot:app@cc rw
91 22 0:48 / /mnt/other rw shared:43 - ext4 /dev/vdb rw
";

    #[test]
    fn the_topmost_mount_at_a_path_names_the_live_version() {
        assert_eq!(top_source(TABLE, Path::new("/opt/hello")).as_deref(), Some("ironroot:hello@bb"));
        assert_eq!(top_source(TABLE, Path::new("/srv/my app")).as_deref(), Some("ironroot:app@cc"));
        assert_eq!(top_source(TABLE, Path::new("/mnt/other")), None, "not ours");
        assert_eq!(top_source(TABLE, Path::new("/opt/none")), None);
        let digest: VerityDigest = "ab".repeat(32).parse().unwrap();
        assert_eq!(source_name("hello", &digest), format!("ironroot:hello@{}", "ab".repeat(32)));
    }
}
