//! `ironroot-build initramfs`: the native initramfs, a newc cpio written here (no external cpio):
//!
//! - `/init`: the agent, which runs as PID 1 (`ironroot-agent` detects it);
//! - the shared libraries it links, from the ELF's own needed entries, and its loader;
//! - the kernel modules a node needs with their dependencies, stored decompressed (`.ko.xz` →
//!   `.ko`: no decompression in the kernel at boot): the hardware drivers the agent loads by
//!   device `modalias` (with `modules.alias` and `modules.dep`) and the fixed set it always
//!   loads, in `/etc/ironroot/modules.load` ([`modules`]);
//! - the trust roots (`/etc/ironroot/trust.pem`) and, when given, the plane CA
//!   (`/etc/ironroot/plane-ca.pem`);
//! - mke2fs as /sbin/mkfs.ext4 (the agent formats its zram or disk store), and any further
//!   programs asked for, with their libraries;
//! - the registry's CA when it has a private one (`/etc/ironroot/registry-ca.pem`);
//! - optionally busybox as `/bin/sh` for the break-glass shell (`ironroot.debug=shell`);
//! - `/dev/console` and `/dev/null`, so the kernel has a console before devtmpfs is mounted.
//!
//! Same inputs, same bytes: sorted entries, one mtime, owner 0:0, and gzip (when asked for)
//! at a fixed level without a name or time in its header.

pub mod cpio;
pub mod elf;
pub mod kmod;
pub mod modules;

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::Serialize;
use sha2::{Digest as _, Sha256};

use self::cpio::{Archive, Entry};

pub use self::modules::{FIXED_MODULES, Hardware};

/// Programs the agent runs in the initramfs (host path → path in the image): mke2fs formats
/// the zram and disk stores.
pub const DEFAULT_BINARIES: &[(&str, &str)] = &[("/sbin/mke2fs", "/sbin/mkfs.ext4")];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    Gzip,
}

#[derive(Debug, Clone)]
pub struct InitramfsArgs {
    pub agent: PathBuf,
    /// The output of `kernel fetch` (modules/lib/modules/REL, kernel.json).
    pub kernel: PathBuf,
    /// The fixed set, loaded on every boot ([`FIXED_MODULES`] by default).
    pub modules: Vec<String>,
    /// The drivers loaded when a device asks for them.
    pub hardware: Hardware,
    pub trust: Vec<PathBuf>,
    pub plane_ca: Option<PathBuf>,
    /// The CA of a registry with a private certificate (/etc/ironroot/registry-ca.pem).
    pub registry_ca: Option<PathBuf>,
    /// More programs, host path → path in the image (their libraries come along).
    pub binaries: Vec<(PathBuf, String)>,
    pub busybox: Option<PathBuf>,
    pub compression: Compression,
    /// Where the agent's libraries are looked up ("/" on the build host).
    pub sysroot: PathBuf,
    pub mtime: u32,
    pub out: PathBuf,
}

#[derive(Debug, Serialize)]
pub struct Built {
    pub path: PathBuf,
    pub sha256: String,
    pub bytes: u64,
    pub uncompressed_bytes: u64,
    pub compression: Compression,
    pub entries: usize,
    pub release: String,
    pub flavour: &'static str,
    pub modules: Vec<String>,
    pub builtin: Vec<String>,
    /// Drivers loaded by modalias.
    pub hardware: Vec<String>,
    /// Default drivers the kernel does not have.
    pub skipped: Vec<String>,
    pub libraries: Vec<String>,
}

pub fn build(args: &InitramfsArgs) -> anyhow::Result<Built> {
    let mut archive = Archive::new(args.mtime);
    for dir in ["dev", "proc", "sys", "run", "sysroot", "tmp", "persist", "etc/ironroot"] {
        archive.add(dir, Entry::Dir { mode: 0o755 })?;
    }
    archive.add("dev/console", Entry::CharDev { mode: 0o600, major: 5, minor: 1 })?;
    archive.add("dev/null", Entry::CharDev { mode: 0o666, major: 1, minor: 3 })?;
    archive.add("init", Entry::File { mode: 0o755, data: read(&args.agent)? })?;

    let mut libraries = elf::needed_closure(&args.agent, &args.sysroot)?;
    if let Some(busybox) = &args.busybox {
        archive.add("bin/busybox", Entry::File { mode: 0o755, data: read(busybox)? })?;
        archive.add("bin/sh", Entry::Symlink { target: "busybox".into() })?;
        // A static busybox (Debian's busybox-static) needs nothing; a dynamic one its libraries.
        libraries.extend(elf::needed_closure(busybox, &args.sysroot)?);
    }
    let defaults = DEFAULT_BINARIES.iter().map(|(h, i)| (PathBuf::from(h), (*i).to_owned()));
    for (host, image_path) in defaults.chain(args.binaries.iter().cloned()) {
        archive.add(&image_path, Entry::File { mode: 0o755, data: read(&host)? })?;
        libraries.extend(elf::needed_closure(&host, &args.sysroot)?);
    }
    for (image_path, host) in &libraries {
        archive.add(image_path, Entry::File { mode: 0o755, data: read(host)? })?;
    }

    let selected = modules::add(&mut archive, &args.kernel, &args.modules, &args.hardware)?;

    let trust = args.trust.iter().map(|p| read_text(p)).collect::<anyhow::Result<Vec<_>>>()?.concat();
    if !trust.contains("-----BEGIN PUBLIC KEY-----") {
        anyhow::bail!("no trusted public key given (--trust): a node could verify nothing");
    }
    archive.add("etc/ironroot/trust.pem", Entry::File { mode: 0o644, data: trust.into_bytes() })?;
    if let Some(ca) = &args.plane_ca {
        let pem = read_text(ca)?;
        if !pem.contains("-----BEGIN CERTIFICATE-----") {
            anyhow::bail!("{} holds no PEM certificate (--plane-ca)", ca.display());
        }
        archive.add("etc/ironroot/plane-ca.pem", Entry::File { mode: 0o644, data: pem.into_bytes() })?;
    }
    if let Some(ca) = &args.registry_ca {
        let pem = read_text(ca)?;
        if !pem.contains("-----BEGIN CERTIFICATE-----") {
            anyhow::bail!("{} holds no PEM certificate (--registry-ca)", ca.display());
        }
        archive.add("etc/ironroot/registry-ca.pem", Entry::File { mode: 0o644, data: pem.into_bytes() })?;
    }

    let mut raw = Vec::new();
    let uncompressed_bytes = archive.write(&mut raw)?;
    let bytes = match args.compression {
        Compression::None => raw,
        Compression::Gzip => {
            // flate2's header carries no name and mtime 0: reproducible.
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
            std::io::Write::write_all(&mut gz, &raw)?;
            gz.finish()?
        }
    };
    write_atomic(&args.out, &bytes)?;
    Ok(Built {
        path: args.out.clone(),
        sha256: hex::encode(Sha256::digest(&bytes)),
        bytes: bytes.len() as u64,
        uncompressed_bytes,
        compression: args.compression,
        entries: archive.len(),
        release: selected.release,
        flavour: selected.flavour,
        modules: selected.modules,
        builtin: selected.builtin,
        hardware: selected.hardware,
        skipped: selected.skipped,
        libraries: libraries.into_keys().collect(),
    })
}

pub(super) fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

pub(super) fn read_text(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    ironroot_oci::layout::write_atomic(path, bytes).with_context(|| format!("writing {}", path.display()))
}
