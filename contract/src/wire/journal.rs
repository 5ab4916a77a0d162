//! The audit journal's wire forms: the records a node submits (`POST /v1/nodes/{id}/audit`) and
//! the plane's signed journal checkpoints (`audit checkpoint --export`, `audit verify
//! --against FILE`). Both are parsed from untrusted bytes, so both are strict and bounded here,
//! where the fuzzer reaches them.

use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// Longest record kind; kinds are `[a-z0-9_.-]{1,64}`.
pub const MAX_KIND: usize = 64;
/// Largest checkpoint file `--against` reads.
pub const MAX_CHECKPOINT: usize = 4096;
/// What a checkpoint signature covers is prefixed with this, so no other signed message of the
/// plane's key can be passed off as a checkpoint.
const CHECKPOINT_CONTEXT: &str = "ironroot journal checkpoint v1";

/// One record a node submits to the journal; `seq` is the node's own sequence number (records
/// are deduplicated by it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeAuditRecord {
    pub seq: u64,
    pub time: u64,
    pub kind: String,
    #[serde(default)]
    pub data: serde_json::Value,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditBatch {
    pub records: Vec<NodeAuditRecord>,
}

/// Why a node's record is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("record {seq}: kind must be 1-{MAX_KIND} characters of a-z, 0-9, '_', '.', '-'")]
    Kind { seq: u64 },
    #[error("record {seq}: sequence number is over {}", i64::MAX)]
    Seq { seq: u64 },
    #[error("record {seq}: a string in its data holds control characters")]
    Control { seq: u64 },
}

/// Whether `kind` is `[a-z0-9_.-]{1,64}`.
pub fn valid_kind(kind: &str) -> bool {
    (1..=MAX_KIND).contains(&kind.len())
        && kind.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-'))
}

fn has_control(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::String(s) => s.chars().any(char::is_control),
        serde_json::Value::Array(a) => a.iter().any(has_control),
        serde_json::Value::Object(o) => o.iter().any(|(k, v)| k.chars().any(char::is_control) || has_control(v)),
        _ => false,
    }
}

impl NodeAuditRecord {
    /// The rules every submitted record keeps: a kind of the allowed alphabet, a sequence number
    /// a database can hold, no control character in any string of its data (keys included).
    pub fn validate(&self) -> Result<(), RecordError> {
        let seq = self.seq;
        if !valid_kind(&self.kind) {
            return Err(RecordError::Kind { seq });
        }
        if i64::try_from(seq).is_err() {
            return Err(RecordError::Seq { seq });
        }
        if has_control(&self.data) {
            return Err(RecordError::Control { seq });
        }
        Ok(())
    }
}

/// A signed statement of the plane: "the journal's record `seq` has hash `head`", made at
/// `time` (seconds since the epoch) with the journal key `key_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JournalCheckpoint {
    pub seq: u64,
    /// The record's hash, 64 lowercase hex characters.
    pub head: String,
    pub time: u64,
    /// The journal key's id (the first 16 hex characters of SHA-256 over its PKIX DER).
    pub key_id: String,
    /// Base64 (standard) signature over [`JournalCheckpoint::signed_message`].
    pub signature: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint is over {MAX_CHECKPOINT} bytes")]
    TooLarge,
    #[error("checkpoint is not the expected JSON: {0}")]
    Json(String),
    #[error("checkpoint head is not 64 lowercase hex characters")]
    Head,
    #[error("checkpoint key id is not 16 lowercase hex characters")]
    KeyId,
    #[error("checkpoint signature is not base64 of at most 128 bytes")]
    Signature,
    #[error("checkpoint sequence number is over {}", i64::MAX)]
    Seq,
}

