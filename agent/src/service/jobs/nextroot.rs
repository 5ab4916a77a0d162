//! Root updates by soft reboot. A changed root (or `usr` layer), already verified into the
//! store, is assembled at `/run/nextroot` by the boot's own code ([`crate::root::mount_root`])
//! with a fresh writable upper; its boot record is written as `boot.next.json` with the trial
//! (the transaction, its deadline and the staged root's device number), and systemd
//! soft-reboots into it (systemd ≥ 254: the kernel keeps running; `/run` and everything under
//! `/run/nextroot` are carried over). The service that starts in the new root promotes that
//! record to `boot.json` ([`promote`]), health-gates the root, and commits it — or stages the
//! root it replaced (`boot.prev.json`, its objects still in the store) the same way and
//! soft-reboots back, which needs no plane.
//!
//! On the way systemd unmounts what it does not consider part of the system's foundation: a
//! mounted `/persist` (a disk-backed store) is bound into the new root, which systemd leaves
//! alone, and a zram store's device is mounted again by the service that starts there
//! ([`crate::store::remount`]).

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use ironroot_contract::run_state::{
    BOOT_JSON, BOOT_NEXT_JSON, BOOT_PREV_JSON, BootRecord, ModuleRecord, RootRecord, TrialRecord,
};
use rustix::mount::UnmountFlags;

use super::Runner;
use crate::service::rollout::ModuleInfo;

/// Where systemd looks for the root to soft-reboot into, under the root.
pub const NEXTROOT: &str = "run/nextroot";
/// Largest boot record read back (boot.json, boot.prev.json).
const MAX_RECORD: u64 = 1024 * 1024;

/// How the staged root is to be tried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrialPlan {
    pub txn: String,
    /// Seconds since the epoch.
    pub started: u64,
    pub deadline_s: u64,
    /// Staged to go back from a failed trial.
    pub rollback: bool,
    /// The transaction's parts so far (ms); staging adds `stage`, the record carries them.
    pub steps_ms: std::collections::BTreeMap<String, u64>,
}

fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    crate::exit::describe(e)
}

impl Runner {
    /// Assembles `modules` (the whole new root: exactly one root, any `usr` layers) at
    /// `/run/nextroot` and writes its record; nothing is left mounted when it fails.
    pub(super) async fn stage_root(
        &self,
        modules: &[ModuleInfo],
        generation: Option<u64>,
        plan: &TrialPlan,
    ) -> Result<(), String> {
        let began = std::time::Instant::now();
        let mut verified = Vec::with_capacity(modules.len());
        for m in modules {
            verified.push(self.verified(m).await?);
        }
        let current = crate::service::read_record(&self.run_dir).map_err(|e| describe(&e))?;
        let records: Vec<ModuleRecord> =
            verified.iter().zip(modules).map(|(v, m)| crate::modules::record(v, Some(&m.reference))).collect();
        let next = self.root.join(NEXTROOT);
        discard_at(&next, &self.run_dir);
        let upper = format!("overlay-{}", plan.txn);
        let mounted = crate::root::mount_root(&verified, self.store()?, &self.run_dir, &upper, &next)
            .map_err(|e| describe(&e))?;
        let root = RootRecord {
            target: PathBuf::from("/"),
            verity: mounted.verity,
            layers: mounted.layers,
            upper: mounted.upper,
        };
        let mut steps_ms = plan.steps_ms.clone();
        steps_ms.insert("stage".to_owned(), u64::try_from(began.elapsed().as_millis()).unwrap_or(u64::MAX));
        let plan = TrialPlan { steps_ms, ..plan.clone() };
        let mut staged = self.finish_staging(&next, current, records, root, generation, &plan);
        if staged.is_ok() && !plan.rollback {
            staged = self.start_guard(&plan.txn).await;
        }
        if staged.is_err() {
            discard_at(&next, &self.run_dir);
        }
        staged
    }

