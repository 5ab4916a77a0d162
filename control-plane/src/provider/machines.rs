//! The machines this plane started (or, recording, would have): one entry per node name, and for
//! each running QEMU a supervisor task that owns the child process. A machine is ended only by
//! its own PID (and the process group it was started in: `timeout` and its QEMU), never by name.
//!
//! Power-off: SIGTERM to the `timeout` process, which hands it to QEMU (QEMU exits at once, like
//! a pulled plug; `timeout` kills it 10 s later if not); after [`POWER_OFF_GRACE`] the group gets
//! SIGKILL. A QEMU that dies by a signal before the guest printed our init's first line (an
//! emulator fault: TCG has aborted a handful of times in CI while the guest kernel probed PCI)
//! is started again once, as the VM tier does: nothing of ours ran, so nothing is hidden.

use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt as _;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rustix::process::{Pid, Signal, kill_process, kill_process_group};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;

use crate::server::Plane;
use crate::store::Refusal;

/// How long a machine has to end after SIGTERM before its process group is killed.
pub const POWER_OFF_GRACE: Duration = Duration::from_secs(15);

/// The line PID 1 of our initramfs prints first: before it, nothing of ours has run.
const AGENT_STARTED: &str = "ironroot: initramfs agent starting";

/// How a machine ended, as the journal and the operator see it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case", tag = "how")]
pub enum Ended {
    /// Recorded only: no process ran.
    Recorded,
    /// Powered off by this plane (its exit status).
    PoweredOff { pid: u32, status: String },
    /// It had already ended by itself.
    AlreadyEnded,
}

/// One machine: what its supervisor listens on, if a process runs.
#[derive(Debug)]
struct Entry {
    instance: u64,
    state: EntryState,
}

#[derive(Debug)]
enum EntryState {
    /// Between the name's reservation and its start.
    Reserved,
    Recorded,
    Running {
        stop: oneshot::Sender<oneshot::Sender<Ended>>,
    },
}

#[derive(Debug, Default)]
pub struct Machines {
    entries: Mutex<HashMap<String, Entry>>,
    next: AtomicU64,
}

/// A name held while its machine is being provisioned; released on drop unless started.
#[derive(Debug)]
pub struct Reservation<'a> {
    machines: &'a Machines,
    name: String,
    instance: u64,
    kept: bool,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.kept {
            self.machines.remove_if(&self.name, self.instance);
        }
    }
}

/// A machine's process: the argv (`timeout … qemu-system-x86_64 …`), where its output goes, and
/// its identity document (removed when the machine ends: it holds the token).
#[derive(Debug, Clone)]
pub struct Process {
    pub argv: Vec<String>,
    pub console: PathBuf,
    pub stderr: PathBuf,
    pub identity: PathBuf,
}

/// Removes the machine's identity document once no process of it runs (a relaunch reads it).
fn forget_identity(p: &Process) {
    if let Err(e) = std::fs::remove_file(&p.identity)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(path = %p.identity.display(), error = %e, "removing a machine's identity document");
    }
}

/// Killed by a signal, directly or as `timeout` reports it (128 + N; 124 is the lifetime).
fn by_signal(s: ExitStatus) -> bool {
    s.signal().is_some() || s.code().is_some_and(|c| c > 128)
}

fn status_text(s: ExitStatus) -> String {
    match (s.code(), s.signal()) {
        (Some(code), _) => format!("exit {code}"),
        (None, Some(sig)) => format!("signal {sig}"),
        _ => s.to_string(),
    }
}

impl Machines {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        // A panic while holding the map leaves it consistent (every change is one insert or remove).
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn remove_if(&self, name: &str, instance: u64) {
        let mut map = self.lock();
        if map.get(name).is_some_and(|e| e.instance == instance) {
            map.remove(name);
        }
    }

