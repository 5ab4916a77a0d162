//! The identity document (fw_cfg, metadata, local file): bounded, flat, strict.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(doc) = ironroot_agent::identity::discover::parse_identity_doc(data) {
        assert!(doc.values().all(|v| v.len() <= 16 * 1024));
    }
});
