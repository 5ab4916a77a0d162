//! The rollout machine's long jobs, which the shell carries out (`service::jobs`), and what
//! each answers.

use ironroot_contract::wire::{DesiredModule, Health};

use super::ModuleInfo;
use crate::service::systemd::PowerOp;

/// A long job the shell runs; it answers with the matching [`JobDone`].
#[derive(Debug, Clone, PartialEq)]
pub enum Job {
    /// Verify one module into the store (offline from evidence when it can).
    Verify {
        module: DesiredModule,
    },
    /// Mount the new version, detached.
    Stage {
        txn: String,
        to: ModuleInfo,
    },
    /// Put it in place of `from` (or first), link its units, reload, (re)start them.
    Attach {
        txn: String,
        to: ModuleInfo,
        from: Option<ModuleInfo>,
    },
    /// Units active and settled, then the module's own probe.
    Gate {
        txn: String,
        module: ModuleInfo,
    },
    /// Raise its serial floor; let go of the old version's layer.
    Commit {
        txn: String,
        to: ModuleInfo,
        from: Option<ModuleInfo>,
    },
    /// Make `from` the live version again (nothing, when there was none), units restarted.
    Restore {
        txn: String,
        to: ModuleInfo,
        from: Option<ModuleInfo>,
    },
    /// Stop its units, unlink them, unmount it.
    Detach {
        txn: String,
        module: ModuleInfo,
    },
    /// Assemble the new root (root + usr layers) at /run/nextroot, its record beside it.
    StageRoot {
        txn: String,
        modules: Vec<ModuleInfo>,
        generation: Option<u64>,
        started: u64,
        deadline_s: u64,
        /// The transaction's verification before it (ms), carried across the soft reboot.
        verify_ms: u64,
    },
    /// A root on trial: every unit of its modules (and of the live ones) active and settled
    /// before `deadline` (seconds since the epoch).
    GateRoot {
        txn: String,
        units: Vec<String>,
        deadline: u64,
    },
    /// The trial passed: serial floors, the trial taken off the record.
    CommitRoot {
        txn: String,
        modules: Vec<ModuleInfo>,
    },
    /// The trial failed: assemble the root it replaced at /run/nextroot.
    StagePrevious {
        txn: String,
        started: u64,
    },
    Power(PowerOp),
}

// One at a time, short-lived: boxing the large variants would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum JobDone {
    Verified {
        name: String,
        result: Result<ModuleInfo, String>,
    },
    Staged {
        txn: String,
        result: Result<(), String>,
    },
    /// The units (re)started.
    Attached {
        txn: String,
        result: Result<Vec<String>, String>,
    },
    Gated {
        txn: String,
        health: Health,
    },
    Committed {
        txn: String,
        result: Result<(), String>,
    },
    Restored {
        txn: String,
        result: Result<(), String>,
    },
    /// The units stopped.
    Detached {
        txn: String,
        result: Result<Vec<String>, String>,
    },
    /// A new root, or the previous one, is at /run/nextroot.
    RootStaged {
        txn: String,
        result: Result<(), String>,
    },
    /// The soft reboot or reboot began (this userspace is ending).
    PowerBegun,
    /// The soft reboot or reboot could not begin.
    PowerFailed(String),
}
