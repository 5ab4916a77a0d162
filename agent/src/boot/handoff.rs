//! Phase 6, hand-off: the boot's record (`/run/ironroot/boot.json`,
//! [`ironroot_contract::run_state`]) as the pipeline's results make it. The bootstrap token is
//! never written.

use ironroot_contract::run_state::{ConflictRecord, IdentityRecord, SourcedRecord};

use crate::identity::discover::{Conflict, Discovered, Sourced};

/// Values never written to disk.
const SECRET_KEYS: &[&str] = &["token"];

fn sourced(s: &Sourced, key: &str) -> SourcedRecord {
    let value = if SECRET_KEYS.contains(&key) { "<redacted>".to_owned() } else { s.value.clone() };
    SourcedRecord { value, source: s.source.to_string() }
}

/// What discovery found, as recorded (secrets redacted).
pub fn identity_record(found: &Discovered) -> IdentityRecord {
    let conflict = |c: &Conflict| ConflictRecord {
        key: c.key.clone(),
        chosen: sourced(&c.chosen, &c.key),
        other: sourced(&c.other, &c.key),
    };
    IdentityRecord {
        values: found.values.iter().map(|(k, v)| (k.clone(), sourced(v, k))).collect(),
        conflicts: found.conflicts.iter().map(conflict).collect(),
        notes: found.notes.clone(),
    }
}
