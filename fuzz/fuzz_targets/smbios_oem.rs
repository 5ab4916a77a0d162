//! Raw SMBIOS type 11 structures from firmware.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Some(strings) = ironroot_agent::identity::discover::parse_oem_strings(data) {
        assert!(strings.iter().all(|s| !s.is_empty() && !s.contains(&0)));
    }
});
