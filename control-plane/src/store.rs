//! The plane's state: one SQLite connection behind a mutex (SQLite serialises writers anyway,
//! and every operation is a short transaction), with the CA. Every state change and every
//! refusal is journaled. Operations live in domain files: `enroll` (tokens, enrollment,
//! renewal), `catalog` (channels, templates), `rollout` (renderings, batches), `receipts`,
//! `work` (assignment, desired state, tasks), here (node reports, lifecycle, sweep).

use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ironroot_contract::wire::{NodeReport, ReportPhase, ReportResponse};
use rusqlite::{Connection, OptionalExtension as _, params};
use serde::Serialize;

use crate::audit;
use crate::ca::Authority;
use crate::lifecycle::{self, NodeState};

/// Timings the plane runs by; defaults in `Settings::standard`, overridable for tests.
#[derive(Debug, Clone)]
pub struct Settings {
    pub token_ttl: Duration,
    pub cert_ttl: Duration,
    pub heartbeat_interval: Duration,
    /// A running node silent this long becomes `suspect` (about three intervals).
    pub suspect_after: Duration,
    /// ... and this long, `silent`.
    pub silent_after: Duration,
    /// Past a template's trial deadline, how long a node served a new rendering may take to
    /// report it before it fails and halts the rollout (`rollout::overdue`).
    pub rollout_grace: Duration,
    pub task_lease: Duration,
    /// Enrollment attempts per remote address: a burst, then this many per second.
    pub enroll_burst: u32,
    pub enroll_per_second: f64,
}

impl Settings {
    /// The node's trial guard acts 60 s past the deadline; the node then soft-reboots back
    /// (allowed 2 min) and reports within a few heartbeats.
    pub fn rollout_grace_for(heartbeat_interval: Duration) -> Duration {
        Duration::from_secs(180).saturating_add(heartbeat_interval.saturating_mul(5))
    }

    pub fn standard() -> Self {
        Self {
            token_ttl: Duration::from_secs(3600),
            cert_ttl: Duration::from_secs(72 * 3600),
            heartbeat_interval: Duration::from_secs(30),
            suspect_after: Duration::from_secs(95),
            silent_after: Duration::from_secs(300),
            rollout_grace: Self::rollout_grace_for(Duration::from_secs(30)),
            task_lease: Duration::from_secs(120),
            enroll_burst: 10,
            enroll_per_second: 0.5,
        }
    }
}

/// A refused request: HTTP status, a short code, and a message naming what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
}

impl Refusal {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into() }
    }
}

impl From<rusqlite::Error> for Refusal {
    fn from(e: rusqlite::Error) -> Self {
        tracing::error!(error = %e, "database");
        Refusal::new(500, "internal", "the plane's database failed")
    }
}

pub struct Store {
    conn: Mutex<Connection>,
    pub(crate) ca: Authority,
    pub settings: Settings,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("settings", &self.settings).finish_non_exhaustive()
    }
}

pub fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// An id from the database as the wire type (ids the plane made always are).
pub(crate) fn wire_id<T: TryFrom<String, Error = String>>(s: &str) -> Result<T, Refusal> {
    T::try_from(s.to_owned()).map_err(|e| Refusal::new(500, "internal", e))
}

pub(crate) fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

#[derive(Debug, Clone, Serialize)]
pub struct NodeView {
    pub id: String,
    pub name: Option<String>,
    pub state: String,
    pub revoked: bool,
    pub template: Option<String>,
    pub generation: i64,
    /// The generation of the desired state the node last fetched (the plane served it).
    pub served_generation: Option<i64>,
    pub last_seen: Option<i64>,
    pub boot_id: Option<String>,
    pub agent_version: Option<String>,
    pub phase: Option<String>,
    pub phase_timings_ms: serde_json::Value,
    pub module_digests: serde_json::Value,
    pub last_reconcile: Option<String>,
    pub heartbeats: i64,
    /// The object store kind the node last reported (`zram+verity`, `tmpfs-insecure`, …).
    pub store: Option<String>,
    /// Why the node's last boot failed (with `phase` = `failed:<phase>`), if it did.
    pub last_error: Option<String>,
    /// Task long-polls the node has waiting on this plane now (it is connected for tasks).
    pub long_polls: usize,
    /// The agent service's resident memory (KiB) and CPU time (ms) at its last report.
    pub agent_rss_kib: Option<i64>,
    pub agent_cpu_ms: Option<i64>,
}

