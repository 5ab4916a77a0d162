//! Which kernel modules go into the initramfs, and the files the agent loads them by
//! (docs/interfaces/initramfs.md):
//!
//! - the hardware set: drivers the agent loads only when a device's `modalias` asks for one
//!   (as udev's coldplug does), with `lib/modules/REL/modules.alias` (their patterns) and
//!   `modules.dep` (what each needs, paths as stored here);
//! - the fixed set, loaded on every boot after the hardware (filesystems of the root and the
//!   store, DMI), in waves in `/etc/ironroot/modules.load`;
//! - `lib/modules/REL/modules.alias.absent`: the PCI patterns of the kernel's NIC and disk
//!   drivers that were left out, so a node whose NIC has no driver here can say which one it
//!   lacks.
//!
//! The hardware set's default follows the kernel's flavour: Debian's cloud kernel has only
//! virtual hardware drivers and keeps its initramfs as small as that allows; the generic kernel
//! gets the NIC and disk drivers of common servers. A default driver the kernel lacks is
//! skipped (and listed); one asked for by name that it lacks is an error.

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{Context as _, bail};

use super::cpio::{Archive, Entry};
use super::kmod::{self, Aliases, ModuleIndex};
use super::{read, read_text};

/// Loaded on every boot, after the hardware: the filesystems of the composefs root and its
/// store, and DMI (identity from SMBIOS; no device to match it by).
pub const FIXED_MODULES: &[&str] = &["dmi_sysfs", "erofs", "overlay", "loop", "zram", "ext4"];

/// The hardware a cloud-kernel node has: QEMU's and the clouds' virtual devices.
pub const CLOUD_HARDWARE: &[&str] = &["virtio_pci", "virtio_net", "virtio_blk", "virtio_rng", "qemu_fw_cfg"];

/// The hardware a bare-metal node may have: common server NICs (Intel, Mellanox, Broadcom,
/// Realtek), NVMe, SATA and SAS disks (with `sd_mod` for the disks behind them), and the
/// virtual devices.
pub const GENERIC_HARDWARE: &[&str] = &[
    "virtio_pci",
    "virtio_net",
    "virtio_blk",
    "virtio_scsi",
    "virtio_rng",
    "qemu_fw_cfg",
    "e1000",
    "e1000e",
    "igb",
    "igc",
    "ixgbe",
    "i40e",
    "ice",
    "mlx5_core",
    "bnxt_en",
    "tg3",
    "r8169",
    "nvme",
    "ahci",
    "megaraid_sas",
    "mpt3sas",
    "sd_mod",
];

/// Where the left-out drivers whose absence a node names are: NICs and disk controllers.
const NAMED_WHEN_ABSENT: &[&str] =
    &["kernel/drivers/net/", "kernel/drivers/nvme/", "kernel/drivers/ata/", "kernel/drivers/scsi/"];

/// The hardware set asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hardware {
    /// The flavour's default (drivers the kernel lacks are skipped), plus these by name.
    Default { add: Vec<String> },
    /// Exactly these (`--modules-from`), plus `add`.
    Listed { names: Vec<String>, add: Vec<String> },
}

/// What went in.
#[derive(Debug, Default, serde::Serialize)]
pub struct Selected {
    pub release: String,
    /// `cloud` or `generic` (from kernel.json's metapackage; generic without one).
    pub flavour: &'static str,
    /// Every module stored (names), hardware and fixed, with dependencies.
    pub modules: Vec<String>,
    pub builtin: Vec<String>,
    /// The hardware drivers loaded by modalias (names, without dependencies).
    pub hardware: Vec<String>,
    /// Default drivers this kernel does not have.
    pub skipped: Vec<String>,
}

/// A `--modules-from` file: one module name per line; `#` starts a comment.
pub fn read_list(path: &Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let names: Vec<String> = text
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    if let Some(bad) = names.iter().find(|n| n.contains(char::is_whitespace) || n.contains('/')) {
        bail!("{}: {bad:?} is not a module name (one per line)", path.display());
    }
    Ok(names)
}

/// The kernel's flavour, from the metapackage `kernel fetch` resolved.
fn flavour(kernel: &Path) -> &'static str {
    let info = std::fs::read(kernel.join("kernel.json")).ok();
    let meta = info.and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
    match meta.as_ref().and_then(|m| m["metapackage"].as_str()) {
        Some(m) if m.contains("-cloud-") => "cloud",
        _ => "generic",
    }
}

