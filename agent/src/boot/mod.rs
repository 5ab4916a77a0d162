//! The boot pipeline, run once in the initramfs: discover → enroll → fetch → verify → mount →
//! hand off. Each phase is a function taking the previous phase's output type, so the order
//! cannot be got wrong: mount takes only `VerifiedModule`s, which only verify makes, which needs
//! an `Assignment`, which needs an `EnrolledIdentity`. [`Phase`] names them in logs, errors and
//! reports. Every path is under `BootOptions::root` so tests run the real pipeline against
//! fixture trees and private mount namespaces.
//!
//! What it does not do: PID 1 duties, networking, switch-root (`crate::init`). A failure after
//! enrollment carries a [`ReportTo`], so the caller can tell the plane which phase failed.
//! [`run`] is [`configure`] (discovery and settings) then [`run_configured`]: the initramfs init
//! goes by the settings of the first, from any identity source, for what follows.

pub mod fetch;
pub mod handoff;
pub mod settings;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use ironroot_oci::{Limits, RegistryAccess};

use ironroot_contract::run_state::{
    BootRecord, HardwareRecord, NetworkRecord, RUN_STATE_SCHEMA, RootRecord, StoreRecord,
};

use crate::backoff::Backoff;
use crate::exit::Exit;
use crate::external::{self, Links};
use crate::identity::{discover, enroll};
use crate::{modules, root, run_state, store};

/// The pipeline's phases, as the plane sees them in reports.
pub use ironroot_contract::wire::BootPhase as Phase;

/// A failed boot: the phase, why, and the exit code that says what kind of failure it was.
#[derive(Debug, thiserror::Error)]
#[error("boot failed in phase {phase}")]
pub struct BootError {
    pub phase: Phase,
    pub exit: Exit,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
    /// Set once the node is enrolled: who to tell that the boot failed.
    pub report_to: Option<ReportTo>,
}

/// An enrolled node's way back to the plane, kept for reporting a failure.
#[derive(Debug, Clone)]
pub struct ReportTo {
    pub client: crate::plane::PlaneClient,
    pub node_id: ironroot_contract::wire::NodeId,
    pub boot_id: String,
    pub phases_ms: BTreeMap<String, u64>,
}

impl BootError {
    fn new(phase: Phase, exit: Exit, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self { phase, exit, source: Box::new(source), report_to: None }
    }

    fn reported_to(mut self, enrolled: &enroll::EnrolledIdentity, boot_id: &str, timer: &Timer) -> Self {
        self.report_to = Some(ReportTo {
            client: enrolled.client.clone(),
            node_id: enrolled.node_id.clone(),
            boot_id: boot_id.to_owned(),
            phases_ms: timer.0.clone(),
        });
        self
    }

    /// Tells the plane (handshake with `phase` = `failed:<phase>` and the error chain), if the
    /// node got far enough to have an identity. Best effort: a failure here is only logged.
    pub async fn report(&self) -> bool {
        let Some(to) = &self.report_to else { return false };
        let report = ironroot_contract::wire::NodeReport {
            boot_id: to.boot_id.clone(),
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            phase: ironroot_contract::wire::ReportPhase::Failed(self.phase),
            phase_timings_ms: to.phases_ms.clone(),
            module_digests: Vec::new(),
            last_reconcile: None,
            probe_summary: None,
            store: None,
            error: Some(crate::exit::describe(self).chars().take(2000).collect()),
            agent: None,
        };
        match to.client.handshake(&to.node_id, &report).await {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(error = %crate::exit::describe(&e), "could not report the failed boot to the plane");
                false
            }
        }
    }
}

