//! The long jobs of the rollout machine, carried out: verifying a module into the store,
//! staging a live module as a detached mount, attaching it (the swap, its units linked,
//! reloaded and (re)started), the health gate, commit (serial floor), restore and detach. Each
//! takes a [`Job`] and answers with its [`JobDone`]; errors become the `Err` text the receipt
//! carries. Blocking mount calls run on the blocking pool.

mod attach;
mod gate;
pub mod nextroot;
mod units;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use ironroot_contract::wire::DesiredModule;
use ironroot_contract::{OciDigest, TrustedKey};
use ironroot_oci::VerifiedModule;

use super::rollout::{Job, JobDone, ModuleInfo};
use super::systemd::{Systemd, SystemdError};
use crate::modules::{self, FetchPolicy};
use crate::root::extension::Prepared;
use crate::store::PreparedStore;

/// Where the jobs act, and what they keep between steps of a transaction.
pub struct Runner {
    pub run_dir: PathBuf,
    /// The root the mount points are under (`/`).
    pub root: PathBuf,
    /// Where module units are linked (`/run/systemd/system`).
    pub units_dir: PathBuf,
    /// The boot's store, when it could be opened again (else module jobs fail, saying why).
    pub store: Result<PreparedStore, String>,
    pub trust: Vec<TrustedKey>,
    pub policy: FetchPolicy,
    /// Verified modules by digest, from `Verify` until the transaction that uses them ends.
    verified: Mutex<HashMap<OciDigest, VerifiedModule>>,
    /// Detached mounts staged by transaction id (dropped, and so unmounted, if never attached).
    staged: Mutex<HashMap<String, Prepared>>,
    systemd: tokio::sync::OnceCell<Systemd>,
}

impl std::fmt::Debug for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner").field("run_dir", &self.run_dir).field("root", &self.root).finish_non_exhaustive()
    }
}

