//! Kernel module files for the initramfs: stored decompressed. Which modules, in what order,
//! and the index files the agent loads them by are [`ironroot_contract::kmod`]'s.

use thiserror::Error;

pub use ironroot_contract::kmod::{Aliases, ModuleIndex, module_name};

#[derive(Debug, Error, PartialEq, Eq)]
pub enum KmodError {
    #[error("decompressing kernel module {path}: {reason}")]
    Decompress { path: String, reason: String },
}

/// Largest module accepted after decompression (the biggest in a distribution kernel are a
/// few MiB).
const MAX_MODULE: u64 = 64 << 20;

/// The module at `rel` as the kernel loads it without decompressing: `.ko.xz`, `.ko.zst` and
/// `.ko.gz` are decompressed here (their path loses the suffix), anything else is returned as
/// it is. The in-kernel decompressor runs on every boot, and under emulation it is the larger
/// part of loading a module; the initramfs as a whole may still be compressed.
pub fn decompressed(rel: &str, bytes: Vec<u8>) -> Result<(String, Vec<u8>), KmodError> {
    use std::io::Read as _;
    let err = |reason: String| KmodError::Decompress { path: rel.to_owned(), reason };
    let Some((plain, suffix)) = rel.rsplit_once('.').filter(|(p, _)| p.ends_with(".ko")) else {
        return Ok((rel.to_owned(), bytes));
    };
    let mut out = Vec::new();
    match suffix {
        "xz" => {
            let mut capped = Capped { out: &mut out };
            lzma_rs::xz_decompress(&mut bytes.as_slice(), &mut capped).map_err(|e| err(e.to_string()))?;
        }
        "zst" => {
            let decoder = zstd::stream::Decoder::new(bytes.as_slice()).map_err(|e| err(e.to_string()))?;
            decoder.take(MAX_MODULE + 1).read_to_end(&mut out).map_err(|e| err(e.to_string()))?;
        }
        "gz" => {
            flate2::read::GzDecoder::new(bytes.as_slice())
                .take(MAX_MODULE + 1)
                .read_to_end(&mut out)
                .map_err(|e| err(e.to_string()))?;
        }
        _ => return Ok((rel.to_owned(), bytes)),
    }
    if out.len() as u64 > MAX_MODULE {
        return Err(err(format!("over {MAX_MODULE} bytes")));
    }
    if !out.starts_with(b"\x7fELF") {
        return Err(err("not an ELF object once decompressed".to_owned()));
    }
    Ok((plain.to_owned(), out))
}

/// A writer that refuses to grow past [`MAX_MODULE`] + 1 bytes.
struct Capped<'a> {
    out: &'a mut Vec<u8>,
}

impl std::io::Write for Capped<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.out.len() as u64 + buf.len() as u64 > MAX_MODULE + 1 {
            return Err(std::io::Error::other(format!("over {MAX_MODULE} bytes")));
        }
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressed_modules_are_stored_plain_and_others_as_they_are() {
        use std::io::Write as _;
        let elf = [b"\x7fELF".as_slice(), &[7u8; 5000]].concat();
        let mut xz = Vec::new();
        lzma_rs::xz_compress(&mut elf.as_slice(), &mut xz).unwrap();
        let zst = zstd::encode_all(elf.as_slice(), 3).unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&elf).unwrap();
        let gz = gz.finish().unwrap();
        for (rel, bytes) in
            [("kernel/a.ko.xz", xz), ("kernel/a.ko.zst", zst), ("kernel/a.ko.gz", gz), ("kernel/a.ko", elf.clone())]
        {
            assert_eq!(decompressed(rel, bytes).unwrap(), ("kernel/a.ko".to_owned(), elf.clone()), "{rel}");
        }
        // Not a module suffix this knows: untouched.
        assert_eq!(decompressed("kernel/a.ko.lz4", vec![1]).unwrap(), ("kernel/a.ko.lz4".to_owned(), vec![1]));
    }

    #[test]
    fn a_module_that_does_not_decompress_to_elf_is_an_error_naming_it() {
        let mut xz = Vec::new();
        lzma_rs::xz_compress(&mut b"not elf".as_slice(), &mut xz).unwrap();
        for (rel, bytes) in
            [("kernel/b.ko.xz", xz), ("kernel/c.ko.xz", b"garbage".to_vec()), ("kernel/d.ko.zst", vec![0; 10])]
        {
            let e = decompressed(rel, bytes).unwrap_err();
            assert!(matches!(&e, KmodError::Decompress { path, .. } if path == rel), "{e}");
        }
    }
}
