//! SQLite storage: one file in the state directory, WAL, append-only migrations run at
//! start-up. With WAL and `synchronous=NORMAL`, a committed (acknowledged) write survives the
//! process being killed; only a power loss can take the last commits back.

use std::path::Path;

use rusqlite::Connection;

/// Append-only: never edit a shipped migration, add a new one.
const MIGRATIONS: &[&str] = &[
    // 1: the first schema.
    "CREATE TABLE tokens (
        hash TEXT PRIMARY KEY,
        created_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        used_at INTEGER,
        node_name TEXT,
        bound_mac TEXT,
        bound_uuid TEXT
    );
    CREATE TABLE nodes (
        id TEXT PRIMARY KEY,
        name TEXT,
        mac TEXT,
        smbios_uuid TEXT,
        serial TEXT,
        state TEXT NOT NULL,
        may_reenroll INTEGER NOT NULL DEFAULT 0,
        revoked INTEGER NOT NULL DEFAULT 0,
        template TEXT,
        generation INTEGER NOT NULL DEFAULT 1,
        created_at INTEGER NOT NULL,
        last_seen INTEGER,
        boot_id TEXT,
        agent_version TEXT,
        phase TEXT,
        phase_timings TEXT,
        module_digests TEXT,
        last_reconcile TEXT,
        probe_summary TEXT,
        heartbeats INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX nodes_name ON nodes(name);
    CREATE TABLE certs (
        serial TEXT PRIMARY KEY,
        node_id TEXT NOT NULL,
        not_after INTEGER NOT NULL,
        revoked INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE templates (
        name TEXT PRIMARY KEY,
        modules TEXT NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE tasks (
        id TEXT PRIMARY KEY,
        node_id TEXT NOT NULL,
        spec TEXT NOT NULL,
        state TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        lease_until INTEGER,
        deliveries INTEGER NOT NULL DEFAULT 0,
        result TEXT,
        finished_at INTEGER
    );
    CREATE INDEX tasks_node ON tasks(node_id, state);
    CREATE TABLE audit (
        seq INTEGER PRIMARY KEY,
        time INTEGER NOT NULL,
        actor TEXT NOT NULL,
        kind TEXT NOT NULL,
        subject TEXT NOT NULL,
        data TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL
    );
    CREATE TABLE node_audit_seen (
        node_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        PRIMARY KEY (node_id, seq)
    );",
    // 2: tokens may carry the template their node starts on; reports name the store kind.
    "ALTER TABLE tokens ADD COLUMN template TEXT;
     ALTER TABLE nodes ADD COLUMN store TEXT;",
    // 3: why the last boot failed, as the agent reported it (cleared by a later report).
    "ALTER TABLE nodes ADD COLUMN last_error TEXT;",
    // 4: signed journal checkpoints (the journal key itself is outside the database).
    "CREATE TABLE checkpoints (
        seq INTEGER PRIMARY KEY,
        head TEXT NOT NULL,
        time INTEGER NOT NULL,
        key_id TEXT NOT NULL,
        signature TEXT NOT NULL
    );",
    // 5: release channels; templates as entries (each following a channel or pinned by
    // digest) rendered into numbered renderings; rollouts (which rendering is the target, the
    // one before it, batch size, halt); which rendering each node is served and how far its
    // rollout got; the receipts nodes send. Existing templates become unverified digest
    // entries rendered exactly as they were served, as revision 1.
    "CREATE TABLE channels (
        repo TEXT NOT NULL,
        channel TEXT NOT NULL,
        digest TEXT NOT NULL,
        name TEXT NOT NULL,
        version TEXT NOT NULL,
        serial INTEGER NOT NULL,
        role TEXT NOT NULL,
        set_at INTEGER NOT NULL,
        set_by TEXT NOT NULL,
        PRIMARY KEY (repo, channel)
    );
    CREATE TABLE template_entries (
        template TEXT NOT NULL,
        module TEXT NOT NULL,
        repo TEXT NOT NULL,
        channel TEXT,
        digest TEXT,
        serial INTEGER,
        verified INTEGER NOT NULL,
        PRIMARY KEY (template, module),
        CHECK ((channel IS NULL) != (digest IS NULL))
    );
    CREATE INDEX template_entries_channel ON template_entries(repo, channel);
    CREATE TABLE renderings (
        template TEXT NOT NULL,
        revision INTEGER NOT NULL,
        modules TEXT NOT NULL,
        digests TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        PRIMARY KEY (template, revision)
    );
    CREATE TABLE rollouts (
        template TEXT PRIMARY KEY,
        revision INTEGER NOT NULL,
        previous INTEGER,
        batch INTEGER,
        halted_node TEXT,
        halted_reason TEXT,
        halted_at INTEGER
    );
    CREATE TABLE receipts (
        node_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        txn TEXT NOT NULL,
        module TEXT NOT NULL,
        outcome TEXT NOT NULL,
        to_digest TEXT,
        received_at INTEGER NOT NULL,
        receipt TEXT NOT NULL,
        PRIMARY KEY (node_id, seq)
    );
    ALTER TABLE nodes ADD COLUMN revision INTEGER;
    ALTER TABLE nodes ADD COLUMN rollout TEXT;
    ALTER TABLE nodes ADD COLUMN rollout_since INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX nodes_rollout ON nodes(template, rollout);
    INSERT OR REPLACE INTO template_entries (template, module, repo, digest, serial, verified)
        SELECT t.name, json_extract(m.value, '$.name'),
               substr(json_extract(m.value, '$.reference'), 1, instr(json_extract(m.value, '$.reference'), '@') - 1),
               json_extract(m.value, '$.digest'), json_extract(m.value, '$.serial'), 0
        FROM templates t, json_each(t.modules) m;
    INSERT INTO renderings (template, revision, modules, digests, created_at)
        SELECT t.name, 1, t.modules,
               (SELECT json_group_array(d) FROM (SELECT DISTINCT json_extract(value, '$.digest') AS d
                                                 FROM json_each(t.modules) ORDER BY d)),
               t.created_at
        FROM templates t;
    INSERT INTO rollouts (template, revision) SELECT name, 1 FROM templates;
    UPDATE nodes SET revision = 1, rollout = 'waiting' WHERE template IS NOT NULL;
    ALTER TABLE templates DROP COLUMN modules;",
    "ALTER TABLE templates ADD COLUMN trial_deadline_s INTEGER;",
    "ALTER TABLE tasks ADD COLUMN deadline INTEGER;",
    "ALTER TABLE nodes ADD COLUMN good_revision INTEGER;",
    "ALTER TABLE nodes ADD COLUMN served_generation INTEGER;",
    "ALTER TABLE nodes ADD COLUMN agent_rss_kib INTEGER; ALTER TABLE nodes ADD COLUMN agent_cpu_ms INTEGER;",
    "ALTER TABLE nodes ADD COLUMN served_at INTEGER;",
];

/// Opens (creating) the database at `path` and brings its schema up to date.
pub fn open(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    migrate(&conn)?;
    Ok(conn)
}

/// Runs every migration newer than the database's `user_version`, each in its own transaction.
pub fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let current: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(usize::try_from(current).unwrap_or(0)) {
        let tx = conn.unchecked_transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i as i64 + 1)?;
        tx.commit()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn migrations_apply_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plane.db");
        drop(super::open(&path).unwrap());
        let c = super::open(&path).unwrap();
        let v: i64 = c.pragma_query_value(None, "user_version", |r| r.get(0)).unwrap();
        assert_eq!(v, super::MIGRATIONS.len() as i64);
        let mode: String = c.pragma_query_value(None, "journal_mode", |r| r.get(0)).unwrap();
        assert_eq!(mode, "wal");
    }
}
