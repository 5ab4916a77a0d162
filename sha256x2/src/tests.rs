use sha2::Digest as _;

use super::*;

/// Deterministic bytes (xorshift), so failures reproduce.
fn bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect()
}

fn reference(data: &[u8]) -> [u8; 32] {
    sha2::Sha256::digest(data).into()
}

/// Lengths around every padding boundary, a few blocks, and fs-verity's 4 KiB block.
fn lengths() -> Vec<usize> {
    let mut v: Vec<usize> = (0..=200).collect();
    v.extend([255, 256, 511, 512, 513, 4095, 4096, 4097, 8192, 65536 + 13]);
    v
}

#[test]
fn known_answers() {
    // FIPS 180-4 examples.
    assert_eq!(hex(&digest(b"abc")), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    assert_eq!(
        hex(&digest(b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq")),
        "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
    );
    assert_eq!(hex(&digest(b"")), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
}

fn hex(d: &[u8; 32]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn one_shot_and_streamed_digests_match_the_sha2_crate_at_every_length() {
    for (i, n) in lengths().into_iter().enumerate() {
        let data = bytes(i as u64, n);
        assert_eq!(digest(&data), reference(&data), "length {n}");
        for step in [1, 7, 63, 64, 65, 1000] {
            let mut h = Sha256::new();
            for piece in data.chunks(step) {
                h.update(piece);
            }
            assert_eq!(h.len(), n as u64);
            assert_eq!(h.finalize(), reference(&data), "length {n} in pieces of {step}");
        }
    }
}

#[test]
fn pairs_of_equal_and_of_different_lengths_match_two_single_digests() {
    for (i, n) in lengths().into_iter().enumerate() {
        let (a, b) = (bytes(2 * i as u64, n), bytes(2 * i as u64 + 1, n));
        assert_eq!(digest_pair(&a, &b), (reference(&a), reference(&b)), "length {n}");
        let shorter = &b[..n / 2];
        assert_eq!(digest_pair(&a, shorter), (reference(&a), reference(shorter)), "lengths {n}, {}", n / 2);
    }
}

#[test]
fn a_stream_fed_alongside_a_digest_matches_both_computed_apart() {
    // Prefixes that leave the stream on a block boundary (interleaved) and off one (not).
    for prefix in [0, 3, 64, 100, 512] {
        for (i, n) in lengths().into_iter().enumerate() {
            let head = bytes(i as u64 + 1000, prefix);
            let data = bytes(i as u64, n);
            let more = bytes(i as u64 + 7, 77);
            let mut stream = Sha256::new();
            stream.update(&head);
            let own = update_and_digest(&mut stream, &data);
            assert_eq!(own, reference(&data), "data of {n} after {prefix}");
            stream.update(&more);
            assert_eq!(stream.len(), (prefix + n + 77) as u64);
            let whole = [head, data, more].concat();
            assert_eq!(stream.finalize(), reference(&whole), "stream of {prefix} + {n} + 77");
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn the_interleaved_instructions_compute_what_two_single_compressions_do() {
    let blocks_a: Vec<Block> = bytes(1, 64 * 33).as_chunks::<64>().0.to_vec();
    let blocks_b: Vec<Block> = bytes(2, 64 * 33).as_chunks::<64>().0.to_vec();
    let (mut sa, mut sb) = ([1, 2, 3, 4, 5, 6, 7, 8], IV);
    let (mut ra, mut rb) = (sa, sb);
    compress(&mut ra, &blocks_a);
    compress(&mut rb, &blocks_b);
    if x86::available() {
        assert!(x86::compress2(&mut sa, &blocks_a, &mut sb, &blocks_b));
        assert_eq!((sa, sb), (ra, rb));
    } else {
        // No SHA extensions here: the pair functions fall back, and the tests above cover it.
        assert!(!x86::compress2(&mut sa, &blocks_a, &mut sb, &blocks_b));
        assert_eq!(sa, [1, 2, 3, 4, 5, 6, 7, 8], "nothing done without the instructions");
    }
    // Different block counts are never interleaved.
    assert!(!x86::compress2(&mut sa, &blocks_a, &mut sb, &blocks_b[1..]));
}
