//! Writing packs (the builder's side).

use std::io::{self, Read, Write};

use super::{BLOCK, OCTAL_MAX};
use crate::digest::VerityDigest;

/// Writes a pack. Objects must be added in strictly ascending digest order.
#[derive(Debug)]
pub struct PackWriter<W: Write> {
    out: W,
    last: Option<VerityDigest>,
    objects: u64,
    bytes: u64,
}

impl<W: Write> PackWriter<W> {
    pub fn new(out: W) -> Self {
        Self { out, last: None, objects: 0, bytes: 0 }
    }

    /// Appends one object of exactly `size` bytes read from `data`.
    pub fn add(&mut self, digest: VerityDigest, size: u64, data: &mut impl Read) -> io::Result<()> {
        if let Some(prev) = self.last
            && digest <= prev
        {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("object {digest} added after {prev}")));
        }
        self.out.write_all(&header(&digest, size))?;
        let copied = io::copy(&mut data.take(size), &mut self.out)?;
        if copied != size {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("object {digest}: source gave {copied} of {size} bytes"),
            ));
        }
        let pad = (BLOCK - (size as usize % BLOCK)) % BLOCK;
        self.out.write_all(&[0u8; BLOCK][..pad])?;
        self.last = Some(digest);
        self.objects += 1;
        self.bytes += size;
        Ok(())
    }

    /// Writes the end marker; returns the writer, the object count and the object bytes.
    pub fn finish(mut self) -> io::Result<(W, u64, u64)> {
        self.out.write_all(&[0u8; 2 * BLOCK])?;
        self.out.flush()?;
        Ok((self.out, self.objects, self.bytes))
    }
}

pub(super) fn header(digest: &VerityDigest, size: u64) -> [u8; BLOCK] {
    let mut h = [0u8; BLOCK];
    h[..64].copy_from_slice(digest.hex().as_bytes());
    h[100..108].copy_from_slice(b"0000444\0");
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    if size <= OCTAL_MAX {
        h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
    } else {
        h[124] = 0x80;
        h[128..136].copy_from_slice(&size.to_be_bytes());
    }
    h[136..148].copy_from_slice(b"00000000000\0");
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    h
}
