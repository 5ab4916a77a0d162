//! Object packs: the archives that carry a module's content objects. A pack is a POSIX ustar
//! stream whose only entries are regular files named by their fs-verity digest, in strictly
//! ascending name order, ended by two zero blocks and nothing after them. Standard `tar` can
//! list and extract one; ironroot's reader accepts nothing else.
//!
//! The reader streams (memory is one header block plus the caller's buffer), checks every
//! header field that matters, and hashes each object as it is read: an entry whose bytes do not
//! match its name fails before the caller can commit it.

use std::io;

use crate::digest::VerityDigest;

mod reader;
mod writer;

pub use reader::{Object, PackReader};
pub use writer::PackWriter;

const BLOCK: usize = 512;
/// Largest size the 11-digit octal field holds; larger objects use the base-256 form.
const OCTAL_MAX: u64 = 0o77_777_777_777;

#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("reading pack")]
    Io(#[source] io::Error),
    #[error("pack entry {index}: {reason}")]
    Header { index: u64, reason: String },
    #[error("pack entry {name:?} is a {kind}, only regular files are allowed")]
    NotRegular { name: String, kind: &'static str },
    #[error("pack entry {name:?} is not named by an fs-verity digest")]
    BadName { name: String },
    #[error("pack entry {name} appears twice")]
    Duplicate { name: VerityDigest },
    #[error("pack entry {name} is out of order (after {previous})")]
    OutOfOrder { name: VerityDigest, previous: VerityDigest },
    #[error("pack entry {name} is truncated: header says {declared} bytes, stream ended after {got}")]
    Truncated { name: VerityDigest, declared: u64, got: u64 },
    #[error("pack entry {name}: content has fs-verity digest {found}")]
    DigestMismatch { name: VerityDigest, found: VerityDigest },
    #[error("pack entry {name}: non-zero padding after its data")]
    Padding { name: VerityDigest },
    #[error("pack has {0} bytes of trailing garbage after its end marker (or more)")]
    TrailingGarbage(usize),
    #[error("pack ended without its end marker")]
    NoEndMarker,
    #[error("pack holds {found} {what}, its descriptor declares {declared}")]
    Totals { what: &'static str, declared: u64, found: u64 },
}

impl From<io::Error> for PackError {
    fn from(e: io::Error) -> Self {
        // Digest mismatches raised inside `Read` travel as io::Error; unwrap them again.
        match e.get_ref().and_then(|inner| inner.downcast_ref::<PackError>()) {
            Some(_) => match e.into_inner().map(|b| b.downcast::<PackError>()) {
                Some(Ok(p)) => *p,
                Some(Err(other)) => PackError::Io(io::Error::other(other)),
                None => PackError::Io(io::Error::other("pack error")),
            },
            None => PackError::Io(e),
        }
    }
}

#[cfg(test)]
mod tests;
