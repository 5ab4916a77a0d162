//! The interleaved compression on the x86 SHA extensions. One SHA-256 message is a single
//! dependency chain of `sha256rnds2` instructions, so a core waits on the instruction's latency
//! rather than its throughput; the rounds of a second, independent message fill those gaps.
//! The round structure follows the kernel's `sha256_ni_finup2x` (arch/x86/lib/crypto): four
//! rounds per step for each message, the next message-schedule words computed between them.
#![allow(unsafe_code)]

use core::arch::x86_64::*;

use crate::{Block, K};

/// Whether this CPU has the instructions [`compress2`] uses.
pub(crate) fn available() -> bool {
    std::is_x86_feature_detected!("sha")
        && std::is_x86_feature_detected!("sse2")
        && std::is_x86_feature_detected!("ssse3")
        && std::is_x86_feature_detected!("sse4.1")
}

/// Compresses `a` into `sa` and `b` into `sb`, interleaved; `false` (and nothing done) when the
/// CPU lacks the SHA extensions or the block counts differ.
pub(crate) fn compress2(sa: &mut [u32; 8], a: &[Block], sb: &mut [u32; 8], b: &[Block]) -> bool {
    if a.len() != b.len() || !available() {
        return false;
    }
    // SAFETY: the CPU has every feature `compress2_shani` is compiled for (checked above); the
    // function reads only within `a`, `b` and the states, through unaligned loads and stores.
    unsafe { compress2_shani(sa, a, sb, b) };
    true
}

/// The state in the instructions' order: (ABEF, CDGH) from the standard A..H.
#[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
fn load_state(state: &[u32; 8]) -> (__m128i, __m128i) {
    // SAFETY: `state` is 32 readable bytes; unaligned loads.
    let (dcba, hgfe) = unsafe {
        let p = state.as_ptr().cast::<__m128i>();
        (_mm_loadu_si128(p), _mm_loadu_si128(p.add(1)))
    };
    let cdab = _mm_shuffle_epi32(dcba, 0xB1);
    let efgh = _mm_shuffle_epi32(hgfe, 0x1B);
    (_mm_alignr_epi8(cdab, efgh, 8), _mm_blend_epi16(efgh, cdab, 0xF0))
}

#[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
fn store_state(state: &mut [u32; 8], abef: __m128i, cdgh: __m128i) {
    let feba = _mm_shuffle_epi32(abef, 0x1B);
    let dchg = _mm_shuffle_epi32(cdgh, 0xB1);
    let dcba = _mm_blend_epi16(feba, dchg, 0xF0);
    let hgef = _mm_alignr_epi8(dchg, feba, 8);
    // SAFETY: `state` is 32 writable bytes; unaligned stores.
    unsafe {
        let p = state.as_mut_ptr().cast::<__m128i>();
        _mm_storeu_si128(p, dcba);
        _mm_storeu_si128(p.add(1), hgef);
    }
}

/// The four message words of `block` at `i` (0..4), big-endian to native.
#[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
fn words(block: &Block, i: usize, mask: __m128i) -> __m128i {
    let quarter: &[u8; 16] = block[i * 16..i * 16 + 16].try_into().unwrap_or(&[0; 16]);
    // SAFETY: `quarter` is 16 readable bytes; unaligned load.
    _mm_shuffle_epi8(unsafe { _mm_loadu_si128(quarter.as_ptr().cast()) }, mask)
}

/// Four rounds of each message (`$g`: which four, 0..16), and while rounds remain to be fed,
/// the schedule words four groups on, written over `$m0` once the rounds have used it.
macro_rules! rounds_2x {
    ($g:expr, $a0:ident, $a1:ident, $b0:ident, $b1:ident,
     $m0a:ident, $m1a:ident, $m2a:ident, $m3a:ident,
     $m0b:ident, $m1b:ident, $m2b:ident, $m3b:ident) => {{
        let k = _mm_set_epi32(K[$g * 4 + 3] as i32, K[$g * 4 + 2] as i32, K[$g * 4 + 1] as i32, K[$g * 4] as i32);
        let ta = _mm_add_epi32($m0a, k);
        let tb = _mm_add_epi32($m0b, k);
        if $g < 12 {
            $m0a = _mm_sha256msg1_epu32($m0a, $m1a);
            $m0b = _mm_sha256msg1_epu32($m0b, $m1b);
        }
        $a1 = _mm_sha256rnds2_epu32($a1, $a0, ta);
        $b1 = _mm_sha256rnds2_epu32($b1, $b0, tb);
        $a0 = _mm_sha256rnds2_epu32($a0, $a1, _mm_shuffle_epi32(ta, 0x0E));
        $b0 = _mm_sha256rnds2_epu32($b0, $b1, _mm_shuffle_epi32(tb, 0x0E));
        if $g < 12 {
            $m0a = _mm_sha256msg2_epu32(_mm_add_epi32($m0a, _mm_alignr_epi8($m3a, $m2a, 4)), $m3a);
            $m0b = _mm_sha256msg2_epu32(_mm_add_epi32($m0b, _mm_alignr_epi8($m3b, $m2b, 4)), $m3b);
        }
    }};
}