/// Adds the modules, their index files and the fixed set's load order to `archive`.
pub fn add(archive: &mut Archive, kernel: &Path, fixed: &[String], hardware: &Hardware) -> anyhow::Result<Selected> {
    let base = kernel.join("modules/lib/modules");
    let release = std::fs::read_dir(&base)
        .with_context(|| format!("{} has no modules (run `ironroot-build kernel fetch`)", base.display()))?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .with_context(|| format!("{} is empty", base.display()))?;
    let dir = base.join(&release);
    let aliases = Aliases::parse(&std::fs::read_to_string(dir.join("modules.alias")).unwrap_or_default())?;
    let plain = ModuleIndex::parse(&read_text(&dir.join("modules.dep"))?, "")?;
    let soft = softdeps(
        &std::fs::read_to_string(dir.join("modules.softdep")).unwrap_or_default(),
        &std::fs::read(dir.join("modules.builtin.modinfo")).unwrap_or_default(),
        &aliases,
        &plain,
    );
    let index = ModuleIndex::parse(
        &with_softdeps(&read_text(&dir.join("modules.dep"))?, &soft, &plain),
        &std::fs::read_to_string(dir.join("modules.builtin")).unwrap_or_default(),
    )?;
    let flavour = flavour(kernel);
    let (wanted, add) = match hardware {
        Hardware::Default { add } => {
            let defaults = if flavour == "cloud" { CLOUD_HARDWARE } else { GENERIC_HARDWARE };
            (defaults.iter().map(|m| (*m).to_owned()).collect::<Vec<_>>(), add)
        }
        Hardware::Listed { names, add } => (names.clone(), add),
    };
    let strict_default = matches!(hardware, Hardware::Listed { .. });
    let mut selected = Selected { release: release.clone(), flavour, ..Selected::default() };
    let mut hw: Vec<String> = Vec::new();
    for name in wanted.iter().map(|n| (n, strict_default)).chain(add.iter().map(|n| (n, true))) {
        let (name, strict) = name;
        let canonical = kmod::module_name(name);
        if index.has(&canonical) {
            if !hw.contains(&canonical) {
                hw.push(canonical);
            }
        } else if strict {
            bail!("kernel module {name:?} is neither in {release}'s modules.dep nor built in");
        } else {
            selected.skipped.push(canonical);
        }
    }

    // A built-in module of the fixed set (ext4 in the generic kernel) still needs its softdeps
    // (crc32c) as modules: they join the fixed set.
    let mut fixed_names: Vec<String> = fixed.iter().map(|n| kmod::module_name(n)).collect();
    let builtin_soft: Vec<String> = fixed_names
        .iter()
        .filter(|n| index.entry(n).is_none())
        .flat_map(|n| soft.get(n).cloned().unwrap_or_default())
        .collect();
    fixed_names.extend(builtin_soft);
    let fixed_names: Vec<&str> = fixed_names.iter().map(String::as_str).collect();
    let (fixed_order, mut builtin) = index.closure(&fixed_names)?;
    let hw_names: Vec<&str> = hw.iter().map(String::as_str).collect();
    let (hw_order, hw_builtin) = index.closure(&hw_names)?;
    builtin.extend(hw_builtin);

    // Every file once, decompressed; the stored path is what modules.dep and modules.load name.
    let mut stored = BTreeSet::new();
    let mut stored_path = std::collections::BTreeMap::new();
    for rel in fixed_order.iter().chain(&hw_order) {
        if !stored.insert(rel.clone()) {
            continue;
        }
        let (plain, data) = kmod::decompressed(rel, read(&dir.join(rel))?)?;
        archive.add(&format!("lib/modules/{release}/{plain}"), Entry::File { mode: 0o644, data })?;
        stored_path.insert(rel.clone(), plain);
    }
    let path_of = |rel: &String| stored_path.get(rel).cloned().unwrap_or_else(|| rel.clone());

    // modules.dep for what is stored, in the stored paths.
    let mut dep = String::new();
    for rel in &stored {
        let (_, deps) = index.entry(&kmod::module_name(rel)).unwrap_or(("", &[]));
        let deps: Vec<String> = deps.iter().map(path_of).collect();
        dep.push_str(&format!("{}:{}{}\n", path_of(rel), if deps.is_empty() { "" } else { " " }, deps.join(" ")));
    }
    archive.add(&format!("lib/modules/{release}/modules.dep"), Entry::File { mode: 0o644, data: dep.into_bytes() })?;

    let names: BTreeSet<String> = stored.iter().map(|p| kmod::module_name(p)).collect();
    let present = aliases.filtered(|_, m| names.contains(m));
    archive.add(
        &format!("lib/modules/{release}/modules.alias"),
        Entry::File { mode: 0o644, data: present.render().into_bytes() },
    )?;
    let absent_modules: BTreeSet<&str> = index
        .modules()
        .filter(|(name, path)| !names.contains(*name) && NAMED_WHEN_ABSENT.iter().any(|d| path.starts_with(d)))
        .map(|(name, _)| name)
        .collect();
    let absent = aliases.filtered(|p, m| p.starts_with("pci:") && absent_modules.contains(m));
    archive.add(
        &format!("lib/modules/{release}/modules.alias.absent"),
        Entry::File { mode: 0o644, data: absent.render().into_bytes() },
    )?;

    // The fixed set: one wave per line, its modules separated by spaces (they load in parallel).
    let mut load = String::new();
    for wave in index.waves(&fixed_order) {
        let paths: Vec<String> = wave.iter().map(|rel| format!("/lib/modules/{release}/{}", path_of(rel))).collect();
        load.push_str(&paths.join(" "));
        load.push('\n');
    }
    archive.add("etc/ironroot/modules.load", Entry::File { mode: 0o644, data: load.into_bytes() })?;

    selected.modules = names.into_iter().collect();
    selected.builtin = builtin;
    selected.hardware = hw;
    Ok(selected)
}

