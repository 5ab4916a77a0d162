//! The node journal: every step of a module transaction, every receipt, every finished task and
//! every audit record the node makes, in one append-only, hash-chained file
//! (`/persist/ironroot/journal/node.jsonl` on disk-backed nodes, else under `/run/ironroot`).
//! It is both the runtime's memory across a `kill -9` (transactions resume or roll back from it)
//! and the spool the plane receives in order once it is reachable.
//!
//! A record is synced to disk before `append` returns, so a step is journaled before it is
//! taken. The file is bounded: records the plane acknowledged are dropped when it is rewritten;
//! records it has not are never dropped — when they alone fill it, `append` refuses and the
//! runtime refuses new changes until the plane takes them.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// The hash the chain starts from.
const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// The file name beside the delivery cursor.
const FILE: &str = "node.jsonl";
const CURSOR: &str = "delivered";

/// One journal record as kept and sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub seq: u64,
    /// Seconds since the epoch, the node's clock.
    pub time: u64,
    pub kind: String,
    pub data: serde_json::Value,
    pub prev: String,
    pub hash: String,
}

fn hash_of(prev: &str, seq: u64, time: u64, kind: &str, data: &str) -> String {
    let mut h = Sha256::new();
    for field in [prev, &seq.to_string(), &time.to_string(), kind, data] {
        h.update((field.len() as u64).to_le_bytes());
        h.update(field.as_bytes());
    }
    hex::encode(h.finalize())
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("{op} {path}")]
    Io { op: &'static str, path: PathBuf, source: std::io::Error },
    #[error("the node journal {path} is broken at record {seq}: {reason}")]
    Broken { path: PathBuf, seq: u64, reason: String },
    #[error("the node journal {path} is not a regular file, or is over {cap} bytes (reading stopped there)")]
    NotAJournal { path: PathBuf, cap: u64 },
    #[error(
        "the node journal is full ({bytes} bytes of records the plane has not received); changes are refused until it does"
    )]
    Full { bytes: u64 },
}

/// The journal, open for appending.
#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
    file: std::fs::File,
    /// The last record's sequence number and hash.
    head: (u64, String),
    /// Records up to this one were acknowledged by the plane.
    delivered: u64,
    /// Bytes in the file, and bytes of records not yet delivered.
    bytes: u64,
    limit: u64,
    /// Records kept in memory: every undelivered one (what the spool sends) and every one
    /// from `pin` on (what a resumed transaction needs), oldest first.
    kept: Vec<Record>,
    /// The first record the runtime still needs after a restart, delivered or not.
    pin: u64,
    /// Every record read at open, for the runtime to resume from (transactions, finished tasks).
    replay: Vec<Record>,
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> JournalError + use<> {
    let path = path.to_owned();
    move |source| JournalError::Io { op, path, source }
}

/// Bytes of one record as a line.
fn line(r: &Record) -> Vec<u8> {
    let mut l = serde_json::to_vec(r).unwrap_or_default();
    l.push(b'\n');
    l
}

