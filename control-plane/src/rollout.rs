//! Rollouts: which rendering of its template each node is served. When a template's rendering
//! changes (a channel it follows moved, an entry changed), the new rendering is stored as the
//! template's next revision, the rollout's target, and the nodes of the template move to it in
//! batches (`rollout set --batch N`; by default all at once). A moved node's generation rises
//! and it is `waiting` until it reports every digest of the rendering (heartbeat
//! `module_digests`) or a committed receipt for it (`done`); the next batch starts when no node
//! of the current batch is waiting. A `rolled-back` or `failed` receipt for the target halts
//! the rollout, and the node (`failed`) is pinned to the last rendering it ran whole (its
//! `good_revision`, set when it is `done`), which it went back to; `rollout resume` continues
//! with the next batch. Nodes not yet moved
//! (`pending`) keep being served the rendering they had. Runs inside the caller's transaction.

use std::collections::HashSet;

use ironroot_contract::OciDigest;
use ironroot_contract::wire::{Outcome, Receipt};
use rusqlite::{Connection, OptionalExtension as _, params};
use serde::Serialize;

use crate::audit;
use crate::render;
use crate::store::{Refusal, Store, now};

/// Nodes named in one journal record of a batch (a larger batch is journaled by count).
const JOURNAL_NODES: usize = 100;
/// Node ids `rollout status` lists per state.
const STATUS_NODES: usize = 50;

/// The receipts table's newest row: receipts after it are newer than a node's move.
const RECEIPT_MARK: &str = "(SELECT COALESCE(MAX(rowid), 0) FROM receipts)";

/// Renders `template` from its entries; when that differs from its target rendering, stores it
/// as the next revision and starts a rollout to it. Returns the new revision, if there is one.
pub(crate) fn republish(tx: &Connection, template: &str, actor: &str) -> Result<Option<i64>, Refusal> {
    let modules = render::render(&crate::catalog::load_entries(tx, template)?);
    let (json, digests) = render::encode(&modules);
    let current: Option<(i64, String)> = tx
        .query_row(
            "SELECT r.revision, g.modules FROM rollouts r
             JOIN renderings g ON g.template = r.template AND g.revision = r.revision WHERE r.template = ?1",
            [template],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    if current.as_ref().is_some_and(|(_, m)| *m == json) {
        return Ok(None);
    }
    let (revision, previous) = current.map_or((1, None), |(rev, _)| (rev + 1, Some(rev)));
    tx.execute(
        "INSERT INTO renderings (template, revision, modules, digests, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![template, revision, json, digests, now()],
    )?;
    // A new target is a new rollout: a halt was about the old one.
    tx.execute(
        "INSERT INTO rollouts (template, revision, previous) VALUES (?1, ?2, ?3)
         ON CONFLICT(template) DO UPDATE SET revision = excluded.revision, previous = excluded.previous,
             halted_node = NULL, halted_reason = NULL, halted_at = NULL",
        params![template, revision, previous],
    )?;
    tx.execute("UPDATE nodes SET rollout = 'pending' WHERE template = ?1", [template])?;
    let data = serde_json::json!({"revision": revision, "modules": modules});
    audit::append(tx, now(), actor, "template.render", template, &data)?;
    advance(tx, template, actor)?;
    tx.execute(
        "DELETE FROM renderings WHERE template = ?1 AND revision NOT IN (
             SELECT revision FROM rollouts WHERE template = ?1
             UNION SELECT previous FROM rollouts WHERE template = ?1 AND previous IS NOT NULL
             UNION SELECT DISTINCT revision FROM nodes WHERE template = ?1 AND revision IS NOT NULL
             UNION SELECT DISTINCT good_revision FROM nodes WHERE template = ?1 AND good_revision IS NOT NULL)",
        [template],
    )?;
    Ok(Some(revision))
}

