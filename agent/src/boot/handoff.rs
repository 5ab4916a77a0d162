//! Phase 6, hand-off: `/run/ironroot/boot.json`, what the agent under systemd (and operators)
//! learn about this boot. Schema: docs/interfaces/run-state.md. The bootstrap token is never
//! written; the file is replaced atomically and readable by root only.

use std::collections::BTreeMap;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ironroot_oci::VerifiedModule;
use ironroot_spec::config::MountRole;
use ironroot_spec::{OciDigest, VerityDigest};
use serde::{Deserialize, Serialize};

use super::discover::{Conflict, Discovered, Sourced};

/// This file's schema version; readers refuse others. Within a schema, fields are only added
/// and readers ignore fields they do not know: the initramfs agent that writes this file and
/// the root's agent that reads it come from different builds (nodes keep netbooting one
/// initramfs while the base module is updated through the plane). A removal or a change of
/// meaning bumps the schema.
pub const RUN_STATE_SCHEMA: u32 = 1;
pub const BOOT_JSON: &str = "boot.json";

/// Seconds between the service's heartbeats a boot may ask for (`ironroot.heartbeat`): from a
/// second (tests, labs) to an hour.
pub const HEARTBEAT_SECONDS: RangeInclusive<u64> = 1..=3600;
/// Heartbeat interval when no identity source sets one (docs/interfaces/kernel-cmdline.md).
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BootRecord {
    pub schema: u32,
    pub agent_version: String,
    pub boot_id: String,
    pub identity: IdentityRecord,
    pub node_id: String,
    pub plane: String,
    /// The plane's CA (PEM), copied under /run so the service can verify the plane after
    /// switch-root, when the initramfs is gone.
    pub plane_ca: PathBuf,
    pub certificate: PathBuf,
    pub key: PathBuf,
    /// Seconds since the epoch.
    pub certificate_not_after: i64,
    pub reused_certificate: bool,
    pub generation: u64,
    pub store: StoreRecord,
    pub modules: Vec<ModuleRecord>,
    pub root: RootRecord,
    /// Milliseconds per phase: discover, store, enroll, fetch, verify, mount; booted by the
    /// initramfs agent also kernel (kernel start to /init), modules and network.
    pub phases_ms: BTreeMap<String, u64>,
    /// CLOCK_BOOTTIME (ms since the kernel started) when this record was written: the service
    /// after switch-root measures systemd's share of the boot from it.
    #[serde(default)]
    pub written_at_boottime_ms: Option<u64>,
    /// Seconds between the service's heartbeats (`ironroot.heartbeat` from any identity
    /// source, validated, or the default); absent from records of older agents.
    #[serde(default)]
    pub heartbeat_s: Option<u64>,
}

/// Milliseconds since the kernel started (CLOCK_BOOTTIME: includes suspend, never jumps).
pub fn boottime_ms() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    (t.tv_sec as u64) * 1000 + (t.tv_nsec as u64) / 1_000_000
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct IdentityRecord {
    pub values: BTreeMap<String, SourcedRecord>,
    pub conflicts: Vec<ConflictRecord>,
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SourcedRecord {
    pub value: String,
    pub source: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ConflictRecord {
    pub key: String,
    pub chosen: SourcedRecord,
    pub other: SourcedRecord,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StoreRecord {
    /// `zram`, `disk`, `dir` or `tmpfs-insecure`.
    pub kind: String,
    pub path: PathBuf,
    /// Whether the kernel enforces every object's fs-verity digest.
    pub verity: bool,
    pub persistent: bool,
    /// True for `tmpfs-insecure`, and for any store without verity.
    pub insecure: bool,
    pub device: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModuleRecord {
    pub name: String,
    pub version: String,
    pub serial: u64,
    pub digest: OciDigest,
    pub composefs_digest: VerityDigest,
    pub role: MountRole,
    pub image: PathBuf,
    pub signed_by: String,
    pub downloaded_bytes: u64,
    pub new_objects: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RootRecord {
    pub target: PathBuf,
    pub verity: bool,
    pub layers: Vec<PathBuf>,
    pub upper: PathBuf,
}

/// Values never written to disk.
const SECRET_KEYS: &[&str] = &["token"];

fn sourced(s: &Sourced, key: &str) -> SourcedRecord {
    let value = if SECRET_KEYS.contains(&key) { "<redacted>".to_owned() } else { s.value.clone() };
    SourcedRecord { value, source: s.source.to_string() }
}

impl IdentityRecord {
    pub fn new(found: &Discovered) -> Self {
        let conflict = |c: &Conflict| ConflictRecord {
            key: c.key.clone(),
            chosen: sourced(&c.chosen, &c.key),
            other: sourced(&c.other, &c.key),
        };
        Self {
            values: found.values.iter().map(|(k, v)| (k.clone(), sourced(v, k))).collect(),
            conflicts: found.conflicts.iter().map(conflict).collect(),
            notes: found.notes.clone(),
        }
    }
}

impl ModuleRecord {
    pub fn new(m: &VerifiedModule) -> Self {
        let c = m.config();
        Self {
            name: c.name.clone(),
            version: c.version.clone(),
            serial: c.serial,
            digest: m.digest(),
            composefs_digest: c.composefs_digest,
            role: c.role,
            image: m.image_path().to_owned(),
            signed_by: m.signature().key_id.clone(),
            downloaded_bytes: m.downloaded(),
            new_objects: m.new_objects(),
        }
    }
}

/// Writes `record` to `run_dir/boot.json` (0600, atomically).
pub fn write(run_dir: &Path, record: &BootRecord) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(run_dir)?;
    let path = run_dir.join(BOOT_JSON);
    write_private(&path, &serde_json::to_vec_pretty(record).map_err(std::io::Error::other)?)?;
    Ok(path)
}

/// Writes `bytes` to `path` with mode 0600 from the start, through `path.partial` and a rename
/// (boot.json, the node key and certificate).
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let partial = path.with_extension("partial");
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&partial)?;
    // A leftover partial file keeps its old mode through `truncate`; make sure it is 0600.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&partial, path)
}
