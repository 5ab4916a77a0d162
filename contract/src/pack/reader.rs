//! Reading packs (the verifier's side): strict, streaming, hashing as it goes.

use std::io::{self, Read};

use super::{BLOCK, PackError};
use crate::digest::{OciDigest, VerityDigest};
use crate::verity::VerityHasher;

fn field_str(f: &[u8]) -> &[u8] {
    f.split(|&b| b == 0).next().unwrap_or(&[])
}

/// An octal number field, or (12-byte fields only) GNU base-256 holding at most 64 bits.
/// Found by `just fuzz`: a base-256 marker in the 8-byte checksum field once indexed past it.
pub(super) fn parse_size(f: &[u8]) -> Option<u64> {
    if *f.first()? & 0x80 != 0 {
        if f.len() != 12 || f[0] != 0x80 || f[1..4].iter().any(|&b| b != 0) {
            return None;
        }
        return Some(u64::from_be_bytes(f[4..12].try_into().ok()?));
    }
    let digits: &[u8] = f.split(|&b| b == 0 || b == b' ').next()?;
    if digits.is_empty() || !digits.iter().all(|b| (b'0'..=b'7').contains(b)) {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(digits).ok()?, 8).ok()
}

fn kind_name(flag: u8) -> &'static str {
    match flag {
        b'1' => "hard link",
        b'2' => "symbolic link",
        b'3' => "character device",
        b'4' => "block device",
        b'5' => "directory",
        b'6' => "fifo",
        b'7' => "contiguous file",
        b'x' | b'g' => "pax extended header",
        b'L' | b'K' => "GNU long name",
        _ => "entry of unknown type",
    }
}

fn printable(name: &[u8]) -> String {
    String::from_utf8_lossy(name).chars().take(120).collect()
}

/// Reads a pack, yielding verified objects.
#[derive(Debug)]
pub struct PackReader<R: Read> {
    input: R,
    index: u64,
    last: Option<VerityDigest>,
    current: Option<Current>,
    ended: bool,
    objects: u64,
    bytes: u64,
    /// Whether this reader computes objects' digests (see [`PackReader::kernel_checked`]).
    hashing: bool,
    /// The SHA-256 of every byte read, when asked for ([`PackReader::with_blob_digest`]).
    blob: Option<sha256x2::Sha256>,
}

#[derive(Debug)]
struct Current {
    name: VerityDigest,
    size: u64,
    remaining: u64,
    /// `None` when the kernel measures the object instead.
    hasher: Option<VerityHasher>,
    checked: bool,
}

/// One object being read. Its bytes come from `Read`; reading to the end checks the digest.
#[derive(Debug)]
pub struct Object<'a, R: Read> {
    reader: &'a mut PackReader<R>,
}

impl<R: Read> PackReader<R> {
    pub fn new(input: R) -> Self {
        Self {
            input,
            index: 0,
            last: None,
            current: None,
            ended: false,
            objects: 0,
            bytes: 0,
            hashing: true,
            blob: None,
        }
    }

    /// Also computes the SHA-256 of the whole pack as it is read (the blob digest its
    /// descriptor names), interleaved with the objects' fs-verity hashing: one pass over the
    /// bytes for both. See [`PackReader::blob_digest`].
    pub fn with_blob_digest(self) -> Self {
        Self { blob: Some(sha256x2::Sha256::new()), ..self }
    }

    /// The SHA-256 of the pack, once [`PackReader::next_object`] has returned `None` (the end
    /// marker was read and nothing follows it); `None` before that or when not asked for.
    pub fn blob_digest(&self) -> Option<OciDigest> {
        let blob = self.blob.as_ref().filter(|_| self.ended)?;
        Some(OciDigest::new(blob.clone().finalize()))
    }

    /// A reader that checks everything but the objects' digests, for a caller that has the
    /// kernel measure each object (fs-verity) before it counts as read: computing the same
    /// Merkle tree twice would double the CPU a boot spends on it. The caller must compare
    /// [`Object::digest`] with the kernel's measurement.
    pub fn kernel_checked(input: R) -> Self {
        Self { hashing: false, ..Self::new(input) }
    }

    /// Objects and object bytes read so far.
    pub fn totals(&self) -> (u64, u64) {
        (self.objects, self.bytes)
    }

