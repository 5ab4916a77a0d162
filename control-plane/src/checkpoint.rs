//! Signed journal checkpoints: what makes the audit journal prove completeness and authorship,
//! not only order. The hash chain alone lets anyone who can write the database delete the
//! newest records, or edit one and recompute every later hash. So the plane signs, at an
//! interval and on shutdown, "record `seq` has hash `head`" with a journal key kept outside the
//! database (`STATE/journal.key`, 0600), keeps the checkpoints in the database and the newest
//! also in `STATE/journal.checkpoint`, and `audit verify` checks every record up to the newest
//! checkpoint against them. Records after it are named as not yet anchored. An operator who
//! keeps an exported checkpoint elsewhere can check that the journal still contains it.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use base64::Engine as _;
use ironroot_contract::wire::JournalCheckpoint;
use ironroot_contract::{KeyAlgorithm, SigningKey, TrustedKey};
use rusqlite::{Connection, OptionalExtension as _, params};
use serde::Serialize;

use crate::ca::write_secret;
use crate::store::{Refusal, Store};

/// The plane's journal key and where the newest checkpoint is kept beside the database.
pub struct Journal {
    key: SigningKey,
    public: TrustedKey,
    newest_file: PathBuf,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Journal(key {})", self.public.id())
    }
}

impl Journal {
    /// Opens `DIR/journal.key`, creating it (0600) and `DIR/journal.pub` on first start.
    pub fn open_or_create(dir: &Path) -> anyhow::Result<Self> {
        let (key_path, pub_path) = (dir.join("journal.key"), dir.join("journal.pub"));
        let key = if key_path.exists() {
            let pem = std::fs::read_to_string(&key_path).with_context(|| format!("reading {}", key_path.display()))?;
            SigningKey::parse_pem(&pem).with_context(|| format!("journal key {}", key_path.display()))?
        } else {
            let key = SigningKey::generate(KeyAlgorithm::Ed25519);
            write_secret(&key_path, &key.to_pkcs8_pem().context("encoding the journal key")?, 0o600)?;
            key
        };
        let public_pem = key.public_pem().context("encoding the journal public key")?;
        write_secret(&pub_path, &public_pem, 0o644)?;
        let public = TrustedKey::parse_pem(&public_pem).context("the journal public key")?;
        Ok(Self { key, public, newest_file: dir.join("journal.checkpoint") })
    }

    pub fn key_id(&self) -> &str {
        self.public.id()
    }

    fn sign(&self, seq: u64, head: &str, time: u64) -> JournalCheckpoint {
        let signature = self.key.sign(&JournalCheckpoint::signed_message(seq, head, time));
        JournalCheckpoint {
            seq,
            head: head.to_owned(),
            time,
            key_id: self.public.id().to_owned(),
            signature: base64::engine::general_purpose::STANDARD.encode(signature),
        }
    }

    /// Whether this plane's journal key made `c`.
    fn signed(&self, c: &JournalCheckpoint) -> bool {
        c.key_id == self.public.id()
            && c.signature_bytes().is_ok_and(|sig| {
                self.public.verify(&JournalCheckpoint::signed_message(c.seq, &c.head, c.time), &sig).is_ok()
            })
    }

