//! The run-state file `/run/ironroot/boot.json` (docs/interfaces/run-state.md): what the
//! initramfs agent hands to the service under systemd (and to operators) about this boot. The
//! initramfs agent that writes it and the root's agent that reads it come from different builds
//! in practice, so this is a contract: fields are only added within a schema, and readers ignore
//! fields they do not know.

use std::collections::BTreeMap;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::MountRole;
use crate::digest::{OciDigest, VerityDigest};
use crate::wire::NodeId;

/// This file's schema version; readers refuse others. Within a schema, fields are only added
/// and readers ignore fields they do not know: the initramfs agent that writes this file and
/// the root's agent that reads it come from different builds (nodes keep netbooting one
/// initramfs while the base module is updated through the plane). A removal or a change of
/// meaning bumps the schema.
pub const RUN_STATE_SCHEMA: u32 = 1;
pub const BOOT_JSON: &str = "boot.json";
/// The record of a root staged at `/run/nextroot` for a soft reboot, written before it; the
/// service that starts in that root promotes it to `boot.json`.
pub const BOOT_NEXT_JSON: &str = "boot.next.json";
/// The record of the root a trial root replaced: what a failed trial goes back to.
pub const BOOT_PREV_JSON: &str = "boot.prev.json";
/// How long a root entered by soft reboot may take to pass its health gate when the template
/// does not say.
pub const DEFAULT_TRIAL_DEADLINE_S: u64 = 300;

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
    pub node_id: NodeId,
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
    /// The keys module signatures are checked against (PEM), for the service's updates.
    #[serde(default)]
    pub trust: Option<PathBuf>,
    /// Extra registry CA certificates (PEM) the boot trusted, for the service's updates.
    #[serde(default)]
    pub registry_ca: Option<PathBuf>,
    /// Set while this root, entered by soft reboot, is on trial (or was entered to roll one
    /// back); absent from netbooted roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trial: Option<TrialRecord>,
    /// What the initramfs agent's coldplug loaded and found unclaimed; absent from roots
    /// booted otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hardware: Option<HardwareRecord>,
    /// The NIC the boot ran DHCP on, why that one, and what the others did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkRecord>,
}

/// A root entered by soft reboot: the transaction that staged it and what decides its fate.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TrialRecord {
    /// The root transaction (its receipt ends it).
    pub txn: String,
    /// When the transaction started (seconds since the epoch).
    pub started: u64,
    /// Seconds from `started` by which the root must pass its health gate.
    pub deadline_s: u64,
    /// The staged root's device number (`st_dev` of its overlay): the service that starts
    /// on a root with this number is in it.
    pub root_dev: u64,
    /// This root was entered to go back from a failed trial (its receipt is already written).
    #[serde(default)]
    pub rollback: bool,
    /// The transaction's parts before the soft reboot, in milliseconds (`verify`, `stage`),
    /// carried into its receipt by the service in the new root.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub steps_ms: BTreeMap<String, u64>,
    /// CLOCK_MONOTONIC in µs when the root was staged (its record written); the kernel, and its
    /// clock, run on through a soft reboot, so the new root's service measures the reboot from
    /// it. 0: not known (an older agent).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub staged_mono_us: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
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
    /// Where it came from (`registry/repository@sha256:…`), to verify it again.
    #[serde(default)]
    pub reference: Option<String>,
    /// The systemd units its signed config declares (a root on trial is healthy when they
    /// are all active).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub units: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RootRecord {
    pub target: PathBuf,
    pub verity: bool,
    pub layers: Vec<PathBuf>,
    pub upper: PathBuf,
}

/// The initramfs's hardware-driven module loading (docs/interfaces/initramfs.md).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct HardwareRecord {
    /// Drivers loaded because a device's modalias asked for them (names, in load order).
    pub drivers: Vec<String>,
    /// Modules that did not load, and why.
    pub failed: Vec<ModuleFailure>,
    /// NICs and disk controllers left without a driver.
    pub unclaimed: Vec<UnclaimedDevice>,
    /// Scan-and-load rounds that loaded something.
    pub rounds: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ModuleFailure {
    pub module: String,
    pub error: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct UnclaimedDevice {
    /// Bus and name: `pci 0000:00:02.0`.
    pub device: String,
    pub modalias: String,
    /// `nic` or `storage`.
    pub kind: String,
    /// The kernel's driver for it that the initramfs does not carry, when one is known.
    pub missing_driver: Option<String>,
}

impl UnclaimedDevice {
    /// The console's line for it: the device, its modalias and the driver it lacks.
    pub fn describe(&self) -> String {
        let (kind, device, alias) = (&self.kind, &self.device, &self.modalias);
        match &self.missing_driver {
            Some(m) => format!(
                "{kind} {device} (modalias {alias}) has no driver: the kernel's {m} is not in this initramfs (ironroot-build initramfs --modules-add {m})"
            ),
            None => format!(
                "{kind} {device} (modalias {alias}) has no driver: no module of this initramfs or of the kernel's NIC and disk drivers claims it"
            ),
        }
    }
}

/// The boot NIC: which interface got the lease, and why it was tried first.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NetworkRecord {
    pub interface: String,
    pub mac: String,
    pub driver: Option<String>,
    pub address: std::net::Ipv4Addr,
    pub prefix: u8,
    pub router: Option<std::net::Ipv4Addr>,
    /// `BOOTIF=…`, `ironroot.nic=…`, or the first NIC with link that answered DHCP.
    pub reason: String,
    /// Every Ethernet NIC, in the order tried, with what happened.
    pub candidates: Vec<NicAttempt>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NicAttempt {
    pub interface: String,
    pub mac: String,
    pub driver: Option<String>,
    /// Whether the link came up within the wait.
    pub carrier: bool,
    /// `lease`, `not tried`, or the error.
    pub outcome: String,
}
