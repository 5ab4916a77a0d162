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

/// Writes what the service needs to verify updates as the boot did: the trusted keys
/// (`trust.pem`) and the extra registry CAs (`registry-ca.pem`, when there are any).
pub fn write_trust(
    run_dir: &std::path::Path,
    trust: &[ironroot_contract::TrustedKey],
    access: &ironroot_oci::RegistryAccess,
) -> std::io::Result<(std::path::PathBuf, Option<std::path::PathBuf>)> {
    let mut pem = String::new();
    for key in trust {
        pem.push_str(&key.to_pem().map_err(std::io::Error::other)?);
    }
    let trust_path = run_dir.join("trust.pem");
    ironroot_oci::layout::write_atomic(&trust_path, pem.as_bytes())?;
    if access.ca_pem.is_empty() {
        return Ok((trust_path, None));
    }
    let ca: Vec<u8> = access.ca_pem.iter().flat_map(|c| c.iter().copied().chain(*b"\n")).collect();
    let ca_path = run_dir.join("registry-ca.pem");
    ironroot_oci::layout::write_atomic(&ca_path, &ca)?;
    Ok((trust_path, Some(ca_path)))
}