    /// The next object, or `None` after the end marker (and a check that nothing follows it).
    pub fn next_object(&mut self) -> Result<Option<Object<'_, R>>, PackError> {
        self.finish_current()?;
        if self.ended {
            return Ok(None);
        }
        let mut h = [0u8; BLOCK];
        if !self.read_full(&mut h)? {
            return Err(PackError::NoEndMarker);
        }
        if h.iter().all(|&b| b == 0) {
            if !self.read_full(&mut h)? || h.iter().any(|&b| b != 0) {
                return Err(PackError::NoEndMarker);
            }
            let mut probe = [0u8; BLOCK];
            let extra = self.input.read(&mut probe)?;
            if extra > 0 {
                return Err(PackError::TrailingGarbage(extra));
            }
            self.ended = true;
            return Ok(None);
        }
        let name = self.check_header(&h)?;
        let size = parse_size(&h[124..136])
            .ok_or_else(|| PackError::Header { index: self.index, reason: "size field is not a number".into() })?;
        self.index += 1;
        let hasher = self.hashing.then(VerityHasher::new);
        self.current = Some(Current { name, size, remaining: size, hasher, checked: false });
        Ok(Some(Object { reader: self }))
    }

    fn check_header(&self, h: &[u8; BLOCK]) -> Result<VerityDigest, PackError> {
        let index = self.index;
        let bad = |reason: &str| PackError::Header { index, reason: reason.to_owned() };
        let stored = parse_size(&h[148..156]).ok_or_else(|| bad("checksum field is not a number"))?;
        let sum: u64 =
            h.iter().enumerate().map(|(i, &b)| if (148..156).contains(&i) { 32 } else { u64::from(b) }).sum();
        if stored != sum {
            return Err(bad("header checksum does not match"));
        }
        if &h[257..263] != b"ustar\0" || &h[263..265] != b"00" {
            return Err(bad("not a POSIX ustar header"));
        }
        let raw_name = field_str(&h[..100]);
        let prefix = field_str(&h[345..500]);
        let shown = if prefix.is_empty() {
            printable(raw_name)
        } else {
            format!("{}/{}", printable(prefix), printable(raw_name))
        };
        let flag = h[156];
        if flag != b'0' && flag != 0 {
            return Err(PackError::NotRegular { name: shown, kind: kind_name(flag) });
        }
        if !field_str(&h[157..257]).is_empty() {
            return Err(PackError::NotRegular { name: shown, kind: "link" });
        }
        if !prefix.is_empty() {
            return Err(PackError::BadName { name: shown });
        }
        let name = std::str::from_utf8(raw_name)
            .ok()
            .and_then(|s| VerityDigest::parse_name(s).ok())
            .ok_or(PackError::BadName { name: shown })?;
        if let Some(prev) = self.last {
            if name == prev {
                return Err(PackError::Duplicate { name });
            }
            if name < prev {
                return Err(PackError::OutOfOrder { name, previous: prev });
            }
        }
        Ok(name)
    }

    fn read_data(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(cur) = self.current.as_mut() else { return Ok(0) };
        if cur.remaining == 0 {
            check_digest(cur)?;
            return Ok(0);
        }
        let want = buf.len().min(usize::try_from(cur.remaining).unwrap_or(usize::MAX));
        let n = self.input.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::other(PackError::Truncated {
                name: cur.name,
                declared: cur.size,
                got: cur.size - cur.remaining,
            }));
        }
        match (cur.hasher.as_mut(), self.blob.as_mut()) {
            (Some(tree), Some(blob)) => tree.update_alongside(&buf[..n], blob),
            (Some(tree), None) => tree.update(&buf[..n]),
            (None, Some(blob)) => blob.update(&buf[..n]),
            (None, None) => {}
        }
        cur.remaining -= n as u64;
        if cur.remaining == 0 {
            check_digest(cur)?;
        }
        Ok(n)
    }

    fn finish_current(&mut self) -> Result<(), PackError> {
        if self.current.is_none() {
            return Ok(());
        }
        let mut sink = [0u8; 16 * 1024];
        while self.read_data(&mut sink)? > 0 {}
        let Some(cur) = self.current.take() else { return Ok(()) };
        check_digest_owned(&cur)?;
        let pad = (BLOCK - (cur.size as usize % BLOCK)) % BLOCK;
        let mut padding = [0u8; BLOCK];
        if !self.read_full(&mut padding[..pad])? && pad > 0 {
            return Err(PackError::Truncated { name: cur.name, declared: cur.size, got: cur.size });
        }
        if padding[..pad].iter().any(|&b| b != 0) {
            return Err(PackError::Padding { name: cur.name });
        }
        self.last = Some(cur.name);
        self.objects += 1;
        self.bytes += cur.size;
        Ok(())
    }

    /// Fills `buf` from the input (see [`read_full`]), counting it into the blob digest.
    fn read_full(&mut self, buf: &mut [u8]) -> Result<bool, PackError> {
        let filled = read_full(&mut self.input, buf)?;
        if let Some(blob) = self.blob.as_mut() {
            blob.update(buf);
        }
        Ok(filled)
    }

    /// Checks the totals a pack descriptor declares against what was read (call after `None`).
    pub fn check_totals(&self, objects: u64, bytes: u64) -> Result<(), PackError> {
        if self.objects != objects {
            return Err(PackError::Totals { what: "objects", declared: objects, found: self.objects });
        }
        if self.bytes != bytes {
            return Err(PackError::Totals { what: "object bytes", declared: bytes, found: self.bytes });
        }
        Ok(())
    }
}

fn check_digest(cur: &mut Current) -> io::Result<()> {
    if !cur.checked {
        cur.checked = true;
        if let Some(hasher) = cur.hasher.take() {
            let found = hasher.finish();
            if found != cur.name {
                return Err(io::Error::other(PackError::DigestMismatch { name: cur.name, found }));
            }
        }
    }
    Ok(())
}

fn check_digest_owned(cur: &Current) -> Result<(), PackError> {
    if cur.checked {
        Ok(())
    } else {
        Err(PackError::Truncated { name: cur.name, declared: cur.size, got: cur.size - cur.remaining })
    }
}

/// Fills `buf` completely; `Ok(false)` on a clean EOF before the first byte, an error on a
/// partial fill.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> Result<bool, PackError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => {
                return Err(PackError::Io(io::Error::new(io::ErrorKind::UnexpectedEof, "pack ends inside a block")));
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(true)
}

impl<R: Read> Object<'_, R> {
    pub fn digest(&self) -> VerityDigest {
        self.reader.current.as_ref().map(|c| c.name).unwrap_or(VerityDigest::new([0; 32]))
    }

    pub fn size(&self) -> u64 {
        self.reader.current.as_ref().map_or(0, |c| c.size)
    }
}

impl<R: Read> Read for Object<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.reader.read_data(buf)
    }
}
