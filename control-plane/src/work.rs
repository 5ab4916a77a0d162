//! What a node is given: its template and the desired state it is served (the rendering its
//! rollout reached; templates themselves are `catalog`'s, renderings `rollout`'s), and the task
//! queue (leases that expire and are redelivered, results idempotent by task id).

use ironroot_contract::wire::{DesiredModule, DesiredState, Task, TaskResult, TaskSpec};
use rusqlite::{OptionalExtension as _, params};
use serde::Serialize;

use crate::audit;
use crate::store::{Refusal, Store, now, secs};

#[derive(Debug, Clone, Serialize)]
pub struct TaskView {
    pub id: String,
    pub node_id: String,
    pub spec: serde_json::Value,
    pub state: String,
    pub deliveries: i64,
    pub result: serde_json::Value,
}

impl Store {
    /// Makes a node follow `template` (see `rollout::join` for which rendering it is served).
    pub fn template_assign(&self, node: &str, template: &str, actor: &str) -> Result<(), Refusal> {
        let id = self.node(node)?.id;
        let conn = self.conn();
        let tx = conn.unchecked_transaction()?;
        crate::rollout::join(&tx, &id, template)?;
        audit::append(&tx, now(), actor, "template.assign", &id, &serde_json::json!({"template": template}))?;
        tx.commit()?;
        Ok(())
    }