// The last four groups compute no schedule words; the macro still names the assignments.
#[allow(unused_assignments)]
#[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
fn compress2_shani(sa: &mut [u32; 8], a: &[Block], sb: &mut [u32; 8], b: &[Block]) {
    let mask = _mm_set_epi64x(0x0C0D_0E0F_0809_0A0B, 0x0405_0607_0001_0203);
    let (mut a0, mut a1) = load_state(sa);
    let (mut b0, mut b1) = load_state(sb);
    for (block_a, block_b) in a.iter().zip(b) {
        let saved = (a0, a1, b0, b1);
        let (mut w0a, mut w1a, mut w2a, mut w3a) =
            (words(block_a, 0, mask), words(block_a, 1, mask), words(block_a, 2, mask), words(block_a, 3, mask));
        let (mut w0b, mut w1b, mut w2b, mut w3b) =
            (words(block_b, 0, mask), words(block_b, 1, mask), words(block_b, 2, mask), words(block_b, 3, mask));
        rounds_2x!(0, a0, a1, b0, b1, w0a, w1a, w2a, w3a, w0b, w1b, w2b, w3b);
        rounds_2x!(1, a0, a1, b0, b1, w1a, w2a, w3a, w0a, w1b, w2b, w3b, w0b);
        rounds_2x!(2, a0, a1, b0, b1, w2a, w3a, w0a, w1a, w2b, w3b, w0b, w1b);
        rounds_2x!(3, a0, a1, b0, b1, w3a, w0a, w1a, w2a, w3b, w0b, w1b, w2b);
        rounds_2x!(4, a0, a1, b0, b1, w0a, w1a, w2a, w3a, w0b, w1b, w2b, w3b);
        rounds_2x!(5, a0, a1, b0, b1, w1a, w2a, w3a, w0a, w1b, w2b, w3b, w0b);
        rounds_2x!(6, a0, a1, b0, b1, w2a, w3a, w0a, w1a, w2b, w3b, w0b, w1b);
        rounds_2x!(7, a0, a1, b0, b1, w3a, w0a, w1a, w2a, w3b, w0b, w1b, w2b);
        rounds_2x!(8, a0, a1, b0, b1, w0a, w1a, w2a, w3a, w0b, w1b, w2b, w3b);
        rounds_2x!(9, a0, a1, b0, b1, w1a, w2a, w3a, w0a, w1b, w2b, w3b, w0b);
        rounds_2x!(10, a0, a1, b0, b1, w2a, w3a, w0a, w1a, w2b, w3b, w0b, w1b);
        rounds_2x!(11, a0, a1, b0, b1, w3a, w0a, w1a, w2a, w3b, w0b, w1b, w2b);
        rounds_2x!(12, a0, a1, b0, b1, w0a, w1a, w2a, w3a, w0b, w1b, w2b, w3b);
        rounds_2x!(13, a0, a1, b0, b1, w1a, w2a, w3a, w0a, w1b, w2b, w3b, w0b);
        rounds_2x!(14, a0, a1, b0, b1, w2a, w3a, w0a, w1a, w2b, w3b, w0b, w1b);
        rounds_2x!(15, a0, a1, b0, b1, w3a, w0a, w1a, w2a, w3b, w0b, w1b, w2b);
        a0 = _mm_add_epi32(a0, saved.0);
        a1 = _mm_add_epi32(a1, saved.1);
        b0 = _mm_add_epi32(b0, saved.2);
        b1 = _mm_add_epi32(b1, saved.3);
    }
    store_state(sa, a0, a1);
    store_state(sb, b0, b1);
}