/// Where the pipeline reads and writes, and how it reaches the network.
#[derive(Debug, Clone)]
pub struct BootOptions {
    /// The boot root: `proc/cmdline`, `sys/…`, `etc/ironroot/…`, `run/`, `persist/` are under it.
    pub root: PathBuf,
    /// Where real sysfs and device nodes are (zram, disks); `/` except in odd test setups.
    pub devices: PathBuf,
    /// Where the composefs root is mounted (`/sysroot` in the initramfs).
    pub target: PathBuf,
    pub mkfs_ext4: PathBuf,
    pub backoff: Backoff,
    pub limits: Limits,
    pub access: RegistryAccess,
    /// Timings measured before the pipeline started (the initramfs agent's kernel, modules
    /// and network), carried into boot.json and the handshake.
    pub early_phases_ms: BTreeMap<String, u64>,
    /// What the initramfs agent's coldplug did: a NIC it left without a driver fails the
    /// boot once the node has enrolled over another (so the plane hears why).
    pub hardware: Option<HardwareRecord>,
    /// The boot NIC and why.
    pub network: Option<NetworkRecord>,
}

/// NICs of the node that no driver of the initramfs claimed.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.join("; "))]
pub struct UnsupportedNics(pub Vec<String>);

impl BootOptions {
    /// `/run/ironroot` under the root.
    pub fn run_dir(&self) -> PathBuf {
        self.root.join("run/ironroot")
    }
}

#[derive(Debug)]
struct Timer(BTreeMap<String, u64>, Instant);

impl Timer {
    fn lap(&mut self, phase: Phase) {
        let now = Instant::now();
        self.0.insert(phase.to_string(), now.duration_since(self.1).as_millis() as u64);
        self.1 = now;
    }
}

/// Discovery done and its values validated: what the rest of the pipeline starts from.
#[derive(Debug)]
pub struct Configured {
    pub found: discover::Discovered,
    pub settings: settings::BootSettings,
    timer: Timer,
}

/// Runs every phase; on success the root is mounted at `opts.target` and boot.json written.
pub async fn run(opts: &BootOptions) -> Result<BootRecord, BootError> {
    let configured = configure(opts).await?;
    run_configured(opts, configured).await
}

/// Phase discover: every identity source, then the settings they make.
pub async fn configure(opts: &BootOptions) -> Result<Configured, BootError> {
    let mut timer = Timer(opts.early_phases_ms.clone(), Instant::now());
    let found = discover::discover(&discover::DiscoverOptions::new(&opts.root))
        .await
        .map_err(|e| BootError::new(Phase::Discover, Exit::Discover, e))?;
    let settings =
        settings::settings(&found, &opts.root).map_err(|e| BootError::new(Phase::Discover, Exit::Discover, e))?;
    timer.lap(Phase::Discover);
    tracing::info!(plane = %settings.plane, identity = ?settings.identity, conflicts = found.conflicts.len(), "identity discovered");
    Ok(Configured { found, settings, timer })
}

