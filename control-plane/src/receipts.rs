//! Receipts: every module change a node applies, fails or rolls back ends in one, kept in the
//! node's journal (kind `receipt`) and sent with it. The plane reads each such record as a
//! [`Receipt`] — a batch holding one that does not parse is refused whole — keeps it beside
//! the journal record (same transaction), and hands it to the rollout (a committed change may
//! complete a node's move; a rolled-back or failed one halts the rollout).

use ironroot_contract::config::validate_name;
use ironroot_contract::wire::{NodeAuditRecord, RECEIPT_KIND, Receipt};
use rusqlite::{Connection, params};
use serde::Serialize;

use crate::store::{Refusal, Store, now};

/// Longest transaction id, agent version and reason a receipt may carry.
const MAX_TRANSACTION: usize = 128;
const MAX_AGENT_VERSION: usize = 128;
const MAX_REASON: usize = 4096;
/// Parts a receipt's `steps_ms` may name.
const MAX_STEPS: usize = 16;

/// A stored receipt as `node receipts` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ReceiptView {
    /// The node's journal sequence number of the record that carried it.
    pub seq: i64,
    /// When the plane received it (seconds since the epoch, the plane's clock).
    pub received_at: i64,
    #[serde(flatten)]
    pub receipt: Receipt,
}

/// The receipt a node record carries, if it is of kind `receipt`; a receipt record whose data
/// is not a well-formed receipt is refused, naming the record and what is wrong.
pub(crate) fn parse(record: &NodeAuditRecord) -> Result<Option<Receipt>, Refusal> {
    if record.kind != RECEIPT_KIND {
        return Ok(None);
    }
    let bad = |why: String| Refusal::new(400, "bad_audit", format!("record {}: receipt {why}", record.seq));
    let receipt: Receipt =
        serde_json::from_value(record.data.clone()).map_err(|e| bad(format!("does not parse: {e}")))?;
    if receipt.transaction.is_empty() || receipt.transaction.len() > MAX_TRANSACTION {
        return Err(bad(format!("transaction must be 1-{MAX_TRANSACTION} bytes")));
    }
    validate_name(&receipt.module).map_err(|e| bad(format!("module: {e}")))?;
    if receipt.agent_version.len() > MAX_AGENT_VERSION || receipt.reason.as_ref().is_some_and(|r| r.len() > MAX_REASON)
    {
        return Err(bad(format!("agent_version is over {MAX_AGENT_VERSION} bytes or reason over {MAX_REASON}")));
    }
    if receipt.steps_ms.len() > MAX_STEPS
        || receipt.steps_ms.keys().any(|k| k.is_empty() || k.len() > 32 || !k.bytes().all(|b| b.is_ascii_lowercase()))
    {
        return Err(bad(format!("steps_ms holds at most {MAX_STEPS} parts named in 1-32 of a-z")));
    }
    if receipt.finished < receipt.started {
        return Err(bad("finished before it started".into()));
    }
    Ok(Some(receipt))
}

/// Keeps `receipt` (node record `seq`, seen for the first time) and tells the rollout.
pub(crate) fn keep(tx: &Connection, node_id: &str, seq: i64, receipt: &Receipt) -> Result<(), Refusal> {
    let json = serde_json::to_string(receipt).map_err(|e| Refusal::new(500, "internal", e.to_string()))?;
    tx.execute(
        "INSERT INTO receipts (node_id, seq, txn, module, outcome, to_digest, received_at, receipt)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            node_id,
            seq,
            receipt.transaction,
            receipt.module,
            receipt.outcome.to_string(),
            receipt.to.as_ref().map(|t| t.digest.to_string()),
            now(),
            json
        ],
    )?;
    crate::rollout::observe_receipt(tx, node_id, receipt)
}

impl Store {
    /// A node's receipts, oldest first.
    pub fn receipts(&self, node: &str) -> Result<Vec<ReceiptView>, Refusal> {
        let node_id = self.node(node)?.id;
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT seq, received_at, receipt FROM receipts WHERE node_id = ?1 ORDER BY seq")?;
        let rows =
            stmt.query_map([node_id], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, String>(2)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, received_at, json) = row?;
            let receipt = serde_json::from_str(&json).map_err(|e| Refusal::new(500, "internal", e.to_string()))?;
            out.push(ReceiptView { seq, received_at, receipt });
        }
        Ok(out)
    }
}