    /// Holds `name` for a provisioning; refused while a machine of that name is known.
    pub fn reserve(&self, name: &str) -> Result<Reservation<'_>, Refusal> {
        let mut map = self.lock();
        if map.contains_key(name) {
            return Err(Refusal::new(
                409,
                "machine_exists",
                format!("a machine named {name:?} is still known to this plane; `node terminate {name}` first"),
            ));
        }
        let instance = self.next.fetch_add(1, Ordering::Relaxed);
        map.insert(name.to_owned(), Entry { instance, state: EntryState::Reserved });
        Ok(Reservation { machines: self, name: name.to_owned(), instance, kept: false })
    }

    /// Keeps the reservation as a recorded machine (recorder mode: no process).
    pub fn record(&self, mut r: Reservation<'_>) {
        r.kept = true;
        if let Some(e) = self.lock().get_mut(&r.name).filter(|e| e.instance == r.instance) {
            e.state = EntryState::Recorded;
        }
    }

    /// Starts the machine's process in its own process group under a supervisor; returns its PID.
    pub fn start(
        &self,
        plane: &Arc<Plane>,
        mut r: Reservation<'_>,
        node_id: &str,
        process: Process,
    ) -> std::io::Result<u32> {
        let child = spawn(&process)?;
        let pid = child.id().ok_or_else(|| std::io::Error::other("the machine ended before it was watched"))?;
        let (stop, stop_rx) = oneshot::channel();
        r.kept = true;
        if let Some(e) = self.lock().get_mut(&r.name).filter(|e| e.instance == r.instance) {
            e.state = EntryState::Running { stop };
        }
        let who = Who { name: r.name.clone(), node_id: node_id.to_owned(), instance: r.instance };
        tokio::spawn(supervise(Arc::clone(plane), who, child, process, stop_rx));
        Ok(pid)
    }

    /// Powers off `name`'s machine (by its PID) and forgets it; `None` if none is known.
    /// Refused while the name is being provisioned.
    pub async fn stop(&self, name: &str) -> Result<Option<Ended>, Refusal> {
        let entry = {
            let mut map = self.lock();
            if map.get(name).is_some_and(|e| matches!(e.state, EntryState::Reserved)) {
                return Err(Refusal::new(409, "machine_busy", format!("{name} is being provisioned; try again")));
            }
            map.remove(name)
        };
        let Some(entry) = entry else { return Ok(None) };
        Ok(Some(match entry.state {
            EntryState::Reserved | EntryState::Recorded => Ended::Recorded,
            EntryState::Running { stop, .. } => {
                let (reply, answer) = oneshot::channel();
                if stop.send(reply).is_err() {
                    return Ok(Some(Ended::AlreadyEnded));
                }
                answer.await.unwrap_or(Ended::AlreadyEnded)
            }
        }))
    }

    /// Powers off every machine (the plane is shutting down); returns what ended.
    pub async fn stop_all(&self) -> Vec<(String, Ended)> {
        let names: Vec<String> = self.lock().keys().cloned().collect();
        let mut ended = Vec::with_capacity(names.len());
        for name in names {
            if let Ok(Some(e)) = self.stop(&name).await {
                ended.push((name, e));
            }
        }
        ended
    }
}

fn spawn(p: &Process) -> std::io::Result<Child> {
    let (program, args) = p.argv.split_first().ok_or_else(|| std::io::Error::other("empty command line"))?;
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&p.stderr)?)
        // Its own group (`timeout` and QEMU): a power-off that needs SIGKILL reaches both.
        .process_group(0)
        .spawn()
}

/// Which machine a supervisor watches.
#[derive(Debug)]
struct Who {
    name: String,
    node_id: String,
    instance: u64,
}

/// Waits for the machine to end or to be told to power off; journals how it ended by itself.
async fn supervise(
    plane: Arc<Plane>,
    who: Who,
    mut child: Child,
    process: Process,
    mut stop: oneshot::Receiver<oneshot::Sender<Ended>>,
) {
    let mut relaunched = false;
    loop {
        let pid = child.id().unwrap_or(0);
        tokio::select! {
            status = child.wait() => {
                let crashed = status.as_ref().is_ok_and(|s| by_signal(*s));
                let status = status.map_or_else(|e| e.to_string(), status_text);
                let console = std::fs::read(&process.console).unwrap_or_default();
                let ours_ran = String::from_utf8_lossy(&console).contains(AGENT_STARTED);
                if crashed && !ours_ran && !relaunched {
                    relaunched = true;
                    match spawn(&process) {
                        Ok(next) => {
                            let why = "QEMU died before the guest ran our init; started again once";
                            let data = serde_json::json!({"pid": pid, "status": status, "next_pid": next.id(), "why": why});
                            journal(&plane, &who, "provider.relaunch", data);
                            child = next;
                            continue;
                        }
                        Err(e) => tracing::warn!(node.name = %who.name, error = %e, "relaunching a machine"),
                    }
                }
                forget_identity(&process);
                plane.provider.machines.remove_if(&who.name, who.instance);
                journal(&plane, &who, "provider.exited", serde_json::json!({"pid": pid, "status": status}));
                return;
            }
            reply = &mut stop => {
                let ended = power_off(&mut child, pid).await;
                forget_identity(&process);
                if let Ok(reply) = reply {
                    // The terminating request may have gone away; the machine is off either way.
                    let _gone = reply.send(ended);
                }
                return;
            }
        }
    }
}

/// SIGTERM to the machine's PID, then SIGKILL to its group after the grace period.
async fn power_off(child: &mut Child, pid: u32) -> Ended {
    let Some(target) = i32::try_from(pid).ok().and_then(Pid::from_raw) else {
        return Ended::AlreadyEnded;
    };
    if let Err(e) = kill_process(target, Signal::TERM) {
        tracing::warn!(pid, error = %e, "SIGTERM to a machine");
    }
    let status = match tokio::time::timeout(POWER_OFF_GRACE, child.wait()).await {
        Ok(status) => status,
        Err(_) => {
            if let Err(e) = kill_process_group(target, Signal::KILL) {
                tracing::warn!(pid, error = %e, "SIGKILL to a machine's process group");
            }
            child.wait().await
        }
    };
    Ended::PoweredOff { pid, status: status.map_or_else(|e| e.to_string(), status_text) }
}

fn journal(plane: &Plane, who: &Who, kind: &str, mut data: serde_json::Value) {
    data["node"] = who.name.as_str().into();
    if let Err(e) = plane.store.journal_provider(super::ACTOR, kind, &who.node_id, &data) {
        tracing::error!(node.name = %who.name, error = %e, "journaling a machine");
    }
}