/// A report's strings are bounded and free of control characters (an error message may span
/// lines); they reach the journal and every operator's terminal.
fn check_report(report: &NodeReport) -> Result<(), Refusal> {
    let fields = [
        ("boot_id", Some(&report.boot_id), 128),
        ("agent_version", Some(&report.agent_version), 128),
        ("store", report.store.as_ref(), 64),
        ("last_reconcile", report.last_reconcile.as_ref(), 256),
        ("probe_summary", report.probe_summary.as_ref(), 2048),
    ];
    for (name, value, max) in fields {
        if let Some(v) = value
            && (v.len() > max || v.chars().any(char::is_control))
        {
            return Err(Refusal::new(
                400,
                "bad_report",
                format!("{name} is over {max} bytes or has control characters"),
            ));
        }
    }
    if let Some(e) = &report.error
        && (e.len() > 2048 || e.chars().any(|c| c.is_control() && c != '\n' && c != '\t'))
    {
        return Err(Refusal::new(400, "bad_report", "error is over 2048 bytes or has control characters"));
    }
    if let Some(k) = report.phase_timings_ms.keys().find(|k| k.len() > 64 || k.chars().any(char::is_control)) {
        return Err(Refusal::new(
            400,
            "bad_report",
            format!(
                "phase timing key {:?} is too long or has control characters",
                k.chars().take(64).collect::<String>()
            ),
        ));
    }
    Ok(())
}

impl Store {
    pub fn open(db_path: &Path, ca: Authority, settings: Settings) -> rusqlite::Result<Self> {
        Ok(Self { conn: Mutex::new(crate::db::open(db_path)?), ca, settings })
    }

    pub(crate) fn conn(&self) -> MutexGuard<'_, Connection> {
        // A poisoned lock means a panic mid-operation; the transaction it held was rolled
        // back by SQLite, so the connection is still consistent.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Journals a refusal (in its own transaction, so it survives the refused operation);
    /// `unjournaled` says how many refusals of the same caller were only counted since its
    /// last record.
    pub fn journal_refusal(&self, actor: &str, kind: &str, subject: &str, refusal: &Refusal, unjournaled: u64) {
        let conn = self.conn();
        let mut data = serde_json::json!({"code": refusal.code, "message": refusal.message});
        if unjournaled > 0 {
            data["unjournaled_before"] = unjournaled.into();
        }
        if let Err(e) = audit::append(&conn, now(), actor, kind, subject, &data) {
            tracing::error!(error = %e, "journaling a refusal");
        }
    }

    pub(crate) fn node_state(conn: &Connection, id: &str) -> Result<NodeState, Refusal> {
        let state: Option<String> =
            conn.query_row("SELECT state FROM nodes WHERE id = ?1", [id], |r| r.get(0)).optional()?;
        let state = state.ok_or_else(|| Refusal::new(404, "unknown_node", format!("no node {id:?}")))?;
        state.parse().map_err(|e: String| Refusal::new(500, "internal", e))
    }

    /// Moves node `id` to `to` if the lifecycle allows it, journaling the move.
    pub(crate) fn transition(
        conn: &Connection,
        id: &str,
        to: NodeState,
        actor: &str,
        why: &str,
    ) -> Result<NodeState, Refusal> {
        let from = Self::node_state(conn, id)?;
        lifecycle::check(from, to).map_err(|e| Refusal::new(409, "invalid_transition", e.to_string()))?;
        if from != to {
            conn.execute("UPDATE nodes SET state = ?1 WHERE id = ?2", params![to.to_string(), id])?;
            let data = serde_json::json!({"from": from.to_string(), "to": to.to_string(), "why": why});
            audit::append(conn, now(), actor, "node.transition", id, &data)?;
        }
        Ok(to)
    }

    /// Operator-requested transition (drain, terminate, quarantine, …).
    pub fn set_state(&self, id: &str, to: NodeState, actor: &str) -> Result<NodeState, Refusal> {
        let conn = self.conn();
        let tx = conn.unchecked_transaction()?;
        let s = Self::transition(&tx, id, to, actor, "operator")?;
        tx.commit()?;
        Ok(s)
    }

    /// Handshake (once per boot) or heartbeat: records the report and moves the node to
    /// `running` once it says `ready`, or back to `bootstrapping` when a new boot handshakes
    /// before it is ready.
    pub fn report(&self, id: &str, report: &NodeReport, handshake: bool) -> Result<ReportResponse, Refusal> {
        check_report(report)?;
        let conn = self.conn();
        let tx = conn.unchecked_transaction()?;
        let actor = format!("node:{id}");
        let state = Self::node_state(&tx, id)?;
        let target = match (report.phase, handshake) {
            (ReportPhase::Ready, _) => NodeState::Running,
            (_, true) => NodeState::Bootstrapping,
            (_, false) => state,
        };
        let new_state = if matches!(state, NodeState::Quarantined | NodeState::Draining) && target == NodeState::Running
        {
            state // an operator's hold is not lifted by a heartbeat
        } else {
            Self::transition(&tx, id, target, &actor, if handshake { "handshake" } else { "heartbeat" })?
        };
        tx.execute(
            "UPDATE nodes SET last_seen = ?1, boot_id = ?2, agent_version = ?3, phase = ?4,
                 phase_timings = CASE WHEN ?5 = '{}' THEN phase_timings ELSE ?5 END,
                 module_digests = ?6, last_reconcile = ?7, probe_summary = ?8, heartbeats = heartbeats + ?9,
                 store = COALESCE(?11, store), last_error = ?12,
                 agent_rss_kib = ?13, agent_cpu_ms = ?14
             WHERE id = ?10",
            params![
                now(),
                report.boot_id,
                report.agent_version,
                report.phase.to_string(),
                serde_json::to_string(&report.phase_timings_ms).unwrap_or_default(),
                serde_json::to_string(&report.module_digests).unwrap_or_default(),
                report.last_reconcile,
                report.probe_summary,
                i64::from(!handshake),
                id,
                report.store,
                report.error,
                report.agent.map(|a| i64::try_from(a.rss_kib).unwrap_or(i64::MAX)),
                report.agent.map(|a| i64::try_from(a.cpu_ms).unwrap_or(i64::MAX)),
            ],
        )?;
        if handshake {
            audit::append(
                &tx,
                now(),
                &actor,
                "node.handshake",
                id,
                &serde_json::json!({"boot_id": report.boot_id, "phase": report.phase, "error": report.error}),
            )?;
        }
        crate::rollout::observe(&tx, id, &report.module_digests)?;
        let generation: i64 = tx.query_row("SELECT generation FROM nodes WHERE id = ?1", [id], |r| r.get(0))?;
        tx.commit()?;
        Ok(ReportResponse { node_id: wire_id(id)?, state: new_state, generation: generation.max(0) as u64 })
    }

