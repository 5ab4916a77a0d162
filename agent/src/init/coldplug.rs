//! Kernel modules as the hardware asks for them, the way udev's coldplug does: every device
//! under `/sys/bus/*/devices` has a `modalias`; the initramfs's `modules.alias` says which of
//! its drivers claim it, `modules.dep` what each needs. Matching drivers load in parallel
//! waves; the buses are scanned again after each round, since a driver makes devices of its
//! own (virtio-pci the virtio devices, ahci the SCSI disks), until a scan finds nothing new
//! and once more after a short settle (100 ms) for drivers that probe asynchronously past
//! their module's init (`finit_module` itself waits for the async work a module's init
//! scheduled: libata's port probes, the SCSI scan).
//!
//! A module that fails to load is reported with its name and error and is not fatal by
//! itself. A NIC or disk controller that no driver claimed is listed with its modalias and,
//! from `modules.alias.absent`, the kernel's driver for it that the initramfs lacks: the caller
//! decides (a NIC without a driver fails the boot, [`super::main`]).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ironroot_contract::kmod::{Aliases, ModuleIndex};
use ironroot_contract::run_state::{HardwareRecord, ModuleFailure, UnclaimedDevice};

use crate::external::{self, Links};

/// Rounds of scan-and-load before giving up on the hardware settling.
const MAX_ROUNDS: usize = 8;

/// How long a round that found nothing new waits before the last scan.
const SETTLE: Duration = Duration::from_millis(100);

/// Largest index file read from the initramfs.
const MAX_INDEX: u64 = 8 << 20;

/// One device on a bus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// `pci 0000:00:02.0`, `virtio virtio0`.
    pub id: String,
    pub modalias: String,
    /// What it is, where the bus says: `nic`, `storage` or `other`.
    pub kind: &'static str,
    /// The bound driver's name.
    pub driver: Option<String>,
}

/// PCI base class 0x02 (network) and 0x01 (mass storage); virtio device ids 1 (net), 2 (block)
/// and 8 (SCSI).
pub fn kind_of(bus: &str, class: Option<&str>, virtio_device: Option<&str>) -> &'static str {
    let num = |s: &str| u32::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok();
    match bus {
        "pci" => match class.and_then(num).map(|c| c >> 16) {
            Some(0x02) => "nic",
            Some(0x01) => "storage",
            _ => "other",
        },
        "virtio" => match virtio_device.and_then(num) {
            Some(1) => "nic",
            Some(2 | 8) => "storage",
            _ => "other",
        },
        _ => "other",
    }
}

/// Every device with a modalias under `sys/bus`.
pub fn scan(sys: &Path) -> Vec<Device> {
    let mut out = Vec::new();
    let Ok(buses) = std::fs::read_dir(sys.join("bus")) else { return out };
    for bus in buses.filter_map(Result::ok) {
        let bus_name = bus.file_name().to_string_lossy().into_owned();
        let Ok(devices) = std::fs::read_dir(bus.path().join("devices")) else { continue };
        for dev in devices.filter_map(Result::ok) {
            let path = dev.path();
            let Some(modalias) = small(&path.join("modalias")) else { continue };
            if modalias.is_empty() {
                continue;
            }
            let class = small(&path.join("class"));
            let virtio = small(&path.join("device"));
            let driver = std::fs::read_link(path.join("driver"))
                .ok()
                .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()));
            out.push(Device {
                id: format!("{bus_name} {}", dev.file_name().to_string_lossy()),
                modalias,
                kind: kind_of(&bus_name, class.as_deref(), virtio.as_deref()),
                driver,
            });
        }
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    out
}

fn small(path: &Path) -> Option<String> {
    external::read(path, 4096, Links::Follow).ok().map(|b| String::from_utf8_lossy(&b).trim().to_owned())
}