    /// The newest checkpoint as kept beside the database, if any (a damaged file is reported by
    /// verification, not ignored).
    fn newest_on_disk(&self) -> Result<Option<JournalCheckpoint>, String> {
        match std::fs::read(&self.newest_file) {
            Ok(bytes) => {
                JournalCheckpoint::parse(&bytes).map(Some).map_err(|e| format!("{}: {e}", self.newest_file.display()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("reading {}: {e}", self.newest_file.display())),
        }
    }
}

/// What `audit verify` found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JournalReport {
    pub records: i64,
    /// The first thing that does not check: a record's sequence number, and why.
    pub broken: Option<(i64, String)>,
    /// Checkpoints checked (the database's, the one beside it, and one given to compare).
    pub checkpoints: usize,
    /// Every record up to this one is covered by a valid checkpoint...
    pub anchored_through: Option<u64>,
    /// ...signed at this time.
    pub anchored_at: Option<u64>,
    /// Records after the newest checkpoint: in order, but not yet anchored.
    pub unanchored: i64,
}

fn head(conn: &Connection) -> rusqlite::Result<Option<(i64, String)>> {
    conn.query_row("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1", [], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()
}

fn stored(conn: &Connection) -> rusqlite::Result<Vec<JournalCheckpoint>> {
    let mut stmt = conn.prepare("SELECT seq, head, time, key_id, signature FROM checkpoints ORDER BY seq")?;
    let rows = stmt.query_map([], |r| {
        Ok(JournalCheckpoint {
            seq: r.get::<_, i64>(0)?.max(0) as u64,
            head: r.get(1)?,
            time: r.get::<_, i64>(2)?.max(0) as u64,
            key_id: r.get(3)?,
            signature: r.get(4)?,
        })
    })?;
    rows.collect()
}

impl Store {
    /// Signs the journal's head now, unless the newest checkpoint already covers it; returns the
    /// newest checkpoint (None for an empty journal).
    pub fn checkpoint(&self, journal: &Journal, now: i64) -> Result<Option<JournalCheckpoint>, Refusal> {
        let conn = self.conn();
        let Some((seq, hash)) = head(&conn)? else { return Ok(None) };
        if let Some(newest) = stored(&conn)?.pop()
            && newest.seq == seq as u64
        {
            return Ok(Some(newest));
        }
        let c = journal.sign(seq as u64, &hash, now.max(0) as u64);
        conn.execute(
            "INSERT INTO checkpoints (seq, head, time, key_id, signature) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![seq, c.head, now, c.key_id, c.signature],
        )?;
        drop(conn);
        let json = serde_json::to_string(&c).map_err(|e| Refusal::new(500, "internal", e.to_string()))?;
        write_secret(&journal.newest_file, &format!("{json}\n"), 0o644).map_err(|e| {
            tracing::error!(error = %e, "writing the newest checkpoint");
            Refusal::new(500, "internal", "the plane could not write its checkpoint file")
        })?;
        Ok(Some(c))
    }

    /// The newest checkpoint in the database.
    pub fn newest_checkpoint(&self) -> Result<Option<JournalCheckpoint>, Refusal> {
        Ok(stored(&self.conn())?.pop())
    }

    /// Walks the chain, then checks every checkpoint (the database's, the file beside it, and
    /// `against` when given) against the records.
    pub fn verify_journal(
        &self,
        journal: &Journal,
        against: Option<&JournalCheckpoint>,
    ) -> Result<JournalReport, Refusal> {
        let conn = self.conn();
        let chain = crate::audit::verify(&conn)?;
        let mut report = JournalReport {
            records: chain.records,
            broken: chain.broken,
            checkpoints: 0,
            anchored_through: None,
            anchored_at: None,
            unanchored: 0,
        };
        if report.broken.is_some() {
            return Ok(report);
        }
        let last = head(&conn)?.map_or(0, |(seq, _)| seq);
        let mut all = stored(&conn)?;
        match journal.newest_on_disk() {
            Ok(c) => all.extend(c),
            Err(why) => {
                report.broken = Some((last, format!("the newest checkpoint cannot be read: {why}")));
                return Ok(report);
            }
        }
        all.extend(against.cloned());
        for c in &all {
            report.checkpoints += 1;
            let seq = c.seq as i64;
            let problem = if !journal.signed(c) {
                Some(format!("the checkpoint for record {seq} is not signed by this plane's journal key"))
            } else if seq > last {
                Some(format!(
                    "a checkpoint signed at {} names record {seq} but the journal ends at {last}: records were deleted",
                    c.time
                ))
            } else {
                let hash: Option<String> =
                    conn.query_row("SELECT hash FROM audit WHERE seq = ?1", [seq], |r| r.get(0)).optional()?;
                (hash.as_deref() != Some(c.head.as_str())).then(|| {
                    format!(
                        "record {seq} is not the record a checkpoint signed at {}: the journal was rewritten",
                        c.time
                    )
                })
            };
            if let Some(p) = problem {
                report.broken = Some((seq, p));
                return Ok(report);
            }
            if report.anchored_through.is_none_or(|a| c.seq > a) {
                (report.anchored_through, report.anchored_at) = (Some(c.seq), Some(c.time));
            }
        }
        report.unanchored = last - report.anchored_through.map_or(0, |a| a as i64);
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Settings;

    fn plane() -> (tempfile::TempDir, Store, Journal) {
        let dir = tempfile::tempdir().unwrap();
        let ca = crate::ca::Authority::open_or_create(dir.path()).unwrap();
        let store = Store::open(&dir.path().join("plane.db"), ca, Settings::standard()).unwrap();
        let journal = Journal::open_or_create(dir.path()).unwrap();
        (dir, store, journal)
    }

    fn append(store: &Store, n: i64) {
        for i in 0..n {
            crate::audit::append(&store.conn(), i, "operator:admin", "token.create", "t", &serde_json::json!({"i": i}))
                .unwrap();
        }
    }

    #[test]
    fn checkpoints_anchor_records_and_name_the_rest() {
        let (dir, store, journal) = plane();
        assert_eq!(store.checkpoint(&journal, 1).unwrap(), None, "nothing to sign yet");
        append(&store, 3);
        let c = store.checkpoint(&journal, 10).unwrap().unwrap();
        assert_eq!(c.seq, 3);
        assert_eq!(store.checkpoint(&journal, 11).unwrap(), Some(c.clone()), "the head did not move");
        append(&store, 2);
        let r = store.verify_journal(&journal, None).unwrap();
        assert_eq!((r.broken, r.anchored_through, r.anchored_at, r.unanchored), (None, Some(3), Some(10), 2));
        let on_disk = JournalCheckpoint::parse(&std::fs::read(dir.path().join("journal.checkpoint")).unwrap()).unwrap();
        assert_eq!(on_disk, c);
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.path().join("journal.key")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn deleted_and_rewritten_records_and_forged_checkpoints_are_named() {
        let (_dir, store, journal) = plane();
        append(&store, 5);
        store.checkpoint(&journal, 10).unwrap().unwrap();
        store.conn().execute("DELETE FROM audit WHERE seq >= 4", []).unwrap();
        let r = store.verify_journal(&journal, None).unwrap();
        assert!(r.broken.as_ref().unwrap().1.contains("records were deleted"), "{r:?}");

        let (_dir, store, journal) = plane();
        append(&store, 5);
        store.checkpoint(&journal, 10).unwrap();
        // Edit record 2 and recompute every later hash: the chain verifies, the checkpoint not.
        let conn = store.conn();
        conn.execute("UPDATE audit SET actor = 'operator:mallory' WHERE seq = 2", []).unwrap();
        let mut prev: String = conn.query_row("SELECT hash FROM audit WHERE seq = 1", [], |r| r.get(0)).unwrap();
        for seq in 2..=5i64 {
            let (time, actor, kind, subject, data): (i64, String, String, String, String) = conn
                .query_row("SELECT time, actor, kind, subject, data FROM audit WHERE seq = ?1", [seq], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                })
                .unwrap();
            let hash = crate::audit::hash_of(&prev, seq, time, &actor, &kind, &subject, &data);
            conn.execute("UPDATE audit SET prev_hash = ?1, hash = ?2 WHERE seq = ?3", params![prev, hash, seq])
                .unwrap();
            prev = hash;
        }
        drop(conn);
        assert_eq!(crate::audit::verify(&store.conn()).unwrap().broken, None, "the chain alone is fooled");
        let r = store.verify_journal(&journal, None).unwrap();
        assert!(r.broken.as_ref().unwrap().1.contains("rewritten"), "{r:?}");

        let (_dir, store, journal) = plane();
        append(&store, 2);
        let forged = JournalCheckpoint { time: 99, ..store.checkpoint(&journal, 10).unwrap().unwrap() };
        let r = store.verify_journal(&journal, Some(&forged)).unwrap();
        assert!(r.broken.as_ref().unwrap().1.contains("not signed by this plane's journal key"), "{r:?}");
    }
}
