//! What a starting service reads back: the finished tasks and the open transaction from the
//! node journal, and the live modules an earlier run of this service left attached
//! (`live.json`, rewritten at every change) — so a `kill -9` and systemd's restart resume
//! where the agent stopped.

use std::path::Path;

use ironroot_contract::run_state::BootRecord;
use ironroot_contract::wire::{DesiredModule, RECEIPT_KIND, TaskId, TaskResult};

use super::journal::Record;
use super::rollout::{ModuleInfo, OpenTxn, Step};
use super::tasks::FINISHED_KIND;

/// The live modules of this boot, by name (written by the service after every change).
pub const LIVE_FILE: &str = "live.json";
/// Largest `live.json` read (a few hundred bytes per module).
const MAX_LIVE: u64 = 1 << 20;

/// Finished tasks, oldest first.
pub fn finished_tasks(records: &[Record]) -> Vec<(TaskId, TaskResult)> {
    records
        .iter()
        .filter(|r| r.kind == FINISHED_KIND)
        .filter_map(|r| {
            let id: TaskId = serde_json::from_value(r.data.get("task")?.clone()).ok()?;
            let result: TaskResult = serde_json::from_value(r.data.get("result")?.clone()).ok()?;
            Some((id, result))
        })
        .collect()
}

/// The module transaction the journal shows started and not ended by a receipt, if any.
/// Only attach/update transactions are resumed (a detach or a root change left open is done
/// again, or not, by the next reconcile).
pub fn open_txn(records: &[Record]) -> Option<OpenTxn> {
    let mut open: Option<OpenTxn> = None;
    for r in records {
        let txn = r.data.get("txn").and_then(|t| t.as_str());
        match r.kind.as_str() {
            "txn" => {
                let step: Step = serde_json::from_value(r.data.get("step")?.clone()).ok()?;
                if step == Step::Planned {
                    let to: Option<ModuleInfo> = r.data.get("to").and_then(|v| serde_json::from_value(v.clone()).ok());
                    let from: Option<ModuleInfo> =
                        r.data.get("from").and_then(|v| serde_json::from_value(v.clone()).ok());
                    let id = txn?.to_owned();
                    open = to.map(|to| OpenTxn { id, step, to, from, started: r.time });
                } else if let Some(o) = open.as_mut().filter(|o| Some(o.id.as_str()) == txn) {
                    o.step = step;
                }
            }
            k if k == RECEIPT_KIND => {
                let ended = r.data.get("transaction").and_then(|t| t.as_str());
                if open.as_ref().is_some_and(|o| Some(o.id.as_str()) == ended) {
                    open = None;
                }
            }
            _ => {}
        }
    }
    open
}

/// Digests whose last receipt in the journal is not `committed` (failed or rolled back).
pub fn refused(records: &[Record]) -> Vec<ironroot_contract::OciDigest> {
    let mut last = std::collections::BTreeMap::new();
    for r in records.iter().filter(|r| r.kind == RECEIPT_KIND) {
        let Ok(receipt) = serde_json::from_value::<ironroot_contract::wire::Receipt>(r.data.clone()) else { continue };
        if let Some(wanted) = receipt.wanted {
            last.insert(wanted, receipt.outcome);
        }
    }
    last.into_iter().filter(|(_, o)| *o != ironroot_contract::wire::Outcome::Committed).map(|(d, _)| d).collect()
}

/// The modules of `new` that `old` does not run, each with the module of the same name it
/// replaces (none for a new one).
pub fn changed(new: &[ModuleInfo], old: &[ModuleInfo]) -> Vec<(Option<ModuleInfo>, ModuleInfo)> {
    new.iter()
        .filter(|n| old.iter().all(|o| o.digest != n.digest))
        .map(|n| (old.iter().find(|o| o.name == n.name).cloned(), n.clone()))
        .collect()
}