impl Journal {
    /// Opens (creating) the journal in `dir`, at most `limit` bytes. Checks the whole chain; a
    /// torn last line (a crash mid-write) is cut off, anything else broken is an error. A new
    /// journal numbers its records from `first`: the plane keeps each (node, sequence number)
    /// once, so a journal under `/run` that starts again at every boot starts from the clock
    /// (microseconds) rather than from 1.
    pub fn open(dir: &Path, limit: u64, first: u64) -> Result<Self, JournalError> {
        use std::os::unix::fs::OpenOptionsExt as _;
        std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
        let path = dir.join(FILE);
        // Our own file: a link or a FIFO there is someone else's doing, refused (a FIFO opened
        // non-blocking, so it does not stall the service), and the read stops past the cap.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc_flags())
            .open(&path)
            .map_err(io("opening", &path))?;
        let cap = limit.saturating_mul(2).saturating_add(MAX_READ_SLACK);
        let not_a_journal = || JournalError::NotAJournal { path: path.clone(), cap };
        if !file.metadata().map_err(io("reading", &path))?.is_file() {
            return Err(not_a_journal());
        }
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut std::io::Read::take(&file, cap.saturating_add(1)), &mut bytes)
            .map_err(io("reading", &path))?;
        if bytes.len() as u64 > cap {
            return Err(not_a_journal());
        }
        let (records, good_bytes) =
            parse_chain(&bytes).map_err(|(seq, reason)| JournalError::Broken { path: path.clone(), seq, reason })?;
        file.set_len(good_bytes).map_err(io("cutting a torn record from", &path))?;
        let head = records.last().map_or((first.max(1) - 1, GENESIS.to_owned()), |r| (r.seq, r.hash.clone()));
        // An empty journal has nothing to deliver, whatever a cursor from before says.
        let delivered = if records.is_empty() { head.0 } else { read_cursor(dir).min(head.0) };
        let kept: Vec<Record> = records.iter().filter(|r| r.seq > delivered).cloned().collect();
        let pin = u64::MAX;
        Ok(Self { dir: dir.to_owned(), file, head, delivered, bytes: good_bytes, limit, kept, pin, replay: records })
    }

    /// Every record the journal held when it was opened, oldest first.
    pub fn replay(&self) -> &[Record] {
        &self.replay
    }

    /// Records the plane has not acknowledged yet, oldest first.
    pub fn pending(&self) -> &[Record] {
        let first = self.kept.partition_point(|r| r.seq <= self.delivered);
        &self.kept[first..]
    }

    /// Keeps every record from `seq` on (delivered or not) across compaction: the first record
    /// of an open transaction. `None` releases it.
    pub fn pin(&mut self, seq: Option<u64>) {
        self.pin = seq.unwrap_or(u64::MAX);
        let (delivered, pin) = (self.delivered, self.pin);
        self.kept.retain(|r| r.seq > delivered || r.seq >= pin);
    }

    pub fn head(&self) -> u64 {
        self.head.0
    }

    /// Records up to this one were acknowledged by the plane.
    pub fn delivered_upto(&self) -> u64 {
        self.delivered
    }

    /// Bytes of records the plane has not acknowledged.
    pub fn undelivered_bytes(&self) -> u64 {
        self.pending().iter().map(|r| line(r).len() as u64).sum()
    }

    /// Whether a new change fits with every record it may write (its steps and its receipt):
    /// what compaction cannot drop (undelivered or pinned records) leaves a quarter of the
    /// limit, at most 64 KiB, free. Only the start of a change is held to it, so the records
    /// of a change under way always have room.
    pub fn has_room_for_change(&self) -> bool {
        let kept: u64 = self.kept.iter().map(|r| line(r).len() as u64).sum();
        kept.saturating_add(change_headroom(self.limit)) <= self.limit
    }

    /// Appends a record and syncs it to disk before returning its sequence number. When the
    /// file would pass its limit, delivered records are dropped first; when undelivered ones
    /// alone fill it, the record is refused.
    pub fn append(&mut self, time: u64, kind: &str, data: serde_json::Value) -> Result<u64, JournalError> {
        let seq = self.head.0 + 1;
        let hash = hash_of(&self.head.1, seq, time, kind, &data.to_string());
        let record = Record { seq, time, kind: kind.to_owned(), data, prev: self.head.1.clone(), hash };
        let bytes = line(&record);
        if self.bytes + bytes.len() as u64 > self.limit {
            self.compact()?;
            if self.bytes + bytes.len() as u64 > self.limit {
                return Err(JournalError::Full { bytes: self.bytes });
            }
        }
        let path = self.dir.join(FILE);
        self.file.write_all(&bytes).map_err(io("appending to", &path))?;
        self.file.sync_data().map_err(io("syncing", &path))?;
        self.bytes += bytes.len() as u64;
        self.head = (seq, record.hash.clone());
        self.kept.push(record);
        Ok(seq)
    }

    /// The plane acknowledged every record up to `seq`.
    pub fn delivered(&mut self, seq: u64) -> Result<(), JournalError> {
        let seq = seq.min(self.head.0);
        if seq <= self.delivered {
            return Ok(());
        }
        let path = self.dir.join(CURSOR);
        ironroot_oci::layout::write_atomic(&path, seq.to_string().as_bytes()).map_err(io("writing", &path))?;
        self.delivered = seq;
        let pin = self.pin;
        self.kept.retain(|r| r.seq > seq || r.seq >= pin);
        Ok(())
    }

    /// Rewrites the file with only the records still needed: undelivered or pinned (the chain
    /// continues from the first kept record's `prev`).
    fn compact(&mut self) -> Result<(), JournalError> {
        let path = self.dir.join(FILE);
        let mut bytes = Vec::new();
        for r in &self.kept {
            bytes.extend_from_slice(&line(r));
        }
        ironroot_oci::layout::write_atomic(&path, &bytes).map_err(io("rewriting", &path))?;
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .map_err(io("restricting", &path))?;
        use std::os::unix::fs::OpenOptionsExt as _;
        self.file = std::fs::OpenOptions::new().append(true).mode(0o600).open(&path).map_err(io("opening", &path))?;
        self.bytes = bytes.len() as u64;
        Ok(())
    }
}

