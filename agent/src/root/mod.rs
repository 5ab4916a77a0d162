//! Composefs roots (the boot's phase 5, and a staged root for a soft reboot). Each verified
//! module's EROFS image is mounted read-only (file-backed, through the `composefs` crate) under
//! `/run/ironroot/layers/<digest>`; one overlayfs then stacks the `usr` layers over the root layer
//! (live `opt`/`ext` modules are mounted by the service, not here), with the object store as its
//! data-only lower layer (`lower:…::store`), `metacopy=on,redirect_dir=on`, `verity=require`
//! whenever the store is sealed, and a writable upper on tmpfs or `/persist/overlay`.
//! Accepts only [`VerifiedModule`]s: nothing unverified can be mounted.

use std::os::fd::{AsFd as _, AsRawFd as _, OwnedFd};
use std::path::{Path, PathBuf};

pub mod extension;

use composefs::mount::{FsHandle, erofs_mount, mount_at};
use ironroot_contract::config::MountRole;
use ironroot_oci::VerifiedModule;
use rustix::fs::{CWD, Mode, OFlags};
use rustix::mount::{FsMountFlags, MountAttrFlags, MountFlags, fsconfig_create, fsconfig_set_string, fsmount};

use crate::store::PreparedStore;

use composefs_ioctls::loop_device::flags::{LO_FLAGS_AUTOCLEAR, LO_FLAGS_READ_ONLY};

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("no module has the root role")]
    NoRoot,
    #[error("{count} modules have the root role; exactly one may")]
    TwoRoots { count: usize },
    #[error("{op} {path}")]
    Io { op: &'static str, path: PathBuf, source: std::io::Error },
    #[error("mounting the EROFS image of {module}")]
    Erofs { module: String, source: std::io::Error },
    #[error("mounting the overlay at {target} (kernel: {kernel})")]
    Overlay { target: PathBuf, kernel: String, source: std::io::Error },
}

/// The root as mounted.
#[derive(Debug, Clone)]
pub struct MountedRoot {
    pub target: PathBuf,
    pub verity: bool,
    pub layers: Vec<PathBuf>,
    pub upper: PathBuf,
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> MountError + use<> {
    let path = path.to_owned();
    move |source| MountError::Io { op, path, source }
}

/// The directory under `/run/ironroot` whose tmpfs holds the booted root's writable upper (a
/// root staged for a soft reboot gets its own, fresh).
pub const OVERLAY_DIR: &str = "overlay";

/// Mounts `modules` (exactly one with role root) at `target`; `run_dir` is `/run/ironroot`,
/// `upper_dir` the directory under it for the writable upper's tmpfs (when the store has no
/// persistent overlay directory).
pub fn mount_root(
    modules: &[VerifiedModule],
    store: &PreparedStore,
    run_dir: &Path,
    upper_dir: &str,
    target: &Path,
) -> Result<MountedRoot, MountError> {
    let roots = modules.iter().filter(|m| m.config().role == MountRole::Root).count();
    match roots {
        0 => return Err(MountError::NoRoot),
        1 => {}
        count => return Err(MountError::TwoRoots { count }),
    }
    // Upper layers first in overlayfs order: `usr` layers over the root. Live modules (`opt`,
    // `ext`) are not part of the root: the service attaches each as its own mount.
    let mut ordered: Vec<&VerifiedModule> = modules.iter().filter(|m| m.config().role == MountRole::Usr).collect();
    ordered.extend(modules.iter().filter(|m| m.config().role == MountRole::Root));

    let mut mounted = Vec::new();
    let result = assemble(&ordered, store, run_dir, upper_dir, target, &mut mounted);
    if result.is_err() {
        // A failed mount phase leaves no partial root behind.
        for dir in mounted.iter().rev() {
            if let Err(e) = rustix::mount::unmount(dir, rustix::mount::UnmountFlags::DETACH) {
                tracing::warn!(dir = %dir.display(), error = %e, "could not detach a mount after a failed boot");
            }
        }
    }
    result
}

/// Mounts the layers, the overlay's tmpfs (if any) and the overlay; `mounted` collects what was
/// mounted so the caller can undo it.
fn assemble(
    ordered: &[&VerifiedModule],
    store: &PreparedStore,
    run_dir: &Path,
    upper_dir: &str,
    target: &Path,
    mounted: &mut Vec<PathBuf>,
) -> Result<MountedRoot, MountError> {
    let mut layers = Vec::new();
    for module in ordered {
        let dir = run_dir.join("layers").join(module.digest().hex());
        mount_image(module, &dir)?;
        mounted.push(dir.clone());
        layers.push(dir);
    }
    let upper_parent = match &store.overlay_dir {
        Some(dir) => dir.clone(),
        None => {
            let dir = run_dir.join(upper_dir);
            std::fs::create_dir_all(&dir).map_err(io("creating", &dir))?;
            rustix::mount::mount("tmpfs", &dir, "tmpfs", MountFlags::NOSUID | MountFlags::NODEV, c"mode=0755")
                .map_err(|e| io("mounting tmpfs on", &dir)(e.into()))?;
            mounted.push(dir.clone());
            dir
        }
    };
    let (upper, work) = (upper_parent.join("upper"), upper_parent.join("work"));
    for d in [&upper, &work, &target.to_path_buf()] {
        std::fs::create_dir_all(d).map_err(io("creating", d))?;
    }
    let layer_refs: Vec<&Path> = layers.iter().map(PathBuf::as_path).collect();

    let name = ordered.last().map_or("root", |m| m.config().name.as_str());
    let dirs = OverlayDirs { lower: &layer_refs, data: store.objects.root(), upper: Some((&upper, &work)) };
    let mnt = overlay(&format!("composefs:{name}"), &dirs, store.verity, target)?;
    mount_at(mnt.as_fd(), CWD, target).map_err(|e| MountError::Overlay {
        target: target.to_owned(),
        kernel: "attaching at the target".into(),
        source: e.into(),
    })?;
    tracing::info!(target = %target.display(), verity = store.verity, layers = layers.len(), "composefs root mounted");
    Ok(MountedRoot { target: target.to_owned(), verity: store.verity, layers, upper })
}

/// Mounts one verified EROFS image read-only at `dir` (already there from an earlier attempt:
/// left as is).
pub(crate) fn mount_image(module: &VerifiedModule, dir: &Path) -> Result<(), MountError> {
    std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
    let erofs = |source| MountError::Erofs { module: module.config().name.clone(), source };
    let open = || rustix::fs::open(module.image_path(), OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty());
    let image: OwnedFd = open().map_err(|e| erofs(e.into()))?;
    let mnt = match erofs_mount(image) {
        Ok(mnt) => mnt,
        // File-backed EROFS needs a filesystem with direct block mapping; tmpfs has none, so
        // the image goes through a read-only loop device (released when unmounted).
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::NOTBLK.raw_os_error()) => {
            let image = open().map_err(|e| erofs(e.into()))?;
            let flags = LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR;
            let dev = composefs_ioctls::loop_device::loopify_with_flags(&image, flags).map_err(erofs)?;
            tracing::debug!(module = %module.config().name, "EROFS image on a filesystem without block mapping; using a loop device");
            erofs_mount(dev).map_err(erofs)?
        }
        Err(e) => return Err(erofs(e)),
    };
    mount_at(mnt.as_fd(), CWD, dir).map_err(|e| erofs(e.into()))?;
    Ok(())
}

