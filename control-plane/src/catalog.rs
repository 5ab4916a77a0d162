//! Release channels and role catalogs. A channel (`REPO:CHANNEL`) names one verified manifest
//! of a repository, with the module's name, version, serial and role as its signed config says;
//! it only moves to a lower serial with an explicit rollback. A template is a role's catalog:
//! one entry per module name, each following a channel or pinned by digest. Every change
//! re-renders the templates it touches (`rollout::republish`), in the same transaction: a
//! refused change leaves nothing behind. Verification itself (registry reads) happens before,
//! in `publish`.

use ironroot_contract::wire::DesiredState;
use rusqlite::{Connection, OptionalExtension as _, params};
use serde::Serialize;

use crate::audit;
use crate::publish::Published;
use crate::render::{self, Entry, Pin};
use crate::rollout;
use crate::store::{Refusal, Store, now};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChannelView {
    pub repo: String,
    pub channel: String,
    pub digest: String,
    pub name: String,
    pub version: String,
    pub serial: u64,
    pub role: String,
    pub set_at: i64,
    pub set_by: String,
}

/// What a channel change did: where the channel was and is, and the templates it re-rendered
/// (each with its new revision).
#[derive(Debug, Clone, Serialize)]
pub struct ChannelChange {
    pub channel: ChannelView,
    pub was: Option<ChannelView>,
    pub rendered: Vec<(String, i64)>,
}

