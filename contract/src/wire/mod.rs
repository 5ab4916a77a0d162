//! The plane API's wire types (HTTP/JSON), shared by the reference plane and the agent.
//! docs/interfaces/plane-api.md is the prose form of this file. Unknown fields are refused on
//! requests so a typo is an error, not a silently ignored setting.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::digest::OciDigest;

mod journal;
mod node;
mod receipt;
mod task;

pub use journal::{
    AuditBatch, CheckpointError, JournalCheckpoint, MAX_CHECKPOINT, NodeAuditRecord, RecordError, valid_kind,
};
pub use node::{BootPhase, Intent, MAX_ID, NodeId, NodeState, ReportPhase, TaskId, valid_id};
pub use receipt::{Health, ModuleVersion, Outcome, RECEIPT_KIND, Receipt};
pub use task::{KINDS, Task, TaskOutcome, TaskResult, TaskSpec};

/// Largest request body the plane reads.
pub const MAX_BODY: usize = 64 * 1024;

/// What a node says about itself when it enrolls; every field optional, each bounded.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smbios_uuid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    pub token: String,
    /// PKCS#10 CSR, PEM.
    pub csr: String,
    #[serde(default)]
    pub identity: Identity,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnrollResponse {
    pub node_id: NodeId,
    /// The node certificate followed by the plane CA certificate, PEM.
    pub certificate: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    pub csr: String,
}

/// Handshake (once per boot) and heartbeat (periodic) carry the same report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeReport {
    pub boot_id: String,
    pub agent_version: String,
    /// Boot phase (`discover`, `enroll`, …), `ready` once the agent runs under systemd and its
    /// health gate passed, `failed:<phase>` after a failed boot.
    pub phase: ReportPhase,
    #[serde(default)]
    pub phase_timings_ms: BTreeMap<String, u64>,
    #[serde(default)]
    pub module_digests: Vec<OciDigest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reconcile: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe_summary: Option<String>,
    /// Object store kind and whether the kernel enforces verity (`zram+verity`,
    /// `tmpfs-insecure`, `dir`): an insecure store shows in every report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
    /// Why the boot failed, when `phase` is `failed:<phase>` (≤ 2 KiB); the plane keeps it
    /// until the next report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What the agent service itself uses, read at each report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentUsage>,
}

/// The agent process's own footprint: resident memory and CPU time used since it started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentUsage {
    pub rss_kib: u64,
    pub cpu_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportResponse {
    pub node_id: NodeId,
    pub state: NodeState,
    /// Desired-state generation; fetch `desired` when it changes.
    pub generation: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredModule {
    pub name: String,
    /// `registry/repository@sha256:…`
    pub reference: String,
    pub digest: OciDigest,
    pub serial: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredState {
    pub generation: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    pub modules: Vec<DesiredModule>,
    /// Node intents: `drain`, `vet`, …
    #[serde(default)]
    pub intents: Vec<Intent>,
    /// Seconds a root entered by soft reboot has to pass its health gate (the template's;
    /// absent: the node's default, 300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trial_deadline_s: Option<u64>,
}

/// Every error body: a short machine code and a message naming what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    pub message: String,
}

/// The SAN URI prefix of node certificates: `urn:ironroot:node:<node id>`.
pub const NODE_URI_PREFIX: &str = "urn:ironroot:node:";
/// The SAN URI prefix of operator certificates: `urn:ironroot:operator:<name>`.
pub const OPERATOR_URI_PREFIX: &str = "urn:ironroot:operator:";
