//! SHA-256 (FIPS 180-4) where two messages can be hashed at once on one core.
//!
//! One message is one dependency chain: a core with the x86 SHA extensions waits on each
//! round instruction's latency and leaves part of its SHA throughput idle. Interleaving the
//! rounds of a second, independent message uses that idle throughput (the Linux kernel's
//! `sha256_finup_2x` for dm-verity and fs-verity; 1.45× per core on the machines here).
//! ironroot has two natural pairs: adjacent data blocks of an fs-verity tree
//! ([`digest_pair`]), and a pack blob's running digest together with the fs-verity leaf of
//! each object block the blob carries ([`update_and_digest`]).
//!
//! Single-message compression is the `sha2` crate's (which has its own SHA-NI path). Without
//! the SHA extensions, or off x86-64, the pair functions compress one message after the
//! other: same results, no speed-up.

#[cfg(target_arch = "x86_64")]
mod x86;

/// SHA-256 block: the unit compressions work on.
pub type Block = [u8; 64];

/// Initial hash value (FIPS 180-4 §5.3.3).
const IV: [u32; 8] = [0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19];

/// Round constants (FIPS 180-4 §4.2.2).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const K: [u32; 64] = [
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5, 0xd807aa98,
    0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786,
    0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8,
    0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13,
    0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819,
    0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a,
    0x5b9cca4f, 0x682e6ff3, 0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
    0xc67178f2,
];

// sha2 0.10 takes its blocks as generic-array 0.14 arrays, which it marks deprecated.
#[allow(deprecated)]
fn compress(state: &mut [u32; 8], blocks: &[Block]) {
    for block in blocks {
        sha2::compress256(state, std::slice::from_ref(sha2::digest::generic_array::GenericArray::from_slice(block)));
    }
}

/// Two independent compressions of equally many blocks, interleaved where the CPU allows.
fn compress2(sa: &mut [u32; 8], a: &[Block], sb: &mut [u32; 8], b: &[Block]) {
    #[cfg(target_arch = "x86_64")]
    if x86::compress2(sa, a, sb, b) {
        return;
    }
    compress(sa, a);
    compress(sb, b);
}

/// The final block(s) of a message of `total` bytes whose last `tail.len()` (< 64) bytes are
/// `tail`: the tail, 0x80, zeros, and the bit length (one block, or two when it does not fit).
fn padding(tail: &[u8], total: u64) -> ([Block; 2], usize) {
    let mut blocks = [[0u8; 64]; 2];
    let flat = blocks.as_flattened_mut();
    flat[..tail.len()].copy_from_slice(tail);
    flat[tail.len()] = 0x80;
    let n = if tail.len() < 56 { 1 } else { 2 };
    flat[n * 64 - 8..n * 64].copy_from_slice(&total.wrapping_mul(8).to_be_bytes());
    (blocks, n)
}

fn output(state: &[u32; 8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (bytes, word) in out.chunks_exact_mut(4).zip(state) {
        bytes.copy_from_slice(&word.to_be_bytes());
    }
    out
}

/// A SHA-256 computation fed in pieces.
#[derive(Clone)]
pub struct Sha256 {
    state: [u32; 8],
    len: u64,
    buf: Block,
    buffered: usize,
}

impl std::fmt::Debug for Sha256 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sha256").field("len", &self.len).finish_non_exhaustive()
    }
}

impl Default for Sha256 {
    fn default() -> Self {
        Self::new()
    }
}

impl Sha256 {
    pub fn new() -> Self {
        Self { state: IV, len: 0, buf: [0; 64], buffered: 0 }
    }

    /// Bytes fed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn update(&mut self, mut data: &[u8]) {
        self.len += data.len() as u64;
        if self.buffered > 0 {
            let take = (64 - self.buffered).min(data.len());
            self.buf[self.buffered..self.buffered + take].copy_from_slice(&data[..take]);
            self.buffered += take;
            data = &data[take..];
            if self.buffered < 64 {
                return;
            }
            compress(&mut self.state, std::slice::from_ref(&self.buf));
            self.buffered = 0;
        }
        let (blocks, rest) = data.as_chunks::<64>();
        compress(&mut self.state, blocks);
        self.buf[..rest.len()].copy_from_slice(rest);
        self.buffered = rest.len();
    }

    pub fn finalize(mut self) -> [u8; 32] {
        let (blocks, n) = padding(&self.buf[..self.buffered], self.len);
        compress(&mut self.state, &blocks[..n]);
        output(&self.state)
    }
}

/// SHA-256 of `data`.
pub fn digest(data: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(data);
    h.finalize()
}

/// SHA-256 of two messages of the same length, interleaved (fs-verity: two data blocks).
/// Messages of different lengths are hashed one after the other.
pub fn digest_pair(a: &[u8], b: &[u8]) -> ([u8; 32], [u8; 32]) {
    if a.len() != b.len() {
        return (digest(a), digest(b));
    }
    let (blocks_a, tail_a) = a.as_chunks::<64>();
    let (blocks_b, tail_b) = b.as_chunks::<64>();
    let (mut sa, mut sb) = (IV, IV);
    compress2(&mut sa, blocks_a, &mut sb, blocks_b);
    let (pad_a, n) = padding(tail_a, a.len() as u64);
    let (pad_b, _) = padding(tail_b, b.len() as u64);
    compress2(&mut sa, &pad_a[..n], &mut sb, &pad_b[..n]);
    (output(&sa), output(&sb))
}

/// Feeds `data` to `stream` and returns the SHA-256 of `data` alone, the two computations
/// interleaved over `data`'s whole blocks when `stream` is at a block boundary (a pack blob's
/// digest and the fs-verity leaf of an object block it carries).
pub fn update_and_digest(stream: &mut Sha256, data: &[u8]) -> [u8; 32] {
    if stream.buffered != 0 {
        stream.update(data);
        return digest(data);
    }
    let (blocks, tail) = data.as_chunks::<64>();
    let mut own = IV;
    compress2(&mut stream.state, blocks, &mut own, blocks);
    stream.len += (blocks.len() * 64) as u64;
    stream.update(tail);
    let (pad, n) = padding(tail, data.len() as u64);
    compress(&mut own, &pad[..n]);
    output(&own)
}

#[cfg(test)]
mod tests;
