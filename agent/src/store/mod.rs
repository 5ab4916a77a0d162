//! Where objects live during and after boot (docs/interfaces/run-state.md):
//!
//! - `zram`: a zram device the agent creates, formatted ext4 `-O verity -b 4096`, mounted at
//!   `/run/ironroot/store`: diskless, yet the kernel enforces every object's digest;
//! - `disk:DEV`: a block device mounted at `/persist` (formatted only when its first 64 KiB are
//!   zero, i.e. a fresh disk); then as `dir:/persist`;
//! - `dir:PATH`: an already-mounted persistent directory: store in `PATH/ironroot/store`, node
//!   key, certificate and serial floors in `PATH/ironroot`, the writable overlay in
//!   `PATH/overlay`; objects survive reboots, so a warm boot downloads nothing;
//! - `tmpfs-insecure`: a tmpfs; digests are checked at download only, and it says so.
//!
//! Whether the kernel enforces fs-verity is measured, not assumed: a probe file in the store
//! gets verity enabled. Without it the store is unsealed, which `ironroot.verity=require` (the
//! default) refuses.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use ironroot_oci::store::ObjectStore;
use rustix::mount::{MountFlags, mount};

/// Where the object store lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreKind {
    /// ext4 (`-O verity`, 4 KiB blocks) on a zram device the agent creates. The default.
    Zram,
    /// A block device mounted at `/persist` (formatted ext4 `-O verity` only if blank).
    Disk(PathBuf),
    /// An already-mounted persistent directory used as `/persist` (dracut flavour, tests).
    Dir(PathBuf),
    /// tmpfs: digests are checked at download only; reported as insecure everywhere.
    TmpfsInsecure,
}

impl StoreKind {
    /// Whether the store, key and serial floors survive a reboot.
    pub fn persistent(&self) -> bool {
        matches!(self, Self::Disk(_) | Self::Dir(_))
    }
}

/// Whether kernel-enforced fs-verity is required of the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerityPolicy {
    /// Refuse to boot from a store without fs-verity. The default.
    Require,
    /// Use fs-verity where the kernel has it; otherwise mount without and say so.
    Optional,
}

/// zram device size: zram only uses memory for what is written, so this is a ceiling.
const ZRAM_SIZE: &str = "16G";
/// First bytes of a disk that must be zero before the agent formats it.
const BLANK_PROBE: usize = 64 * 1024;

