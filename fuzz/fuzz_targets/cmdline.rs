//! The kernel command line parser: any bytes parse or give an error, never a panic; what
//! parses is ours only (`ironroot.*`), never empty and free of control characters.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(line) = ironroot_agent::cmdline::parse_cmdline(data) {
        for key in line.keys() {
            assert!(key.starts_with("ironroot.") && !key.chars().any(char::is_control));
            let value = line.get(key).unwrap_or_default();
            assert!(!value.is_empty() && !value.chars().any(char::is_control));
        }
    }
});
