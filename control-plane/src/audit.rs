//! The audit journal: append-only and hash-chained. Each record's hash is SHA-256 over the
//! previous record's hash and the record's canonical fields, so editing, removing or reordering
//! any record breaks every hash after it; `verify` names the first record that does not check.

use rusqlite::{Connection, OptionalExtension as _, params};
use serde::Serialize;
use sha2::{Digest as _, Sha256};

/// The hash a chain starts from.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Record {
    pub seq: i64,
    pub time: i64,
    pub actor: String,
    pub kind: String,
    pub subject: String,
    pub data: serde_json::Value,
    pub prev_hash: String,
    pub hash: String,
}

/// A record's hash: SHA-256 over the previous hash and the record's fields, length-prefixed.
pub fn hash_of(prev: &str, seq: i64, time: i64, actor: &str, kind: &str, subject: &str, data: &str) -> String {
    let mut h = Sha256::new();
    // Length-prefixed fields: no two different records serialise to the same bytes.
    for field in [prev, &seq.to_string(), &time.to_string(), actor, kind, subject, data] {
        h.update((field.len() as u64).to_le_bytes());
        h.update(field.as_bytes());
    }
    hex::encode(h.finalize())
}

/// Appends a record inside the caller's transaction; returns its sequence number.
pub fn append(
    tx: &Connection,
    time: i64,
    actor: &str,
    kind: &str,
    subject: &str,
    data: &serde_json::Value,
) -> rusqlite::Result<i64> {
    let last: Option<(i64, String)> = tx
        .query_row("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1", [], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let (seq, prev) = last.map_or((1, GENESIS.to_owned()), |(s, h)| (s + 1, h));
    let data = data.to_string();
    let hash = hash_of(&prev, seq, time, actor, kind, subject, &data);
    tx.execute(
        "INSERT INTO audit (seq, time, actor, kind, subject, data, prev_hash, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![seq, time, actor, kind, subject, data, prev, hash],
    )?;
    Ok(seq)
}

/// Records from `after` (exclusive), oldest first, at most `limit`.
pub fn list(conn: &Connection, after: i64, limit: i64) -> rusqlite::Result<Vec<Record>> {
    let mut stmt = conn.prepare(
        "SELECT seq, time, actor, kind, subject, data, prev_hash, hash FROM audit WHERE seq > ?1 ORDER BY seq LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![after, limit], |r| {
        let data: String = r.get(5)?;
        Ok(Record {
            seq: r.get(0)?,
            time: r.get(1)?,
            actor: r.get(2)?,
            kind: r.get(3)?,
            subject: r.get(4)?,
            data: serde_json::from_str(&data).unwrap_or(serde_json::Value::String(data)),
            prev_hash: r.get(6)?,
            hash: r.get(7)?,
        })
    })?;
    rows.collect()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChainReport {
    pub records: i64,
    /// The first record that does not check, and why.
    pub broken: Option<(i64, String)>,
}

/// Walks the whole chain.
pub fn verify(conn: &Connection) -> rusqlite::Result<ChainReport> {
    let mut stmt =
        conn.prepare("SELECT seq, time, actor, kind, subject, data, prev_hash, hash FROM audit ORDER BY seq")?;
    let mut rows = stmt.query([])?;
    let (mut expected_prev, mut expected_seq, mut count) = (GENESIS.to_owned(), 1i64, 0i64);
    while let Some(r) = rows.next()? {
        let (seq, time): (i64, i64) = (r.get(0)?, r.get(1)?);
        let (actor, kind, subject, data, prev, hash): (String, String, String, String, String, String) =
            (r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?, r.get(7)?);
        count += 1;
        let problem = if seq != expected_seq {
            Some(format!("sequence {seq} where {expected_seq} was expected (a record is missing)"))
        } else if prev != expected_prev {
            Some("previous-hash link does not match the record before it".to_owned())
        } else if hash != hash_of(&prev, seq, time, &actor, &kind, &subject, &data) {
            Some("hash does not match the record's contents (edited)".to_owned())
        } else {
            None
        };
        if let Some(p) = problem {
            return Ok(ChainReport { records: count, broken: Some((seq, p)) });
        }
        expected_prev = hash;
        expected_seq += 1;
    }
    Ok(ChainReport { records: count, broken: None })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> Connection {
        let c = Connection::open_in_memory().unwrap();
        crate::db::migrate(&c).unwrap();
        c
    }

    #[test]
    fn chain_verifies_and_names_the_first_broken_record() {
        let c = db();
        for i in 0..5 {
            append(&c, 100 + i, "operator:admin", "token.create", "t", &serde_json::json!({"i": i})).unwrap();
        }
        assert_eq!(verify(&c).unwrap(), ChainReport { records: 5, broken: None });

        c.execute("UPDATE audit SET data = '{\"i\":99}' WHERE seq = 3", []).unwrap();
        let r = verify(&c).unwrap();
        assert_eq!(r.broken.as_ref().map(|b| b.0), Some(3));
        assert!(r.broken.unwrap().1.contains("edited"));

        let c = db();
        for i in 0..4 {
            append(&c, i, "a", "k", "s", &serde_json::Value::Null).unwrap();
        }
        c.execute("DELETE FROM audit WHERE seq = 2", []).unwrap();
        assert_eq!(verify(&c).unwrap().broken.map(|b| b.0), Some(3));
    }
}
