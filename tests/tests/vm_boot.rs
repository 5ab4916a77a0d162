//! Tier 3: the image `just image` built, booted in QEMU (TCG) against the real plane and a TLS
//! registry on the host loopback. Assertions read the plane's records, then the console.

use std::time::Duration;

use ironroot_tests::vm::{IdentityVia, VmLab};

const BOOT: Duration = Duration::from_secs(600);

fn running_with_heartbeats(view: &serde_json::Value) -> bool {
    view["state"] == "running" && view["phase"] == "ready" && view["heartbeats"].as_i64().unwrap_or(0) >= 2
}

#[test]
fn a_node_boots_direct_with_fw_cfg_identity_and_reaches_running() {
    let lab = VmLab::start();
    let token = lab.token("vm-direct", "base", &lab.guest_reference);
    let mut vm = lab.boot("vm-direct", &token, IdentityVia::FwCfg, false);
    let view = lab.wait_for(&mut vm, "vm-direct", BOOT, running_with_heartbeats);

    // The plane's records: the module it assigned, the store, the boot timings, the journal.
    assert_eq!(view["module_digests"], serde_json::json!([lab.digest]), "{view}");
    assert_eq!(view["store"], "zram+verity", "{view}");
    for phase in ["discover", "store", "enroll", "fetch", "verify", "mount"] {
        assert!(view["phase_timings_ms"][phase].is_u64(), "no {phase} timing: {view}");
    }
    let handshakes = lab.plane.journal("node.handshake");
    assert!(handshakes.iter().any(|r| r.to_string().contains(r#"\"phase\":\"ready\""#)), "{handshakes:?}");
    let console = vm.console();
    assert!(console.contains("identity discovered"), "console:\n{}", vm.console_tail(40));
    assert!(console.contains("switching root"), "console:\n{}", vm.console_tail(40));
}

#[test]
fn a_node_boots_over_pxe_with_smbios_identity_and_reaches_running() {
    let lab = VmLab::start();
    let token = lab.token("vm-pxe", "base", &lab.guest_reference);
    let mut vm = lab.boot("vm-pxe", &token, IdentityVia::Smbios, true);
    let view = lab.wait_for(&mut vm, "vm-pxe", BOOT, running_with_heartbeats);
    assert_eq!(view["module_digests"], serde_json::json!([lab.digest]), "{view}");
    let console = vm.console();
    // No -kernel was given; the command line is the one boot.ipxe (over TFTP) passed.
    assert!(console.contains("bootmethod=ipxe"), "not a PXE boot:\n{}", vm.console_tail(40));
    // Plane, token and name came from SMBIOS type 11; the CA from fw_cfg.
    assert!(console.contains("smbios_uuid: Some(\"5c3f1e0a-8d2b-4c1e-9f3a-0123456789ab\")"), "{}", vm.console_tail(40));
}

/// A refused boot: no root is mounted, the console says why, the plane records the phase.
fn refused(lab: &VmLab, node: &str, reference: &str, console_says: &str) {
    let token = lab.token(node, node, reference);
    let mut vm = lab.boot(node, &token, IdentityVia::FwCfg, false);
    let view = lab.wait_for(&mut vm, node, BOOT, |v| v["phase"] == "failed:verify");
    assert!(view["last_error"].as_str().is_some_and(|e| e.contains(console_says)), "{view}");
    // on_failure=reboot and -no-reboot: QEMU ends by itself.
    assert!(vm.wait_exit(Duration::from_secs(120)).is_some(), "VM still running:\n{}", vm.console_tail(20));
    let console = vm.console();
    assert!(console.contains("BOOT FAILED in phase verify"), "{}", vm.console_tail(40));
    assert!(console.contains(console_says), "{}", vm.console_tail(40));
    assert!(!console.contains("switching root"), "{}", vm.console_tail(40));
}

#[test]
fn a_module_signed_by_an_untrusted_key_is_refused() {
    let lab = VmLab::start();
    let image = ironroot_tests::vm::workspace().join("target/image/base");
    let (untrusted, _) = lab.publish(&image, "other-keys", "untrusted");
    refused(&lab, "vm-untrusted", &untrusted, "signature");
}

#[test]
fn a_module_whose_object_bytes_changed_after_signing_is_refused() {
    let lab = VmLab::start();
    let image = ironroot_tests::vm::workspace().join("target/image/base");
    let (reference, _) = lab.publish(&image, "keys", "changed");
    // Flip bytes in the middle of the first pack blob, behind the registry's back.
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(lab.registry.blob_file(reference.rsplit('@').next().unwrap())).unwrap())
            .unwrap();
    let pack = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["mediaType"].as_str().unwrap().contains("objects"))
        .unwrap();
    let path = lab.registry.blob_file(pack["digest"].as_str().unwrap());
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 64] {
        *b ^= 0xff;
    }
    std::fs::write(&path, bytes).unwrap();
    refused(&lab, "vm-changed", &reference, "digest");
}
