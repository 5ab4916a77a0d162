//! The kernel command line parser: any bytes parse or give an error, never a panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(line) = ironroot_agent::boot::cmdline::parse_cmdline(data) {
        for key in line.keys() {
            assert!(key.starts_with("ironroot.") && line.get(key).is_some_and(|v| !v.is_empty()));
        }
    }
});
