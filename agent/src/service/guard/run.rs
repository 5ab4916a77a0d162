//! The guard's shell: follows PID 1 into the root it soft-reboots into, looks at the boot
//! records every few seconds, and carries out [`super::decide`]'s verdict. It talks to systemd
//! on the system bus of the root it is in (systemd's private socket would need no bus daemon,
//! but zbus 5 panics on the messages systemd sends there: measured in the QEMU tier).

use std::path::{Path, PathBuf};
use std::time::Duration;

use ironroot_contract::run_state::{BOOT_JSON, BOOT_NEXT_JSON, BOOT_PREV_JSON, BootRecord};
use ironroot_contract::wire::{Health, Outcome, RECEIPT_KIND, Receipt};
use rustix::fd::OwnedFd;
use rustix::fs::{Mode, OFlags};

use super::{Look, Verdict, decide, fire_at};
use crate::external::{self, Links};
use crate::service::journal::{Journal, JournalError};
use crate::service::replay;
use crate::service::systemd::{PowerOp, Systemd, SystemdError, UnitOp};

/// How often the records are looked at (and PID 1's root compared with ours).
const POLL: Duration = Duration::from_secs(5);
/// The unit whose agent ends a trial.
pub const AGENT_UNIT: &str = "ironroot-agent.service";
/// Largest boot record read.
const MAX_RECORD: u64 = 1024 * 1024;

