//! Userspace fs-verity digests: SHA-256, 4 KiB blocks, no salt — the parameters the kernel uses
//! for composefs objects and the ones `mkcomposefs` and overlayfs `verity=require` expect.
//!
//! The hasher streams: memory is one block per tree level, whatever the input size.

use std::io;

use sha2::{Digest as _, Sha256};

use crate::digest::VerityDigest;

/// fs-verity block size for every digest ironroot computes (`log_blocksize = 12`).
pub const BLOCK_SIZE: usize = 4096;
const HASH_SIZE: usize = 32;

struct Level {
    ctx: Sha256,
    filled: usize,
    received: u64,
    last: [u8; HASH_SIZE],
}

impl Level {
    fn new() -> Self {
        Self { ctx: Sha256::new(), filled: 0, received: 0, last: [0; HASH_SIZE] }
    }
}

/// Streaming fs-verity digest. Feed bytes with [`io::Write`] or [`VerityHasher::update`].
pub struct VerityHasher {
    levels: Vec<Level>,
    partial: Vec<u8>,
    size: u64,
}

impl std::fmt::Debug for VerityHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerityHasher").field("size", &self.size).finish_non_exhaustive()
    }
}

impl Default for VerityHasher {
    fn default() -> Self {
        Self::new()
    }
}

impl VerityHasher {
    pub fn new() -> Self {
        Self { levels: Vec::new(), partial: Vec::with_capacity(BLOCK_SIZE), size: 0 }
    }

    /// Bytes fed so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn update(&mut self, data: &[u8]) {
        let (blocks, tail) = self.complete_partial(data).as_chunks::<BLOCK_SIZE>();
        let (pairs, single) = blocks.as_chunks::<2>();
        for [a, b] in pairs {
            let (ha, hb) = sha256x2::digest_pair(a, b);
            self.push_hash(0, ha);
            self.push_hash(0, hb);
        }
        for block in single {
            self.push_hash(0, sha256x2::digest(block));
        }
        self.partial.extend_from_slice(tail);
    }

    /// Feeds `data` to this tree and to `stream` (the digest of a pack blob that carries the
    /// object): each whole data block that starts on a block boundary of both is hashed for
    /// the two in one interleaved pass ([`sha256x2::update_and_digest`]).
    pub fn update_alongside(&mut self, data: &[u8], stream: &mut sha256x2::Sha256) {
        let rest = self.complete_partial(data);
        stream.update(&data[..data.len() - rest.len()]);
        let (blocks, tail) = rest.as_chunks::<BLOCK_SIZE>();
        for block in blocks {
            let hash = sha256x2::update_and_digest(stream, block);
            self.push_hash(0, hash);
        }
        stream.update(tail);
        self.partial.extend_from_slice(tail);
    }

    /// Counts `data` in, and fills the pending partial block from it first; the rest.
    fn complete_partial<'d>(&mut self, mut data: &'d [u8]) -> &'d [u8] {
        self.size += data.len() as u64;
        if !self.partial.is_empty() {
            let take = (BLOCK_SIZE - self.partial.len()).min(data.len());
            self.partial.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.partial.len() == BLOCK_SIZE {
                let block = std::mem::take(&mut self.partial);
                self.data_block(&block);
                self.partial = block;
                self.partial.clear();
            }
        }
        data
    }

    /// One data block's hash, a short final block zero-padded (fs-verity hashes whole blocks).
    fn data_block(&mut self, block: &[u8]) {
        let hash = if block.len() == BLOCK_SIZE {
            sha256x2::digest(block)
        } else {
            let mut padded = [0u8; BLOCK_SIZE];
            padded[..block.len()].copy_from_slice(block);
            sha256x2::digest(&padded)
        };
        self.push_hash(0, hash);
    }

    fn push_hash(&mut self, level: usize, hash: [u8; HASH_SIZE]) {
        if self.levels.len() == level {
            self.levels.push(Level::new());
        }
        let l = &mut self.levels[level];
        l.ctx.update(hash);
        l.filled += HASH_SIZE;
        l.received += 1;
        l.last = hash;
        if l.filled == BLOCK_SIZE {
            let full = std::mem::replace(&mut l.ctx, Sha256::new()).finalize().into();
            l.filled = 0;
            self.push_hash(level + 1, full);
        }
    }

    /// The fs-verity digest of everything fed so far.
    pub fn finish(mut self) -> VerityDigest {
        if !self.partial.is_empty() {
            let block = std::mem::take(&mut self.partial);
            self.data_block(&block);
        }
        let mut root = [0u8; HASH_SIZE];
        let mut level = 0;
        while level < self.levels.len() {
            if self.levels[level].received == 1 && level + 1 == self.levels.len() {
                root = self.levels[level].last;
                break;
            }
            let l = &mut self.levels[level];
            if l.filled > 0 {
                let pad = BLOCK_SIZE - l.filled;
                l.ctx.update(&ZEROS[..pad]);
                l.filled = 0;
                let hash = std::mem::replace(&mut l.ctx, Sha256::new()).finalize().into();
                self.push_hash(level + 1, hash);
            }
            level += 1;
        }
        VerityDigest::new(descriptor_digest(self.size, &root))
    }
}