/// The modules each module wants loaded before it (`softdep NAME pre: …` in modules.softdep, and
/// `NAME.softdep=pre: …` in modules.builtin.modinfo for built-in ones: ext4 and libcrc32c want
/// crc32c), their names resolved through the aliases (`crc32c` → crc32c_generic, crc32c_intel)
/// to the modules the kernel has as files. `post:` softdeps are not needed to boot.
pub fn softdeps(
    softdep: &str,
    builtin_modinfo: &[u8],
    aliases: &Aliases,
    index: &ModuleIndex,
) -> std::collections::BTreeMap<String, Vec<String>> {
    let mut lines: Vec<(String, String)> = softdep
        .lines()
        .filter_map(|l| l.trim().strip_prefix("softdep "))
        .filter_map(|l| l.split_once(' '))
        .map(|(m, rest)| (kmod::module_name(m), rest.to_owned()))
        .collect();
    for entry in builtin_modinfo.split(|&b| b == 0) {
        let entry = String::from_utf8_lossy(entry);
        if let Some((m, rest)) = entry.split_once(".softdep=") {
            lines.push((kmod::module_name(m), rest.to_owned()));
        }
    }
    let mut out: std::collections::BTreeMap<String, Vec<String>> = std::collections::BTreeMap::new();
    for (module, rest) in lines {
        let mut pre = false;
        for word in rest.split_whitespace() {
            match word {
                "pre:" => pre = true,
                "post:" => pre = false,
                name if pre => {
                    let direct = index.entry(name).is_some().then(|| kmod::module_name(name));
                    let resolved = direct.into_iter().chain(aliases.matching(name).into_iter().map(str::to_owned));
                    let wanted = out.entry(module.clone()).or_default();
                    for m in resolved.filter(|m| index.entry(m).is_some() && *m != module) {
                        if !wanted.contains(&m) {
                            wanted.push(m);
                        }
                    }
                }
                _ => {}
            }
        }
    }
    out.retain(|_, v| !v.is_empty());
    out
}

/// modules.dep with each module's softdeps (and what they need) added to what it needs.
fn with_softdeps(dep: &str, soft: &std::collections::BTreeMap<String, Vec<String>>, index: &ModuleIndex) -> String {
    let mut out = String::new();
    for line in dep.lines() {
        let Some((path, deps)) = line.split_once(':') else {
            out.push_str(line);
            out.push('\n');
            continue;
        };
        let mut all: Vec<String> = deps.split_whitespace().map(str::to_owned).collect();
        for pre in soft.get(&kmod::module_name(path)).into_iter().flatten() {
            if let Some((pre_path, pre_deps)) = index.entry(pre) {
                for p in pre_deps.iter().map(String::as_str).chain([pre_path]) {
                    if p != path && !all.iter().any(|a| a == p) {
                        all.push(p.to_owned());
                    }
                }
            }
        }
        out.push_str(&format!("{path}:{}{}\n", if all.is_empty() { "" } else { " " }, all.join(" ")));
    }
    out
}

#[cfg(test)]
#[path = "modules_tests.rs"]
mod tests;
