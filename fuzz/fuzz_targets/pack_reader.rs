//! The object pack reader: any byte stream yields verified objects or an error, never a panic,
//! and never more object bytes than the input holds.
#![no_main]

use std::io::Read as _;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut reader = ironroot_spec::pack::PackReader::new(data);
    let mut buf = [0u8; 4096];
    loop {
        match reader.next_object() {
            Ok(Some(mut object)) => loop {
                match object.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            },
            Ok(None) | Err(_) => break,
        }
    }
    let (_, bytes) = reader.totals();
    assert!(bytes <= data.len() as u64);
});