    fn finish_staging(
        &self,
        next: &Path,
        current: BootRecord,
        records: Vec<ModuleRecord>,
        root: RootRecord,
        generation: Option<u64>,
        plan: &TrialPlan,
    ) -> Result<(), String> {
        if !["usr/lib/os-release", "etc/os-release"].iter().any(|p| next.join(p).exists()) {
            return Err("the new root has no os-release (systemd soft-reboots only into an OS tree)".into());
        }
        if std::fs::symlink_metadata(next.join("sbin/init")).is_err() {
            return Err("the new root has no /sbin/init".into());
        }
        let persist = self.root.join("persist");
        if is_mount_point(&persist) {
            let to = next.join("persist");
            std::fs::create_dir_all(&to).map_err(|e| format!("creating {}: {e}", to.display()))?;
            rustix::mount::mount_bind_recursive(&persist, &to)
                .map_err(|e| format!("binding {} into the new root: {e}", persist.display()))?;
        }
        let root_dev = std::fs::metadata(next).map_err(|e| format!("{}: {e}", next.display()))?.dev();
        let live: Vec<ModuleRecord> = current.modules.iter().filter(|m| m.role.is_live()).cloned().collect();
        let mut record = current;
        record.modules = records.into_iter().chain(live).collect();
        record.root = root;
        if let Some(g) = generation {
            record.generation = g;
        }
        record.trial = Some(TrialRecord {
            txn: plan.txn.clone(),
            started: plan.started,
            deadline_s: plan.deadline_s,
            root_dev,
            rollback: plan.rollback,
            steps_ms: plan.steps_ms.clone(),
            staged_mono_us: super::monotonic_us(),
        });
        write_record(&self.run_dir.join(BOOT_NEXT_JSON), &record)
    }

    /// Starts the trial's guard ([`crate::service::guard`]): a copy of this agent under
    /// `/run` (so it holds nothing of the root it leaves), in a transient unit a soft reboot
    /// leaves running. A trial nothing could bring back
    /// is not entered: without the guard the staging fails.
    async fn start_guard(&self, txn: &str) -> Result<(), String> {
        let dir = self.run_dir.join("guard");
        let exe = dir.join("ironroot-agent");
        let partial = dir.join("ironroot-agent.partial");
        let copied = std::fs::create_dir_all(&dir)
            .and_then(|()| std::fs::copy("/proc/self/exe", &partial))
            .and_then(|_| std::fs::set_permissions(&partial, std::os::unix::fs::PermissionsExt::from_mode(0o700)))
            .and_then(|()| std::fs::rename(&partial, &exe));
        copied.map_err(|e| format!("copying the agent for the trial guard to {}: {e}", exe.display()))?;
        let argv: Vec<String> = [exe.to_string_lossy().as_ref(), "guard", "--run-dir"]
            .into_iter()
            .map(str::to_owned)
            .chain([self.run_dir.to_string_lossy().into_owned(), "--txn".to_owned(), txn.to_owned()])
            .collect();
        let unit = crate::service::guard::unit_name(txn);
        let systemd = self.systemd().await.map_err(|e| describe(&e))?;
        systemd
            .start_survivor(&unit, "ironroot trial guard: goes back if the trial root never ends its trial", &argv)
            .await
            .map_err(|e| format!("starting the trial guard: {}", describe(&e)))?;
        tracing::info!(%unit, "the trial guard started");
        Ok(())
    }

    /// The trial passed: the root's serial floors rise, its record loses the trial and the
    /// previous root's record goes.
    pub(super) async fn commit_root(&self, modules: &[ModuleInfo]) -> Result<(), String> {
        // Floors first: once the trial is off the record, a restart does not come back here.
        let mut floors = Ok(());
        for m in modules {
            match self.verified(m).await {
                Ok(v) => {
                    floors = floors.and(self.store().and_then(|s| {
                        crate::modules::raise_floors(s, std::slice::from_ref(&v)).map_err(|e| describe(&e))
                    }));
                }
                Err(e) => floors = floors.and(Err(e)),
            }
        }
        // The trial ends whatever the floors say: the root passed its gate.
        let mut record = crate::service::read_record(&self.run_dir).map_err(|e| describe(&e))?;
        record.trial = None;
        write_record(&self.run_dir.join(BOOT_JSON), &record)?;
        if let Err(e) = std::fs::remove_file(self.run_dir.join(BOOT_PREV_JSON)) {
            tracing::debug!(error = %e, "boot.prev.json was already gone");
        }
        floors
    }

    /// The trial failed: stages the root it replaced, to soft-reboot back into.
    pub(super) async fn stage_previous_root(&self, txn: &str, started: u64) -> Result<(), String> {
        let path = self.run_dir.join(BOOT_PREV_JSON);
        let bytes = crate::external::read(&path, MAX_RECORD, crate::external::Links::Refuse)
            .map_err(|e| format!("the previous root's record: {}", describe(&e)))?;
        let previous: BootRecord =
            serde_json::from_slice(&bytes).map_err(|e| format!("{} does not parse: {e}", path.display()))?;
        self.stage_record(&previous, txn, started).await
    }