    /// What node `node_id` is served: the rendering of its template its rollout has reached.
    pub fn desired(&self, node_id: &str) -> Result<DesiredState, Refusal> {
        let conn = self.conn();
        type Row = (Option<String>, i64, String, Option<String>, Option<i64>);
        let row: Option<Row> = conn
            .query_row(
                "SELECT n.template, n.generation, n.state, g.modules, t.trial_deadline_s FROM nodes n
                 LEFT JOIN renderings g ON g.template = n.template AND g.revision = n.revision
                 LEFT JOIN templates t ON t.name = n.template WHERE n.id = ?1",
                [node_id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
            )
            .optional()?;
        let (template, generation, state, modules, trial_deadline_s) =
            row.ok_or_else(|| Refusal::new(404, "unknown_node", format!("no node {node_id:?}")))?;
        let modules: Vec<DesiredModule> = match (&template, modules) {
            (None, _) => Vec::new(),
            (Some(_), Some(json)) => {
                serde_json::from_str(&json).map_err(|e| Refusal::new(500, "internal", e.to_string()))?
            }
            (Some(t), None) => {
                return Err(Refusal::new(500, "internal", format!("node {node_id} has no rendering of {t}")));
            }
        };
        let mut desired = crate::render::desired(generation.max(0) as u64, template, modules, state == "draining");
        desired.trial_deadline_s = trial_deadline_s.and_then(|s| u64::try_from(s).ok());
        // What the node now knows: an operator (and the fan-out benchmark) sees a change reach it.
        // ... and since when (the first time this generation was served).
        conn.execute(
            "UPDATE nodes SET served_at = CASE WHEN served_generation IS ?1 THEN served_at ELSE ?3 END,
                 served_generation = ?1 WHERE id = ?2",
            params![generation, node_id, now()],
        )?;
        Ok(desired)
    }

    /// Queues `spec` for `node`; `deadline` (seconds since the epoch) is when it must be
    /// finished by.
    pub fn enqueue(&self, node: &str, spec: &TaskSpec, deadline: Option<i64>, actor: &str) -> Result<String, Refusal> {
        let node_id = self.node(node)?.id;
        let id = format!("t-{}", hex::encode(rand::random::<[u8; 8]>()));
        let conn = self.conn();
        let tx = conn.unchecked_transaction()?;
        let json = serde_json::to_string(spec).unwrap_or_default();
        tx.execute(
            "INSERT INTO tasks (id, node_id, spec, state, created_at, deadline) VALUES (?1, ?2, ?3, 'queued', ?4, ?5)",
            params![id, node_id, json, now(), deadline],
        )?;
        let data = serde_json::json!({"node": node_id, "spec": spec, "deadline": deadline});
        audit::append(&tx, now(), actor, "task.enqueue", &id, &data)?;
        tx.commit()?;
        Ok(id)
    }

    /// Leases the oldest task that is queued, or whose lease expired (redelivery).
    pub fn lease(&self, node_id: &str) -> Result<Option<Task>, Refusal> {
        let conn = self.conn();
        let tx = conn.unchecked_transaction()?;
        let t = now();
        let row: Option<(String, String, i64, Option<i64>)> = tx
            .query_row(
                "SELECT id, spec, deliveries, deadline FROM tasks WHERE node_id = ?1
                   AND (state = 'queued' OR (state = 'leased' AND lease_until <= ?2))
                 ORDER BY created_at, id LIMIT 1",
                params![node_id, t],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()?;
        let Some((id, spec, deliveries, deadline)) = row else {
            return Ok(None);
        };
        let lease_until = t.saturating_add(secs(self.settings.task_lease));
        tx.execute(
            "UPDATE tasks SET state = 'leased', lease_until = ?1, deliveries = deliveries + 1 WHERE id = ?2",
            params![lease_until, id],
        )?;
        let kind = if deliveries > 0 { "task.redeliver" } else { "task.lease" };
        audit::append(&tx, t, &format!("node:{node_id}"), kind, &id, &serde_json::json!({"delivery": deliveries + 1}))?;
        tx.commit()?;
        let spec: TaskSpec = serde_json::from_str(&spec).map_err(|e| Refusal::new(500, "internal", e.to_string()))?;
        Ok(Some(Task {
            id: crate::store::wire_id(&id)?,
            spec,
            lease_until: lease_until.max(0) as u64,
            deadline: deadline.map(|d| d.max(0) as u64),
        }))
    }

    /// Records a result; a repeated result for a finished task is accepted and changes nothing.
    pub fn task_result(&self, node_id: &str, task_id: &str, result: &TaskResult) -> Result<bool, Refusal> {
        if result.output.len() > 48 * 1024 || result.reason.as_ref().is_some_and(|r| r.len() > 4096) {
            return Err(Refusal::new(400, "bad_result", "task output is over 48 KiB or its reason over 4 KiB"));
        }
        // A reason reaches every operator's terminal: lines and tabs, no other control characters.
        if result.reason.as_ref().is_some_and(|r| r.chars().any(|c| c.is_control() && c != '\n' && c != '\t')) {
            return Err(Refusal::new(400, "bad_result", "the task's reason has control characters"));
        }
        let conn = self.conn();
        let tx = conn.unchecked_transaction()?;
        let (owner, state) = task_row(&tx, task_id)?;
        if owner != node_id {
            return Err(Refusal::new(403, "wrong_node", format!("task {task_id} belongs to another node")));
        }
        if state == "done" {
            return Ok(false);
        }
        finish(&tx, task_id, result)?;
        audit::append(
            &tx,
            now(),
            &format!("node:{node_id}"),
            "task.result",
            task_id,
            &serde_json::json!({"outcome": result.outcome, "exit_code": result.exit_code}),
        )?;
        tx.commit()?;
        Ok(true)
    }

    /// Cancels a task that is not finished: it is not delivered (again) and its result is
    /// `cancelled`; a result the node posts later changes nothing. Returns the task's node.
    pub fn task_cancel(&self, task_id: &str, actor: &str) -> Result<String, Refusal> {
        let conn = self.conn();
        let tx = conn.unchecked_transaction()?;
        let (node_id, state) = task_row(&tx, task_id)?;
        if state == "done" {
            return Err(Refusal::new(409, "task_finished", format!("task {task_id} is already finished")));
        }
        let result = TaskResult::new(
            ironroot_contract::wire::TaskOutcome::Cancelled,
            Some(format!("cancelled by {actor} while {state}")),
        );
        finish(&tx, task_id, &result)?;
        audit::append(&tx, now(), actor, "task.cancel", task_id, &serde_json::json!({"node": node_id, "was": state}))?;
        tx.commit()?;
        Ok(node_id)
    }

    pub fn tasks(&self, node: &str) -> Result<Vec<TaskView>, Refusal> {
        let node_id = self.node(node)?.id;
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, node_id, spec, state, deliveries, result FROM tasks WHERE node_id = ?1 ORDER BY created_at, id",
        )?;
        let json = |s: Option<String>| s.and_then(|s| serde_json::from_str(&s).ok()).unwrap_or(serde_json::Value::Null);
        let rows = stmt.query_map([node_id], |r| {
            Ok(TaskView {
                id: r.get(0)?,
                node_id: r.get(1)?,
                spec: json(r.get(2)?),
                state: r.get(3)?,
                deliveries: r.get(4)?,
                result: json(r.get(5)?),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

/// A task's node and state (404 `unknown_task`).
fn task_row(tx: &rusqlite::Connection, task_id: &str) -> Result<(String, String), Refusal> {
    tx.query_row("SELECT node_id, state FROM tasks WHERE id = ?1", [task_id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?
        .ok_or_else(|| Refusal::new(404, "unknown_task", format!("no task {task_id:?}")))
}

/// Marks a task done with `result`.
fn finish(tx: &rusqlite::Connection, task_id: &str, result: &TaskResult) -> Result<(), Refusal> {
    let json = serde_json::to_string(result).unwrap_or_default();
    tx.execute(
        "UPDATE tasks SET state = 'done', result = ?1, finished_at = ?2 WHERE id = ?3",
        params![json, now(), task_id],
    )?;
    Ok(())
}