/// Reads a journal file's bytes: the records of its chain and how many bytes they take. A torn
/// last line (no newline: a crash mid-write) is left out; anything else that does not parse or
/// does not chain is `Err((seq, reason))`, naming the first bad record.
pub fn parse_chain(bytes: &[u8]) -> Result<(Vec<Record>, u64), (u64, String)> {
    let mut records: Vec<Record> = Vec::new();
    let mut good = 0usize;
    let mut rest = bytes;
    while let Some(end) = rest.iter().position(|&b| b == b'\n') {
        let (text, tail) = rest.split_at(end + 1);
        rest = tail;
        let next = records.last().map_or(Some(1), |r| r.seq.checked_add(1));
        let r: Record = serde_json::from_slice(text).map_err(|e| (next.unwrap_or(u64::MAX), e.to_string()))?;
        let problem = match records.last() {
            _ if r.seq == 0 => Some("sequence 0".to_owned()),
            Some(p) if Some(r.seq) != p.seq.checked_add(1) => {
                Some(format!("sequence {} where {} was expected", r.seq, p.seq.saturating_add(1)))
            }
            Some(p) if p.hash != r.prev => Some("previous-hash link does not match".to_owned()),
            _ if r.hash != hash_of(&r.prev, r.seq, r.time, &r.kind, &r.data.to_string()) => {
                Some("hash does not match the record".to_owned())
            }
            _ => None,
        };
        if let Some(reason) = problem {
            return Err((r.seq, reason));
        }
        good += text.len();
        records.push(r);
    }
    Ok((records, good as u64))
}

/// The journal's open flags beyond read/append/create: no link followed, no FIFO waited on.
fn libc_flags() -> i32 {
    (rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK).bits() as i32
}

/// Room kept for the records of a change under way.
fn change_headroom(limit: u64) -> u64 {
    (limit / 4).min(64 << 10)
}

/// How far past twice its limit a journal file may be read before it is refused.
const MAX_READ_SLACK: u64 = 1 << 20;