fn lower_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl JournalCheckpoint {
    /// The bytes the journal key signs.
    pub fn signed_message(seq: u64, head: &str, time: u64) -> Vec<u8> {
        format!("{CHECKPOINT_CONTEXT}\nseq {seq}\nhead {head}\ntime {time}\n").into_bytes()
    }

    /// Parses and checks the shape of a checkpoint (its signature is checked by whoever holds
    /// the journal's public key).
    pub fn parse(bytes: &[u8]) -> Result<Self, CheckpointError> {
        if bytes.len() > MAX_CHECKPOINT {
            return Err(CheckpointError::TooLarge);
        }
        let c: Self = serde_json::from_slice(bytes).map_err(|e| CheckpointError::Json(e.to_string()))?;
        if !lower_hex(&c.head, 64) {
            return Err(CheckpointError::Head);
        }
        if !lower_hex(&c.key_id, 16) {
            return Err(CheckpointError::KeyId);
        }
        if i64::try_from(c.seq).is_err() {
            return Err(CheckpointError::Seq);
        }
        c.signature_bytes()?;
        Ok(c)
    }

    pub fn signature_bytes(&self) -> Result<Vec<u8>, CheckpointError> {
        if self.signature.len() > 176 {
            return Err(CheckpointError::Signature);
        }
        base64::engine::general_purpose::STANDARD.decode(&self.signature).map_err(|_| CheckpointError::Signature)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(kind: &str, data: serde_json::Value) -> NodeAuditRecord {
        NodeAuditRecord { seq: 1, time: 1, kind: kind.to_owned(), data }
    }

    #[test]
    fn records_keep_their_alphabet_and_refuse_control_characters() {
        let ok = serde_json::json!({"argv": ["/usr/bin/uname", "-r"], "unit": "run-x.service", "n": 3});
        assert_eq!(record("exec.start", ok.clone()).validate(), Ok(()));
        assert_eq!(record("module_update-1", serde_json::Value::Null).validate(), Ok(()));
        for kind in ["", "Transition", "exec start", "exec/start", "ex\u{0}ec", &"k".repeat(65), "é"] {
            assert_eq!(record(kind, ok.clone()).validate(), Err(RecordError::Kind { seq: 1 }), "{kind:?}");
        }
        assert!(valid_kind(&"k".repeat(64)));
        for data in [
            serde_json::json!({"a": "line\nbreak"}),
            serde_json::json!({"a\u{7}": 1}),
            serde_json::json!([[["\u{1b}[31m"]]]),
            serde_json::json!("\u{0}"),
        ] {
            assert_eq!(record("k", data.clone()).validate(), Err(RecordError::Control { seq: 1 }), "{data}");
        }
        let big = NodeAuditRecord { seq: u64::MAX, ..record("k", serde_json::Value::Null) };
        assert_eq!(big.validate(), Err(RecordError::Seq { seq: u64::MAX }));
    }

    #[test]
    fn checkpoints_parse_strictly() {
        let good = serde_json::json!({"seq": 7, "head": "ab".repeat(32), "time": 1, "key_id": "0123456789abcdef",
                                      "signature": base64::engine::general_purpose::STANDARD.encode([1u8; 64])});
        let c = JournalCheckpoint::parse(good.to_string().as_bytes()).unwrap();
        assert_eq!((c.seq, c.signature_bytes().unwrap().len()), (7, 64));
        let with = |k: &str, v: serde_json::Value| {
            let mut g = good.clone();
            g[k] = v;
            JournalCheckpoint::parse(g.to_string().as_bytes()).unwrap_err()
        };
        assert_eq!(with("head", "AB".repeat(32).into()), CheckpointError::Head);
        assert_eq!(with("head", "ab".into()), CheckpointError::Head);
        assert_eq!(with("key_id", "xyz".into()), CheckpointError::KeyId);
        assert_eq!(with("signature", "%%%".into()), CheckpointError::Signature);
        assert_eq!(with("signature", "A".repeat(400).into()), CheckpointError::Signature);
        assert_eq!(with("seq", u64::MAX.into()), CheckpointError::Seq);
        assert!(matches!(with("extra", 1.into()), CheckpointError::Json(_)));
        assert_eq!(JournalCheckpoint::parse(&[b' '; MAX_CHECKPOINT + 1]), Err(CheckpointError::TooLarge));
        let m = JournalCheckpoint::signed_message(7, &"ab".repeat(32), 1);
        assert!(m.starts_with(CHECKPOINT_CONTEXT.as_bytes()));
    }
}
