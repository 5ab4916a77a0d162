//! Kernel modules for the initramfs: the requested names, their dependencies from
//! `modules.dep` (which `depmod -b` wrote), in an order where every module comes after what it
//! needs. Names compare the way modprobe compares them (`-` and `_` are the same); a module the
//! kernel has built in (`modules.builtin`) needs no file.

use std::collections::{BTreeMap, BTreeSet};

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum KmodError {
    #[error("modules.dep line {line}: {text:?} is not 'path: deps'")]
    Malformed { line: usize, text: String },
    #[error("kernel module {0:?} is neither in modules.dep nor built in")]
    Unknown(String),
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

/// Parsed `modules.dep` + `modules.builtin`.
#[derive(Debug, Default)]
pub struct ModuleIndex {
    /// name → (path relative to lib/modules/REL, dependency paths)
    by_name: BTreeMap<String, (String, Vec<String>)>,
    by_path: BTreeMap<String, Vec<String>>,
    builtin: BTreeSet<String>,
}

/// `kernel/fs/erofs/erofs.ko.xz` → `erofs`; `virtio-rng` → `virtio_rng`.
pub fn module_name(path_or_name: &str) -> String {
    let base = path_or_name.rsplit('/').next().unwrap_or(path_or_name);
    let stem = base.split(".ko").next().unwrap_or(base);
    stem.replace('-', "_")
}

impl ModuleIndex {
    pub fn parse(dep: &str, builtin: &str) -> Result<Self, KmodError> {
        let mut index = ModuleIndex::default();
        for (n, line) in dep.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let (path, deps) =
                line.split_once(':').ok_or_else(|| KmodError::Malformed { line: n + 1, text: line.to_owned() })?;
            let deps: Vec<String> = deps.split_whitespace().map(str::to_owned).collect();
            index.by_name.insert(module_name(path), (path.to_owned(), deps.clone()));
            index.by_path.insert(path.to_owned(), deps);
        }
        index.builtin = builtin.lines().filter(|l| !l.trim().is_empty()).map(module_name).collect();
        Ok(index)
    }

    /// The files to load for `names`, dependencies first, each once. Built-in names are
    /// returned separately (nothing to load).
    pub fn closure(&self, names: &[&str]) -> Result<(Vec<String>, Vec<String>), KmodError> {
        let mut order = Vec::new();
        let mut seen = BTreeSet::new();
        let mut builtin = Vec::new();
        for name in names {
            let name = module_name(name);
            if let Some((path, _)) = self.by_name.get(&name) {
                self.visit(path, &mut seen, &mut order);
            } else if self.builtin.contains(&name) {
                builtin.push(name);
            } else {
                return Err(KmodError::Unknown(name));
            }
        }
        Ok((order, builtin))
    }

    /// `order` (from [`ModuleIndex::closure`]) in waves: a module's wave is one past the
    /// latest wave of what it needs, so each wave's modules can load at the same time.
    pub fn waves(&self, order: &[String]) -> Vec<Vec<String>> {
        let mut wave_of: BTreeMap<&str, usize> = BTreeMap::new();
        let mut waves: Vec<Vec<String>> = Vec::new();
        for path in order {
            let deps = self.by_path.get(path).into_iter().flatten();
            let wave = deps.filter_map(|d| wave_of.get(d.as_str())).map(|w| w + 1).max().unwrap_or(0);
            wave_of.insert(path, wave);
            if waves.len() <= wave {
                waves.resize_with(wave + 1, Vec::new);
            }
            waves[wave].push(path.clone());
        }
        waves
    }

    fn visit(&self, path: &str, seen: &mut BTreeSet<String>, order: &mut Vec<String>) {
        if !seen.insert(path.to_owned()) {
            return;
        }
        // modules.dep lists the full transitive set; visiting each keeps the order right
        // even when a dependency's own line is what orders it.
        for dep in self.by_path.get(path).into_iter().flatten() {
            self.visit(dep, seen, order);
        }
        order.push(path.to_owned());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "kernel/fs/erofs/erofs.ko.xz: kernel/lib/libcrc32c.ko.xz\n\
        kernel/lib/libcrc32c.ko.xz:\n\
        kernel/drivers/net/virtio_net.ko.xz: kernel/drivers/net/net_failover.ko.xz kernel/net/core/failover.ko.xz\n\
        kernel/drivers/net/net_failover.ko.xz: kernel/net/core/failover.ko.xz\n\
        kernel/net/core/failover.ko.xz:\n\
        kernel/drivers/char/hw_random/virtio-rng.ko.xz:\n";

    #[test]
    fn dependencies_come_first_and_once() {
        let index = ModuleIndex::parse(DEP, "kernel/fs/ext4/ext4.ko\n").unwrap();
        let (order, builtin) = index.closure(&["virtio_net", "erofs", "virtio-rng", "ext4", "virtio_net"]).unwrap();
        assert_eq!(
            order,
            [
                "kernel/net/core/failover.ko.xz",
                "kernel/drivers/net/net_failover.ko.xz",
                "kernel/drivers/net/virtio_net.ko.xz",
                "kernel/lib/libcrc32c.ko.xz",
                "kernel/fs/erofs/erofs.ko.xz",
                "kernel/drivers/char/hw_random/virtio-rng.ko.xz",
            ]
        );
        assert_eq!(builtin, ["ext4"]);
    }

    #[test]
    fn waves_put_each_module_after_everything_it_needs() {
        let index = ModuleIndex::parse(DEP, "").unwrap();
        let (order, _) = index.closure(&["virtio_net", "erofs", "virtio-rng"]).unwrap();
        let waves = index.waves(&order);
        assert_eq!(
            waves,
            [
                vec![
                    "kernel/net/core/failover.ko.xz",
                    "kernel/lib/libcrc32c.ko.xz",
                    "kernel/drivers/char/hw_random/virtio-rng.ko.xz"
                ],
                vec!["kernel/drivers/net/net_failover.ko.xz", "kernel/fs/erofs/erofs.ko.xz"],
                vec!["kernel/drivers/net/virtio_net.ko.xz"],
            ]
        );
        assert_eq!(waves.concat().len(), order.len(), "every module once");
    }

    #[test]
    fn unknown_modules_and_broken_lines_are_named() {
        let index = ModuleIndex::parse(DEP, "").unwrap();
        assert_eq!(index.closure(&["nope"]), Err(KmodError::Unknown("nope".into())));
        assert!(matches!(ModuleIndex::parse("no colon here", ""), Err(KmodError::Malformed { line: 1, .. })));
    }

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