    /// Stages the root `previous` ran (its root and `usr` modules, its generation) to go back
    /// into from the trial of `txn`.
    pub async fn stage_record(&self, previous: &BootRecord, txn: &str, started: u64) -> Result<(), String> {
        let modules = crate::service::replay::running(previous);
        let plan =
            TrialPlan { txn: txn.to_owned(), started, deadline_s: 0, rollback: true, steps_ms: Default::default() };
        self.stage_root(&modules, Some(previous.generation), &plan).await
    }

    /// A soft reboot that did not begin: nothing staged may be entered by a later reboot.
    pub(super) fn discard_next(&self) {
        discard_at(&self.root.join(NEXTROOT), &self.run_dir);
    }
}

/// Detaches a staged root and removes its record.
fn discard_at(next: &Path, run_dir: &Path) {
    while is_mount_point(next) {
        if let Err(e) = rustix::mount::unmount(next, UnmountFlags::DETACH | UnmountFlags::NOFOLLOW) {
            tracing::warn!(path = %next.display(), error = %e, "could not detach a staged root");
            break;
        }
    }
    // Absent when nothing was staged; a leftover would only be discarded by the next start.
    let _ignored = std::fs::remove_file(run_dir.join(BOOT_NEXT_JSON));
}

fn write_record(path: &Path, record: &BootRecord) -> Result<(), String> {
    let bytes = serde_json::to_vec_pretty(record).map_err(|e| e.to_string())?;
    crate::run_state::write_private(path, &bytes).map_err(|e| format!("writing {}: {e}", path.display()))
}

/// Whether `path` is where a filesystem is mounted (its device differs from its parent's, or
/// it is a bind of the same one: then mountinfo is asked).
fn is_mount_point(path: &Path) -> bool {
    let (Ok(here), Some(Ok(parent))) = (std::fs::metadata(path), path.parent().map(std::fs::metadata)) else {
        return false;
    };
    if here.dev() != parent.dev() {
        return true;
    }
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return false };
    let want = path.to_string_lossy();
    info.lines().any(|l| l.split(' ').nth(4).is_some_and(|m| m == want))
}

/// What the service finds at start about a root staged for a soft reboot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Promotion {
    /// This root is the staged one: its record is now `boot.json`.
    Entered,
    /// A root was staged and not entered (the soft reboot did not happen): discarded. With
    /// the modules it would have run.
    NotEntered(TrialRecord, Vec<ModuleInfo>),
}

/// Makes `boot.next.json` this root's record when this root (`root`, `/`) is the one it was
/// written for; discards it otherwise. Entering a trial root keeps the replaced record as
/// `boot.prev.json`; entering a rollback root drops both the trial and that record.
pub fn promote(run_dir: &Path, root: &Path) -> Option<Promotion> {
    let next = run_dir.join(BOOT_NEXT_JSON);
    let Ok(bytes) = crate::external::read(&next, 1024 * 1024, crate::external::Links::Refuse) else {
        // A root staged by a service stopped before it wrote the record: not to be entered.
        discard_at(&root.join(NEXTROOT), run_dir);
        return None;
    };
    let record: Option<BootRecord> = serde_json::from_slice(&bytes).ok();
    let Some(mut record) = record.filter(|r| r.trial.is_some()) else {
        tracing::warn!(path = %next.display(), "a staged root's record that does not parse: discarded");
        discard_at(&root.join(NEXTROOT), run_dir);
        return None;
    };
    let trial = record.trial.clone()?;
    let here = std::fs::metadata(root).map(|m| m.dev()).unwrap_or(0);
    if here != trial.root_dev {
        discard_at(&root.join(NEXTROOT), run_dir);
        return Some(Promotion::NotEntered(trial, crate::service::replay::running(&record)));
    }
    let promoted = if trial.rollback {
        record.trial = None;
        // The root gone back from replaced this one's record: nothing of it is needed.
        let _ignored = std::fs::remove_file(run_dir.join(BOOT_PREV_JSON));
        write_record(&run_dir.join(BOOT_JSON), &record)
            .and_then(|()| std::fs::remove_file(&next).map_err(|e| format!("removing {}: {e}", next.display())))
    } else {
        // Copied, then replaced by rename: boot.json is never missing, and a service
        // stopped in between promotes again.
        crate::external::read(&run_dir.join(BOOT_JSON), MAX_RECORD, crate::external::Links::Refuse)
            .map_err(std::io::Error::other)
            .and_then(|b| crate::run_state::write_private(&run_dir.join(BOOT_PREV_JSON), &b))
            .and_then(|()| std::fs::rename(&next, run_dir.join(BOOT_JSON)))
            .map_err(|e| format!("promoting {}: {e}", next.display()))
    };
    if let Err(e) = promoted {
        tracing::error!(error = %e, "promoting the staged root's record");
    }
    Some(Promotion::Entered)
}