/// The directories of one overlay mount; lower layers uppermost first. Without an upper (and
/// work) directory the overlay is read-only.
pub(crate) struct OverlayDirs<'a> {
    pub lower: &'a [&'a Path],
    pub data: &'a Path,
    pub upper: Option<(&'a Path, &'a Path)>,
}

/// Creates an overlay (a detached mount: the caller attaches it) named `source` in the mount
/// table. Layers are handed over one per `lowerdir+`/`datadir+` (kernel ≥ 6.8) as
/// `/proc/self/fd/N` of an O_PATH descriptor: fsconfig string values are capped at 256 bytes,
/// which a `lowerdir` list of long paths exceeds, and no path needs escaping this way. `target`
/// only names the mount in errors.
pub(crate) fn overlay(
    source: &str,
    dirs: &OverlayDirs<'_>,
    verity: bool,
    target: &Path,
) -> Result<OwnedFd, MountError> {
    let fail = |kernel: String| {
        move |e: rustix::io::Errno| MountError::Overlay { target: target.to_owned(), kernel, source: e.into() }
    };
    let fs = FsHandle::open("overlay").map_err(|e| MountError::Overlay {
        target: target.to_owned(),
        kernel: "overlayfs is not available".into(),
        source: e,
    })?;
    let set = |k: &str, v: &str| fsconfig_set_string(fs.as_fd(), k, v).map_err(fail(format!("{k}={v} refused")));
    set("source", source)?;
    set("metacopy", "on")?;
    set("redirect_dir", "on")?;
    if verity {
        set("verity", "require")?;
    }
    let mut held = Vec::new();
    let mut set_dir = |key: &str, dir: &Path| -> Result<(), MountError> {
        let fd = rustix::fs::open(dir, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
            .map_err(|e| io("opening", dir)(e.into()))?;
        let proc_path = format!("/proc/self/fd/{}", fd.as_raw_fd());
        held.push(fd);
        fsconfig_set_string(fs.as_fd(), key, &proc_path).map_err(fail(format!("{key}={} refused", dir.display())))
    };
    for lower in dirs.lower {
        set_dir("lowerdir+", lower)?;
    }
    set_dir("datadir+", dirs.data)?;
    let attrs = match dirs.upper {
        Some((upper, work)) => {
            set_dir("upperdir", upper)?;
            set_dir("workdir", work)?;
            MountAttrFlags::empty()
        }
        None => MountAttrFlags::MOUNT_ATTR_RDONLY | MountAttrFlags::MOUNT_ATTR_NODEV,
    };
    fsconfig_create(fs.as_fd()).map_err(fail("creating the overlay".into()))?;
    let mnt = fsmount(fs.as_fd(), FsMountFlags::FSMOUNT_CLOEXEC, attrs).map_err(fail("fsmount".into()))?;
    Ok(mnt)
}