impl io::Write for VerityHasher {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

static ZEROS: [u8; BLOCK_SIZE] = [0; BLOCK_SIZE];

/// SHA-256 over `struct fsverity_descriptor` (linux/fsverity.h): version 1, SHA-256,
/// log_blocksize 12, no salt, the data size, and the Merkle root padded to 64 bytes.
fn descriptor_digest(size: u64, root: &[u8; HASH_SIZE]) -> [u8; 32] {
    let mut desc = [0u8; 256];
    desc[0] = 1; // version
    desc[1] = 1; // FS_VERITY_HASH_ALG_SHA256
    desc[2] = 12; // log2(BLOCK_SIZE)
    desc[8..16].copy_from_slice(&size.to_le_bytes());
    desc[16..16 + HASH_SIZE].copy_from_slice(root);
    Sha256::digest(desc).into()
}

/// The fs-verity digest of `data`.
pub fn verity_digest(data: &[u8]) -> VerityDigest {
    let mut h = VerityHasher::new();
    h.update(data);
    h.finish()
}

/// The fs-verity digest of everything `reader` yields, read in 1 MiB chunks.
pub fn verity_digest_of(mut reader: impl io::Read) -> io::Result<VerityDigest> {
    let mut h = VerityHasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => return Ok(h.finish()),
            Ok(n) => h.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Known answers computed with composefs-rs's independent implementation (`compute_verity`);
    // they cover the empty file, one partial block, two tree levels and three tree levels.
    #[test]
    fn known_answers() {
        let cases: [(Vec<u8>, &str); 4] = [
            (vec![], "3d248ca542a24fc62d1c43b916eae5016878e2533c88238480b26128a1f1af95"),
            (b"hello world\n".to_vec(), "37061ef2ac4c21bec68489b56138c5780306a4ad7fe6676236ecdf2c9027cd92"),
            (vec![0x5a; 4096 * 129 + 5], "c36e9f55258ad680239bd69e27201656ca3753220daa0cf28eba7bac26c8d92c"),
            (
                (0..4096usize * 128 * 130 + 3).map(|i| (i % 251) as u8).collect(),
                "1145a5aa06f9f9144cbb976f83f7ed5c0ff4970066d383b23e90dae5f5de4f20",
            ),
        ];
        for (data, want) in cases {
            assert_eq!(verity_digest(&data).to_string(), want, "{} bytes", data.len());
        }
    }

    #[test]
    fn streaming_in_any_chunking_matches_one_shot() {
        let data: Vec<u8> = (0..(BLOCK_SIZE * 300 + 17)).map(|i| (i * 7 % 251) as u8).collect();
        let whole = verity_digest(&data);
        for chunk in [1, 100, 4095, 4096, 4097, 65536] {
            let mut h = VerityHasher::new();
            for c in data.chunks(chunk) {
                h.update(c);
            }
            assert_eq!(h.finish(), whole, "chunk size {chunk}");
        }
    }

    #[test]
    fn a_tree_fed_alongside_a_blob_stream_gives_both_digests_unchanged() {
        use sha2::Digest as _;
        let data: Vec<u8> = (0..(BLOCK_SIZE * 37 + 1000)).map(|i| (i * 13 % 251) as u8).collect();
        let whole = verity_digest(&data);
        // A 512-byte header before the data keeps blob and tree blocks aligned (as in a pack);
        // 100 bytes does not, and takes the separate path.
        for header in [512usize, 100] {
            for chunk in [1, 700, 4096, 5000, 65536] {
                let mut blob = sha256x2::Sha256::new();
                blob.update(&vec![7u8; header]);
                let mut tree = VerityHasher::new();
                for c in data.chunks(chunk) {
                    tree.update_alongside(c, &mut blob);
                }
                blob.update(b"trailer");
                assert_eq!(tree.finish(), whole, "header {header}, chunks of {chunk}");
                let expected: [u8; 32] =
                    sha2::Sha256::digest([vec![7u8; header], data.clone(), b"trailer".to_vec()].concat()).into();
                assert_eq!(blob.finalize(), expected, "header {header}, chunks of {chunk}");
            }
        }
    }
}