/// Starts the next batch when the rollout is not halted, has pending nodes, and (in batches)
/// no node of the current batch is still waiting. Returns how many nodes moved.
pub(crate) fn advance(tx: &Connection, template: &str, actor: &str) -> Result<usize, Refusal> {
    let row: Option<(i64, Option<i64>, bool)> = tx
        .query_row(
            "SELECT revision, batch, halted_node IS NOT NULL FROM rollouts WHERE template = ?1",
            [template],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    let Some((revision, batch, halted)) = row else {
        return Ok(0);
    };
    let exists = |sql: &str| -> rusqlite::Result<bool> { tx.query_row(sql, [template], |r| r.get(0)) };
    if halted || !exists("SELECT EXISTS (SELECT 1 FROM nodes WHERE template = ?1 AND rollout = 'pending')")? {
        return Ok(0);
    }
    if batch.is_some()
        && exists(
            "SELECT EXISTS (SELECT 1 FROM nodes WHERE template = ?1 AND rollout = 'waiting' AND state != 'terminated')",
        )?
    {
        return Ok(0);
    }
    let limit = batch.unwrap_or(-1); // LIMIT -1: no limit
    let named: Vec<String> = if batch.is_some_and(|b| b <= JOURNAL_NODES as i64) {
        let mut stmt =
            tx.prepare("SELECT id FROM nodes WHERE template = ?1 AND rollout = 'pending' ORDER BY id LIMIT ?2")?;
        stmt.query_map(params![template, limit], |r| r.get(0))?.collect::<Result<_, _>>()?
    } else {
        Vec::new()
    };
    let moved = tx.execute(
        &format!(
            "UPDATE nodes SET revision = ?2, generation = generation + 1, rollout = 'waiting',
                 rollout_since = {RECEIPT_MARK}
             WHERE id IN (SELECT id FROM nodes WHERE template = ?1 AND rollout = 'pending' ORDER BY id LIMIT ?3)"
        ),
        params![template, revision, limit],
    )?;
    let mut data = serde_json::json!({"revision": revision, "moved": moved});
    if !named.is_empty() {
        data["nodes"] = named.into();
    }
    audit::append(tx, now(), actor, "rollout.batch", template, &data)?;
    Ok(moved)
}

/// Puts a node on `template` (enrollment with a template, or an operator's assignment): it is
/// served the target, unless a rollout is moving nodes in batches, in which case it waits its
/// turn on the rendering before the target.
pub(crate) fn join(tx: &Connection, node_id: &str, template: &str) -> Result<(), Refusal> {
    let (revision, previous): (i64, Option<i64>) = tx
        .query_row("SELECT revision, previous FROM rollouts WHERE template = ?1", [template], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()?
        .ok_or_else(|| Refusal::new(404, "unknown_template", format!("no template {template:?}")))?;
    let rolling: bool = tx.query_row(
        "SELECT EXISTS (SELECT 1 FROM nodes WHERE template = ?1 AND rollout = 'pending' AND id != ?2)",
        params![template, node_id],
        |r| r.get(0),
    )?;
    let (revision, progress) = match previous {
        Some(p) if rolling => (p, "pending"),
        _ => (revision, "waiting"),
    };
    tx.execute(
        &format!(
            "UPDATE nodes SET template = ?1, revision = ?2, rollout = ?3, generation = generation + 1,
                 good_revision = NULL, rollout_since = {RECEIPT_MARK} WHERE id = ?4"
        ),
        params![template, revision, progress, node_id],
    )?;
    Ok(())
}

/// A node reported `reported` (a heartbeat's `module_digests`): when it is waiting and now has
/// every digest of its rendering (or committed receipts for them since it moved), it is done,
/// and the rollout may start its next batch.
pub(crate) fn observe(tx: &Connection, node_id: &str, reported: &[OciDigest]) -> Result<(), Refusal> {
    let row: Option<(String, String, i64)> = tx
        .query_row(
            "SELECT n.template, g.digests, n.rollout_since FROM nodes n
             JOIN renderings g ON g.template = n.template AND g.revision = n.revision
             WHERE n.id = ?1 AND n.rollout = 'waiting'",
            [node_id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    let Some((template, wanted, since)) = row else {
        return Ok(());
    };
    let wanted: Vec<String> =
        serde_json::from_str(&wanted).map_err(|e| Refusal::new(500, "internal", e.to_string()))?;
    let mut have: HashSet<String> = reported.iter().map(ToString::to_string).collect();
    if !wanted.iter().all(|d| have.contains(d)) {
        let mut stmt = tx.prepare_cached(
            "SELECT to_digest FROM receipts WHERE node_id = ?1 AND rowid > ?2 AND outcome = 'committed'
               AND to_digest IS NOT NULL",
        )?;
        have.extend(
            stmt.query_map(params![node_id, since], |r| r.get::<_, String>(0))?.collect::<Result<Vec<_>, _>>()?,
        );
        if !wanted.iter().all(|d| have.contains(d)) {
            return Ok(());
        }
    }
    // The rendering it runs whole: what a later failed change pins it back to.
    tx.execute("UPDATE nodes SET rollout = 'done', good_revision = revision WHERE id = ?1", [node_id])?;
    advance(tx, &template, "plane:rollout")?;
    Ok(())
}

/// A receipt arrived (already stored): a committed one may complete the node's move; a
/// rolled-back or failed one for a module of the rollout's target halts the rollout and pins
/// the node to the last rendering it ran whole (its generation rises).
pub(crate) fn observe_receipt(tx: &Connection, node_id: &str, receipt: &Receipt) -> Result<(), Refusal> {
    if receipt.outcome == Outcome::Committed {
        let reported: Option<String> =
            tx.query_row("SELECT module_digests FROM nodes WHERE id = ?1", [node_id], |r| r.get(0))?;
        let reported: Vec<OciDigest> = reported.and_then(|s| serde_json::from_str(&s).ok()).unwrap_or_default();
        return observe(tx, node_id, &reported);
    }
    // What the change was about: its new version, or the digest asked for when the node
    // refused it before reading its config.
    let Some(wanted) = receipt.to.as_ref().map(|t| t.digest).or(receipt.wanted) else {
        return Ok(());
    };
    let row: Option<(String, String, Option<String>, i64)> = tx
        .query_row(
            "SELECT n.template, g.digests, r.halted_node, r.revision FROM nodes n
             JOIN rollouts r ON r.template = n.template AND r.revision = n.revision
             JOIN renderings g ON g.template = n.template AND g.revision = n.revision
             WHERE n.id = ?1 AND n.rollout IN ('waiting', 'done')",
            [node_id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .optional()?;
    let Some((template, digests, halted, revision)) = row else {
        return Ok(()); // not on the target: a receipt about an earlier change
    };
    let digests: Vec<String> = serde_json::from_str(&digests).unwrap_or_default();
    if !digests.contains(&wanted.to_string()) {
        return Ok(());
    }
    let version = receipt.to.as_ref().map_or_else(|| wanted.to_string(), |t| t.version.clone());
    let mut reason = format!("node {node_id}: {} {version} {}", receipt.module, receipt.outcome);
    if let Some(why) = &receipt.reason {
        reason = format!("{reason}: {}", why.chars().take(512).collect::<String>());
    }
    let data = serde_json::json!({"revision": revision, "node": node_id, "module": receipt.module,
        "outcome": receipt.outcome.to_string(), "transaction": receipt.transaction, "reason": reason});
    fail(tx, node_id, &template, halted.is_none(), &reason, data)
}

/// Fails `node_id`'s move and halts `template`'s rollout on it (unless `halt` is false: it is
/// halted already). Pinned to the last good rendering (the one before the target, which the
/// node went back to) its desired state stops naming what it refused; with none yet, it stays,
/// its refusal standing.
fn fail(
    tx: &Connection,
    node_id: &str,
    template: &str,
    halt: bool,
    reason: &str,
    data: serde_json::Value,
) -> Result<(), Refusal> {
    tx.execute(
        "UPDATE nodes SET rollout = 'failed',
             generation = generation + (good_revision IS NOT NULL AND good_revision != revision),
             revision = COALESCE(good_revision, revision)
         WHERE id = ?1",
        [node_id],
    )?;
    if halt {
        tx.execute(
            "UPDATE rollouts SET halted_node = ?2, halted_reason = ?3, halted_at = ?4 WHERE template = ?1",
            params![template, node_id, reason, now()],
        )?;
        audit::append(tx, now(), "plane:rollout", "rollout.halt", template, &data)?;
    }
    Ok(())
}

/// The sweep at `at`: a node that took its new rendering (it was served it) and has reported
/// neither it nor a receipt by the template's trial deadline plus `grace` is failed, as if it
/// had rolled back, and halts the rollout — a root whose agent never came up, a node that went
/// dark mid-change. Returns how many nodes it failed.
pub(crate) fn overdue(tx: &Connection, at: i64, grace: std::time::Duration) -> Result<usize, Refusal> {
    let grace = i64::try_from(grace.as_secs()).unwrap_or(i64::MAX);
    let default = i64::try_from(ironroot_contract::run_state::DEFAULT_TRIAL_DEADLINE_S).unwrap_or(i64::MAX);
    let late: Vec<(String, String, i64, i64, i64, Option<String>)> = {
        let mut stmt = tx.prepare_cached(
            "SELECT n.id, n.template, n.revision, n.served_at, COALESCE(t.trial_deadline_s, ?1), r.halted_node
             FROM nodes n JOIN templates t ON t.name = n.template
             JOIN rollouts r ON r.template = n.template AND r.revision = n.revision
             WHERE n.rollout = 'waiting' AND n.state != 'terminated' AND n.served_generation = n.generation
               AND n.served_at + COALESCE(t.trial_deadline_s, ?1) + ?2 < ?3",
        )?;
        stmt.query_map(params![default, grace, at], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?))
        })?
        .collect::<Result<_, _>>()?
    };
    let mut halted_now = std::collections::HashSet::new();
    for (node, template, revision, served_at, deadline, halted) in &late {
        let reason = format!(
            "node {node}: revision {revision} not reported within {} s of taking it (trial deadline {deadline} s + {grace} s)",
            at.saturating_sub(*served_at)
        );
        let data = serde_json::json!({"revision": revision, "node": node, "outcome": "overdue", "reason": reason});
        let halt = halted.is_none() && halted_now.insert(template.clone());
        fail(tx, node, template, halt, &reason, data)?;
    }
    Ok(late.len())
}

/// `rollout status`: where a template's rollout stands.
#[derive(Debug, Clone, Serialize)]
pub struct RolloutStatus {
    pub template: String,
    /// The target rendering.
    pub revision: i64,
    /// The rendering before it (served to nodes that wait their turn).
    pub previous: Option<i64>,
    /// Nodes per batch; `null`: all at once.
    pub batch: Option<i64>,
    pub halted: Option<Halt>,
    /// Nodes per state: `pending` (not yet moved), `waiting` (moved, not yet confirmed),
    /// `done`, `failed` (its receipt halted the rollout).
    pub counts: std::collections::BTreeMap<String, i64>,
    /// Up to 50 node ids per state other than `done`.
    pub nodes: std::collections::BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Halt {
    pub node: String,
    pub reason: String,
    pub at: i64,
}

impl Store {
    pub fn rollout_status(&self, template: &str) -> Result<RolloutStatus, Refusal> {
        let conn = self.conn();
        type Row = (i64, Option<i64>, Option<i64>, Option<String>, Option<String>, Option<i64>);
        let (revision, previous, batch, node, reason, at): Row = conn
            .query_row(
                "SELECT revision, previous, batch, halted_node, halted_reason, halted_at FROM rollouts WHERE template = ?1",
                [template],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)),
            )
            .optional()?
            .ok_or_else(|| Refusal::new(404, "unknown_template", format!("no template {template:?}")))?;
        let halted = match (node, reason, at) {
            (Some(node), Some(reason), Some(at)) => Some(Halt { node, reason, at }),
            _ => None,
        };
        let mut counts = std::collections::BTreeMap::new();
        let mut stmt =
            conn.prepare("SELECT COALESCE(rollout, 'done'), COUNT(*) FROM nodes WHERE template = ?1 GROUP BY 1")?;
        for row in stmt.query_map([template], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))? {
            let (state, n) = row?;
            *counts.entry(state).or_insert(0) += n;
        }
        let mut nodes = std::collections::BTreeMap::new();
        let mut stmt =
            conn.prepare("SELECT id FROM nodes WHERE template = ?1 AND rollout = ?2 ORDER BY id LIMIT ?3")?;
        for state in ["pending", "waiting", "failed"] {
            let ids: Vec<String> = stmt
                .query_map(params![template, state, STATUS_NODES as i64], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            if !ids.is_empty() {
                nodes.insert(state.to_owned(), ids);
            }
        }
        Ok(RolloutStatus { template: template.to_owned(), revision, previous, batch, halted, counts, nodes })
    }

    /// Sets the batch size (`None`: all at once) and starts a batch if one is due.
    pub fn rollout_set(&self, template: &str, batch: Option<u32>, actor: &str) -> Result<(), Refusal> {
        if batch == Some(0) {
            return Err(Refusal::new(400, "bad_rollout", "a batch is at least one node"));
        }
        let conn = self.conn();
        let tx = conn.unchecked_transaction()?;
        let n = tx.execute("UPDATE rollouts SET batch = ?2 WHERE template = ?1", params![template, batch])?;
        if n == 0 {
            return Err(Refusal::new(404, "unknown_template", format!("no template {template:?}")));
        }
        audit::append(&tx, now(), actor, "rollout.set", template, &serde_json::json!({"batch": batch}))?;
        advance(&tx, template, actor)?;
        tx.commit()?;
        Ok(())
    }

    /// Lifts a halt and starts the next batch (nodes whose receipts halted it stay `failed`
    /// and no longer hold a batch).
    pub fn rollout_resume(&self, template: &str, actor: &str) -> Result<usize, Refusal> {
        let conn = self.conn();
        let tx = conn.unchecked_transaction()?;
        let halted: Option<Option<String>> = tx
            .query_row("SELECT halted_reason FROM rollouts WHERE template = ?1", [template], |r| r.get(0))
            .optional()?;
        let reason = match halted {
            None => return Err(Refusal::new(404, "unknown_template", format!("no template {template:?}"))),
            Some(None) => {
                return Err(Refusal::new(409, "not_halted", format!("the rollout of {template} is not halted")));
            }
            Some(Some(reason)) => reason,
        };
        tx.execute(
            "UPDATE rollouts SET halted_node = NULL, halted_reason = NULL, halted_at = NULL WHERE template = ?1",
            [template],
        )?;
        audit::append(&tx, now(), actor, "rollout.resume", template, &serde_json::json!({"halted": reason}))?;
        let moved = advance(&tx, template, actor)?;
        tx.commit()?;
        Ok(moved)
    }
}
