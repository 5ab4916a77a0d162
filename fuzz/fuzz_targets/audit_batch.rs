//! A node's journal batch (`POST /v1/nodes/{id}/audit`), as the plane parses and checks it:
//! never a panic, and every record that passes keeps the documented alphabet and is free of
//! control characters.
#![no_main]

use ironroot_contract::wire::{AuditBatch, valid_kind};

fn no_control(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::String(s) => !s.chars().any(char::is_control),
        serde_json::Value::Array(a) => a.iter().all(no_control),
        serde_json::Value::Object(o) => o.iter().all(|(k, v)| !k.chars().any(char::is_control) && no_control(v)),
        _ => true,
    }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if data.len() > ironroot_contract::wire::MAX_BODY {
        return;
    }
    let Ok(batch) = serde_json::from_slice::<AuditBatch>(data) else { return };
    for record in &batch.records {
        if record.validate().is_ok() {
            assert!(valid_kind(&record.kind));
            assert!(i64::try_from(record.seq).is_ok());
            assert!(no_control(&record.data));
        }
    }
});