    /// Marks running nodes `suspect`, and suspect ones `silent`, by time since last seen.
    /// Returns how many nodes moved.
    pub fn sweep(&self, at: i64) -> Result<usize, Refusal> {
        let conn = self.conn();
        let tx = conn.unchecked_transaction()?;
        let suspect_before = at.saturating_sub(secs(self.settings.suspect_after));
        let silent_before = at.saturating_sub(secs(self.settings.silent_after));
        let mut moved = 0;
        let stale: Vec<(String, String, i64)> = {
            let mut stmt = tx.prepare(
                "SELECT id, state, last_seen FROM nodes WHERE state IN ('running', 'suspect') AND last_seen < ?1",
            )?;
            stmt.query_map([suspect_before], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?.collect::<Result<_, _>>()?
        };
        for (id, state, last_seen) in stale {
            let why = format!("no heartbeat for {} s", at.saturating_sub(last_seen));
            if state == "running" {
                Self::transition(&tx, &id, NodeState::Suspect, "plane:sweep", &why)?;
                moved += 1;
            }
            if last_seen < silent_before {
                Self::transition(&tx, &id, NodeState::Silent, "plane:sweep", &why)?;
                moved += 1;
            }
        }
        moved += crate::rollout::overdue(&tx, at, self.settings.rollout_grace)?;
        tx.commit()?;
        Ok(moved)
    }

    pub fn nodes(&self) -> Result<Vec<NodeView>, Refusal> {
        self.query_nodes(None)
    }

    /// One node, by id or name (an id wins over a name; among names, the newest node).
    pub fn node(&self, id_or_name: &str) -> Result<NodeView, Refusal> {
        self.query_nodes(Some(id_or_name))?
            .into_iter()
            .next()
            .ok_or_else(|| Refusal::new(404, "unknown_node", format!("no node {id_or_name:?}")))
    }

    fn query_nodes(&self, key: Option<&str>) -> Result<Vec<NodeView>, Refusal> {
        const COLUMNS: &str = "SELECT id, name, state, revoked, template, generation, last_seen, boot_id, agent_version, \
                               phase, phase_timings, module_digests, last_reconcile, heartbeats, store, last_error, \
                               served_generation, agent_rss_kib, agent_cpu_ms FROM nodes";
        let conn = self.conn();
        let sql = match key {
            None => format!("{COLUMNS} ORDER BY created_at, id"),
            Some(_) => format!("{COLUMNS} WHERE id = ?1 OR name = ?1 ORDER BY id = ?1 DESC, created_at DESC LIMIT 1"),
        };
        let mut stmt = conn.prepare(&sql)?;
        let json = |s: Option<String>| s.and_then(|s| serde_json::from_str(&s).ok()).unwrap_or(serde_json::Value::Null);
        let row = |r: &rusqlite::Row<'_>| {
            Ok(NodeView {
                id: r.get(0)?,
                name: r.get(1)?,
                state: r.get(2)?,
                revoked: r.get::<_, i64>(3)? != 0,
                template: r.get(4)?,
                generation: r.get(5)?,
                last_seen: r.get(6)?,
                boot_id: r.get(7)?,
                agent_version: r.get(8)?,
                phase: r.get(9)?,
                phase_timings_ms: json(r.get(10)?),
                module_digests: json(r.get(11)?),
                last_reconcile: r.get(12)?,
                heartbeats: r.get(13)?,
                store: r.get(14)?,
                last_error: r.get(15)?,
                served_generation: r.get(16)?,
                agent_rss_kib: r.get(17)?,
                agent_cpu_ms: r.get(18)?,
                long_polls: 0,
            })
        };
        let rows = match key {
            None => stmt.query_map([], row)?.collect::<Result<Vec<_>, _>>()?,
            Some(k) => stmt.query_map([k], row)?.collect::<Result<Vec<_>, _>>()?,
        };
        Ok(rows)
    }

    pub fn audit_list(&self, after: i64, limit: i64) -> Result<Vec<audit::Record>, Refusal> {
        Ok(audit::list(&self.conn(), after, limit)?)
    }
}
