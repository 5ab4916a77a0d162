//! Tier 3, bare metal: the generic kernel's bundle booted in QEMU (TCG) on the emulated
//! physical hardware QEMU has: Intel 82574L (e1000e) and 82576 (igb) NICs, NVMe and AHCI
//! disks, UEFI firmware (OVMF) with the NIC's UEFI iPXE. The initramfs loads the drivers the
//! devices' modaliases ask for; the boot NIC is the one the firmware booted from.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests stop loudly on a failed setup step")]

use std::time::Duration;

use ironroot_tests::vm::{IdentityVia, VmLab, tail};

const BOOT: Duration = Duration::from_secs(900);
const GENERIC: &str = "target/kernel-generic";

fn running(view: &serde_json::Value) -> bool {
    view["state"] == "running" && view["phase"] == "ready" && view["heartbeats"].as_i64().unwrap_or(0) >= 1
}

fn sparse_disk(lab: &VmLab, name: &str) -> String {
    let path = lab.work.path().join(name);
    std::fs::File::create(&path).unwrap().set_len(2 << 30).unwrap();
    path.to_string_lossy().into_owned()
}

/// UEFI (OVMF) PXE: the e1000e NIC's UEFI iPXE loads boot.ipxe over TFTP, which passes BOOTIF
/// of that NIC. The first NIC (virtio, in the lower slot) gets DHCP too but reaches nothing:
/// only the NIC BOOTIF names reaches the plane. The store is on the NVMe disk.
#[test]
fn uefi_pxe_boots_the_generic_kernel_over_the_bootif_nic_e1000e_with_an_nvme_store() {
    let lab = VmLab::start_on(GENERIC, &[]);
    let node = "metal-uefi";
    let token = lab.token(node, "base", &lab.guest_reference);
    let disk = sparse_disk(&lab, "nvme.img");
    let doc: &[(&str, &str)] = &[("store", "disk:/dev/nvme0n1")];
    let hw = ["--uefi", "--nic", "virtio,isolated", "--nic", "e1000e,boot", "--disk", &disk, "--disk-bus", "nvme"];
    let mut vm = lab.boot_bundle(&lab.bundle, node, &token, (IdentityVia::FwCfg, doc), true, &hw);
    let view = lab.wait_for(&mut vm, node, BOOT, running);
    assert_eq!(view["store"], "disk+verity", "{view}");
    let console = vm.console();
    let says = |needle: &str| assert!(console.contains(needle), "no {needle:?} in:\n{}", tail(&console, 60));
    says("bootmethod=ipxe");
    says("BOOTIF=01-52-54-00-12-34-57");
    says("by EDK II"); // the kernel found UEFI firmware (OVMF) under it
    says("e1000e");
    says("nvme");
    // The choice and why: BOOTIF's NIC (e1000e, 52:54:00:12:34:57) though virtio's slot is lower.
    says("mac=52:54:00:12:34:57 driver=e1000e");
    says("because=BOOTIF=01-52-54-00-12-34-57 (the NIC the boot named)");
    says("switching root");
}

/// The plane's provider boots a machine with an igb NIC and a SATA disk behind AHCI (SeaBIOS,
/// direct boot): the drivers come from the devices' modaliases (igb; ahci, then sd_mod for the
/// disk it finds), the store is on /dev/sda.
#[test]
fn a_provisioned_node_with_igb_and_ahci_reaches_running_on_the_generic_kernel() {
    let lab = VmLab::start_on(GENERIC, &[]);
    let node = "metal-igb";
    let flags = ["--nic", "igb", "--disk", "2G", "--disk-bus", "ahci"];
    lab.provision_with(node, "base", &[&lab.guest_reference], &flags);
    let view = lab.wait_for_provisioned(node, BOOT, running);
    assert_eq!(view["store"], "disk+verity", "{view}");
    let console = lab.plane.op(&["node", "console", node]).ok();
    let says = |needle: &str| assert!(console.contains(needle), "no {needle:?} in:\n{}", tail(&console, 60));
    says("hardware drivers loaded by modalias");
    for driver in ["\"igb\"", "\"ahci\"", "\"sd_mod\""] {
        let line = console.lines().find(|l| l.contains("hardware drivers loaded by modalias")).unwrap_or("");
        assert!(line.contains(driver), "{driver} not loaded by modalias: {line}");
    }
    says("driver=igb");
    says("ironroot.store=disk:/dev/sda");
    says("console=tty0 console=ttyS0,115200");
}

/// An initramfs without e1000e (`--modules-from`): the node's e1000e NIC, the one BOOTIF names,
/// has no driver. The console names the device, its modalias and the missing driver; the node
/// enrolls over its virtio NIC and the plane hears the failed phase.
#[test]
fn a_nic_whose_driver_is_missing_fails_the_boot_naming_it_and_the_plane_hears_over_another_nic() {
    let lab = VmLab::start_on(GENERIC, &[]);
    let list = lab.work.path().join("drivers.list");
    std::fs::write(&list, "# no e1000e\nvirtio_pci\nvirtio_net\nvirtio_blk\nvirtio_rng\nqemu_fw_cfg\nigb\n").unwrap();
    let bundle = lab.variant("no-e1000e", &["--modules-from", &list.to_string_lossy()]);
    let node = "metal-nodriver";
    let token = lab.token(node, "base", &lab.guest_reference);
    let hw = ["--nic", "e1000e,isolated", "--nic", "virtio", "--append", "BOOTIF=01-52-54-00-12-34-56"];
    let mut vm = lab.boot_bundle(&bundle, node, &token, (IdentityVia::FwCfg, &[]), false, &hw);
    let view = lab.wait_for(&mut vm, node, BOOT, |v| v["phase"] == "failed:hardware");
    let error = view["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("pci:v00008086d000010D3"), "the modalias: {view}");
    assert!(error.contains("the kernel's e1000e is not in this initramfs"), "the driver: {view}");
    assert!(vm.wait_exit(Duration::from_secs(120)).is_some(), "VM still running:\n{}", vm.console_tail(20));
    let console = vm.console();
    let says = |needle: &str| assert!(console.contains(needle), "no {needle:?} in:\n{}", tail(&console, 60));
    says("has no driver: the kernel's e1000e is not in this initramfs (ironroot-build initramfs --modules-add e1000e)");
    says("names no NIC here");
    says("driver=virtio_net");
    says("BOOT FAILED in phase hardware");
    assert!(!console.contains("switching root"), "{}", tail(&console, 40));
}
