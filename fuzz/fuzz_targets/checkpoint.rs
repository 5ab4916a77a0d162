//! A journal checkpoint file (`audit verify --against FILE`): parsed strictly and bounded; what
//! parses has the documented shape and serializes back to something that parses to itself.
#![no_main]

use ironroot_contract::wire::JournalCheckpoint;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(c) = JournalCheckpoint::parse(data) {
        assert_eq!(c.head.len(), 64);
        assert_eq!(c.key_id.len(), 16);
        assert!(c.signature_bytes().is_ok_and(|s| s.len() <= 132));
        let again = serde_json::to_vec(&c).expect("serializes");
        assert_eq!(JournalCheckpoint::parse(&again).as_ref(), Ok(&c));
    }
});