fn read_cursor(dir: &Path) -> u64 {
    crate::external::read_if_present(&dir.join(CURSOR), 64, crate::external::Links::Refuse)
        .ok()
        .flatten()
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(i: u64) -> serde_json::Value {
        serde_json::json!({"i": i, "pad": "x".repeat(100)})
    }

    #[test]
    fn records_chain_survive_reopening_and_a_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path(), 1 << 20, 1).unwrap();
        for i in 1..=3 {
            assert_eq!(j.append(100 + i, "txn.planned", data(i)).unwrap(), i);
        }
        drop(j);
        // A crash mid-write leaves half a line.
        let mut f = std::fs::OpenOptions::new().append(true).open(dir.path().join(FILE)).unwrap();
        f.write_all(br#"{"seq":4,"time":1,"ki"#).unwrap();
        drop(f);
        let mut j = Journal::open(dir.path(), 1 << 20, 1).unwrap();
        assert_eq!(j.replay().len(), 3);
        assert_eq!(j.append(200, "receipt", data(4)).unwrap(), 4, "the torn record is gone, its number reused");
        assert_eq!(j.pending().len(), 4);
        j.delivered(2).unwrap();
        drop(j);
        let j = Journal::open(dir.path(), 1 << 20, 1).unwrap();
        assert_eq!(j.pending().iter().map(|r| r.seq).collect::<Vec<_>>(), [3, 4], "the cursor survives");
    }

    /// A FIFO where the journal lives would stall the service forever on its first read: it
    /// is refused at once, by name; so is a file far over the journal's limit.
    #[test]
    fn a_fifo_or_an_oversized_file_in_place_of_the_journal_is_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &path,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::RUSR | rustix::fs::Mode::WUSR,
            0,
        )
        .unwrap();
        let refused = Journal::open(dir.path(), 1 << 20, 1).unwrap_err();
        assert!(matches!(&refused, JournalError::NotAJournal { path: p, .. } if *p == path), "{refused}");
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, vec![b'x'; (2 << 10) + (1 << 20) + 1]).unwrap();
        let refused = Journal::open(dir.path(), 1 << 10, 1).unwrap_err();
        assert!(matches!(refused, JournalError::NotAJournal { .. }), "{refused}");
    }

    #[test]
    fn an_edited_record_is_refused_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path(), 1 << 20, 1).unwrap();
        for i in 1..=3 {
            j.append(i, "k", data(i)).unwrap();
        }
        drop(j);
        let path = dir.path().join(FILE);
        let text = std::fs::read_to_string(&path).unwrap().replace("\"i\":2", "\"i\":9");
        std::fs::write(&path, text).unwrap();
        let err = Journal::open(dir.path(), 1 << 20, 1).unwrap_err();
        assert!(matches!(err, JournalError::Broken { seq: 2, .. }), "{err}");
    }

    #[test]
    fn delivered_records_make_room_and_undelivered_ones_are_never_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let one = line(&Record {
            seq: 10,
            time: 1000,
            kind: "audit".into(),
            data: data(10),
            prev: GENESIS.into(),
            hash: GENESIS.into(),
        })
        .len() as u64;
        let mut j = Journal::open(dir.path(), one * 4, 1).unwrap();
        for i in 1..=4 {
            j.append(1000, "audit", data(i)).unwrap();
        }
        let full = j.append(1000, "audit", data(5)).unwrap_err();
        assert!(matches!(full, JournalError::Full { .. }), "{full}");
        assert_eq!(j.pending().len(), 4, "nothing undelivered was dropped");
        j.delivered(3).unwrap();
        assert_eq!(j.append(1000, "audit", data(5)).unwrap(), 5, "delivered records made room");
        drop(j);
        let j = Journal::open(dir.path(), one * 4, 1).unwrap();
        assert_eq!(j.replay().iter().map(|r| r.seq).collect::<Vec<_>>(), [4, 5], "compacted, chain intact");
    }

    /// A new change is held back while the undelivered records leave less than its headroom;
    /// records of changes under way still fit, and a delivery makes room again.
    #[test]
    fn a_new_change_needs_headroom_that_records_under_way_may_use() {
        let dir = tempfile::tempdir().unwrap();
        let one = line(&Record {
            seq: 10,
            time: 1000,
            kind: "audit".into(),
            data: data(10),
            prev: GENESIS.into(),
            hash: GENESIS.into(),
        })
        .len() as u64;
        // Room for 8 records; a new change wants a quarter of it (2) free.
        let mut j = Journal::open(dir.path(), one * 8, 1).unwrap();
        for i in 1..=7 {
            assert!(j.has_room_for_change(), "{} records", i - 1);
            j.append(1000, "audit", data(i)).unwrap();
        }
        assert!(!j.has_room_for_change(), "7 of 8 undelivered: no new change");
        j.append(1000, "audit", data(8)).unwrap();
        assert!(matches!(j.append(1000, "audit", data(9)), Err(JournalError::Full { .. })));
        j.delivered(5).unwrap();
        assert!(j.has_room_for_change(), "the plane took 5");
    }

    #[test]
    fn a_pinned_transaction_survives_compaction_after_delivery() {
        let dir = tempfile::tempdir().unwrap();
        let one = line(&Record {
            seq: 1,
            time: 1,
            kind: "audit".into(),
            data: data(1),
            prev: GENESIS.into(),
            hash: GENESIS.into(),
        })
        .len() as u64;
        let limit = one * 7 + one / 2;
        let mut j = Journal::open(dir.path(), limit, 1).unwrap();
        j.append(1, "audit", data(1)).unwrap();
        let first = j.append(2, "txn", data(2)).unwrap();
        j.pin(Some(first));
        for i in 3..=8 {
            j.delivered(i - 1).unwrap();
            j.append(i, "audit", data(i)).unwrap();
        }
        drop(j);
        let j = Journal::open(dir.path(), limit, 1).unwrap();
        let seqs: Vec<u64> = j.replay().iter().map(|r| r.seq).collect();
        assert_eq!(seqs.first(), Some(&first), "compacted, yet the pinned record stays: {seqs:?}");
        assert_eq!(j.pending().iter().map(|r| r.seq).collect::<Vec<_>>(), [8]);
    }

    #[test]
    fn parse_chain_names_the_first_bad_record() {
        assert_eq!(parse_chain(b"").unwrap(), (vec![], 0));
        let err = parse_chain(b"{\"seq\":1}\n").unwrap_err();
        assert_eq!(err.0, 1, "{err:?}");
        let zero =
            Record { seq: 0, time: 0, kind: "k".into(), data: data(0), prev: GENESIS.into(), hash: String::new() };
        assert_eq!(parse_chain(&line(&zero)).unwrap_err(), (0, "sequence 0".to_owned()));
        let max = Record { seq: u64::MAX, ..zero };
        let hash = hash_of(&max.prev, max.seq, max.time, &max.kind, &max.data.to_string());
        let max = Record { hash, ..max };
        let mut two = line(&max);
        two.extend_from_slice(&line(&max));
        assert_eq!(parse_chain(&two).unwrap_err().0, u64::MAX, "no overflow past the last sequence number");
    }
}