/// The modules of `aliases` that `devices` ask for, not yet tried, in order.
pub fn wanted<'a>(devices: &[Device], aliases: &'a Aliases, tried: &BTreeSet<String>) -> Vec<&'a str> {
    let mut out: Vec<&str> = Vec::new();
    for dev in devices.iter().filter(|d| d.driver.is_none()) {
        for module in aliases.matching(&dev.modalias) {
            if !tried.contains(module) && !out.contains(&module) {
                out.push(module);
            }
        }
    }
    out
}

/// NICs and disk controllers no driver claimed, each with the kernel's driver the initramfs
/// lacks when `absent` knows one.
pub fn unclaimed(devices: &[Device], absent: &Aliases) -> Vec<UnclaimedDevice> {
    devices
        .iter()
        .filter(|d| d.driver.is_none() && d.kind != "other")
        .map(|d| UnclaimedDevice {
            device: d.id.clone(),
            modalias: d.modalias.clone(),
            kind: d.kind.to_owned(),
            missing_driver: absent.matching(&d.modalias).first().map(|m| (*m).to_owned()),
        })
        .collect()
}

/// Scans and loads until the hardware settles; `root` is `/` in the initramfs.
pub fn run(root: &Path, release: &str) -> HardwareRecord {
    let dir = root.join("lib/modules").join(release);
    let text = |name: &str| {
        external::read(&dir.join(name), MAX_INDEX, Links::Follow).map(|b| String::from_utf8_lossy(&b).into_owned())
    };
    let mut record = HardwareRecord::default();
    let index = match text("modules.dep").map(|t| ModuleIndex::parse(&t, "")) {
        Ok(Ok(index)) => index,
        Ok(Err(e)) => return with_error(record, format!("modules.dep: {e}")),
        Err(e) => return with_error(record, format!("{}: {e}", dir.join("modules.dep").display())),
    };
    let aliases = match text("modules.alias").map(|t| Aliases::parse(&t)) {
        Ok(Ok(a)) => a,
        Ok(Err(e)) => return with_error(record, format!("modules.alias: {e}")),
        Err(e) => return with_error(record, format!("{}: {e}", dir.join("modules.alias").display())),
    };
    let absent = text("modules.alias.absent").ok().and_then(|t| Aliases::parse(&t).ok()).unwrap_or_default();
    let sys = root.join("sys");
    let mut tried = BTreeSet::new();
    let mut settled = false;
    let mut devices = scan(&sys);
    for round in 1..=MAX_ROUNDS {
        let names: Vec<String> = wanted(&devices, &aliases, &tried).into_iter().map(str::to_owned).collect();
        if names.is_empty() {
            if settled {
                break;
            }
            settled = true;
            std::thread::sleep(SETTLE);
            devices = scan(&sys);
            continue;
        }
        settled = false;
        record.rounds = round as u32;
        tried.extend(names.iter().cloned());
        // Only names with a file here (a built-in driver has already bound).
        let with_file: Vec<&str> = names.iter().map(String::as_str).filter(|n| index.entry(n).is_some()).collect();
        if let Ok((order, _)) = index.closure(&with_file) {
            let paths: Vec<Vec<PathBuf>> =
                index.waves(&order).into_iter().map(|w| w.into_iter().map(|rel| dir.join(rel)).collect()).collect();
            let loaded = super::sys::load_waves(&paths);
            record.failed.extend(
                loaded
                    .failed
                    .into_iter()
                    .map(|(path, error)| ModuleFailure { module: ironroot_contract::kmod::module_name(&path), error }),
            );
        }
        record.drivers.extend(with_file.iter().map(|n| (*n).to_owned()));
        devices = scan(&sys);
    }
    record.unclaimed = unclaimed(&devices, &absent);
    record
}

fn with_error(mut record: HardwareRecord, error: String) -> HardwareRecord {
    record.failed.push(ModuleFailure { module: "(index)".to_owned(), error });
    record
}

#[cfg(test)]
#[path = "coldplug_tests.rs"]
mod tests;