/// A template entry as an operator asked for it, verified where the plane can.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum EntrySpec {
    Channel {
        repo: String,
        channel: String,
    },
    /// `verified`: the serial and name come from the signed config (else the operator typed
    /// the serial, and the name is the repository's last component).
    Digest {
        repo: String,
        digest: String,
        name: String,
        serial: u64,
        verified: bool,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct EntryView {
    pub module: String,
    pub repo: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    /// The digest served now (where the channel stands, for a channel entry).
    pub digest: String,
    pub serial: u64,
    pub verified: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct TemplateView {
    pub name: String,
    /// The newest rendering (the rollout's target).
    pub revision: i64,
    pub entries: Vec<EntryView>,
}

/// Template names: 1-128 characters of `A-Z a-z 0-9 . _ -` (they appear in paths).
pub fn check_template_name(name: &str) -> Result<(), Refusal> {
    if (1..=128).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b".-_".contains(&b)) {
        Ok(())
    } else {
        Err(Refusal::new(400, "bad_template", "template name must be 1-128 characters of A-Z a-z 0-9 . _ -"))
    }
}

const CHANNEL_COLUMNS: &str = "repo, channel, digest, name, version, serial, role, set_at, set_by";

fn channel_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ChannelView> {
    Ok(ChannelView {
        repo: r.get(0)?,
        channel: r.get(1)?,
        digest: r.get(2)?,
        name: r.get(3)?,
        version: r.get(4)?,
        serial: r.get::<_, i64>(5)?.max(0) as u64,
        role: r.get(6)?,
        set_at: r.get(7)?,
        set_by: r.get(8)?,
    })
}

fn find_channel(conn: &Connection, repo: &str, channel: &str) -> Result<Option<ChannelView>, Refusal> {
    Ok(conn
        .query_row(
            &format!("SELECT {CHANNEL_COLUMNS} FROM channels WHERE repo = ?1 AND channel = ?2"),
            params![repo, channel],
            channel_row,
        )
        .optional()?)
}

/// A mount role as the module config spells it (`root`, `opt`, …).
fn role_name(role: ironroot_contract::config::MountRole) -> String {
    serde_json::to_value(role).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
}

fn serial_sql(serial: u64) -> Result<i64, Refusal> {
    i64::try_from(serial).map_err(|_| Refusal::new(400, "bad_module", format!("serial {serial} is out of range")))
}

/// A template's entries with their pins resolved (channels at their current position).
pub(crate) fn load_entries(conn: &Connection, template: &str) -> Result<Vec<Entry>, Refusal> {
    let mut stmt = conn.prepare_cached(
        "SELECT e.module, e.repo, e.channel, COALESCE(c.digest, e.digest), COALESCE(c.serial, e.serial)
         FROM template_entries e LEFT JOIN channels c ON c.repo = e.repo AND c.channel = e.channel
         WHERE e.template = ?1 ORDER BY e.module",
    )?;
    let rows = stmt.query_map([template], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, Option<String>>(2)?,
            r.get::<_, Option<String>>(3)?,
            r.get::<_, Option<i64>>(4)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (module, repo, channel, digest, serial) = row?;
        let broken = || Refusal::new(500, "internal", format!("template {template} entry {module} has no digest"));
        let digest = digest.ok_or_else(broken)?.parse().map_err(|_| broken())?;
        let serial = serial.ok_or_else(broken)?.max(0) as u64;
        let pin = match channel {
            Some(channel) => Pin::Channel { channel, digest, serial },
            None => Pin::Digest { digest, serial },
        };
        out.push(Entry { module, repo, pin });
    }
    Ok(out)
}

/// module name → serial in `template`'s target rendering.
fn target_serials(conn: &Connection, template: &str) -> Result<Vec<(String, u64)>, Refusal> {
    let json: Option<String> = conn
        .query_row(
            "SELECT g.modules FROM rollouts r JOIN renderings g ON g.template = r.template AND g.revision = r.revision
             WHERE r.template = ?1",
            [template],
            |r| r.get(0),
        )
        .optional()?;
    let modules: Vec<ironroot_contract::wire::DesiredModule> =
        json.and_then(|j| serde_json::from_str(&j).ok()).unwrap_or_default();
    Ok(modules.into_iter().map(|m| (m.name, m.serial)).collect())
}

impl Store {
    pub fn channels(&self) -> Result<Vec<ChannelView>, Refusal> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!("SELECT {CHANNEL_COLUMNS} FROM channels ORDER BY repo, channel"))?;
        Ok(stmt.query_map([], channel_row)?.collect::<Result<_, _>>()?)
    }

    pub fn channel(&self, repo: &str, channel: &str) -> Result<ChannelView, Refusal> {
        find_channel(&self.conn(), repo, channel)?
            .ok_or_else(|| Refusal::new(404, "unknown_channel", format!("no channel {repo}:{channel}")))
    }

    /// Points `repo:channel` at `module` (verified by the caller) and re-renders every template
    /// that follows it. Refused: a lower serial than the channel has (unless `allow_rollback`),
    /// and a different module name. `from`: the channel it was promoted from, for the journal.
    pub fn channel_set(
        &self,
        channel: &str,
        module: &Published,
        from: Option<&str>,
        allow_rollback: bool,
        actor: &str,
    ) -> Result<ChannelChange, Refusal> {
        let repo = module.repo.as_str();
        let conn = self.conn();
        let tx = conn.unchecked_transaction()?;
        let was = find_channel(&tx, repo, channel)?;
        if let Some(was) = &was {
            if was.name != module.name {
                return Err(Refusal::new(
                    409,
                    "wrong_module",
                    format!(
                        "channel {repo}:{channel} carries module {}; {} is module {}",
                        was.name, module.digest, module.name
                    ),
                ));
            }
            if module.serial < was.serial && !allow_rollback {
                return Err(Refusal::new(
                    409,
                    "serial_rollback",
                    format!(
                        "channel {repo}:{channel} is at {} serial {}; {} has serial {} (a rollback needs --allow-rollback)",
                        was.name, was.serial, module.digest, module.serial
                    ),
                ));
            }
        }
        tx.execute(
            "INSERT INTO channels (repo, channel, digest, name, version, serial, role, set_at, set_by)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
             ON CONFLICT(repo, channel) DO UPDATE SET digest = excluded.digest, name = excluded.name,
                 version = excluded.version, serial = excluded.serial, role = excluded.role,
                 set_at = excluded.set_at, set_by = excluded.set_by",
            params![
                repo,
                channel,
                module.digest.to_string(),
                module.name,
                module.version,
                serial_sql(module.serial)?,
                role_name(module.role),
                now(),
                actor
            ],
        )?;
        let rollback = was.as_ref().is_some_and(|w| module.serial < w.serial);
        let data = serde_json::json!({"channel": channel, "from": from, "was": was.as_ref().map(|w| &w.digest),
            "module": module, "rollback": rollback});
        audit::append(&tx, now(), actor, if from.is_some() { "channel.promote" } else { "channel.set" }, repo, &data)?;
        let templates: Vec<String> = {
            let mut stmt = tx.prepare(
                "SELECT DISTINCT template FROM template_entries WHERE repo = ?1 AND channel = ?2 ORDER BY template",
            )?;
            stmt.query_map(params![repo, channel], |r| r.get(0))?.collect::<Result<_, _>>()?
        };
        let mut rendered = Vec::new();
        for t in templates {
            if let Some(rev) = rollout::republish(&tx, &t, actor)? {
                rendered.push((t, rev));
            }
        }
        let channel =
            find_channel(&tx, repo, channel)?.ok_or_else(|| Refusal::new(500, "internal", "channel vanished"))?;
        tx.commit()?;
        Ok(ChannelChange { channel, was, rendered })
    }

    /// Creates or changes template `name`: `replace` sets exactly `specs` (creating the
    /// template), else each spec adds or replaces the entry of its module name. Refused when a
    /// module's rendered serial would drop (unless `allow_rollback`). Returns the new revision.
    /// Sets (or clears) how long a root entered by soft reboot has to pass its trial on the
    /// nodes of `name`: 30 to 3600 seconds.
    pub fn template_trial_deadline(&self, name: &str, seconds: Option<u64>, actor: &str) -> Result<(), Refusal> {
        check_trial_deadline(seconds)?;
        let conn = self.conn();
        let tx = conn.unchecked_transaction()?;
        let changed = tx.execute(
            "UPDATE templates SET trial_deadline_s = ?2 WHERE name = ?1",
            params![name, seconds.map(|s| s as i64)],
        )?;
        if changed == 0 {
            return Err(Refusal::new(404, "unknown_template", format!("no template {name:?}")));
        }
        crate::audit::append(
            &tx,
            now(),
            actor,
            "template.trial_deadline",
            name,
            &serde_json::json!({"seconds": seconds}),
        )?;
        tx.commit()?;
        Ok(())
    }

    pub fn template_put(
        &self,
        name: &str,
        specs: &[EntrySpec],
        replace: bool,
        allow_rollback: bool,
        actor: &str,
    ) -> Result<Option<i64>, Refusal> {
        check_template_name(name)?;
        if specs.is_empty() {
            return Err(Refusal::new(400, "bad_template", "a template change names at least one module"));
        }
        let conn = self.conn();
        let tx = conn.unchecked_transaction()?;
        let exists: bool =
            tx.query_row("SELECT EXISTS (SELECT 1 FROM templates WHERE name = ?1)", [name], |r| r.get(0))?;
        if !exists && !replace {
            return Err(Refusal::new(404, "unknown_template", format!("no template {name:?}; create it first")));
        }
        let before = target_serials(&tx, name)?;
        if replace {
            tx.execute(
                "INSERT INTO templates (name, created_at) VALUES (?1, ?2) ON CONFLICT(name) DO NOTHING",
                params![name, now()],
            )?;
            tx.execute("DELETE FROM template_entries WHERE template = ?1", [name])?;
        }
        for spec in specs {
            let (module, repo, channel, digest, serial, verified) = match spec {
                EntrySpec::Channel { repo, channel } => {
                    let c = find_channel(&tx, repo, channel)?.ok_or_else(|| {
                        Refusal::new(
                            404,
                            "unknown_channel",
                            format!("no channel {repo}:{channel} (set it with channel set)"),
                        )
                    })?;
                    (c.name, repo, Some(channel), None, None, true)
                }
                EntrySpec::Digest { repo, digest, name, serial, verified } => {
                    (name.clone(), repo, None, Some(digest), Some(serial_sql(*serial)?), *verified)
                }
            };
            tx.execute(
                "INSERT OR REPLACE INTO template_entries (template, module, repo, channel, digest, serial, verified)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![name, module, repo, channel, digest, serial, verified],
            )?;
        }
        let after = render::render(&load_entries(&tx, name)?);
        if let Some((m, old, new)) = after.iter().find_map(|m| {
            before.iter().find(|(n, s)| *n == m.name && m.serial < *s).map(|(_, s)| (&m.name, *s, m.serial))
        }) && !allow_rollback
        {
            return Err(Refusal::new(
                409,
                "serial_rollback",
                format!(
                    "template {name} serves {m} at serial {old}; this change gives serial {new} (a rollback needs --allow-rollback)"
                ),
            ));
        }
        let kind = if replace { "template.set" } else { "template.add" };
        let data = serde_json::json!({"entries": specs, "allow_rollback": allow_rollback});
        audit::append(&tx, now(), actor, kind, name, &data)?;
        let revision = rollout::republish(&tx, name, actor)?;
        tx.commit()?;
        Ok(revision)
    }

    /// Removes module `module` from template `name`.
    pub fn template_remove(&self, name: &str, module: &str, actor: &str) -> Result<Option<i64>, Refusal> {
        let conn = self.conn();
        let tx = conn.unchecked_transaction()?;
        if tx.execute("DELETE FROM template_entries WHERE template = ?1 AND module = ?2", params![name, module])? == 0 {
            return Err(Refusal::new(404, "unknown_module", format!("template {name:?} has no module {module:?}")));
        }
        audit::append(&tx, now(), actor, "template.remove", name, &serde_json::json!({"module": module}))?;
        let revision = rollout::republish(&tx, name, actor)?;
        tx.commit()?;
        Ok(revision)
    }

    pub fn template_show(&self, name: &str) -> Result<TemplateView, Refusal> {
        let conn = self.conn();
        let revision: i64 = conn
            .query_row("SELECT revision FROM rollouts WHERE template = ?1", [name], |r| r.get(0))
            .optional()?
            .ok_or_else(|| Refusal::new(404, "unknown_template", format!("no template {name:?}")))?;
        let verified: std::collections::HashMap<String, bool> = {
            let mut stmt = conn.prepare("SELECT module, verified FROM template_entries WHERE template = ?1")?;
            stmt.query_map([name], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? != 0)))?.collect::<Result<_, _>>()?
        };
        let entries = load_entries(&conn, name)?
            .into_iter()
            .map(|e| EntryView {
                verified: verified.get(&e.module).copied().unwrap_or(false),
                digest: e.pin.digest().to_string(),
                serial: e.pin.serial(),
                channel: match &e.pin {
                    Pin::Channel { channel, .. } => Some(channel.clone()),
                    Pin::Digest { .. } => None,
                },
                module: e.module,
                repo: e.repo,
            })
            .collect();
        Ok(TemplateView { name: name.to_owned(), revision, entries })
    }

    /// The desired state template `name`'s newest rendering gives: to `node` if named (its
    /// generation as it would be, its intents), else with generation 0. Assigns nothing.
    pub fn template_render(&self, name: &str, node: Option<&str>) -> Result<DesiredState, Refusal> {
        let node = node.map(|n| self.node(n)).transpose()?;
        let conn = self.conn();
        let (revision, modules): (i64, String) = conn
            .query_row(
                "SELECT r.revision, g.modules FROM rollouts r
                 JOIN renderings g ON g.template = r.template AND g.revision = r.revision WHERE r.template = ?1",
                [name],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?
            .ok_or_else(|| Refusal::new(404, "unknown_template", format!("no template {name:?}")))?;
        let modules = serde_json::from_str(&modules).map_err(|e| Refusal::new(500, "internal", e.to_string()))?;
        let (generation, draining) = match &node {
            None => (0, false),
            Some(n) => {
                let on_target: bool = conn.query_row(
                    "SELECT EXISTS (SELECT 1 FROM nodes WHERE id = ?1 AND template = ?2 AND revision = ?3)",
                    params![n.id, name, revision],
                    |r| r.get(0),
                )?;
                let generation = n.generation.max(0) as u64;
                (if on_target { generation } else { generation + 1 }, n.state == "draining")
            }
        };
        Ok(render::desired(generation, Some(name.to_owned()), modules, draining))
    }
}

/// A template's trial deadline: 30 to 3600 seconds.
pub(crate) fn check_trial_deadline(seconds: Option<u64>) -> Result<(), Refusal> {
    match seconds {
        Some(s) if !(30..=3600).contains(&s) => {
            Err(Refusal::new(400, "bad_template", format!("trial deadline {s} s is not 30 to 3600 seconds")))
        }
        _ => Ok(()),
    }
}