fn wall_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Runner {
    pub fn new(
        run_dir: PathBuf,
        store: Result<PreparedStore, String>,
        trust: Vec<TrustedKey>,
        policy: FetchPolicy,
    ) -> Self {
        Self {
            run_dir,
            root: PathBuf::from("/"),
            units_dir: PathBuf::from("/run/systemd/system"),
            store,
            trust,
            policy,
            verified: Mutex::default(),
            staged: Mutex::default(),
            systemd: tokio::sync::OnceCell::new(),
        }
    }

    /// The system manager, connected on first use (a service outside systemd has none).
    async fn systemd(&self) -> Result<&Systemd, SystemdError> {
        self.systemd.get_or_try_init(Systemd::connect).await
    }

    fn store(&self) -> Result<&PreparedStore, String> {
        self.store.as_ref().map_err(|e| format!("the object store is not usable: {e}"))
    }

    pub async fn run(&self, job: Job) -> JobDone {
        match job {
            Job::Verify { module } => {
                let name = module.name.clone();
                JobDone::Verified { name, result: self.verify(&module).await }
            }
            Job::Stage { txn, to } => {
                let result = self.stage(&txn, &to).await;
                JobDone::Staged { txn, result }
            }
            Job::Attach { txn, to, from } => {
                let result = self.attach(&txn, &to, from.as_ref()).await;
                JobDone::Attached { txn, result }
            }
            Job::Gate { txn, module } => {
                let health = self.gate(&module).await;
                JobDone::Gated { txn, health }
            }
            Job::Commit { txn, to, from } => {
                let result = self.commit(&txn, &to, from.as_ref());
                JobDone::Committed { txn, result }
            }
            Job::Restore { txn, to, from } => {
                let result = self.restore(&txn, &to, from.as_ref()).await;
                JobDone::Restored { txn, result }
            }
            Job::Detach { txn, module } => {
                let result = self.detach(&module).await;
                JobDone::Detached { txn, result }
            }
            Job::StageRoot { txn, modules, generation, started, deadline_s, verify_ms } => {
                let steps_ms = (verify_ms > 0).then(|| ("verify".to_owned(), verify_ms)).into_iter().collect();
                let plan = nextroot::TrialPlan { txn: txn.clone(), started, deadline_s, rollback: false, steps_ms };
                let result = self.stage_root(&modules, generation, &plan).await;
                JobDone::RootStaged { txn, result }
            }
            Job::GateRoot { txn, units, deadline } => {
                let left = deadline.saturating_sub(wall_now());
                let health = self.gate_units(&units, tokio::time::Instant::now() + Duration::from_secs(left)).await;
                JobDone::Gated { txn, health }
            }
            Job::CommitRoot { txn, modules } => {
                let result = self.commit_root(&modules).await;
                JobDone::Committed { txn, result }
            }
            Job::StagePrevious { txn, started } => {
                let result = self.stage_previous_root(&txn, started).await;
                JobDone::RootStaged { txn, result }
            }
            Job::Power(op) => {
                let begun = match self.systemd().await {
                    Ok(s) => s.power(op).await.map_err(|e| crate::exit::describe(&e)),
                    Err(e) => Err(crate::exit::describe(&e)),
                };
                match begun {
                    Ok(()) => JobDone::PowerBegun,
                    Err(why) => {
                        self.discard_next();
                        JobDone::PowerFailed(why)
                    }
                }
            }
        }
    }

    /// Verifies one module into the store: the whole trust chain, offline from the store's
    /// evidence when it can, the serial floor read (raised only at commit).
    async fn verify(&self, module: &DesiredModule) -> Result<ModuleInfo, String> {
        let store = self.store()?;
        let verified = modules::verify(std::slice::from_ref(module), store, &self.trust, &self.policy)
            .await
            .map_err(|e| crate::exit::describe(&e))?;
        let v = verified.into_iter().next().ok_or("nothing verified")?;
        let c = v.config();
        let info = ModuleInfo {
            name: c.name.clone(),
            reference: module.reference.clone(),
            digest: v.digest(),
            composefs: c.composefs_digest,
            version: c.version.clone(),
            serial: c.serial,
            role: c.role,
            mount_point: c.mount_point(),
            units: c.units.clone(),
            health: c.health.clone(),
        };
        if !module.name.is_empty() && module.name != info.name {
            return Err(format!("the plane names it {:?} but its signed config says {:?}", module.name, info.name));
        }
        if info.role.is_live() && info.mount_point.is_none() {
            return Err(format!("{} is an ext module without a mount point", info.name));
        }
        self.verified.lock().unwrap_or_else(|e| e.into_inner()).insert(info.digest, v);
        Ok(info)
    }

    /// The verified module for `info`, verifying it again (offline) when this run has not.
    async fn verified(&self, info: &ModuleInfo) -> Result<VerifiedModule, String> {
        if let Some(v) = self.verified.lock().unwrap_or_else(|e| e.into_inner()).get(&info.digest) {
            return Ok(v.clone());
        }
        self.verify(&info.pinned()).await?;
        self.verified.lock().unwrap_or_else(|e| e.into_inner()).get(&info.digest).cloned().ok_or("not verified".into())
    }

    /// Raises the serial floor of `to` and lets go of what the transaction kept.
    fn commit(&self, txn: &str, to: &ModuleInfo, from: Option<&ModuleInfo>) -> Result<(), String> {
        self.staged.lock().unwrap_or_else(|e| e.into_inner()).remove(txn);
        let verified = self.verified.lock().unwrap_or_else(|e| e.into_inner()).remove(&to.digest);
        if let Some(from) = from.filter(|f| f.digest != to.digest) {
            attach::release_layer(&self.run_dir, from);
        }
        let store = self.store()?;
        match verified {
            Some(v) => modules::raise_floors(store, &[v]).map_err(|e| crate::exit::describe(&e)),
            None => Ok(()),
        }
    }
}

/// CLOCK_MONOTONIC in µs: the clock of systemd's `*TimestampMonotonic` properties, and one a
/// soft reboot does not reset (the kernel runs on).
pub(crate) fn monotonic_us() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    (t.tv_sec as u64) * 1_000_000 + (t.tv_nsec as u64) / 1_000
}