/// Every phase after discover.
pub async fn run_configured(opts: &BootOptions, configured: Configured) -> Result<BootRecord, BootError> {
    let Configured { found, settings, mut timer } = configured;
    let store_paths =
        store::StorePaths { root: opts.root.clone(), devices: opts.devices.clone(), mkfs_ext4: opts.mkfs_ext4.clone() };
    let store = tokio::task::block_in_place(|| store::prepare(&settings.store, settings.verity, &store_paths))
        .map_err(|e| BootError::new(Phase::Store, Exit::Store, e))?;
    timer.lap(Phase::Store);

    let with = enroll::EnrollWith {
        plane: &settings.plane,
        plane_ca_pem: &settings.plane_ca_pem,
        token: settings.token.as_deref(),
        identity: &settings.identity,
    };
    let enrolled = enroll::enroll(&with, &store.state_dir, &opts.backoff)
        .await
        .map_err(|e| BootError::new(Phase::Enroll, Exit::Enroll, e))?;
    timer.lap(Phase::Enroll);

    let boot_id = boot_id(&opts.root);
    let nics: Vec<String> =
        opts.hardware.iter().flat_map(|h| &h.unclaimed).filter(|u| u.kind == "nic").map(|u| u.describe()).collect();
    if !nics.is_empty() {
        let e = UnsupportedNics(nics);
        return Err(BootError::new(Phase::Hardware, Exit::Hardware, e).reported_to(&enrolled, &boot_id, &timer));
    }
    let assignment = fetch::fetch(&enrolled, &settings, &opts.backoff)
        .await
        .map_err(|e| BootError::new(Phase::Fetch, Exit::Fetch, e).reported_to(&enrolled, &boot_id, &timer))?;
    timer.lap(Phase::Fetch);

    let policy =
        modules::FetchPolicy { access: opts.access.clone(), limits: opts.limits.clone(), backoff: opts.backoff };
    let verified = modules::verify(&assignment.modules, &store, &settings.trust, &policy).await.map_err(|e| {
        let exit = Exit::from(e.kind());
        BootError::new(Phase::Verify, exit, e).reported_to(&enrolled, &boot_id, &timer)
    })?;
    modules::raise_floors(&store, &verified)
        .map_err(|e| BootError::new(Phase::Verify, Exit::Failure, e).reported_to(&enrolled, &boot_id, &timer))?;
    tokio::task::block_in_place(|| store.sync())
        .map_err(|e| BootError::new(Phase::Store, Exit::Store, e).reported_to(&enrolled, &boot_id, &timer))?;
    timer.lap(Phase::Verify);

    let mounted = tokio::task::block_in_place(|| {
        root::mount_root(&verified, &store, &opts.run_dir(), root::OVERLAY_DIR, &opts.target)
    })
    .map_err(|e| BootError::new(Phase::Mount, Exit::Mount, e).reported_to(&enrolled, &boot_id, &timer))?;
    timer.lap(Phase::Mount);

    let plane_ca = opts.run_dir().join("plane-ca.pem");
    run_state::write_private(&plane_ca, settings.plane_ca_pem.as_bytes())
        .map_err(|e| BootError::new(Phase::HandOff, Exit::HandOff, e).reported_to(&enrolled, &boot_id, &timer))?;
    let (trust, registry_ca) = handoff::write_trust(&opts.run_dir(), &settings.trust, &opts.access)
        .map_err(|e| BootError::new(Phase::HandOff, Exit::HandOff, e).reported_to(&enrolled, &boot_id, &timer))?;
    let record = BootRecord {
        schema: RUN_STATE_SCHEMA,
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        boot_id,
        identity: handoff::identity_record(&found),
        node_id: enrolled.node_id.clone(),
        plane: settings.plane.clone(),
        plane_ca,
        certificate: enrolled.cert_path.clone(),
        key: enrolled.key_path.clone(),
        certificate_not_after: enrolled.not_after,
        reused_certificate: enrolled.reused,
        generation: assignment.generation,
        store: StoreRecord {
            kind: store.kind.to_owned(),
            path: store.objects.root().to_owned(),
            verity: store.verity,
            persistent: store.persistent,
            insecure: !store.verity,
            device: store.device.clone(),
        },
        modules: verified
            .iter()
            .zip(&assignment.modules)
            .map(|(v, wanted)| modules::record(v, Some(&wanted.reference)))
            .collect(),
        root: RootRecord {
            target: mounted.target.clone(),
            verity: mounted.verity,
            layers: mounted.layers.clone(),
            upper: mounted.upper.clone(),
        },
        phases_ms: timer.0.clone(),
        written_at_boottime_ms: Some(run_state::boottime_ms()),
        heartbeat_s: Some(settings.heartbeat.as_secs()),
        trust: Some(trust),
        registry_ca,
        trial: None,
        hardware: opts.hardware.clone(),
        network: opts.network.clone(),
    };
    run_state::write(&opts.run_dir(), &record).map_err(|e| {
        BootError::new(Phase::HandOff, Exit::HandOff, e).reported_to(&enrolled, &record.boot_id, &timer)
    })?;
    Ok(record)
}

/// The kernel's id for this boot (`/proc/sys/kernel/random/boot_id`), or a fresh one.
fn boot_id(root: &std::path::Path) -> String {
    external::read(&root.join("proc/sys/kernel/random/boot_id"), 64, Links::Follow)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic()))
        .unwrap_or_else(|| hex::encode(rand::random::<[u8; 16]>()))
}
