//! Receipts: the record every module change leaves, applied, failed or rolled back. The node
//! keeps each in its journal (kind [`RECEIPT_KIND`], the receipt as the record's data) and the
//! plane receives it with the rest of the journal, in order.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::config::MountRole;
use crate::digest::{OciDigest, VerityDigest};

/// The node-journal record kind that carries a receipt.
pub const RECEIPT_KIND: &str = "receipt";

/// One side of a change: what a module was, or became.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModuleVersion {
    pub version: String,
    pub serial: u64,
    /// The manifest digest (what the plane pins).
    pub digest: OciDigest,
    pub composefs_digest: VerityDigest,
}

/// How a change ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// The new version passed its health gate and is now the module (its serial floor rose).
    Committed,
    /// The new version was attached, failed its health gate, and the old one is back.
    RolledBack,
    /// Nothing changed on the node: the new version was refused before it was attached.
    Failed,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Committed => "committed",
            Self::RolledBack => "rolled-back",
            Self::Failed => "failed",
        })
    }
}

/// What the health gate found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Health {
    pub healthy: bool,
    /// Each unit and the state it was in when the gate decided (`active`, `failed`, …).
    #[serde(default)]
    pub units: Vec<(String, String)>,
    /// The module's own probe, if it declares one: what ran and how it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Receipt {
    /// The transaction this receipt closes (unique per node).
    pub transaction: String,
    /// The module name.
    pub module: String,
    /// Absent when the change failed before the module's signed config was read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<MountRole>,
    /// Absent for a first attach.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<ModuleVersion>,
    /// Absent for a detach.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<ModuleVersion>,
    /// The digest the plane asked for, also when the change failed before `to` was known (a
    /// module refused at verification): what a rollout halts on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wanted: Option<OciDigest>,
    /// Units restarted (or started, or stopped) by the change.
    #[serde(default)]
    pub units: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<Health>,
    /// Seconds since the epoch, the node's clock.
    pub started: u64,
    pub finished: u64,
    pub outcome: Outcome,
    /// Why it failed or was rolled back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub agent_version: String,
    /// Milliseconds spent on each part of the change, as far as this agent saw it: `verify`
    /// (fetching and verifying the new version into the store), `stage` (mounting it detached,
    /// or assembling a new root), `swap` (the atomic swap and the units restarted), `gate` (the
    /// health gate), `commit` (serial floors), `restore` (going back).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub steps_ms: BTreeMap<String, u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_receipt_round_trips_and_names_its_outcome_in_kebab_case() {
        let v = |serial| ModuleVersion {
            version: format!("1.{serial}"),
            serial,
            digest: format!("sha256:{}", "ab".repeat(32)).parse().unwrap(),
            composefs_digest: "cd".repeat(32).parse().unwrap(),
        };
        let r = Receipt {
            transaction: "x-1".into(),
            module: "hello".into(),
            role: Some(MountRole::Opt),
            from: Some(v(1)),
            to: Some(v(2)),
            wanted: Some(v(2).digest),
            units: vec!["hello.service".into()],
            health: Some(Health {
                healthy: false,
                units: vec![("hello.service".into(), "failed".into())],
                probe: None,
            }),
            started: 10,
            finished: 20,
            outcome: Outcome::RolledBack,
            reason: Some("hello.service failed".into()),
            agent_version: "0.1.0".into(),
            steps_ms: [("verify".to_owned(), 812), ("gate".to_owned(), 30_004)].into(),
        };
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["outcome"], "rolled-back");
        assert_eq!(json["steps_ms"]["gate"], 30_004);
        assert_eq!(serde_json::from_value::<Receipt>(json).unwrap(), r);
    }
}