fn wall_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// `ironroot-agent guard`: the transaction whose trial is guarded.
#[derive(Debug, Clone)]
pub struct GuardOptions {
    pub run_dir: PathBuf,
    pub txn: String,
    /// Seconds past the trial's deadline before the guard acts.
    pub grace: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error("opening /proc (to follow PID 1 into the root it soft-reboots into)")]
    Proc(#[source] std::io::Error),
    #[error("following PID 1 into its root")]
    Follow(#[source] std::io::Error),
    #[error("reading the boot records: {0}")]
    Records(String),
    #[error(transparent)]
    Systemd(Box<SystemdError>),
    #[error("going back to the root before the trial: {0}")]
    Stage(String),
    #[error("journaling the receipt")]
    Journal(#[source] JournalError),
}

impl From<SystemdError> for GuardError {
    fn from(e: SystemdError) -> Self {
        Self::Systemd(Box::new(e))
    }
}

/// Runs until the trial of `opts.txn` ended, or until the guard went back.
pub async fn guard(opts: &GuardOptions) -> Result<(), GuardError> {
    // Kept open across the soft reboot, which moves /proc out of the root this process runs in.
    let proc = rustix::fs::open("/proc", OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
        .map_err(|e| GuardError::Proc(e.into()))?;
    tracing::info!(txn = %opts.txn, grace_s = opts.grace, "the trial guard watches its trial");
    let mut at = None;
    loop {
        follow_pid1(&proc)?;
        let look = look(&opts.run_dir, &opts.txn);
        if let (Some(t), None) = (look.open_trial(), at) {
            let when = fire_at(t, opts.grace);
            tracing::info!(txn = %opts.txn, at = when, in_s = when.saturating_sub(look.now), "the trial guard acts at");
            at = Some(when);
        }
        match decide(&look, at.unwrap_or(0)) {
            Verdict::Wait => tokio::time::sleep(POLL).await,
            Verdict::Done(why) => {
                tracing::info!(txn = %opts.txn, why, "the trial guard has nothing to do");
                return Ok(());
            }
            Verdict::GoBack { .. } | Verdict::Finish => return act(opts).await,
        }
    }
}

/// Enters PID 1's root when it is not ours: after the soft reboot this process still runs in
/// the root it was started in, whose /run, /proc and bus socket have moved to the new one.
fn follow_pid1(proc: &OwnedFd) -> Result<(), GuardError> {
    let follow = |e: rustix::io::Errno| GuardError::Follow(e.into());
    let theirs = rustix::fs::openat(proc, "1/root", OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
        .map_err(follow)?;
    let (a, b) = (rustix::fs::fstat(&theirs).map_err(follow)?, rustix::fs::stat("/").map_err(follow)?);
    if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino) {
        return Ok(());
    }
    rustix::process::fchdir(&theirs).map_err(follow)?;
    rustix::process::chroot(".").map_err(follow)?;
    std::env::set_current_dir("/").map_err(GuardError::Follow)?;
    tracing::info!("followed PID 1 into the root it soft-rebooted into");
    Ok(())
}

fn record_at(path: &Path) -> Result<Option<BootRecord>, String> {
    let bytes = external::read_if_present(path, MAX_RECORD, Links::Refuse)
        .map_err(|e| format!("{}: {}", path.display(), crate::exit::describe(&e)))?;
    bytes.map(|b| serde_json::from_slice(&b).map_err(|e| format!("{} does not parse: {e}", path.display()))).transpose()
}

fn look(run_dir: &Path, txn: &str) -> Look {
    let trial_of = |name: &str| match record_at(&run_dir.join(name)) {
        Ok(r) => r.and_then(|r| r.trial).filter(|t| t.txn == txn),
        Err(e) => {
            tracing::warn!(error = %e, "a boot record the guard cannot read");
            None
        }
    };
    let root_dev = std::fs::metadata("/").map_or(0, |m| std::os::unix::fs::MetadataExt::dev(&m));
    Look { promoted: trial_of(BOOT_JSON), staged: trial_of(BOOT_NEXT_JSON), root_dev, now: wall_now() }
}

/// Stops the agent, looks again (it may have ended the trial meanwhile) and goes back, or
/// finishes a way back the agent staged, or starts the agent again when nothing is left.
async fn act(opts: &GuardOptions) -> Result<(), GuardError> {
    let systemd = Systemd::connect().await?;
    let before = systemd.state(AGENT_UNIT).await?;
    tracing::warn!(txn = %opts.txn, agent = %before.active, "the trial is open past its deadline: stopping the agent");
    systemd.apply(AGENT_UNIT, UnitOp::Stop).await?;
    let look = look(&opts.run_dir, &opts.txn);
    match decide(&look, 0) {
        Verdict::Wait | Verdict::Done(_) => {
            tracing::info!("the trial ended while the agent stopped: starting it again");
            systemd.request_start(AGENT_UNIT).await?;
            Ok(())
        }
        Verdict::Finish => {
            systemd.power(PowerOp::SoftReboot).await?;
            Ok(())
        }
        Verdict::GoBack { promoted } => {
            let agent = (AGENT_UNIT.to_owned(), format!("{} ({})", before.active, before.sub));
            let gone = go_back(opts, &look, promoted, agent).await;
            match gone {
                Ok(()) => systemd.power(PowerOp::SoftReboot).await.map_err(GuardError::from),
                Err(e) => {
                    // Nothing staged: the agent may yet come up and say what it sees.
                    if let Err(start) = systemd.request_start(AGENT_UNIT).await {
                        tracing::error!(error = %crate::exit::describe(&start), "starting the agent again");
                    }
                    Err(e)
                }
            }
        }
    }
}

/// Stages the root before the trial and journals the receipt (`rolled-back`, or `failed`
/// saying why going back failed).
async fn go_back(opts: &GuardOptions, look: &Look, promoted: bool, agent: (String, String)) -> Result<(), GuardError> {
    let records = |e: String| GuardError::Records(e);
    let record = crate::service::read_record(&opts.run_dir).map_err(|e| records(crate::exit::describe(&e)))?;
    let other = |name: &str| {
        record_at(&opts.run_dir.join(name))?.ok_or_else(|| format!("{} is missing", opts.run_dir.join(name).display()))
    };
    let (trial_record, previous) = if promoted {
        (record.clone(), other(BOOT_PREV_JSON).map_err(records)?)
    } else {
        (other(BOOT_NEXT_JSON).map_err(records)?, record.clone())
    };
    let trial = look.open_trial().cloned().ok_or_else(|| records("no open trial".into()))?;

    let runner = crate::service::runner(&record, &opts.run_dir);
    let staged = runner.stage_record(&previous, &opts.txn, trial.started).await;

    let mut reason = format!(
        "the trial root's agent did not end the trial by its deadline ({} s, and {} s more){}: its guard stopped {AGENT_UNIT} and went back to the root before",
        trial.deadline_s,
        opts.grace,
        if promoted { "" } else { " (it never started: the trial root's record was not promoted)" },
    );
    let outcome = match &staged {
        Ok(()) => Outcome::RolledBack,
        Err(e) => {
            reason = format!("{reason}; going back failed: {e}");
            Outcome::Failed
        }
    };
    let changed = replay::changed(&replay::running(&trial_record), &replay::running(&previous));
    let first = changed.first();
    let receipt = Receipt {
        transaction: opts.txn.clone(),
        module: first.map_or_else(|| "root".to_owned(), |(_, to)| to.name.clone()),
        role: first.map(|(_, to)| to.role),
        from: first.and_then(|(from, _)| from.as_ref().map(|f| f.version())),
        to: first.map(|(_, to)| to.version()),
        wanted: first.map(|(_, to)| to.digest),
        units: vec![agent.0.clone()],
        health: Some(Health { healthy: false, units: vec![agent], probe: None }),
        started: trial.started,
        finished: wall_now(),
        outcome,
        reason: Some(reason),
        agent_version: crate::service::agent_version().to_owned(),
        steps_ms: Default::default(),
    };
    journal_receipt(&record, &opts.run_dir, &receipt)?;
    staged.map_err(GuardError::Stage)
}

/// Appends `receipt` to the node journal unless the agent journaled one for its transaction
/// (it writes its own before staging the way back).
fn journal_receipt(record: &BootRecord, run_dir: &Path, receipt: &Receipt) -> Result<(), GuardError> {
    let dir = crate::service::journal_dir(record, run_dir);
    let mut journal = Journal::open(&dir, crate::service::JOURNAL_LIMIT, wall_now().saturating_mul(1_000_000))
        .map_err(GuardError::Journal)?;
    let written = journal.replay().iter().any(|r| {
        r.kind == RECEIPT_KIND
            && r.data.get("transaction").and_then(|t| t.as_str()) == Some(receipt.transaction.as_str())
    });
    if written {
        return Ok(());
    }
    let data = serde_json::to_value(receipt).map_err(|e| GuardError::Records(e.to_string()))?;
    journal.append(receipt.finished, RECEIPT_KIND, data).map_err(GuardError::Journal)?;
    Ok(())
}
