//! The object pack reader: any byte stream yields verified objects or an error, never a panic,
//! and never more object bytes than the input holds; when it reads to the end, the blob digest
//! it computed alongside is the SHA-256 of the whole input. Odd lengths take the kernel-checked
//! mode (no fs-verity in userspace), even lengths the hashing one.
#![no_main]

use std::io::Read as _;

use sha2::Digest as _;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let reader = if data.len() % 2 == 1 {
        ironroot_contract::pack::PackReader::kernel_checked(data)
    } else {
        ironroot_contract::pack::PackReader::new(data)
    };
    let mut reader = reader.with_blob_digest();
    let mut buf = [0u8; 4096];
    let ended = loop {
        match reader.next_object() {
            Ok(Some(mut object)) => loop {
                match object.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            },
            Ok(None) => break true,
            Err(_) => break false,
        }
    };
    let (_, bytes) = reader.totals();
    assert!(bytes <= data.len() as u64);
    match reader.blob_digest() {
        Some(digest) => {
            assert!(ended);
            let expected: [u8; 32] = sha2::Sha256::digest(data).into();
            assert_eq!(digest, ironroot_contract::OciDigest::new(expected));
        }
        None => assert!(!ended),
    }
});