/// What this boot runs and what the service must attach: the boot's root and `usr` modules
/// run; live modules come from `live.json` when an earlier run wrote it, else from the boot.
pub fn startup(record: &BootRecord, run_dir: &Path) -> (Vec<ModuleInfo>, Vec<DesiredModule>) {
    let running = running(record);
    let live: Option<Vec<ModuleInfo>> =
        crate::external::read_if_present(&run_dir.join(LIVE_FILE), MAX_LIVE, crate::external::Links::Refuse)
            .ok()
            .flatten()
            .and_then(|b| serde_json::from_slice(&b).ok());
    let attach = match live {
        Some(live) => live.iter().map(ModuleInfo::pinned).collect(),
        None => record
            .modules
            .iter()
            .filter(|m| m.role.is_live())
            .filter_map(|m| {
                Some(DesiredModule {
                    name: m.name.clone(),
                    reference: m.reference.clone()?,
                    digest: m.digest,
                    serial: m.serial,
                })
            })
            .collect(),
    };
    (running, attach)
}

/// The root and `usr` modules a boot record says run.
pub fn running(record: &BootRecord) -> Vec<ModuleInfo> {
    record
        .modules
        .iter()
        .filter(|m| !m.role.is_live())
        .map(|m| ModuleInfo {
            name: m.name.clone(),
            reference: m.reference.clone().unwrap_or_else(|| format!("booted@{}", m.digest)),
            digest: m.digest,
            composefs: m.composefs_digest,
            version: m.version.clone(),
            serial: m.serial,
            role: m.role,
            mount_point: None,
            units: m.units.clone(),
            health: None,
        })
        .collect()
}

/// Rewrites `live.json` with the live modules (by rename).
pub fn write_live(run_dir: &Path, live: &[&ModuleInfo]) -> std::io::Result<()> {
    let json = serde_json::to_vec_pretty(live).unwrap_or_default();
    ironroot_oci::layout::write_atomic(&run_dir.join(LIVE_FILE), &json)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(seq: u64, kind: &str, data: serde_json::Value) -> Record {
        Record { seq, time: 100 + seq, kind: kind.into(), data, prev: String::new(), hash: String::new() }
    }

    fn module(serial: u64) -> serde_json::Value {
        serde_json::json!({
            "name": "hello", "reference": "r/hello@sha256:00", "digest": format!("sha256:{}", "0".repeat(64)),
            "composefs": "0".repeat(64), "version": "1", "serial": serial, "role": "opt",
            "mount_point": "/opt/hello", "units": ["hello.service"],
        })
    }

    #[test]
    fn the_last_transaction_without_a_receipt_is_open_at_its_last_step() {
        let records = vec![
            rec(1, "txn", serde_json::json!({"txn": "x-1", "step": "planned", "to": module(2), "from": null})),
            rec(2, "receipt", serde_json::json!({"transaction": "x-1"})),
            rec(3, "txn", serde_json::json!({"txn": "x-2", "step": "planned", "to": module(3), "from": module(2)})),
            rec(4, "txn", serde_json::json!({"txn": "x-2", "step": "staged"})),
            rec(5, "txn", serde_json::json!({"txn": "x-2", "step": "attached", "units": []})),
            rec(6, "task.finished", serde_json::json!({"task": "t-1", "result": {"outcome": "succeeded"}})),
        ];
        let open = open_txn(&records).unwrap();
        assert_eq!((open.id.as_str(), open.step, open.to.serial), ("x-2", Step::Attached, 3));
        assert_eq!(open.from.map(|f| f.serial), Some(2));
        assert_eq!(open.started, 103);
        assert!(open_txn(&records[..2]).is_none(), "ended by its receipt");
        let tasks = finished_tasks(&records);
        assert_eq!(tasks.len(), 1);
        assert_eq!(tasks[0].0.as_str(), "t-1");
    }

    #[test]
    fn a_digest_is_refused_when_its_last_receipt_did_not_commit() {
        let d = |n: u8| format!("sha256:{}", format!("{n:02x}").repeat(32));
        let receipt = |wanted: &str, outcome: &str| {
            serde_json::json!({"transaction": "x", "module": "hello", "wanted": wanted, "units": [],
                "started": 1, "finished": 2, "outcome": outcome, "agent_version": "0.1.0"})
        };
        let records = vec![
            rec(1, "receipt", receipt(&d(1), "rolled-back")),
            rec(2, "receipt", receipt(&d(2), "failed")),
            rec(3, "receipt", receipt(&d(1), "committed")),
            rec(4, "receipt", receipt(&d(3), "committed")),
        ];
        let refused: Vec<String> = refused(&records).iter().map(|d| d.to_string()).collect();
        assert_eq!(refused, [d(2)], "committed later, or committed: not refused");
    }
}