/// Paths and tools the store phase uses; tests point them elsewhere.
#[derive(Debug, Clone)]
pub struct StorePaths {
    /// The boot root: `/run` and `/persist` are under it.
    pub root: PathBuf,
    /// Where sysfs and device nodes are (the real ones even when `root` is a fixture).
    pub devices: PathBuf,
    pub mkfs_ext4: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{op} {path}")]
    Io { op: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{command} failed: {reason}")]
    Command { command: String, reason: String },
    #[error("the {kind} store has no fs-verity (kernel or filesystem lacks it) and ironroot.verity=require")]
    NoVerity { kind: &'static str },
    #[error("{0} is not blank and holds no mountable filesystem")]
    NotBlank(PathBuf),
    #[error("{0} is not a block device")]
    NotADevice(PathBuf),
}

/// The store the boot uses, ready for objects.
#[derive(Debug)]
pub struct PreparedStore {
    pub kind: &'static str,
    pub objects: ObjectStore,
    /// Node key, certificate, enrollment record and serial floors.
    pub state_dir: PathBuf,
    /// The writable overlay's parent (`upper/`, `work/`), when it persists.
    pub overlay_dir: Option<PathBuf>,
    /// Whether the kernel enforces objects' fs-verity digests on read.
    pub verity: bool,
    pub persistent: bool,
    /// The block device backing the store, if any (`/dev/zram1`).
    pub device: Option<String>,
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + use<> {
    let path = path.to_owned();
    move |source| StoreError::Io { op, path, source }
}

fn run(cmd: &mut Command) -> Result<(), StoreError> {
    let command = format!("{cmd:?}");
    let out = cmd.output().map_err(|e| StoreError::Command { command: command.clone(), reason: e.to_string() })?;
    if !out.status.success() {
        let reason = format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
        return Err(StoreError::Command { command, reason });
    }
    Ok(())
}

/// Whether ext4 in this kernel can carry fs-verity.
fn ext4_has_verity(devices: &Path) -> bool {
    devices.join("sys/fs/ext4/features/verity").exists()
}

fn mkfs(paths: &StorePaths, dev: &Path, verity: bool) -> Result<(), StoreError> {
    let mut cmd = Command::new(&paths.mkfs_ext4);
    cmd.args(["-q", "-F", "-b", "4096", "-E", "nodiscard", "-L", "ironroot"]);
    if verity {
        cmd.args(["-O", "verity"]);
    }
    run(cmd.arg(dev))
}

/// Prepares a store of `kind`; `verity` says whether one the kernel cannot seal is refused.
pub fn prepare(kind: &StoreKind, policy: VerityPolicy, paths: &StorePaths) -> Result<PreparedStore, StoreError> {
    let run_dir = paths.root.join("run/ironroot");
    let store_dir = run_dir.join("store");
    let (kind, persist, device) = match kind {
        StoreKind::Zram => {
            let verity = ext4_has_verity(&paths.devices);
            if !verity && policy == VerityPolicy::Require {
                return Err(StoreError::NoVerity { kind: "zram" });
            }
            let dev = zram_create(&paths.devices)?;
            mkfs(paths, &dev, verity)?;
            mount_at(&dev, &store_dir, "ext4")?;
            ("zram", None, Some(dev.display().to_string()))
        }
        StoreKind::TmpfsInsecure => {
            std::fs::create_dir_all(&store_dir).map_err(io("creating", &store_dir))?;
            mount("tmpfs", &store_dir, "tmpfs", MountFlags::NOSUID | MountFlags::NODEV, c"mode=0700")
                .map_err(|e| io("mounting tmpfs on", &store_dir)(e.into()))?;
            ("tmpfs-insecure", None, None)
        }
        StoreKind::Disk(dev) => {
            let dev = paths.devices.join(dev.strip_prefix("/").unwrap_or(dev));
            wait_for_device(&dev, DISK_WAIT);
            let persist = paths.root.join("persist");
            if is_blank(&dev)? {
                tracing::info!(device = %dev.display(), "blank disk; formatting ext4 with verity");
                mkfs(paths, &dev, ext4_has_verity(&paths.devices))?;
            }
            mount_at(&dev, &persist, "ext4").or_else(|_| mount_at(&dev, &persist, "btrfs")).map_err(|e| {
                tracing::error!(error = %e, "mounting the persistent disk");
                StoreError::NotBlank(dev.clone())
            })?;
            ("disk", Some(persist), Some(dev.display().to_string()))
        }
        StoreKind::Dir(dir) => ("dir", Some(paths.root.join(dir.strip_prefix("/").unwrap_or(dir))), None),
    };
    let (store_dir, state_dir, overlay_dir) = match &persist {
        Some(p) => (p.join("ironroot/store"), p.join("ironroot"), Some(p.join("overlay"))),
        None => (store_dir, run_dir.clone(), None),
    };
    std::fs::create_dir_all(&store_dir).map_err(io("creating", &store_dir))?;
    let verity = kind != "tmpfs-insecure" && probe_verity(&store_dir);
    if !verity && policy == VerityPolicy::Require {
        return Err(StoreError::NoVerity { kind });
    }
    if !verity {
        tracing::warn!(store = kind, "object store without fs-verity: digests are checked at download only");
    }
    let objects = if verity { ObjectStore::open_sealed(&store_dir) } else { ObjectStore::open(&store_dir) }
        .map_err(io("opening the object store in", &store_dir))?;
    Ok(PreparedStore { kind, objects, state_dir, overlay_dir, verity, persistent: persist.is_some(), device })
}

/// How long a disk store's device gets to appear: NVMe namespaces and SATA disks behind AHCI
/// show up after their controller's asynchronous probe, not when its driver has loaded.
const DISK_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

/// Waits until `dev` exists or `wait` has passed (then what follows names the missing device).
fn wait_for_device(dev: &Path, wait: std::time::Duration) {
    let start = std::time::Instant::now();
    while !dev.exists() && start.elapsed() < wait {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    if start.elapsed() >= std::time::Duration::from_millis(100) {
        tracing::info!(device = %dev.display(), waited_ms = start.elapsed().as_millis() as u64, found = dev.exists(), "waited for the store's disk");
    }
}

impl PreparedStore {
    /// Makes what the verify phase wrote durable on a persistent store (one syncfs): a power
    /// cut right after boot must not cost the next boot its warm store.
    pub fn sync(&self) -> Result<(), StoreError> {
        if !self.persistent {
            return Ok(());
        }
        let root = self.objects.root();
        let dir = std::fs::File::open(root).map_err(io("opening", root))?;
        rustix::fs::syncfs(&dir).map_err(|e| io("syncing the filesystem of", root)(e.into()))
    }
}

/// Creates a zram device and sizes it; returns its device node.
fn zram_create(devices: &Path) -> Result<PathBuf, StoreError> {
    let control = devices.join("sys/class/zram-control/hot_add");
    let mut id = String::new();
    std::fs::File::open(&control)
        .and_then(|f| f.take(16).read_to_string(&mut id))
        .map_err(io("adding a zram device through", &control))?;
    let id = id.trim();
    let size = devices.join(format!("sys/block/zram{id}/disksize"));
    std::fs::write(&size, ZRAM_SIZE).map_err(io("sizing", &size))?;
    Ok(devices.join(format!("dev/zram{id}")))
}

fn mount_at(dev: &Path, dir: &Path, fstype: &str) -> Result<(), StoreError> {
    std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
    mount(dev, dir, fstype, MountFlags::NOSUID | MountFlags::NODEV, None).map_err(|e| io("mounting", dir)(e.into()))?;
    tracing::debug!(device = %dev.display(), dir = %dir.display(), fstype, "mounted");
    Ok(())
}

fn is_blank(dev: &Path) -> Result<bool, StoreError> {
    let mut head = vec![0u8; BLANK_PROBE];
    let mut f = std::fs::File::open(dev).map_err(io("opening", dev))?;
    let n = f.read(&mut head).map_err(io("reading", dev))?;
    Ok(head[..n].iter().all(|&b| b == 0))
}

/// Enables fs-verity on a scratch file in `dir`: the only reliable answer to "does this
/// filesystem, in this kernel, enforce verity?".
fn probe_verity(dir: &Path) -> bool {
    use composefs::fsverity::{Sha256HashValue, enable_verity_with_retry};
    let probe = dir.join(".verity-probe");
    let _ignored = std::fs::remove_file(&probe); // a probe from an earlier boot already has verity
    let ok = std::fs::write(&probe, [0u8; 4096]).is_ok()
        && std::fs::File::open(&probe).is_ok_and(|f| enable_verity_with_retry::<Sha256HashValue>(&f).is_ok());
    let _ignored = std::fs::remove_file(&probe); // only its answer matters
    ok
}

/// Mounts a zram store's device at its path again when it is not there: systemd unmounts it on
/// the way to a soft reboot (the device and its filesystem stay; the roots' overlays hold it).
/// Returns whether it mounted.
pub fn remount(record: &ironroot_contract::run_state::StoreRecord) -> Result<bool, StoreError> {
    use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
    let (Some(dev), "zram") = (record.device.as_deref(), record.kind.as_str()) else { return Ok(false) };
    let dev = Path::new(dev);
    let device = std::fs::metadata(dev).map_err(io("reading", dev))?;
    if !device.file_type().is_block_device() {
        return Err(StoreError::NotADevice(dev.to_owned()));
    }
    let here = std::fs::metadata(&record.path).map(|m| m.dev()).ok();
    if here == Some(device.rdev()) {
        return Ok(false);
    }
    mount_at(dev, &record.path, "ext4")?;
    Ok(true)
}

/// The store a boot prepared, opened again by the service from the boot's record of it (its
/// mounts moved into the root with `/run` and `/persist`).
pub fn reopen(record: &ironroot_contract::run_state::StoreRecord, run_dir: &Path) -> Result<PreparedStore, StoreError> {
    let kind = match record.kind.as_str() {
        "zram" => "zram",
        "tmpfs-insecure" => "tmpfs-insecure",
        "disk" => "disk",
        _ => "dir",
    };
    let objects = if record.verity { ObjectStore::open_sealed(&record.path) } else { ObjectStore::open(&record.path) }
        .map_err(io("opening the object store in", &record.path))?;
    // A persistent store keeps its state beside the objects (`…/ironroot/store` → `…/ironroot`).
    let state_dir = match record.path.parent() {
        Some(parent) if record.persistent => parent.to_owned(),
        _ => run_dir.to_owned(),
    };
    Ok(PreparedStore {
        kind,
        objects,
        state_dir,
        overlay_dir: None,
        verity: record.verity,
        persistent: record.persistent,
        device: record.device.clone(),
    })
}
